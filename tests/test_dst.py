"""Shared dynamic sparse training machinery (jaxsparse.dst): drop and grow, counts, update steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.selection import top_k_mask, top_k_masks_nested
from jaxsparse.dst import drop_and_grow, drop_count, dst_update_steps, update_fractions


def test_drop_and_grow_choices():
    mask = jnp.array([True, True, True, False, False, False, True, False])
    magnitude = jnp.array([0.5, 0.1, 0.1, 9.0, 0.0, 0.0, 0.7, 0.0])  # a tie at 0.1
    gradient = jnp.array([9.0, 5.0, 9.0, 1.0, 2.0, 2.0, 0.0, 0.5])  # dropped weights have big gradients
    choose = jax.jit(drop_and_grow, static_argnames="regrow_dropped")
    # Without regrowth of dropped weights: leaf 0 drops 2 of its 4: both tied 0.1s go. Leaf 1
    # (same data) drops 1: of the tied 0.1s the lowest index goes. Growth takes the best inactive
    # positions (the 2.0 tie: lowest index first), never an active or just-dropped one, however
    # large its gradient.
    new, kept, grown = choose([mask, mask], [magnitude, magnitude], [gradient, gradient], [2, 1], [2, 1], regrow_dropped=False)
    np.testing.assert_array_equal(kept[0], [True, False, False, False, False, False, True, False])
    np.testing.assert_array_equal(kept[1], [True, False, True, False, False, False, True, False])
    np.testing.assert_array_equal(grown[0], [False, False, False, False, True, True, False, False])
    np.testing.assert_array_equal(grown[1], [False, False, False, False, True, False, False, False])
    assert int(new[0].sum()) == int(new[1].sum()) == int(mask.sum())
    # RigL's rule (the default): growth chooses among everything not kept, so the dropped 0.1s,
    # whose gradients are the largest there, come straight back. Leaf 1 keeps the lowest index of
    # the tie and drops index 2, which regrows (gradient 9.0).
    new, kept, grown = choose([mask, mask], [magnitude, magnitude], [gradient, gradient], [2, 1], [2, 1])
    np.testing.assert_array_equal(kept[0], [True, False, False, False, False, False, True, False])
    np.testing.assert_array_equal(kept[1], [True, True, False, False, False, False, True, False])
    np.testing.assert_array_equal(grown[0], [False, True, True, False, False, False, False, False])
    np.testing.assert_array_equal(grown[1], [False, False, True, False, False, False, False, False])
    for m in new:
        np.testing.assert_array_equal(m, mask)


def test_drop_and_grow_ignores_nan_scores():
    # NaN scores count as 0: a NaN active weight is dropped first, a NaN position is grown last.
    mask = jnp.array([True, True, True, False, False])
    magnitude = jnp.array([jnp.nan, 0.5, 0.7, 0.0, 0.0])
    gradient = jnp.array([0.0, 0.0, 0.0, jnp.nan, 0.3])
    for regrow in (False, True):
        new, kept, grown = drop_and_grow([mask], [magnitude], [gradient], [1], [1], regrow_dropped=regrow)
        np.testing.assert_array_equal(kept[0], [False, True, True, False, False])
        np.testing.assert_array_equal(grown[0], [False, False, False, False, True])


def test_nested_selection_equals_separate_selections():
    # jaxsparse.selection.top_k_masks_nested, the search behind drop_and_grow.
    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 5, size=(7, 9)).astype(np.float32), [0, 5, 17, 63]),  # many ties, k = 0 and N
        (rng.normal(size=(33,)).astype(np.float32), [1, 32, 9]),  # 1-D, an odd number of ks
    ]
    single = jax.jit(top_k_mask)
    for scores, ks in cases:
        nested = jax.jit(top_k_masks_nested)(jnp.asarray(scores), ks)
        for k, mask in zip(ks, nested):
            np.testing.assert_array_equal(mask, single(jnp.asarray(scores), k))
            assert int(mask.sum()) == min(k, scores.size)


def test_drop_count_and_update_steps():
    assert int(drop_count(10, 100, 0.35)) == 3
    np.testing.assert_allclose(update_fractions(0.5, 2, 8), [0.5, 0.25 * (1 + math.cos(math.pi / 4)), 0.25, 0.25 * (1 - math.cos(math.pi / 4)), 0.0])
    assert list(update_fractions(0.3, 5, None)) == [0.3]
    # Explicit annealing: constant until end_step, any step -> fraction schedule, errors.
    np.testing.assert_allclose(update_fractions(0.3, 5, 20, "constant"), [0.3, 0.3, 0.3, 0.3, 0.0])
    np.testing.assert_allclose(update_fractions(lambda t: 0.01 * t, 5, 20), [0.0, 0.05, 0.1, 0.15, 0.0])
    with pytest.raises(ValueError, match="'cosine' needs end_step"):
        update_fractions(0.3, 5, None, "cosine")
    with pytest.raises(ValueError, match="schedule needs end_step"):
        update_fractions(lambda t: 0.1, 5, None)
    with pytest.raises(ValueError, match=r"schedule gives the fraction 1.5 at step 0; fractions must be in \[0, 1\]"):
        update_fractions(lambda t: 1.5, 5, 20)
    with pytest.raises(ValueError, match="drop_fraction_anneal must be one of"):
        update_fractions(0.3, 5, 20, "linear")
    assert int(drop_count(90, 100, 0.5, regrow_dropped=False)) == 10  # at most the inactive positions
    assert int(drop_count(90, 100, 0.5)) == 45  # dropped weights may be regrown: no cap
    assert int(drop_count(10, 100, 0.0)) == 0
    is_update = dst_update_steps(5, 20)
    assert [t for t in range(30) if bool(is_update(jnp.int32(t)))] == [5, 10, 15]
    assert [t for t in range(12) if bool(dst_update_steps(4, None)(jnp.int32(t)))] == [4, 8]

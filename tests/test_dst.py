"""SET and RigL (jaxsparse.dst): exact counts, the cosine schedule, fresh grown weights, seeds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.selection import top_k_mask, top_k_masks_nested
from jaxsparse.dst import drop_and_grow, drop_count, dst_update_steps, update_fractions
from dst_testing import make_step, params_shaped_leaves, run

KERNELS = ("Dense_0/kernel", "Dense_1/kernel")


def expected_drop(fraction: float, keep: int, size: int) -> int:
    d = math.floor(fraction * keep)
    return min(d, size - keep)


@pytest.mark.compat
def test_rigl_counts_cosine_schedule_and_end_step():
    end_step, every, f0 = 9, 2, 0.5
    tx = js.rigl(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=every, end_step=end_step, drop_fraction=f0)
    records = run(tx, steps=12)
    keep = {name: 192 - math.floor(0.75 * 192) if name == "Dense_0/kernel" else 48 - math.floor(0.75 * 48) for name in KERNELS}
    changed_any = False
    for t in range(12):  # record t + 1 is after the update call at step t
        before, after = records[t], records[t + 1]
        for name in KERNELS:
            m0, m1 = before.masks[name], after.masks[name]
            assert m1.sum() == keep[name], f"{name} count changed at step {t}"
            f = f0 / 2 * (1 + math.cos(math.pi * t / end_step))
            d = expected_drop(f, keep[name], m1.size) if (t > 0 and t % every == 0 and t < end_step) else 0
            assert (m0 ^ m1).sum() == 2 * d, f"{name}: step {t} changed {(m0 ^ m1).sum()} positions, expected {2 * d}"
            assert (m0 & ~m1).sum() == d  # d dropped, d grown
            changed_any |= d > 0
            assert np.all(after.params[name][~m1] == 0)
    assert changed_any


@pytest.mark.parametrize(
    "inner",
    [
        optax.adam(1e-2),
        optax.sgd(1e-2, momentum=0.9),
        optax.lion(1e-3),
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    ],
    ids=["adam", "sgd_momentum", "lion", "inject_hyperparams_adam"],
)
def test_grown_weights_and_their_moments_start_at_zero(inner):
    tx = js.rigl(inner, sparsity=js.uniform(0.75), update_every=2, end_step=20, drop_fraction=0.5)
    records = run(tx, steps=4)  # the update runs at step 2 (record 3)
    before, after, later = records[2], records[3], records[4]
    grew = 0
    for name in KERNELS:
        grown = after.masks[name] & ~before.masks[name]
        dropped = before.masks[name] & ~after.masks[name]
        grew += grown.sum()
        assert np.all(after.params[name][grown] == 0), f"{name}: grown weights are not 0"
        assert np.all(after.params[name][dropped] == 0)
        moments = params_shaped_leaves(after.state.inner_state, name, grown.shape)
        assert moments, "no params-shaped leaf found in the inner state"
        for m in moments:
            assert np.all(m[grown] == 0), f"{name}: moments of grown weights are not 0"
            assert np.all(m[dropped] == 0)
    assert grew > 0
    # From the next step on, grown weights train like the others.
    name = "Dense_0/kernel"
    grown = after.masks[name] & ~before.masks[name]
    assert np.any(later.params[name][grown] != 0)


def test_set_constant_drop_fraction_forever_and_random_growth():
    tx = js.set_sparse(optax.sgd(1e-2), sparsity=js.uniform(0.75), update_every=3, drop_fraction=0.25, seed=3)
    step = make_step(tx)
    records = run(tx, steps=10, step=step)
    keep = 48
    for t in (3, 6, 9):
        m0, m1 = records[t].masks["Dense_0/kernel"], records[t + 1].masks["Dense_0/kernel"]
        assert m1.sum() == keep
        assert (m0 ^ m1).sum() == 2 * math.floor(0.25 * keep)
    # Growth is random: from the same masks and weights with another key, the same weights are
    # dropped (by magnitude) but others are grown.
    other = run(tx, steps=4, step=step, state=records[0].state._replace(key=jax.random.PRNGKey(4)))
    m0, a, b = records[3].masks["Dense_0/kernel"], records[4].masks["Dense_0/kernel"], other[4].masks["Dense_0/kernel"]
    np.testing.assert_array_equal(m0 & ~a, m0 & ~b)
    assert not np.array_equal(a & ~m0, b & ~m0)


@pytest.mark.compat
def test_same_seed_bit_identical_runs():
    tx = js.rigl(optax.adam(1e-2), sparsity=0.75, update_every=2, end_step=8, seed=7)
    step = make_step(tx)
    first, second = run(tx, steps=7, step=step), run(tx, steps=7, step=step)
    for a, b in zip(first, second):
        for name in a.params:
            assert np.array_equal(a.params[name], b.params[name])
        for name in a.masks:
            assert np.array_equal(a.masks[name], b.masks[name])


def test_drop_and_grow_choices():
    mask = jnp.array([True, True, True, False, False, False, True, False])
    magnitude = jnp.array([0.5, 0.1, 0.1, 9.0, 0.0, 0.0, 0.7, 0.0])  # a tie at 0.1
    gradient = jnp.array([9.0, 5.0, 9.0, 1.0, 2.0, 2.0, 0.0, 0.5])  # dropped weights have big gradients
    choose = jax.jit(drop_and_grow)
    # Leaf 0 drops 2 of its 4: both tied 0.1s go. Leaf 1 (same data) drops 1: of the tied 0.1s
    # the lowest index goes. Growth takes the best inactive positions (the 2.0 tie: lowest index
    # first), never an active or just-dropped one, however large its gradient.
    new, kept, grown = choose([mask, mask], [magnitude, magnitude], [gradient, gradient], [2, 1], [2, 1])
    np.testing.assert_array_equal(kept[0], [True, False, False, False, False, False, True, False])
    np.testing.assert_array_equal(kept[1], [True, False, True, False, False, False, True, False])
    np.testing.assert_array_equal(grown[0], [False, False, False, False, True, True, False, False])
    np.testing.assert_array_equal(grown[1], [False, False, False, False, True, False, False, False])
    assert int(new[0].sum()) == int(new[1].sum()) == int(mask.sum())


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
    assert int(drop_count(90, 100, 0.5)) == 10  # at most the inactive positions
    assert int(drop_count(10, 100, 0.0)) == 0
    is_update = dst_update_steps(5, 20)
    assert [t for t in range(30) if bool(is_update(jnp.int32(t)))] == [5, 10, 15]
    assert [t for t in range(12) if bool(dst_update_steps(4, None)(jnp.int32(t)))] == [4, 8]


def test_float_sparsity_uses_the_papers_distribution():
    params = {"a": jnp.ones((64, 64)), "b": jnp.ones((64, 4))}
    state = jax.jit(js.rigl(optax.sgd(0.1), sparsity=0.9, end_step=10).init)(params)
    targets = js.erk(0.9)(params)
    for name in ("a", "b"):
        size = params[name].size
        assert int(state.masks[name].sum()) == size - math.floor(targets[name] * size)
    assert targets["b"] < 0.9 < targets["a"]  # ERK differs from uniform here


def test_bad_arguments():
    inner = optax.sgd(0.1)
    with pytest.raises(ValueError, match="end_step"):
        js.rigl(inner, sparsity=0.9, end_step=None)
    with pytest.raises(ValueError, match="drop_fraction"):
        js.rigl(inner, sparsity=0.9, end_step=10, drop_fraction=1.5)
    with pytest.raises(ValueError, match="drop_fraction"):
        js.set_sparse(inner, sparsity=0.9, drop_fraction=-0.1)
    with pytest.raises(ValueError, match="update_every"):
        js.set_sparse(inner, sparsity=0.9, update_every=0)
    with pytest.raises(ValueError, match="end_step"):
        js.rigl(inner, sparsity=0.9, end_step=0)
    with pytest.raises(ValueError, match="sparsity"):
        js.rigl(inner, sparsity=1.0, end_step=10)

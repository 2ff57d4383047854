"""SNFS / sparse momentum (jaxsparse.snfs): redistribution by momentum, exact total budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.snfs import allocate
from dst_testing import run


def test_allocate_is_exact_proportional_and_capped():
    alloc = jax.jit(allocate)
    np.testing.assert_array_equal(alloc(10, jnp.array([1.0, 1.0]), jnp.array([100, 100])), [5, 5])
    np.testing.assert_array_equal(alloc(12, jnp.array([3.0, 1.0]), jnp.array([100, 100])), [9, 3])
    # A capped share gives its excess to the others.
    np.testing.assert_array_equal(alloc(12, jnp.array([3.0, 1.0]), jnp.array([4, 100])), [4, 8])
    # Rounding remainders are handed out, never lost; all-zero weights still place everything.
    for total, weights, caps in [
        (7, [1.0, 1.0, 1.0], [5, 5, 5]),
        (9, [0.0, 0.0, 0.0], [2, 3, 4]),
        (1000, [0.2, 5.0, 1e-6, 3.3], [10, 400, 900, 300]),
    ]:
        out = np.asarray(alloc(total, jnp.array(weights), jnp.array(caps)))
        assert out.sum() == total and np.all(out <= caps) and np.all(out >= 0), out



def test_allocate_totals_beyond_int32():
    # The drops of a model with billions of weights: the total exceeds 2**31, each share fits.
    from jaxsparse import counts

    caps = jnp.full((4,), 2**31 - 1, jnp.int32)
    for total, weights in [
        (3 * 2**31 + 7, [1.0, 2.0, 3.0, 4.0]),  # the largest share is capped, its excess re-split
        (2**31 + 1, [1.0, 1.0, 1.0, 1.0]),
        (4 * (2**31 - 1), [0.0, 0.0, 5.0, 0.0]),  # every share full
        (2**33, [1.0, 1.0, 1.0, 1.0]),  # more than all caps: each share its cap
    ]:
        out = np.asarray(jax.jit(lambda w, c: allocate(total, w, c))(jnp.array(weights), caps)).astype(np.int64)
        assert out.sum() == min(total, 4 * (2**31 - 1)) and np.all(out >= 0) and np.all(out <= 2**31 - 1), (total, out)
    alloc = jax.jit(allocate)
    out = np.asarray(alloc(counts.count(3 * 2**31 + 7), jnp.array([1.0, 2.0, 3.0, 4.0]), caps)).astype(np.int64)
    assert out[3] == 2**31 - 1 and out[0] < out[1] < out[2]
    # The total can come straight from the int32 drops of the leaves.
    drops = jnp.full((3,), 2**31 - 1, jnp.int32)
    out = np.asarray(alloc(counts.sum(drops), jnp.array([1.0, 1.0, 1.0]), jnp.full((3,), 2**31 - 1, jnp.int32)))
    assert out.astype(np.int64).sum() == 3 * (2**31 - 1)


def linear_loss(params, x, y):
    # Constant gradients: 100x larger on "a" than on "b".
    del y
    return 100.0 * jnp.sum(params["a"] * x[0]) + jnp.sum(params["b"] * x[1])


@pytest.mark.compat
def test_regrowth_follows_momentum_total_exact():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"a": jax.random.normal(k1, (8, 8)), "b": jax.random.normal(k2, (8, 8))}
    coefficients = jnp.stack([jax.random.normal(k3, (8, 8)), jax.random.normal(k4, (8, 8))])
    tx = js.snfs(optax.sgd(1e-3), sparsity=0.75, update_every=2, end_step=100, drop_fraction=0.5, momentum=0.9)
    records = run(tx, steps=3, params=params, loss=linear_loss, batches=lambda t: (coefficients, None))
    before, after = records[2], records[3]  # the update at step 2
    assert before.masks["a"].sum() == before.masks["b"].sum() == 16
    # f(2) = 0.25 (1 + cos(pi / 50)) ~ 0.4995: each leaf drops floor(f * 16) = 7 of its 16; all 14
    # regrow in "a", whose mean momentum is ~100x larger.
    assert after.masks["a"].sum() == 16 - 7 + 14
    assert after.masks["b"].sum() == 16 - 7
    assert after.masks["a"].sum() + after.masks["b"].sum() == 32
    # The momentum is an EMA of the dense gradients, in the sparsifier's own state.
    ema = after.state.aux
    np.testing.assert_allclose(ema[0], (1 - 0.9**3) * 100.0 * coefficients[0], rtol=1e-5)
    np.testing.assert_allclose(ema[1], (1 - 0.9**3) * coefficients[1], rtol=1e-5)
    # Growth picks the inactive positions with the largest momentum.
    grown = after.masks["a"] & ~before.masks["a"]
    inactive = ~before.masks["a"]
    speed = np.abs(np.asarray(coefficients[0]))
    assert speed[grown].min() >= speed[inactive & ~grown].max()
    for name in ("a", "b"):
        assert np.all(after.params[name][~after.masks[name]] == 0)
        assert np.all(after.params[name][after.masks[name] & ~before.masks[name]] == 0)


def test_total_constant_and_no_change_after_end_step():
    tx = js.snfs(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=7)
    records = run(tx, steps=10)
    total = sum(m.sum() for m in records[0].masks.values())
    for t, r in enumerate(records):
        assert sum(m.sum() for m in r.masks.values()) == total
        if t >= 8:  # record t is after step t - 1; no update from step 7 on
            for name in r.masks:
                np.testing.assert_array_equal(r.masks[name], records[7].masks[name])


def test_bad_arguments():
    with pytest.raises(ValueError, match="end_step"):
        js.snfs(optax.sgd(0.1), sparsity=0.9, end_step=None)
    with pytest.raises(ValueError, match="momentum"):
        js.snfs(optax.sgd(0.1), sparsity=0.9, end_step=10, momentum=1.0)
    with pytest.raises(ValueError, match="drop_fraction"):
        js.snfs(optax.sgd(0.1), sparsity=0.9, end_step=10, drop_fraction=2.0)


def test_prune_counts_are_not_capped_and_pruned_weights_can_regrow():
    # Sparse momentum's reference code prunes floor(f * n) weights of each leaf even where that is
    # more than the leaf's zeros, and regrows among all positions not kept. Here all momentum is
    # on "a": at the update (f ~ 0.4995) each leaf prunes 23 of its 48 weights (more than its 16
    # zeros); "a" regrows into all of its 39 free positions (its 23 just-pruned ones included),
    # and the rest of the total 46 goes back to "b".
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"a": jax.random.normal(k1, (8, 8)), "b": jax.random.normal(k2, (8, 8))}
    coefficients = jnp.stack([jax.random.normal(k3, (8, 8)), jnp.zeros((8, 8))])
    for regrow, expected in ((True, (64, 32)), (False, (48, 48))):
        tx = js.snfs(optax.sgd(1e-3), sparsity=0.25, update_every=2, end_step=100, drop_fraction=0.5, regrow_dropped=regrow)
        records = run(tx, steps=3, params=params, loss=linear_loss, batches=lambda t: (coefficients, None))
        before, after = records[2], records[3]
        assert (before.masks["a"].sum(), before.masks["b"].sum()) == (48, 48)
        assert (after.masks["a"].sum(), after.masks["b"].sum()) == expected, regrow
        if regrow:  # the weights "a" pruned came back with their values
            assert np.all(after.params["a"][before.masks["a"]] != 0)

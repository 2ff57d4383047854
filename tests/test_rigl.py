"""SET and RigL (jaxsparse.rigl): exact counts, the cosine schedule, regrowth, fresh grown weights, seeds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from dst_testing import make_step, params_shaped_leaves, run

KERNELS = ("Dense_0/kernel", "Dense_1/kernel")


def expected_drop(fraction: float, keep: int, size: int, regrow_dropped: bool) -> int:
    d = math.floor(fraction * keep)
    return d if regrow_dropped else min(d, size - keep)


@pytest.mark.compat
@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_rigl_counts_cosine_schedule_and_end_step(regrow_dropped):
    end_step, every, f0 = 9, 2, 0.5
    tx = js.rigl(
        optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=every, end_step=end_step, drop_fraction=f0,
        regrow_dropped=regrow_dropped,
    )
    records = run(tx, steps=12)
    keep = {name: 192 - math.floor(0.75 * 192) if name == "Dense_0/kernel" else 48 - math.floor(0.75 * 48) for name in KERNELS}
    changed_any = False
    for t in range(12):  # record t + 1 is after the update call at step t
        before, after = records[t], records[t + 1]
        for name in KERNELS:
            m0, m1 = before.masks[name], after.masks[name]
            assert m1.sum() == keep[name], f"{name} count changed at step {t}"
            f = f0 / 2 * (1 + math.cos(math.pi * t / end_step))
            d = expected_drop(f, keep[name], m1.size, regrow_dropped) if (t > 0 and t % every == 0 and t < end_step) else 0
            if regrow_dropped:  # d dropped and d grown, some of them the same positions
                assert (m0 & ~m1).sum() <= d and (m0 ^ m1).sum() <= 2 * d
            else:
                assert (m0 ^ m1).sum() == 2 * d, f"{name}: step {t} changed {(m0 ^ m1).sum()} positions, expected {2 * d}"
                assert (m0 & ~m1).sum() == d  # d dropped, d grown
            changed_any |= bool((m0 ^ m1).any())
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
    tx = js.set_sparse(optax.sgd(1e-2), sparsity=js.uniform(0.75), update_every=3, drop_fraction=0.25, seed=3, regrow_dropped=False)
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


@pytest.mark.parametrize("regrow_dropped", [True, False])
def test_a_dropped_weight_regrows_with_its_value_as_in_rigl(regrow_dropped):
    # Gradients are large exactly on the smallest active weights, 0 elsewhere: RigL (Algorithm 1)
    # drops those weights and grows them straight back, keeping their values and moments.
    w = jax.random.normal(jax.random.PRNGKey(0), (8, 8))
    tx = js.rigl(optax.adam(1e-3), sparsity=js.uniform(0.5), update_every=1, end_step=100, drop_fraction=0.5,
                 drop_fraction_anneal="constant",
                 regrow_dropped=regrow_dropped)
    params, state = js.init(tx, {"w": w})
    mask0 = np.asarray(state.masks["w"])
    pull = jnp.where(mask0, 1.0 / jnp.abs(w), 0.0)
    loss = lambda p, x, y: jnp.sum(pull * p["w"])
    records = run(tx, steps=2, params=params, loss=loss, state=state)
    before, after = records[1], records[2]  # the update at step 1
    m0, m1 = before.masks["w"], after.masks["w"]
    active_w = np.abs(before.params["w"])[m0]
    dropped_by_magnitude = m0 & (np.abs(before.params["w"]) < np.sort(active_w)[math.floor(0.5 * 32)])
    assert dropped_by_magnitude.sum() == 16
    if regrow_dropped:
        np.testing.assert_array_equal(m1, m0)  # every dropped weight came back
        assert np.all(after.params["w"][dropped_by_magnitude] != 0)  # with its value, still training
        for moment in params_shaped_leaves(after.state.inner_state, "w", (8, 8)):
            assert np.all(moment[dropped_by_magnitude] != 0)
    else:
        assert not np.any(m1 & dropped_by_magnitude)
        assert np.all(after.params["w"][dropped_by_magnitude] == 0)
        assert (m0 ^ m1).sum() == 32


def test_set_end_step_keeps_the_fraction_constant_unless_annealed():
    kw = dict(sparsity=js.uniform(0.75), update_every=2, end_step=7, drop_fraction=0.5, regrow_dropped=False)
    for anneal, fraction_at_4 in (("constant", 0.5), ("cosine", 0.25 * (1 + math.cos(math.pi * 4 / 7)))):
        records = run(js.set_sparse(optax.sgd(1e-2), drop_fraction_anneal=anneal, **kw), steps=8)
        m0, m1 = records[4].masks["Dense_0/kernel"], records[5].masks["Dense_0/kernel"]
        assert (m0 ^ m1).sum() == 2 * math.floor(fraction_at_4 * 48), anneal
        for t in (7, 8):  # no update from end_step on
            np.testing.assert_array_equal(records[t].masks["Dense_0/kernel"], records[7].masks["Dense_0/kernel"])


def test_drop_fraction_from_an_optax_schedule():
    schedule = optax.linear_schedule(0.5, 0.0, transition_steps=8)
    tx = js.rigl(optax.sgd(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=8, drop_fraction=schedule,
                 regrow_dropped=False)
    records = run(tx, steps=7)
    for t in (2, 4, 6):
        m0, m1 = records[t].masks["Dense_0/kernel"], records[t + 1].masks["Dense_0/kernel"]
        assert (m0 ^ m1).sum() == 2 * math.floor(float(schedule(t)) * 48), t

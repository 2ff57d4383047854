"""SRigL (jaxsparse.srigl): constant fan-in per neuron, neuron ablation, per-neuron selection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.srigl import fan_in_counts, neuron_top_k
from dst_testing import run


def test_neuron_top_k_matches_a_stable_sort():
    rng = np.random.default_rng(0)
    select = jax.jit(neuron_top_k)
    for trial in range(6):
        scores = rng.integers(-3, 4, size=(9, 5)).astype(np.float32)  # many ties
        if trial % 2:
            scores = rng.normal(size=(9, 5)).astype(np.float32)
            scores[0, 0] = -np.inf
        ks = rng.integers(0, 10, size=5)
        got = np.asarray(select(jnp.asarray(scores), jnp.asarray(ks)))
        for j in range(5):
            order = sorted(range(9), key=lambda i: (-scores[i, j], i))[: ks[j]]
            expected = np.zeros(9, bool)
            expected[order] = True
            np.testing.assert_array_equal(got[:, j], expected)


@pytest.mark.compat
@pytest.mark.parametrize("output_axis", [-1, 0])
def test_constant_fan_in_across_updates(output_axis):
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (12, 16) if output_axis == -1 else (16, 12))}

    def loss(params, x, y):
        w = params["w"] if output_axis == -1 else params["w"].T
        return jnp.mean((jnp.tanh(x @ w) - y) ** 2)

    def batches(t):
        x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), t), (8, 12))
        return x, jnp.sin(x[:, :1] * jnp.arange(16))

    tx = js.srigl(optax.adam(1e-2), sparsity=js.uniform(0.7), update_every=2, end_step=9, gamma_sal=0.0, output_axis=output_axis)
    records = run(tx, steps=10, params=params, loss=loss, batches=batches)
    k0 = (192 - int(0.7 * 192)) // 16  # 58 // 16 = 3 per neuron
    changed = 0
    for before, after in zip(records, records[1:]):
        counts = np.asarray(fan_in_counts(after.masks["w"], output_axis))
        np.testing.assert_array_equal(counts, k0)
        assert np.all(after.params["w"][~after.masks["w"]] == 0)
        changed += (before.masks["w"] ^ after.masks["w"]).sum()
    assert changed > 0


def test_neuron_ablation_raises_fan_in_of_the_others():
    # Neuron 3 has tiny weights and no gradient: it is dropped and not salient, so it is ablated.
    w = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
    params = {"w": w.at[:, 3].multiply(1e-6)}

    def loss(params, x, y):
        return jnp.sum((x @ params["w"])[:, :3] * y)

    def batches(t):
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(2), t))
        return jax.random.normal(keys[0], (8, 16)), jax.random.normal(keys[1], (8, 3))

    tx = js.srigl(optax.sgd(1e-3), sparsity=js.uniform(0.75), update_every=2, end_step=100, drop_fraction=0.5, gamma_sal=0.3)
    records = run(tx, steps=3, params=params, loss=loss, batches=batches)
    np.testing.assert_array_equal(fan_in_counts(records[2].masks["w"]), [4, 4, 4, 4])
    after = records[3]
    np.testing.assert_array_equal(fan_in_counts(after.masks["w"]), [5, 5, 5, 0])  # 16 // 3 active neurons
    assert np.all(after.params["w"][:, 3] == 0)


def test_bad_arguments():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    with pytest.raises(ValueError, match="input and an output axis"):
        js.srigl(optax.sgd(0.1), sparsity=0.5, end_step=10, include="b").init(params)
    with pytest.raises(ValueError, match="output_axis"):
        js.srigl(optax.sgd(0.1), sparsity=0.5, end_step=10, output_axis=2).init(params)
    with pytest.raises(ValueError, match="gamma_sal"):
        js.srigl(optax.sgd(0.1), sparsity=0.5, end_step=10, gamma_sal=1.5)
    with pytest.raises(ValueError, match="end_step"):
        js.srigl(optax.sgd(0.1), sparsity=0.5, end_step=None)


def test_never_exceeds_the_budget_at_high_sparsity():
    # A (16, 64) leaf at 99% has a budget of 11 weights for 64 neurons: 11 neurons get one weight
    # each (the others ablated) instead of one weight for every neuron (64).
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 64))}

    def loss(params, x, y):
        return jnp.mean((jnp.tanh(x @ params["w"]) - y) ** 2)

    def batches(t):
        x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), t), (8, 16))
        return x, jnp.sin(x[:, :1] * jnp.arange(64))

    budget = 16 * 64 - int(0.99 * 16 * 64)
    tx = js.srigl(optax.adam(1e-2), sparsity=js.uniform(0.99), update_every=2, end_step=9, gamma_sal=0.0)
    records = run(tx, steps=8, params=params, loss=loss, batches=batches)
    assert budget == 11 and records[0].masks["w"].sum() == 11
    np.testing.assert_array_equal(np.sort(fan_in_counts(records[0].masks["w"]))[-11:], 1)
    for r in records:
        assert r.masks["w"].sum() <= budget
        counts = np.asarray(fan_in_counts(r.masks["w"]))
        assert len(set(counts[counts > 0])) == 1  # constant fan-in on the active neurons

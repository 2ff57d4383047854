"""Every transformation in conformance.FACTORIES passes these checks.

Each test compiles one training step, so checks that can share a run do (compilation dominates
the suite's time on CPU).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from conformance import FACTORIES, SHADOW_WEIGHTS, assert_params_sparse, batch, mlp_loss, mlp_params, train

NAMES = sorted(FACTORIES)


@pytest.mark.compat
@pytest.mark.parametrize("name", NAMES)
def test_standard_loop(name):
    """jit, one compiled step reused, params exactly sparse after every step, adam moments zero
    where pruned, masks shaped like params (bool on sparsified leaves, None elsewhere)."""
    tx = FACTORIES[name](optax.adam(1e-2))
    params = mlp_params()
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, x, y):
        traces.append(1)
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(7):
        params, state = step(params, state, *batch(t))
        masks = js.get_masks(state)
        assert_params_sparse(params, masks)
        if name not in SHADOW_WEIGHTS:
            adam = state.inner_state[0]
            assert_params_sparse(adam.mu, masks)
            assert_params_sparse(adam.nu, masks)
    assert len(traces) == 1, "the step was retraced"
    assert int(state.step) == 7
    assert masks["Dense_0"]["bias"] is None and masks["Dense_1"]["bias"] is None
    for layer in ("Dense_0", "Dense_1"):
        m = masks[layer]["kernel"]
        assert m.dtype == jnp.bool_ and m.shape == params[layer]["kernel"].shape
        assert 0 < int(m.sum()) < m.size


@pytest.mark.parametrize("name", NAMES)
def test_chain_and_inject_hyperparams(name):
    """A chain as the inner transformation (clipping sees the masked gradients), wrapping
    inject_hyperparams(sgd), wrapped by inject_hyperparams: the composition to copy."""

    def make(learning_rate):
        inner = optax.chain(
            optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=0.9)
        )
        return FACTORIES[name](inner)

    tx = optax.inject_hyperparams(make)(learning_rate=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no leak warning: the composition keeps params sparse
        params, state, _ = train(tx)
        jax.effects_barrier()
    assert_params_sparse(params, js.get_masks(state))
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name):
    tx = optax.MultiSteps(FACTORIES[name](optax.adam(1e-2)), every_k_schedule=2)
    params, state, _ = train(tx, steps=8)
    assert_params_sparse(params, js.get_masks(state))
    assert int(state.inner_opt_state.step) == 4  # the sparsifier saw 4 averaged gradients


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_params(name):
    params, state, _ = train(FACTORIES[name](optax.adam(1e-2)), dtype=jnp.bfloat16, steps=5)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    masks = js.get_masks(state)
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(masks))
    assert_params_sparse(params, masks)

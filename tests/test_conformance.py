"""Every transformation in conformance.FACTORIES: jit, chain, inject_hyperparams, MultiSteps, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from conformance import FACTORIES, assert_params_sparse, batch, mlp_loss, mlp_params, train

NAMES = sorted(FACTORIES)


@pytest.mark.compat
@pytest.mark.parametrize("name", NAMES)
def test_jit_params_exactly_sparse_every_step_and_no_retrace(name):
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
        assert_params_sparse(params, js.get_masks(state))
    assert len(traces) == 1, "the step was retraced"
    assert int(state.step) == 7


@pytest.mark.parametrize("name", NAMES)
def test_inner_moments_zero_where_pruned(name):
    _, state, _ = train(FACTORIES[name](optax.adam(1e-2)), steps=6)
    masks = js.get_masks(state)
    adam_state = state.inner_state[0]
    for moments in (adam_state.mu, adam_state.nu):
        assert_params_sparse(moments, masks)


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain(name):
    tx = optax.chain(optax.clip_by_global_norm(1.0), FACTORIES[name](optax.sgd(1e-2, momentum=0.9)))
    params, state, _ = train(tx)
    assert_params_sparse(params, js.get_masks(state))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_inside_and_outside(name):
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    params, state, _ = train(FACTORIES[name](inner))
    assert_params_sparse(params, js.get_masks(state))

    outer = optax.inject_hyperparams(lambda learning_rate: FACTORIES[name](optax.adam(learning_rate)))(learning_rate=1e-2)
    params, state, _ = train(outer)
    assert_params_sparse(params, js.get_masks(state))
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name):
    tx = optax.MultiSteps(FACTORIES[name](optax.adam(1e-2)), every_k_schedule=2)
    params, state, _ = train(tx, steps=8)
    assert_params_sparse(params, js.get_masks(state))
    assert int(state.inner_opt_state.step) == 4  # the sparsifier saw 4 averaged gradients


@pytest.mark.parametrize("name", NAMES)
def test_dtype_preserved(name):
    tx = FACTORIES[name](optax.adam(1e-2))
    params, state, _ = train(tx, dtype=jnp.bfloat16, steps=5)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    masks = js.get_masks(state)
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(masks))
    assert_params_sparse(params, masks)


@pytest.mark.parametrize("name", NAMES)
def test_masks_structure_matches_params(name):
    params = mlp_params()
    state = FACTORIES[name](optax.adam(1e-2)).init(params)
    masks = js.get_masks(state)
    assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(
        jax.tree.map(lambda p: None if p.ndim < 2 else p, params), is_leaf=lambda x: x is None
    )
    for m, p in [(masks["Dense_0"]["kernel"], params["Dense_0"]["kernel"])]:
        assert m.shape == p.shape and m.dtype == jnp.bool_
    assert masks["Dense_0"]["bias"] is None

"""The core transformation: get_masks in every nesting, errors, moment resets, nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse as js
from conformance import assert_params_sparse, batch, mlp_loss, mlp_params, train
from jaxsparse.core import reset_inner_state


def pruner(inner, **kw):
    return js.magnitude_pruning(inner, sparsity=0.5, **kw)


@pytest.mark.compat
def test_get_masks_in_every_nesting():
    params = mlp_params()
    expected = js.get_masks(pruner(optax.sgd(0.1)).init(params))
    nestings = {
        "chain": optax.chain(optax.clip(1.0), pruner(optax.sgd(0.1))),
        "inject_hyperparams": optax.inject_hyperparams(lambda lr: pruner(optax.sgd(lr)))(lr=0.1),
        "MultiSteps": optax.MultiSteps(pruner(optax.sgd(0.1)), every_k_schedule=3),
        "multi_transform": optax.multi_transform(
            {"sparse": pruner(optax.sgd(0.1)), "dense": optax.sgd(0.1)},
            {"Dense_0": "sparse", "Dense_1": "dense"},
        ),
    }
    for name, tx in nestings.items():
        masks = js.get_masks(tx.init(params))
        assert masks["Dense_0"]["kernel"].shape == (12, 16), name
        if name != "multi_transform":
            assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(
                expected, is_leaf=lambda x: x is None
            ), name
    with pytest.raises(ValueError, match="no jaxsparse sparsifier"):
        js.get_masks(optax.adam(0.1).init(params))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(12, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_optimizer():
    model = NnxMLP(nnx.Rngs(0))
    tx = js.magnitude_pruning(optax.adam(1e-2), sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    for t in range(6):
        step(model, optimizer, *batch(t))
    for masks in (js.get_masks(optimizer), js.get_masks(optimizer.opt_state)):
        assert int(masks["hidden"]["kernel"].sum()) == 12 * 16 // 4
        assert masks["hidden"]["bias"] is None
        assert_params_sparse(nnx.state(model, nnx.Param), masks)


def test_update_errors_name_the_problem():
    params = mlp_params()
    tx = pruner(optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.grad(mlp_loss)(params, *batch(0))
    with pytest.raises(ValueError, match="need params"):
        tx.update(grads, state)
    other = {**params, "Dense_2": {"kernel": jnp.zeros((3, 3))}}
    with pytest.raises(ValueError, match=r"unexpected leaves \['Dense_2/kernel'\]"):
        tx.update(grads, state, other)
    resized = {**params, "Dense_1": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match=r"leaf 'Dense_1/kernel' has shape \(16, 4\).*\(16, 3\)"):
        tx.update(grads, state, resized)


def test_overrides():
    params = mlp_params()
    tx = js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, overrides={"Dense_1": None, "Dense_0/kernel": 0.75})
    params, state, _ = train(tx, steps=1, params=params)
    masks = js.get_masks(state)
    assert masks["Dense_1"]["kernel"] is None
    assert int(masks["Dense_0"]["kernel"].sum()) == 12 * 16 - int(0.75 * 12 * 16)
    with pytest.raises(ValueError, match="override pattern 'conv' matches no sparsified leaf"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, overrides={"conv": 0.9}).init(params)
    with pytest.raises(ValueError, match=r"override for leaf 'Dense_0/kernel' must be in \[0, 1\); got 1.2"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, overrides={"Dense_0": 1.2}).init(params)


@pytest.mark.parametrize(
    "inner",
    [optax.sgd(0.1, momentum=0.9), optax.lion(1e-3), optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), optax.adafactor(1e-2)],
    ids=["sgd_momentum", "lion", "inject_adam", "adafactor"],
)
def test_moments_reset_where_pruned_for_any_optimizer(inner, request):
    inner_name = request.node.callspec.id
    tx = js.magnitude_pruning(inner, sparsity=0.75, schedule=js.polynomial_schedule(2, 6), update_every=2)
    params, state, _ = train(tx, steps=7)
    masks = js.get_masks(state)
    assert_params_sparse(params, masks)
    shaped = [
        x for x in jax.tree.leaves(state.inner_state)
        if getattr(x, "shape", None) in {(12, 16), (16, 3)} and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert shaped, "no params-shaped moment found"
    # adafactor adds epsilon=1e-30 to g**2 inside its second moment, so that moment is ~1e-30,
    # not 0, one step after the reset; every other optimizer's moments stay exactly 0.
    tolerance = 1e-25 if inner_name == "adafactor" else 0.0
    for x in shaped:
        m = masks["Dense_0"]["kernel"] if x.shape == (12, 16) else masks["Dense_1"]["kernel"]
        assert np.all(np.abs(np.asarray(x)[~np.asarray(m)]) <= tolerance)


def test_reset_falls_back_to_structure_for_inits_that_inspect_params():
    def init(params):  # reads a shape: optax's placeholder cannot stand in for params
        _ = jax.tree.leaves(params)[0].shape
        return {"trace": jax.tree.map(jnp.ones_like, params), "count": jnp.zeros([])}

    inner = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
    masks = {"a": jnp.array([True, False]), "b": None}
    state = init({"a": jnp.ones(2), "b": jnp.ones(3)})
    reset = reset_inner_state(inner, state, masks)
    np.testing.assert_array_equal(reset["trace"]["a"], [1.0, 0.0])
    np.testing.assert_array_equal(reset["trace"]["b"], [1.0, 1.0, 1.0])


def test_vmap_over_seeds():
    params = mlp_params()
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    masks = jax.vmap(lambda k: js.get_masks(js.static_sparse(optax.sgd(0.1), sparsity=0.5, seed=k).init(params)))(keys)
    kernel = masks["Dense_0"]["kernel"]
    assert kernel.shape == (3, 12, 16)
    assert [int(m.sum()) for m in kernel] == [96, 96, 96]
    assert not jnp.array_equal(kernel[0], kernel[1])


def test_periodic_updates():
    f = js.periodic_updates(3, begin_step=2, end_step=10)
    assert [t for t in range(15) if bool(f(t))] == [2, 5, 8, 10]
    assert [t for t in range(8) if bool(js.periodic_updates(4)(t))] == [0, 4]
    with pytest.raises(ValueError, match="update_every must be a positive int; got 0"):
        js.periodic_updates(0)

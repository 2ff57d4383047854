"""The core transformation: get_masks in every nesting, errors, moment resets, nnx.Optimizer."""

import warnings

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
        # Labels per leaf: optax marks the leaves a sparsifier does not own with MaskedNode.
        "multi_transform": optax.multi_transform(
            {"sparse": pruner(optax.sgd(0.1)), "dense": optax.sgd(0.1)},
            {"Dense_0": {"kernel": "sparse", "bias": "dense"}, "Dense_1": {"kernel": "dense", "bias": "dense"}},
        ),
    }
    structure = lambda tree: jax.tree.structure(tree, is_leaf=lambda x: x is None)
    for name, tx in nestings.items():
        masks = js.get_masks(tx.init(params))
        assert masks["Dense_0"]["kernel"].shape == (12, 16), name
        if name == "multi_transform":
            assert masks["Dense_1"]["kernel"] is None and masks["Dense_0"]["bias"] is None
        else:
            assert masks["Dense_1"]["kernel"].shape == (16, 3), name
        assert structure(masks) == structure(expected), name
    with pytest.raises(ValueError, match="no jaxsparse sparsifier"):
        js.get_masks(optax.adam(0.1).init(params))


def test_get_masks_merges_sparsifiers_of_multi_transform():
    # One sparsifier per parameter group, with prefix labels: optax collapses a subtree a
    # sparsifier does not own into one MaskedNode, and the merge puts the trees back together.
    params = mlp_params()
    tx = optax.multi_transform(
        {"first": js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5),
         "second": js.rigl(optax.adam(0.1), sparsity=js.uniform(0.75), end_step=10, include="kernel"),
         "dense": optax.sgd(0.1)},
        {"Dense_0": "first", "Dense_1": "second"},
    )
    params, state, _ = train(tx, steps=2, params=params)
    masks = js.get_masks(state)
    assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(params)
    assert masks["Dense_0"]["bias"] is None and masks["Dense_1"]["bias"] is None
    assert int(masks["Dense_0"]["kernel"].sum()) == 96 and int(masks["Dense_1"]["kernel"].sum()) == 12
    assert_params_sparse(params, masks)
    # A group that no sparsifier owns comes back as one None, or params-shaped given params.
    tx = optax.multi_transform({"sparse": pruner(optax.sgd(0.1)), "dense": optax.sgd(0.1)}, {"Dense_0": "sparse", "Dense_1": "dense"})
    state = tx.init(params)
    assert js.get_masks(state)["Dense_1"] is None
    full = js.get_masks(state, params)
    assert full["Dense_1"] == {"kernel": None, "bias": None} and full["Dense_0"]["kernel"].shape == (12, 16)


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


def test_nnx_optimizer_starts_from_the_masked_model():
    model = NnxMLP(nnx.Rngs(0))
    dense_kernel = np.asarray(model.hidden.kernel[...])
    optimizer = js.nnx_optimizer(model, js.rigl(optax.adam(1e-2), sparsity=js.uniform(0.75), end_step=10))
    masks = js.get_masks(optimizer)
    assert_params_sparse(nnx.state(model, nnx.Param), masks)
    kept = np.asarray(masks["hidden"]["kernel"])
    np.testing.assert_array_equal(np.asarray(model.hidden.kernel[...])[kept], dense_kernel[kept])
    # A dense optimizer leaves the model as it is.
    other = NnxMLP(nnx.Rngs(0))
    js.nnx_optimizer(other, optax.adam(1e-2))
    np.testing.assert_array_equal(np.asarray(other.hidden.kernel[...]), dense_kernel)


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


def test_init_returns_masked_params_so_step_0_trains_the_sparse_model():
    params = mlp_params()
    for tx in (js.static_sparse(optax.adam(1e-2), sparsity=0.8),
               js.rigl(optax.adam(1e-2), sparsity=js.uniform(0.8), end_step=10),
               js.topkast(optax.adam(1e-2), sparsity=0.8),
               optax.chain(optax.identity(), js.set_sparse(optax.sgd(0.1), sparsity=0.8))):
        masked, state = js.init(tx, params)
        masks = js.get_masks(state)
        assert_params_sparse(masked, masks)
        for layer in ("Dense_0", "Dense_1"):
            np.testing.assert_array_equal(masked[layer]["kernel"], jnp.where(masks[layer]["kernel"], params[layer]["kernel"], 0))
            np.testing.assert_array_equal(masked[layer]["bias"], params[layer]["bias"])
        # The first step's gradients come from the sparse model.
        grads = jax.grad(mlp_loss)(masked, *batch(0))
        assert not np.allclose(grads["Dense_0"]["kernel"], jax.grad(mlp_loss)(params, *batch(0))["Dense_0"]["kernel"])


def test_a_transformation_after_the_sparsifier_warns_and_names_the_fix():
    # optax.chain(sparsifier, scale) halves the -param updates that zero pruned entries: params
    # keep nonzeros off the masks. The sparsifier sees the chain when traced and warns.
    tx = optax.chain(js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5), optax.scale(0.5))
    with pytest.warns(RuntimeWarning, match=r"inside optax.chain with 1 transformation\(s\) after it.*inner optimizer"):
        params, state, _ = train(tx, steps=3)
    assert np.any(np.asarray(params["Dense_0"]["kernel"])[~np.asarray(js.get_masks(state)["Dense_0"]["kernel"])] != 0)
    # Nested deeper (inject_hyperparams inside the chain) it is found too.
    nested = optax.chain(optax.inject_hyperparams(lambda lr: js.rigl(optax.sgd(lr), sparsity=0.5, end_step=10))(lr=0.1),
                         optax.add_decayed_weights(1e-4))
    with pytest.warns(RuntimeWarning, match="inside optax.chain"):
        train(nested, steps=1)
    # The right composition: everything inside inner, or the sparsifier last; no warning, params exactly sparse.
    for tx in (js.magnitude_pruning(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1), optax.scale(0.5)), sparsity=0.5),
               optax.chain(optax.identity(), js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            params, state, _ = train(tx, steps=3)
        assert_params_sparse(params, js.get_masks(state))


def test_counts_of_a_run_vmapped_over_seeds():
    params = mlp_params()

    def run_seed(seed):
        tx = js.static_sparse(optax.sgd(0.1), sparsity=0.5, seed=seed)
        p, state = js.init(tx, params)
        for t in range(3):
            updates, state = tx.update(jax.grad(mlp_loss)(p, *batch(t)), state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    p, state = jax.jit(jax.vmap(run_seed))(jnp.arange(3))
    counts = js.count_nonzeros(state)  # per seed, not summed over them
    np.testing.assert_array_equal(counts["Dense_0/kernel"], [96, 96, 96])
    np.testing.assert_array_equal(js.count_nonzeros(js.get_masks(state), batch_dims=1)["Dense_1/kernel"], [24, 24, 24])
    masks = js.get_masks(state)
    assert not np.array_equal(masks["Dense_0"]["kernel"][0], masks["Dense_0"]["kernel"][1])


@pytest.mark.parametrize("seed", [np.int64(3), np.int32(3), jnp.int32(3), jax.random.PRNGKey(3), jax.random.key(3)],
                         ids=["np.int64", "np.int32", "jnp.int32", "raw key", "typed key"])
def test_seeds_of_every_kind(seed):
    params = mlp_params()
    expected = js.get_masks(js.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10, seed=3).init(params))
    masks = js.get_masks(js.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10, seed=seed).init(params))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seed must be"):
        js.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10, seed=1.5).init(params)


def test_every_preset_takes_the_common_arguments():
    import inspect

    presets = [js.magnitude_pruning, js.random_pruning, js.saliency_pruning, js.global_magnitude_pruning,
               js.lamp_pruning, js.static_sparse, js.set_sparse, js.rigl, js.snfs, js.srigl, js.topkast]
    for preset in presets:
        names = set(inspect.signature(preset).parameters)
        assert {"sparsity", "seed", "include", "exclude", "overrides"} <= names, preset.__name__
        assert "js.init(" in preset.__doc__, f"{preset.__name__}'s docstring does not show js.init"


def test_errors_for_restored_states_and_other_containers():
    from flax.core import FrozenDict

    params = mlp_params()
    tx = js.rigl(optax.adam(1e-2), sparsity=0.5, end_step=10)
    state = tx.init(params)
    grads = jax.grad(mlp_loss)(params, *batch(0))
    # A checkpoint restored without a target turns the state into dicts and lists.
    restored = [state._asdict() | {"inner_state": [dict(x._asdict()) for x in state.inner_state if hasattr(x, "_asdict")]}]
    masks = js.get_masks(restored)  # get_masks still finds the masks there
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"], state.masks["Dense_0"]["kernel"])
    with pytest.raises(ValueError, match="restored from a checkpoint without a target.*StandardRestore"):
        tx.update(grads, restored[0], params)
    with pytest.raises(ValueError, match="no jaxsparse sparsifier state found in list"):
        js.get_masks([jnp.zeros(3)])
    # init with a FrozenDict, update with a dict: a clear message instead of a raw cond error.
    state = tx.init(FrozenDict(params))
    with pytest.raises(ValueError, match="in other containers.*FrozenDict"):
        tx.update(grads, state, params)


def test_a_leaf_too_large_for_selection_is_named_at_init():
    params = {"embed": jax.ShapeDtypeStruct((2**16, 2**15 + 1), jnp.float32), "w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    with pytest.raises(ValueError, match=r"leaf 'embed' of shape \(65536, 32769\) has 2147549184 entries"):
        jax.eval_shape(js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5).init, params)
    # Excluded, it stays dense and the rest is sparsified.
    state = jax.eval_shape(js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, exclude="embed").init, params)
    assert state.masks["embed"] is None and state.masks["w"].shape == (8, 8)


# -- gradient annealing (gradient_annealing=) -------------------------------------------------


def recovery_run(alpha, steps=6):
    """Magnitude pruning to 50% at every step of [0, 10], with a loss that pushes the smallest
    weight up; returns the kernel's masks after each step and the last state."""
    kernel = jnp.concatenate([jnp.array([0.01]), jnp.linspace(2.0, 4.0, 15)]).reshape(4, 4)
    params = {"Dense_0": {"kernel": kernel}}
    schedule = js.SparsitySchedule(lambda t: 1.0, begin_step=0, end_step=10)
    tx = js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, schedule=schedule, update_every=1, gradient_annealing=alpha)
    params, state = js.init(tx, params)
    loss = lambda p: -10.0 * p["Dense_0"]["kernel"][0, 0]
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(jax.grad(loss)(p), s, p)))
    masks = []
    for _ in range(steps):
        params, state = step(params, state)
        mask = np.asarray(state.masks["Dense_0"]["kernel"])
        assert mask.sum() == 8
        assert np.all(np.asarray(params["Dense_0"]["kernel"])[~mask] == 0)  # exactly 0 where pruned
        masks.append(mask[0, 0])
    return masks, state


@pytest.mark.compat
def test_annealed_gradient_lets_a_pruned_weight_recover():
    masks, state = recovery_run(1.0)
    # pruned after step 0 (1.01 < the kept weights), its dense value grows by 1 a step, and it is
    # kept again once it passes the smallest kept weight (~2.9)
    assert masks[0] == False and masks[-1] == True
    assert float(state.shadow["Dense_0"]["kernel"][0, 0]) == pytest.approx(0.01 + 6 * 1.0, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, lambda step: 0.0 * step], ids=["float", "schedule"])
def test_with_alpha_zero_nothing_pruned_returns(alpha):
    masks, state = recovery_run(alpha)
    assert not any(masks)
    # its dense value is frozen once pruned (the first step trained it while it was kept)
    assert float(state.shadow["Dense_0"]["kernel"][0, 0]) == pytest.approx(1.01, rel=1e-5)


def test_shadow_weights_take_the_straight_through_gradient_scaled_by_alpha():
    """A hand-written reference: with sgd(lr), dense <- dense - lr * (g on the mask, alpha(t) g
    elsewhere), g the gradient at the masked params; params = dense on the mask, 0 elsewhere."""
    lr = 0.05
    alpha = lambda step: 0.5 / (1.0 + step)
    tx = js.magnitude_pruning(optax.sgd(lr), sparsity=0.75, gradient_annealing=alpha)
    params, state = js.init(tx, mlp_params())
    dense = {k: np.asarray(mlp_params()[k]["kernel"]) for k in ("Dense_0", "Dense_1")}
    step = jax.jit(lambda p, s, x, y: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(jax.grad(mlp_loss)(p, x, y), s, p)))
    for t in range(3):
        grads = jax.grad(mlp_loss)(params, *batch(t))
        old_masks = js.get_masks(state)
        params, state = step(params, state, *batch(t))
        for k in dense:
            m, g = np.asarray(old_masks[k]["kernel"]), np.asarray(grads[k]["kernel"])
            dense[k] = dense[k] - lr * np.where(m, g, alpha(t) * g)
            np.testing.assert_allclose(np.asarray(state.shadow[k]["kernel"]), dense[k], rtol=1e-5, atol=1e-6)
            new_mask = np.asarray(state.masks[k]["kernel"])
            np.testing.assert_array_equal(np.asarray(params[k]["kernel"]), np.where(new_mask, np.asarray(state.shadow[k]["kernel"]), 0.0))
        # biases are not sparsified: trained as usual, no shadow
        assert state.shadow["Dense_0"]["bias"] is None


def test_annealed_state_is_a_pytree_and_restores():
    tx = js.rigl(optax.adam(1e-2), sparsity=0.5, update_every=2, end_step=10, gradient_annealing=0.3)
    params, state = js.init(tx, mlp_params())
    leaves, treedef = jax.tree_util.tree_flatten(state)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    grads = jax.grad(mlp_loss)(params, *batch(0))
    a, _ = tx.update(grads, state, params)
    b, _ = tx.update(grads, again, params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    restored = state._asdict()  # a checkpoint restored without a target: masks still found
    np.testing.assert_array_equal(js.get_masks(restored)["Dense_0"]["kernel"], state.masks["Dense_0"]["kernel"])


def test_gradient_annealing_errors():
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match="gradient_annealing"):
            js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, gradient_annealing=bad)


def test_get_shadow_finds_the_dense_weights_however_nested():
    tx = optax.inject_hyperparams(lambda lr: js.ste(optax.sgd(lr), sparsity=0.5))(lr=0.1)
    state = tx.init(mlp_params())
    shadow = js.get_shadow(optax.MultiSteps(tx, 2).init(mlp_params()))
    np.testing.assert_array_equal(shadow["Dense_0"]["kernel"], mlp_params()["Dense_0"]["kernel"])
    assert shadow["Dense_0"]["bias"] is None
    assert jax.tree.structure(js.get_shadow(state), is_leaf=lambda x: x is None) == jax.tree.structure(
        js.get_masks(state), is_leaf=lambda x: x is None)
    with pytest.raises(ValueError, match="no shadow weights"):
        js.get_shadow(pruner(optax.sgd(0.1)).init(mlp_params()))

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js

LENET_300_100 = {
    "Dense_0": {"kernel": jnp.zeros((784, 300)), "bias": jnp.zeros(300)},
    "Dense_1": {"kernel": jnp.zeros((300, 100)), "bias": jnp.zeros(100)},
    "Dense_2": {"kernel": jnp.zeros((100, 10)), "bias": jnp.zeros(10)},
}
CONV_NET = {
    "conv0": jnp.zeros((3, 3, 3, 16)),
    "conv1": jnp.zeros((3, 3, 16, 32)),
    "dense": jnp.zeros((512, 10)),
    "embed": jnp.zeros((1000, 64)),
}


def erk_reference(shapes, s, power=1.0, kernel=True):
    """The RigL paper's ERK/ER solve, written independently of the library."""
    sizes = {n: math.prod(sh) for n, sh in shapes.items()}
    if kernel:
        raw = {n: (sum(sh) / math.prod(sh)) ** power for n, sh in shapes.items()}
    else:
        raw = {n: (sh[-2] + sh[-1]) / (sh[-2] * sh[-1]) for n, sh in shapes.items()}
    dense = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        rhs = sum((1 - s) * sizes[n] for n in sparse) - sum(s * sizes[n] for n in dense)
        eps = rhs / sum(raw[n] * sizes[n] for n in sparse)
        over = [n for n in sparse if eps * raw[n] > 1]
        if not over:
            return {n: 0.0 if n in dense else 1 - eps * raw[n] for n in shapes}
        top = max(raw[n] for n in over)
        dense |= {n for n in sparse if raw[n] == top}


@pytest.mark.compat
def test_uniform_and_float():
    t = js.uniform(0.8)(LENET_300_100)
    assert t["Dense_0"]["kernel"] == 0.8 and t["Dense_0"]["bias"] is None
    assert js.distributions.as_distribution(0.8).solve({"a": (3, 3)}) == {"a": 0.8}


@pytest.mark.parametrize("s", [0.5, 0.9, 0.98])
def test_erk_matches_paper_formula_on_lenet(s):
    t = js.erk(s)(LENET_300_100)
    shapes = {"Dense_0/kernel": (784, 300), "Dense_1/kernel": (300, 100), "Dense_2/kernel": (100, 10)}
    ref = erk_reference(shapes, s)
    for name, value in ref.items():
        layer = name.split("/")[0]
        assert t[layer]["kernel"] == pytest.approx(value, abs=1e-12)
    # density = eps * (n_in + n_out) / (n_in * n_out) for every non-dense layer: one common eps
    eps = {n: (1 - v) / (sum(shapes[n]) / math.prod(shapes[n])) for n, v in ref.items() if v > 0}
    assert len({round(e, 9) for e in eps.values()}) == 1
    # the overall number of nonzeros equals uniform sparsity s
    total = sum(math.prod(sh) for sh in shapes.values())
    nnz = sum((1 - ref[n]) * math.prod(sh) for n, sh in shapes.items())
    assert nnz == pytest.approx((1 - s) * total)


def test_erk_moves_overfull_layers_to_dense_and_resolves():
    # At 50%, the small output layer's ERK density exceeds 1: it must become dense.
    t = js.erk(0.5)(LENET_300_100)
    assert t["Dense_2"]["kernel"] == 0.0
    assert t["Dense_0"]["kernel"] > 0.5


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_erk_on_conv_kernels_uses_all_dims(power):
    shapes = {k: v.shape for k, v in CONV_NET.items()}
    t = js.erk(0.9, power=power)(CONV_NET)
    ref = erk_reference(shapes, 0.9, power)
    for n in shapes:
        assert t[n] == pytest.approx(ref[n], abs=1e-12)


def test_er_uses_fan_in_and_fan_out():
    shapes = {k: v.shape for k, v in CONV_NET.items()}
    t = js.er(0.9)(CONV_NET)
    ref = erk_reference(shapes, 0.9, kernel=False)
    for n in shapes:
        assert t[n] == pytest.approx(ref[n], abs=1e-12)


@pytest.mark.parametrize("dist", [js.uniform(0.9), js.erk(0.9), js.er(0.9), js.erk(0.7, power=0.5)], ids=repr)
def test_exact_nonzero_counts_per_leaf(dist):
    params = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(0), x.shape), LENET_300_100)
    targets = dist(params)
    state = js.static_sparse(optax.sgd(0.1), sparsity=dist, seed=3).init(params)
    counts = js.count_nonzeros(js.get_masks(state))
    for layer in LENET_300_100:
        s = targets[layer]["kernel"]
        n = params[layer]["kernel"].size
        assert int(counts[f"{layer}/kernel"]) == n - math.floor(s * n)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_bad_sparsity_raises(bad):
    for make in (js.uniform, js.erk, js.er):
        with pytest.raises(ValueError, match="sparsity"):
            make(bad)
    with pytest.raises(ValueError, match="sparsity"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=bad)


@pytest.mark.parametrize("make", [js.erk, js.er], ids=["erk", "er"])
def test_zero_size_leaf_is_dense_and_leaves_the_others_solve_alone(make):
    # (4, 0, 8): a conv kernel with no input channels is sparsified by default but holds nothing.
    params = {**CONV_NET, "empty": jnp.zeros((4, 0, 8))}
    t = make(0.9)(params)
    assert t["empty"] == 0.0
    ref = make(0.9)(CONV_NET)
    for n in CONV_NET:
        assert t[n] == pytest.approx(ref[n], abs=1e-12)
    assert make(0.9).solve({"a": (0, 8), "b": (0,)}) == {"a": 0.0, "b": 0.0}


def test_static_sparse_with_erk_on_a_zero_size_leaf():
    key = jax.random.PRNGKey(0)
    params = {
        "dense": jax.random.normal(key, (16, 8)),
        "empty": jnp.zeros((4, 0, 8)),
        "picked": jnp.zeros((0, 8)),  # zero-size and chosen explicitly below
    }
    tx = js.static_sparse(optax.sgd(0.1), sparsity=js.erk(0.9), include="dense|empty|picked")
    state = tx.init(params)
    masks = js.get_masks(state)
    assert masks["empty"].shape == (4, 0, 8) and masks["picked"].shape == (0, 8)
    assert int(js.count_nonzeros(masks)["dense"]) == 16 * 8 - math.floor(js.erk(0.9)(params)["dense"] * 16 * 8)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert new["empty"].shape == (4, 0, 8) and new["picked"].shape == (0, 8)
    assert np.all(np.asarray(new["dense"])[~np.asarray(masks["dense"])] == 0)


def test_a_scalar_leaf_stays_dense_under_erk_and_er():
    # A scalar picked with include= has no dimensions to spread over: it keeps its entry instead
    # of getting an out-of-range target (ERK) or an unpacking error (ER).
    shapes = {"w": (16, 8), "temperature": ()}
    for dist in (js.erk(0.9), js.er(0.9)):
        targets = dist.solve(shapes)
        assert targets["temperature"] == 0.0
        assert targets["w"] == pytest.approx(dist.solve({"w": (16, 8)})["w"])

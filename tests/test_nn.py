import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
import flax.serialization  # noqa: E402
from flax import nnx  # noqa: E402

import jaxsparse.nn as jsn  # noqa: E402
from pallas_kernels import BlockSparseMatrix  # noqa: E402


def _expand(block_mask, shape):
    return np.kron(block_mask, np.ones((shape[0] // block_mask.shape[0], shape[1] // block_mask.shape[1]), bool))


class DenseMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


class SparseMLP(nn.Module):
    density: float = 1.0

    @nn.compact
    def __call__(self, x):
        init = jsn.random_block_mask(self.density) if self.density < 1 else jsn.all_blocks
        h = jsn.linen.BlockSparseDense(8, (2, 4), block_mask_init=init, name="hidden")(x)
        return jsn.linen.BlockSparseDense(6, (2, 3), block_mask_init=init, name="out")(nn.relu(h))


def _masks(rng):
    hidden = rng.random((2, 2)) < 0.6
    hidden[0, 0] = True
    out = rng.random((4, 2)) < 0.6
    out[:, 1] = False  # an empty block column: those outputs are the bias alone
    return {"hidden": {"kernel": hidden, "bias": None}, "out": {"kernel": out, "bias": None}}


@pytest.mark.compat
def test_linen_conversion_matches_the_masked_dense_model():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    params = DenseMLP().init(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # nonzero biases too
    masks = _masks(rng)
    variables = jsn.linen.variables_from_dense(params, masks)
    assert set(variables) == {"params", "block_pattern"}
    masked = jax.tree_util.tree_map(
        lambda m, p: p if m is None else np.where(_expand(m, p.shape), p, 0), masks, params, is_leaf=lambda m: m is None
    )
    np.testing.assert_allclose(SparseMLP().apply(variables, x), DenseMLP().apply({"params": masked}, x), rtol=1e-5, atol=1e-5)
    # Only floating values are parameters; the pattern is its own collection.
    for leaf in jax.tree_util.tree_leaves(variables["params"]):
        assert jnp.issubdtype(leaf.dtype, jnp.floating)
    # The variables survive flax serialization.
    restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
    np.testing.assert_array_equal(SparseMLP().apply(restored, x), SparseMLP().apply(variables, x))


def test_linen_training_step_keeps_padding_zero():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    params = DenseMLP().init(jax.random.key(0), x)["params"]
    variables = jsn.linen.variables_from_dense(params, _masks(rng))
    patterns = variables["block_pattern"]
    tx = optax.adamw(1e-2, weight_decay=0.1)
    p, state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(p, state):
        loss = lambda p: jnp.mean(SparseMLP().apply({"params": p, "block_pattern": patterns}, x) ** 2)
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    for _ in range(3):
        p, state = step(p, state)
    for name in ("hidden", "out"):
        valid = np.asarray(patterns[name]["kernel"].valid_slots())
        kernel = np.asarray(p[name]["kernel"])
        assert (kernel[~valid] == 0).all() and (kernel[valid] != 0).any()


def test_linen_init_with_random_blocks_and_under_jit():
    x = jnp.ones((3, 4))
    variables = SparseMLP(density=0.5).init(jax.random.key(0), x)
    w = BlockSparseMatrix(variables["params"]["out"]["kernel"], variables["block_pattern"]["out"]["kernel"])
    assert int(w.nnz_blocks()) == 4  # round(0.5 * 4 * 2)
    assert SparseMLP(density=0.5).apply(variables, x).shape == (3, 6)
    jitted = jax.jit(SparseMLP(density=0.5).init)(jax.random.key(0), x)
    # Traced masks get full-size lists; the kept blocks are the same.
    assert jitted["block_pattern"]["out"]["kernel"].max_blocks_per_col == 4
    np.testing.assert_array_equal(
        jitted["block_pattern"]["out"]["kernel"].block_mask(), variables["block_pattern"]["out"]["kernel"].block_mask()
    )


@pytest.mark.compat
def test_nnx_layer_and_conversion_from_linear():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
    block_mask = rng.random((4, 2)) < 0.5
    block_mask[0] = True
    layer = jsn.nnx.BlockSparseDense(8, 6, block_shape=(2, 3), block_mask=block_mask, rngs=nnx.Rngs(0))
    dense = np.asarray(layer.weight.to_dense())
    assert (dense[~_expand(block_mask, dense.shape)] == 0).all()
    np.testing.assert_allclose(layer(x), x @ dense + layer.bias[...], rtol=1e-5, atol=1e-5)

    linear = nnx.Linear(8, 6, bias_init=nnx.initializers.ones_init(), rngs=nnx.Rngs(1))
    converted = jsn.nnx.BlockSparseDense.from_linear(linear, block_mask)
    masked = np.where(_expand(block_mask, (8, 6)), linear.kernel[...], 0)
    np.testing.assert_allclose(converted(x), x @ masked + 1.0, rtol=1e-5, atol=1e-5)


def test_nnx_sparsify_linears_and_train():
    rng = np.random.default_rng(3)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 8, rngs=rngs)
            self.out = nnx.Linear(8, 6, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    before = model(x)
    masks = {"hidden": {"kernel": np.ones((2, 2), bool), "bias": None}}  # convert one layer, fully kept
    jsn.nnx.sparsify_linears(model, masks)
    assert isinstance(model.hidden, jsn.nnx.BlockSparseDense) and isinstance(model.out, nnx.Linear)
    np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-5)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    pattern_before = jax.tree_util.tree_leaves(model.hidden.pattern.get_value())

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    for a, b in zip(pattern_before, jax.tree_util.tree_leaves(model.hidden.pattern.get_value())):
        np.testing.assert_array_equal(a, b)


def test_to_block_sparse_on_a_plain_tree():
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((4, 6)).astype(np.float32), "b": np.ones(6, np.float32)}
    out = jsn.to_block_sparse(params, {"w": np.array([[True, False, True], [False, False, True]]), "b": None})
    assert isinstance(out["w"], BlockSparseMatrix) and out["w"].block_shape == (2, 2)
    assert out["b"] is params["b"]
    element = rng.random((4, 6)) < 0.3
    with pytest.warns(UserWarning, match=r"not made of whole \(2, 3\) blocks"):
        out = jsn.to_block_sparse(params, {"w": element, "b": None}, block_shape=(2, 3))
    np.testing.assert_array_equal(out["w"].to_dense(), np.where(element, params["w"], 0))


def test_bad_input():
    with pytest.raises(ValueError, match=r"pass block_shape.*structure=js.blocks"):
        jsn.to_block_sparse({"w": np.ones((4, 6))}, {"w": np.eye(4, 6, dtype=bool)})
    with pytest.raises(ValueError, match=r"\(3, 4\) does not tile a kernel of shape \(4, 6\)"):
        jsn.to_block_sparse({"w": np.ones((4, 6))}, {"w": np.ones((3, 4), bool)})
    with pytest.raises(ValueError, match=r"block_shape \(3, 4\) does not divide"):
        jsn.nnx.BlockSparseDense(8, 6, block_shape=(3, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"block_shape \(3, 4\) does not divide"):
        jsn.linen.BlockSparseDense(6, (3, 4)).init(jax.random.key(0), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="density"):
        jsn.random_block_mask(0.0)


class _BlockMLP(nn.Module):
    block_shapes: tuple

    @nn.compact
    def __call__(self, x):
        h = jsn.linen.BlockSparseDense(8, self.block_shapes[0], name="hidden")(x)
        return jsn.linen.BlockSparseDense(6, self.block_shapes[1], name="out")(nn.relu(h))


@pytest.mark.compat
def test_masks_of_a_blocks_sparsifier_convert_with_no_hand_conversion():
    import jaxsparse as js

    x = jnp.asarray(np.random.default_rng(5).standard_normal((5, 4)), jnp.float32)
    params = DenseMLP().init(jax.random.key(0), x)["params"]
    tx = js.rigl(optax.sgd(0.1), sparsity=0.5, structure=js.blocks(2, 2), update_every=1, end_step=10)
    params, state = js.init(tx, params)
    grads = jax.grad(lambda p: jnp.sum(DenseMLP().apply({"params": p}, x) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks = js.get_masks(state)  # element masks of whole 2x2 tiles
    converted = jsn.to_block_sparse(params, masks)
    shapes = []
    for name in ("hidden", "out"):
        w = converted[name]["kernel"]
        assert isinstance(w, BlockSparseMatrix) and w.block_shape[0] % 2 == 0 and w.block_shape[1] % 2 == 0
        np.testing.assert_array_equal(w.to_dense(), params[name]["kernel"])
        shapes.append(w.block_shape)
    dense_out = DenseMLP().apply({"params": params}, x)
    variables = jsn.linen.variables_from_dense(params, masks)
    np.testing.assert_allclose(_BlockMLP(tuple(shapes)).apply(variables, x), dense_out, rtol=1e-5, atol=1e-5)
    layer = jsn.nnx.BlockSparseDense.from_dense(params["hidden"]["kernel"], masks["hidden"]["kernel"], params["hidden"]["bias"])
    np.testing.assert_allclose(layer(x), x @ params["hidden"]["kernel"] + params["hidden"]["bias"], rtol=1e-5, atol=1e-5)
    assert jsn.block_shape_of(js.blocks(2, 4).select(jnp.asarray(np.random.default_rng(0).random((8, 16))), 0.5)) == (2, 4)


def test_unstructured_mask_to_blocks_warns_with_the_kept_block_density():
    import jaxsparse as js

    kernel = jnp.asarray(np.random.default_rng(6).standard_normal((8, 8)), jnp.float32)
    mask = js.unstructured().select(jnp.abs(kernel), 0.75)
    with pytest.warns(UserWarning, match=r"not made of whole \(4, 4\) blocks: 100\.0% of the blocks.*25\.0% of the entries.*js\.blocks\(4, 4\)"):
        w = jsn.kernel_to_block_sparse(kernel, mask, block_shape=(4, 4))
    np.testing.assert_array_equal(w.to_dense(), jnp.where(mask, kernel, 0))

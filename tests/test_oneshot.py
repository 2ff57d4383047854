"""One-shot pruning: Wanda, SparseGPT, OWL, the Hessian accumulator and the flax driver."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.oneshot.layer import magnitude_layer


def correlated_heavy_tailed(n_in, tokens, seed=0):
    """Layer inputs like a language model's: mixed (correlated) Student-t features whose scales
    are heavy-tailed (a few outlier features)."""
    rng = np.random.default_rng(seed)
    mix = np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
    scales = np.exp(rng.standard_normal(n_in))
    return ((rng.standard_t(3, (tokens, n_in)) @ mix) * scales).astype(np.float32)


def sparsegpt_numpy(weight, inputs, *, sparsity=None, n=None, m=None, block_size=128, damp=0.01):
    """SparseGPT (Frantar & Alistarh, 2023, Algorithm 1) in float64 numpy, in the paper's
    orientation (W: out x in), written independently of jaxsparse: one column at a time, the
    mask chosen per block of columns (the block's share of the exact budget) or per group of m."""
    W = np.asarray(weight, np.float64).T.copy()
    X = np.asarray(inputs, np.float64)
    H = 2.0 * X.T @ X / X.shape[0]
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(len(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: U^T U = H^-1
    rows, cols = W.shape
    pruned = np.zeros(W.shape, bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if n is None:
            saliency = W[:, i1:i2] ** 2 / np.diag(U)[None, i1:i2] ** 2
            k = math.floor(sparsity * i2 * rows) - math.floor(sparsity * i1 * rows)
            smallest = np.argsort(saliency.T.ravel(), kind="stable")[:k]  # row-major in (in, out)
            block = np.zeros(saliency.T.size, bool)
            block[smallest] = True
            pruned[:, i1:i2] = block.reshape(saliency.T.shape).T
        for i in range(i1, i2):
            if n is not None and (i - i1) % m == 0:
                saliency = W[:, i:i + m] ** 2 / np.diag(U)[None, i:i + m] ** 2
                for r in range(rows):
                    pruned[r, i + np.argsort(-saliency[r], kind="stable")[n:]] = True
            q = np.where(pruned[:, i], 0.0, W[:, i])
            err = (W[:, i] - q) / U[i, i]
            W[:, i:] -= np.outer(err, U[i, i:])  # the paper's update, all later columns at once
            W[:, i] = q
    return W.T, ~pruned.T


def reconstruction_error(x, w, pruned):
    return float(np.linalg.norm(x @ np.asarray(w, np.float64) - x @ np.asarray(pruned, np.float64)))


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(1)
    x = correlated_heavy_tailed(64, 512)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(x)


@pytest.mark.compat
@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(n=2, m=4)], ids=["50%", "2:4"])
def test_reconstruction_error_ordering(layer, target):
    w, x = layer
    errors = {
        "sparsegpt": js.sparsegpt(w, x, block_size=16, **target),
        "wanda": js.wanda(w, x, **target),
        "magnitude": magnitude_layer(w, **target),
    }
    errors = {k: reconstruction_error(np.asarray(x, np.float64), w, p) for k, p in errors.items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.77])
def test_exact_unstructured_budget(layer, method, sparsity):
    w, x = layer
    w = w[:, :45]  # 64 * 45 * s not an integer for s = 0.3, 0.77
    pruned, keep = getattr(js, method)(w, x, sparsity=sparsity, return_mask=True)
    assert int(keep.sum()) == w.size - math.floor(sparsity * w.size)
    assert np.all(np.asarray(pruned)[~np.asarray(keep)] == 0)
    if method == "wanda":  # per output unit: each column prunes floor or ceil of s * in
        per_column = (~np.asarray(keep)).sum(0)
        assert set(per_column) <= {math.floor(sparsity * 64), math.ceil(sparsity * 64)}
        assert np.array_equal(np.asarray(pruned)[np.asarray(keep)], np.asarray(w)[np.asarray(keep)])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 8)])
def test_n_m_validity(layer, method, n, m):
    w, x = layer
    pruned, keep = getattr(js, method)(w, x, n=n, m=m, return_mask=True)
    groups = np.asarray(keep).reshape(64 // m, m, -1).sum(1)
    assert np.all(groups == n)
    assert np.all(np.asarray(pruned)[~np.asarray(keep)] == 0)


def test_wanda_matches_its_definition(layer):
    w, x = layer
    keep = np.asarray(js.wanda(w, x, n=2, m=4, return_mask=True)[1])
    score = np.abs(np.asarray(w)) * np.linalg.norm(np.asarray(x, np.float64), axis=0)[:, None]
    grouped = score.reshape(16, 4, -1)
    want = np.argsort(-grouped, axis=1, kind="stable").argsort(axis=1, kind="stable") < 2
    assert np.array_equal(keep, want.reshape(keep.shape))


@pytest.mark.compat
@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(sparsity=0.3), dict(n=2, m=4)], ids=["50%", "30%", "2:4"])
def test_sparsegpt_equals_float64_reference(target):
    rng = np.random.default_rng(3)
    x = correlated_heavy_tailed(40, 200, seed=3)
    x[:, 5] = 0.0  # a dead input
    w = rng.standard_normal((40, 24)).astype(np.float32)
    want_w, want_keep = sparsegpt_numpy(w, x, block_size=8, **target)
    got_w, got_keep = js.sparsegpt(jnp.asarray(w), jnp.asarray(x), block_size=8, return_mask=True, **target)
    assert np.array_equal(np.asarray(got_keep), want_keep)
    np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=1e-4, atol=1e-4 * np.abs(want_w).max())


def test_sparsegpt_at_zero_sparsity_returns_the_weight(layer):
    w, x = layer
    assert np.array_equal(np.asarray(js.sparsegpt(w, x, sparsity=0.0)), np.asarray(w))


def test_layer_functions_inside_jit(layer):
    w, x = layer
    for fn in (js.sparsegpt, js.wanda):
        jitted, eager = jax.jit(lambda w, x: fn(w, x, sparsity=0.5))(w, x), fn(w, x, sparsity=0.5)
        np.testing.assert_array_equal(jitted == 0, eager == 0)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_sparsegpt_bfloat16_and_hessian_in_chunks(layer):
    w, x = layer
    state = js.hessian_init(64)
    for chunk in jnp.split(x, 4):
        state = js.hessian_update(state, chunk.astype(jnp.bfloat16))
    assert state.hessian.dtype == jnp.float32 and int(state.count) == 512
    out = js.sparsegpt(w.astype(jnp.bfloat16), state, sparsity=0.5)
    assert out.dtype == jnp.bfloat16
    whole = js.sparsegpt(w.astype(jnp.bfloat16), x.astype(jnp.bfloat16), sparsity=0.5)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(whole, np.float32), atol=0.02)
    chunked = js.hessian_update(js.hessian_update(js.hessian_init(64), x[:100]), x[100:])
    want = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    np.testing.assert_allclose(chunked.hessian, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.compat
def test_errors(layer):
    w, x = layer
    with pytest.raises(ValueError, match=r"'fc'.*\(64, 48\).*\(tokens, 64\)"):
        js.sparsegpt(w, x[:, :60], sparsity=0.5, name="fc")
    with pytest.raises(ValueError, match=r"'weight'.*multiple of 3.*\(64, 48\)"):
        js.wanda(w, x, n=1, m=3)
    with pytest.raises(ValueError, match=r"int32"):
        js.wanda(w.astype(jnp.int32), x, sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsity"):
        js.wanda(w, x, sparsity=1.5)
    with pytest.raises(ValueError, match=r"either sparsity or n and m"):
        js.sparsegpt(w, x, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match=r"'weight' of shape \(64, 48\): 10 calibration tokens.*singular"):
        js.sparsegpt(w, x[:10], sparsity=0.5, damp=0.0)
    with pytest.raises(ValueError, match=r"'weight' of shape \(64, 48\): 10 calibration tokens.*damp=1e-06"):
        js.sparsegpt(w, x[:10], sparsity=0.5, damp=1e-6)
    assert np.all(np.isfinite(js.sparsegpt(w, x[:10], sparsity=0.5)))  # the default damping conditions it
    with pytest.raises(ValueError, match=r"no calibration tokens"):
        js.sparsegpt(w, js.hessian_init(64), sparsity=0.5)
    with pytest.raises(ValueError, match=r"only its diagonal"):
        js.sparsegpt(w, js.hessian_update(js.hessian_init(64, diagonal=True), x), sparsity=0.5)


def test_owl_targets():
    rng = np.random.default_rng(0)
    flat = rng.random((8, 8))
    spiky = flat.copy()
    spiky[0, :4] = 100.0  # outliers
    dist = js.owl(0.6, outlier_threshold=5.0, lam=0.1)
    targets = dist.solve_scores({"a": flat, "b": spiky, "c": flat * 2})
    assert targets["b"] == pytest.approx(0.6 - 0.1 * 4 / 3)  # most outliers: least pruned
    assert targets["a"] == pytest.approx(targets["c"]) == pytest.approx(0.6 + 0.1 * 2 / 3)
    assert np.mean(list(targets.values())) == pytest.approx(0.6)
    by_block = js.owl(0.6, layer_of=r"block\d").solve_scores({"block0/q": flat, "block0/k": spiky, "block1/q": flat})
    assert by_block["block0/q"] == by_block["block0/k"] < by_block["block1/q"]
    with pytest.raises(ValueError, match="calibration"):
        js.static_sparse(optax.sgd(0.1), sparsity=dist).init({"w": jnp.ones((4, 4))})


def _linen_model():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32, name="fc1")(x))
            x = nn.relu(nn.Dense(32, name="fc2")(x))
            return nn.Dense(8, name="head")(x)

    return MLP()


@pytest.mark.compat
def test_driver_linen_sequential_and_finetune():
    model = _linen_model()
    x = jnp.asarray(correlated_heavy_tailed(16, 4 * 64, seed=2)).reshape(4, 64, 16)
    params = model.init(jax.random.PRNGKey(0), x[0])["params"]
    batches = list(x)
    pruned, masks = js.prune_oneshot(model, params, batches, method="sparsegpt", sparsity=0.5, exclude="head", progress=False)
    assert masks["head"]["kernel"] is None and masks["fc1"]["bias"] is None
    for layer in ("fc1", "fc2"):
        keep = np.asarray(masks[layer]["kernel"])
        assert keep.sum() == keep.size // 2
        assert np.all(np.asarray(pruned[layer]["kernel"])[~keep] == 0)
    # Sequential: fc2 was pruned from the inputs of the already-pruned fc1.
    import flax.linen as nn

    def fc2_inputs(p):
        h = nn.relu(x.reshape(-1, 16) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
        return h

    want = js.sparsegpt(params["fc2"]["kernel"], fc2_inputs(pruned), sparsity=0.5)
    np.testing.assert_allclose(pruned["fc2"]["kernel"], want, atol=1e-5)
    # The sparse fine-tune starts from (and keeps) the masks.
    tx = js.static_sparse(optax.sgd(0.1), masks=masks)
    p, state = js.init(tx, pruned)
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x[0]) ** 2))(p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    got = js.get_masks(state)
    assert np.array_equal(got["fc1"]["kernel"], masks["fc1"]["kernel"])
    assert np.all(np.asarray(p["fc1"]["kernel"])[~np.asarray(masks["fc1"]["kernel"])] == 0)
    assert not np.array_equal(p["fc1"]["kernel"], pruned["fc1"]["kernel"])


def test_driver_nnx_wanda_owl_and_n_m():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs)])
            self.head = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return self.head(x)

    model = MLP(nnx.Rngs(0))
    batches = list(jnp.asarray(correlated_heavy_tailed(16, 128, seed=4)).reshape(2, 64, 16))
    params, masks = js.prune_oneshot(model, None, batches, method="wanda", n=2, m=4, progress=False)
    for name in ("layers/0/kernel", "layers/1/kernel", "head/kernel"):
        keep = np.asarray(dict(zip(js.leaf_paths(masks), jax.tree.leaves(masks)))[name])
        assert np.all(keep.reshape(-1, 4, keep.shape[-1]).sum(1) == 2), name
    nnx.update(model, params)
    assert float(jnp.mean(model.layers[0].kernel[...] == 0)) == 0.5
    optimizer = js.nnx_optimizer(model, js.static_sparse(optax.sgd(0.1), masks=masks))  # fine-tune from the masks
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(js.get_masks(optimizer)), jax.tree.leaves(masks)))
    _, masks = js.prune_oneshot(model, None, batches, method="sparsegpt", sparsity=js.owl(0.5, lam=0.1), progress=False)
    kept = [float(np.mean(m)) for m in jax.tree.leaves(masks)]
    assert len(kept) == 3 and np.mean(kept) == pytest.approx(0.5, abs=0.01) and max(kept) - min(kept) > 0.05


def test_driver_prunes_general_layers_of_flax_attention_as_their_in_out_matrix():
    # flax's attention projects with DenseGeneral / LinearGeneral: q, k, v kernels (in, heads,
    # head_dim), the output (heads, head_dim, out); each is pruned as its (in, out) matrix
    import flax.linen as nn
    from flax import nnx

    x = jnp.asarray(correlated_heavy_tailed(16, 2 * 4 * 32, seed=5)).reshape(2, 4, 32, 16)
    linen_model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)
    params = linen_model.init(jax.random.PRNGKey(0), x[0])["params"]
    pruned, masks = js.prune_oneshot(linen_model, params, list(x), method="sparsegpt", sparsity=0.5, progress=False)
    for name in ("query", "key", "value", "out"):
        keep = np.asarray(masks[name]["kernel"])
        assert keep.shape == params[name]["kernel"].shape and keep.sum() == keep.size // 2, name
    # q sees the model's inputs: the same as SparseGPT on the (16, 2 * 8) matrix
    want = js.sparsegpt(params["query"]["kernel"].reshape(16, 16), x.reshape(-1, 16), sparsity=0.5)
    np.testing.assert_allclose(pruned["query"]["kernel"].reshape(16, 16), want, atol=1e-5)

    model = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=nnx.Rngs(0))
    _, masks = js.prune_oneshot(model, None, [(b, b) for b in x], method="wanda", n=2, m=4, progress=False)
    named = dict(zip(js.leaf_paths(masks), jax.tree.leaves(masks)))
    for name in ("query/kernel", "key/kernel", "value/kernel", "out/kernel"):
        keep = np.asarray(named[name]).reshape(16, 16)  # (in, out) with the input axes flattened
        assert np.all(keep.reshape(4, 4, 16).sum(1) == 2), name


def test_driver_warns_about_kernels_it_leaves_dense():
    import flax.linen as nn

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            return nn.Dense(4)(x.reshape(x.shape[0], -1))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 6, 6, 3)), jnp.float32)
    params = ConvNet().init(jax.random.PRNGKey(0), x[0])["params"]
    with pytest.warns(UserWarning, match=r"stay dense.*Conv_0/kernel \(3, 3, 3, 8\)"):
        _, masks = js.prune_oneshot(ConvNet(), params, list(x), method="magnitude", sparsity=0.5, progress=False)
    assert masks["Conv_0"]["kernel"] is None and masks["Dense_0"]["kernel"] is not None


def test_driver_errors():
    model = _linen_model()
    x = jnp.ones((4, 15))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    with pytest.raises(ValueError, match=r"fc1/kernel.*multiple of 4.*\(15, 32\)"):
        js.prune_oneshot(model, params, [x], method="wanda", n=2, m=4, progress=False)
    with pytest.raises(ValueError, match="method"):
        js.prune_oneshot(model, params, [x], method="obs", sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="sparsity"):
        js.prune_oneshot(model, params, [x], method="wanda", progress=False)


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxsparse as js

    mesh = Mesh(np.array(jax.devices()).reshape(4), ("data",))
    x = jax.random.normal(jax.random.PRNGKey(0), (4 * 64, 32))
    w = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
    want = js.hessian_update(js.hessian_init(32), x)
    # shard_map: each device sums its own tokens, psum over the data axis.
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    f = shard_map(lambda s, x: js.hessian_update(s, x, axis_name="data"), mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    got = jax.jit(f)(js.hessian_init(32), x)
    tol = 1e-5 * float(jnp.abs(want.hessian).max())
    np.testing.assert_allclose(got.hessian, want.hessian, atol=tol)
    assert int(got.count) == 256
    # jit with the tokens sharded: XLA reduces the partial sums.
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    got = jax.jit(js.hessian_update)(js.hessian_init(32), xs)
    np.testing.assert_allclose(got.hessian, want.hessian, atol=tol)
    np.testing.assert_allclose(js.sparsegpt(w, got, sparsity=0.5), js.sparsegpt(w, x, sparsity=0.5), atol=1e-5)
    # The model-level driver on calibration batches sharded over the data axis.
    import flax.linen as nn
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(16)])
    params = model.init(jax.random.PRNGKey(2), x[:8])["params"]
    batches = [x[:128], x[128:]]
    sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
    want, want_masks = js.prune_oneshot(model, params, batches, method="sparsegpt", sparsity=0.5, progress=False)
    got, got_masks = js.prune_oneshot(model, params, sharded, method="sparsegpt", sparsity=0.5, progress=False)
    for a, b in zip(jax.tree.leaves(want_masks), jax.tree.leaves(got_masks)):
        assert np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    print("ok")
    """
)


def test_hessian_over_data_parallel_shards():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]

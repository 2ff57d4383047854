import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

from jaxsparse.nn.attention import BlockSparseSelfAttention, local_global_mask  # noqa: E402
from pallas_kernels import attention_masks as am  # noqa: E402


def _manual_attention(params, x, num_heads, kv_heads, token_mask):
    """The layer's math written out densely: projections, GQA, masked softmax, output projection."""
    p = params["params"]
    q = jnp.einsum("bsf,fhd->bhsd", x, p["query"]["kernel"]) + p["query"]["bias"][None, :, None]
    k = jnp.einsum("bsf,fhd->bhsd", x, p["key"]["kernel"]) + p["key"]["bias"][None, :, None]
    v = jnp.einsum("bsf,fhd->bhsd", x, p["value"]["kernel"]) + p["value"]["bias"][None, :, None]
    k, v = jnp.repeat(k, num_heads // kv_heads, 1), jnp.repeat(v, num_heads // kv_heads, 1)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    attn = jax.nn.softmax(jnp.where(token_mask, s, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bhkd->bqhd", attn, v)
    return jnp.einsum("bqhd,hdf->bqf", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.compat
def test_local_global_layer_matches_dense_masked_attention():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 32)), jnp.float32)
    layer = BlockSparseSelfAttention(num_heads=4, num_kv_heads=2, block_q=16, block_k=16, causal=True,
                                     mask_builder=local_global_mask(window=16, num_global=8))
    params = jax.jit(layer.init)(jax.random.key(0), x)
    out = jax.jit(layer.apply)(params, x)
    assert out.shape == x.shape
    mask = local_global_mask(16, 8)(64, 16, 16)[0]
    tokens = np.repeat(np.repeat(mask, 16, 0), 16, 1) & np.tril(np.ones((64, 64), bool))
    np.testing.assert_allclose(out, _manual_attention(params, x, 4, 2, tokens), atol=1e-5, rtol=1e-5)


def test_mask_at_call_time_and_gradients():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 16)), jnp.float32)
    layer = BlockSparseSelfAttention(num_heads=2, block_q=16, block_k=32)
    params = jax.jit(layer.init)(jax.random.key(1), x)
    mask = am.sliding_window_mask(64, 64, 8, block_q=16, block_k=32)
    tokens = np.repeat(np.repeat(mask[0], 16, 0), 32, 1)
    apply = jax.jit(lambda p, x: layer.apply(p, x, mask))  # the mask stays concrete (closed over)
    np.testing.assert_allclose(apply(params, x), _manual_attention(params, x, 2, 2, tokens), atol=1e-5, rtol=1e-5)
    # Default mask: all blocks, i.e. dense attention.
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), _manual_attention(params, x, 2, 2, True), atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: (apply(p, x) ** 2).sum()))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves) and all(bool(jnp.any(g != 0)) for g in leaves)


def test_bad_heads():
    layer = BlockSparseSelfAttention(num_heads=4, num_kv_heads=3, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="divisible"):
        layer.init(jax.random.key(0), jnp.ones((1, 32, 12)))


def test_token_rule_and_per_call_segment_ids():
    """A token-exact window + global rule on the layer, and a document rule over segment ids given
    per call (traced under jit)."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 16)), jnp.float32)
    rule = am.or_fn(am.sliding_window_fn(10), am.global_tokens_fn(3))
    layer = BlockSparseSelfAttention(num_heads=2, block_q=16, block_k=16, causal=True, mask_fn=rule,
                                     mask_builder=local_global_mask(window=10, num_global=3))
    params = jax.jit(layer.init)(jax.random.key(2), x)
    i, j = np.arange(64)[:, None], np.arange(64)[None]
    tokens = ((j >= i - 10) | (i < 3) | (j < 3)) & (j <= i)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), _manual_attention(params, x, 2, 2, tokens), atol=1e-5, rtol=1e-5)
    seg = np.stack([np.repeat([0, 1], [20, 44]), np.repeat([0, 1, 2], [5, 30, 29])]).astype(np.int32)
    apply = jax.jit(lambda p, x, s: layer.apply(p, x, mask_fn=am.document_fn(s)))
    blocks = np.repeat(np.repeat(local_global_mask(10, 3)(64, 16, 16)[0], 16, 0), 16, 1)  # the builder's blocks stay
    docs = (seg[:, :, None] == seg[:, None, :])[:, None] & (j <= i) & blocks
    np.testing.assert_allclose(apply(params, x, seg), _manual_attention(params, x, 2, 2, docs), atol=1e-5, rtol=1e-5)


def test_nnx_layer_matches_dense_masked_attention():
    """The nnx layer: projections, GQA, a token rule given per call, against the dense math."""
    from flax import nnx

    from jaxsparse.nn.nnx import BlockSparseSelfAttention as NnxAttention

    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 16)), jnp.float32)
    layer = NnxAttention(16, 4, num_kv_heads=2, block_q=16, block_k=32, causal=True, rngs=nnx.Rngs(0))
    params = {"params": {name: {"kernel": getattr(layer, name).kernel[...], "bias": getattr(layer, name).bias[...]}
                         for name in ("query", "key", "value", "out")}}
    i, j = np.arange(64)[:, None], np.arange(64)[None]
    np.testing.assert_allclose(layer(x), _manual_attention(params, x, 4, 2, j <= i), atol=1e-5, rtol=1e-5)
    window = am.sliding_window_fn(12)
    out = nnx.jit(lambda layer, x: layer(x, mask_fn=window))(layer, x)
    np.testing.assert_allclose(out, _manual_attention(params, x, 4, 2, (j <= i) & (j >= i - 12)), atol=1e-5, rtol=1e-5)

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_masks as am
from pallas_kernels.attention import block_sparse_attention
from pallas_kernels.block_index import FULL

BACKENDS = ["xla", "tpu", "gpu"]


def dense_reference(q, k, v, block_mask, block_q, block_k, causal, scale=None):
    """Dense masked softmax attention: the block mask expanded to tokens; empty rows give zeros."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k, v = jnp.repeat(k, heads // kv_heads, axis=1), jnp.repeat(v, heads // kv_heads, axis=1)
    mask = jnp.asarray(block_mask, bool)
    mask = mask[None] if mask.ndim == 3 else mask
    allowed = jnp.repeat(jnp.repeat(mask, block_q, axis=-2), block_k, axis=-1)
    if causal:
        allowed &= jnp.arange(k.shape[2])[None, :] <= jnp.arange(q.shape[2])[:, None]
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision="highest") * scale
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = p.sum(-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, precision="highest")


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _empty_rows_mask(heads, nq, nk):
    """Random mask with fully masked rows, a full row and (under causal) a row of future blocks only."""
    mask = np.random.default_rng(3).random((heads, nq, nk)) < 0.4
    mask[:, 0] = False  # no key at all
    mask[0, 1] = True  # full density row
    mask[-1, 2] = False
    mask[-1, 2, nk - 1] = True  # only the last key block: all future keys under causal
    return mask


def _each_builder(seq_q, seq_k, bq, bk, causal):
    """One head per mask builder (and combination), so one call checks them all."""
    blocks = dict(block_q=bq, block_k=bk)
    window = am.sliding_window_mask(seq_q, seq_k, 12, causal=causal, **blocks)
    glob = am.global_tokens_mask(seq_q, seq_k, 4, **blocks)
    dilated = am.dilated_mask(seq_q, seq_k, 2, causal=causal, **blocks)
    return am.stack_heads(
        am.causal_mask(seq_q, seq_k, **blocks) if causal else am.full_mask(seq_q, seq_k, **blocks),
        window,
        glob,
        dilated,
        am.union(window, glob),
        am.intersection(am.sliding_window_mask(seq_q, seq_k, 20, **blocks), am.dilated_mask(seq_q, seq_k, 1, num_blocks=1, **blocks)),
    )


# name -> (heads, kv_heads, seq_q, seq_k, block_q, block_k, causal, mask builder(q, k) -> block mask)
CASES = {
    "causal_one_mask_for_all_heads_gqa": (4, 2, 64, 64, 16, 16, True, lambda q, k: am.causal_mask(64, 64, block_q=16, block_k=16)),
    "builders_per_head_gqa_rect_blocks": (6, 3, 64, 128, 16, 32, False, lambda q, k: _each_builder(64, 128, 16, 32, False)),
    "builders_per_head_causal_mqa": (6, 1, 64, 64, 16, 16, True, lambda q, k: _each_builder(64, 64, 16, 16, True)),
    "topk_per_example_causal": (4, 2, 64, 64, 16, 16, True, lambda q, k: am.topk_mask(q, k, 2, block_q=16, block_k=16, causal=True)),
    "empty_rows_causal": (2, 2, 64, 64, 16, 16, True, lambda q, k: _empty_rows_mask(2, 4, 4)),
}


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, q, k, v, cot):
    """``fn(q, k, v)`` and its vjp with ``cot``, in one compiled function."""
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot)


@functools.lru_cache(maxsize=None)
def _case_data(name):
    heads, kv_heads, seq_q, seq_k, bq, bk, causal, build = CASES[name]
    q = _random((2, heads, seq_q, 16), 0)
    k, v = _random((2, kv_heads, seq_k, 16), 1), _random((2, kv_heads, seq_k, 16), 2)
    cot = _random(q.shape, 4)  # a random output cotangent, so every gradient entry is exercised
    mask = build(q, k)
    reference = functools.partial(dense_reference, block_mask=mask, block_q=bq, block_k=bk, causal=causal)
    out, grads = _value_and_vjp(reference, q, k, v, cot)
    return (q, k, v, cot, mask, bq, bk, causal), out, grads


def _check(backend, data, want_out, want_grads, interpret=True):
    q, k, v, cot, mask, bq, bk, causal = data
    attend = lambda q, k, v: block_sparse_attention(
        q, k, v, mask, block_q=bq, block_k=bk, causal=causal, backend=backend, interpret=interpret
    )
    out, grads = _value_and_vjp(attend, q, k, v, cot)
    for name, got, want in zip(["out", "dq", "dk", "dv"], (out,) + grads, (want_out,) + want_grads):
        assert bool(jnp.isfinite(got).all()), f"{name} has NaN/inf"
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=name)
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c != "empty_rows_causal"])  # that one: below
def test_matches_dense_reference(backend, case):
    data, out, grads = _case_data(case)
    _check(backend, data, out, grads)


@pytest.mark.compat
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_gradients(backend):
    data, want_out, want_grads = _case_data("empty_rows_causal")
    out, (dq, _, _) = _check(backend, data, want_out, want_grads)
    # Query block 0 has no blocks; query block 2 of head 1 only future keys (causal): exact zeros.
    for h, i in [(0, 0), (1, 0), (1, 2)]:
        rows = slice(16 * i, 16 * i + 16)
        assert not np.asarray(out[:, h, rows]).any() and not np.asarray(dq[:, h, rows]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_reads_unlisted_blocks(backend):
    """Keys/values in a block no query lists hold NaN: nothing of them may reach the results."""
    blocks = dict(block_q=16, block_k=16)
    # 3 query blocks x 4 key blocks; no row lists key block 3 (tokens 48..63).
    mask = am.stack_heads(am.causal_mask(48, 64, **blocks), am.sliding_window_mask(48, 64, 4, causal=True, **blocks))
    q, k, v = _random((1, 2, 48, 16), 0), _random((1, 2, 64, 16), 1), _random((1, 2, 64, 16), 2)
    poison = lambda x: x.at[:, :, 48:].set(jnp.nan)
    attend = lambda q, k, v: block_sparse_attention(q, k, v, mask, **blocks, backend=backend, interpret=True)
    out, (dq, dk, dv) = _value_and_vjp(attend, q, poison(k), poison(v), jnp.ones(q.shape))
    np.testing.assert_allclose(out, dense_reference(q, k, v, mask, 16, 16, False), atol=2e-5, rtol=2e-5)
    assert bool(jnp.isfinite(dq).all())
    for g in (dk, dv):
        assert bool(jnp.isfinite(g[:, :, :48]).all()) and not np.asarray(g[:, :, 48:]).any()


@pytest.mark.compat
@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_dynamic_mask_under_jit(backend):
    """A top-k mask computed inside jit (traced) with a static max_blocks."""
    q, k, v = _random((2, 4, 64, 16), 5), _random((2, 2, 64, 16), 6), _random((2, 2, 64, 16), 7)

    @jax.jit
    def run(q, k, v):
        mask = am.topk_mask(q, k, 2, block_q=16, block_k=16)
        out = block_sparse_attention(q, k, v, mask, block_q=16, block_k=16, backend=backend, interpret=True, max_blocks=2)
        return out, mask

    out, mask = run(q, k, v)
    np.testing.assert_allclose(out, dense_reference(q, k, v, mask, 16, 16, False), atol=2e-5, rtol=2e-5)


def test_traced_mask_without_max_blocks_visits_all_key_blocks():
    data, want_out, _ = _case_data("builders_per_head_gqa_rect_blocks")
    q, k, v, _, mask, bq, bk, causal = data
    run = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, block_q=bq, block_k=bk, causal=causal))
    np.testing.assert_allclose(run(q, k, v, jnp.asarray(mask)), want_out, atol=2e-5, rtol=2e-5)


def test_scale_and_bf16():
    data, _, _ = _case_data("causal_one_mask_for_all_heads_gqa")
    q, k, v, _, mask, bq, bk, causal = data
    attend = jax.jit(lambda q, k, v, scale: block_sparse_attention(q, k, v, mask, block_q=bq, block_k=bk, causal=causal, scale=scale),
                     static_argnums=3)
    np.testing.assert_allclose(attend(q, k, v, 0.3), dense_reference(q, k, v, mask, bq, bk, causal, scale=0.3), atol=2e-5, rtol=2e-5)
    out = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), dense_reference(q, k, v, mask, bq, bk, causal), atol=5e-2)


@pytest.mark.compat
def test_bad_input_raises_value_error_naming_shapes():
    q, k = jnp.ones((1, 4, 64, 16)), jnp.ones((1, 2, 64, 16))
    mask = am.full_mask(64, 64, block_q=16, block_k=16)
    call = functools.partial(block_sparse_attention, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=r"seq_q \(60\).*block_q \(16\).*q \(1, 4, 60, 16\)"):
        call(jnp.ones((1, 4, 60, 16)), k, k, mask)
    with pytest.raises(ValueError, match=r"seq_k \(64\).*block_k \(24\)"):
        block_sparse_attention(q, k, k, mask, block_q=16, block_k=24)
    with pytest.raises(ValueError, match=r"block_mask .*\[4 or 1, 4, 4\].*block_mask \(1, 4, 3\)"):
        call(q, k, k, mask[:, :, :3])
    with pytest.raises(ValueError, match=r"block_mask"):
        call(q, k, k, np.ones((2, 4, 4), bool))  # 2 mask heads for 4 query heads
    with pytest.raises(ValueError, match=r"heads \(4\) must be divisible by kv_heads \(3\)"):
        call(q, jnp.ones((1, 3, 64, 16)), jnp.ones((1, 3, 64, 16)), mask)
    with pytest.raises(ValueError, match="same shape"):
        call(q, k, jnp.ones((1, 2, 64, 8)), mask)
    with pytest.raises(ValueError, match="backend"):
        call(q, k, k, mask, backend="cuda")
    with pytest.raises(ValueError, match=r"powers of two.*'head_dim': 24"):
        call(jnp.ones((1, 4, 64, 24)), jnp.ones((1, 2, 64, 24)), jnp.ones((1, 2, 64, 24)), mask, backend="gpu")


def _lower(backend, platform):
    """Lower forward + backward for a real accelerator (checks Mosaic / Triton lowering, no run),
    with full and partial blocks (causal, and a document rule over segment ids)."""
    seq, bs = 512, 128
    mask = am.union(
        am.sliding_window_mask(seq, seq, 128, causal=True, block_q=bs, block_k=bs),
        am.global_tokens_mask(seq, seq, 16, block_q=bs, block_k=bs),
    )
    q = jax.ShapeDtypeStruct((1, 4, seq, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, seq, 64), jnp.bfloat16)
    documents = am.document_fn(np.repeat(np.arange(4), 128))  # partial blocks from a rule that gathers
    attend = lambda q, k, v: block_sparse_attention(q, k, v, mask, mask_fn=documents, block_q=bs, block_k=bs, causal=True, backend=backend)
    grads = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
    return jax.jit(grads).trace(q, kv, kv).lower(lowering_platforms=(platform,)).as_text()


def test_tpu_kernels_lower_to_mosaic():
    assert "tpu_custom_call" in _lower("tpu", "tpu")


def test_gpu_kernels_lower_to_triton():
    try:
        text = _lower("gpu", "cuda")
    except RuntimeError as e:  # newer jax needs a GPU (or an abstract one) to lower Triton calls
        if "No supported GPU devices" not in str(e):
            raise
        pytest.skip("this jax cannot lower Triton kernels without a GPU")
    assert "triton" in text


def test_tpu_kernels_in_the_tpu_interpreter():
    """The TPU kernels under Pallas' TPU interpreter, which simulates TPU memories and DMAs."""
    from jax.experimental.pallas import tpu as pltpu

    data, want_out, want_grads = _case_data("empty_rows_causal")
    _check("tpu", data, want_out, want_grads, interpret=pltpu.InterpretParams())


# --- Token-level rules (mask_fn) on every path, several row and column tiles in every kernel grid.


def token_reference(q, k, v, allowed, scale=None):
    """Dense attention with a token mask ``allowed`` broadcasting to ``[B, H, Sq, Sk]``; rows with
    no allowed key give zeros (and zero gradients)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k, v = jnp.repeat(k, heads // kv_heads, axis=1), jnp.repeat(v, heads // kv_heads, axis=1)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision="highest") * scale
    m = jnp.where(allowed, s, -jnp.inf).max(-1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v.astype(jnp.float32), precision="highest")


def _allowed(rule, block_mask, batch, heads, seq_q, seq_k, bq, bk):
    """Token mask ``[B, H, Sq, Sk]`` of a rule restricted to a block mask (brute force)."""
    b = np.arange(batch)[:, None, None, None]
    h = np.arange(heads)[None, :, None, None]
    tokens = np.broadcast_to(np.asarray(rule(b, h, np.arange(seq_q)[:, None], np.arange(seq_k)[None])), (batch, heads, seq_q, seq_k))
    if block_mask is not None:
        blocks = np.asarray(block_mask, bool)
        blocks = blocks[None] if blocks.ndim == 3 else blocks
        tokens = tokens & np.repeat(np.repeat(blocks, bq, -2), bk, -1)
    return tokens


def _segments(batch, seq, seed):
    """Packed documents of random lengths, one packing per example."""
    rng = np.random.default_rng(seed)
    ids = np.stack([np.sort(rng.integers(0, 5, seq)) for _ in range(batch)]).astype(np.int32)
    return ids


def _uneven(shape, seed, density=0.5):
    """Random block mask with uneven rows: one empty row, one full row."""
    mask = np.random.default_rng(seed).random(shape) < density
    mask[..., 1, :] = False
    mask[..., 2, :] = True
    return mask


# name -> (heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k, rule, block_mask, causal)
RULE_CASES = {
    # documents (per example) closing over segment ids, causal, uneven block mask, GQA, d=64
    "documents_causal_gqa_d64": (4, 2, 64, 64, 64, 16, 16, am.and_fn(am.document_fn(_segments(2, 64, 0)), am.causal_fn()),
                                 _uneven((1, 4, 4), 0, 0.7), False),
    # window + global tokens, causal shorthand with seq_q != seq_k, MQA, d=128, per-head block mask
    "window_global_causal_rect_d128": (2, 1, 64, 96, 128, 16, 32, am.or_fn(am.sliding_window_fn(10, 3), am.global_tokens_fn(5)),
                                       _uneven((2, 4, 3), 1, 0.8), True),
    # prefix-LM with one prefix length per example, no block mask (all blocks), rectangular blocks
    "prefix_lm_per_example": (2, 2, 96, 64, 32, 32, 16, am.prefix_lm_fn(np.array([7, 40])), None, False),
}


@functools.lru_cache(maxsize=None)
def _rule_case(name):
    heads, kv_heads, seq_q, seq_k, dim, bq, bk, rule, block_mask, causal = RULE_CASES[name]
    q = _random((2, heads, seq_q, dim), 10)
    k, v = _random((2, kv_heads, seq_k, dim), 11), _random((2, kv_heads, seq_k, dim), 12)
    cot = _random(q.shape, 13)
    full_rule = am.and_fn(am.causal_fn(), rule) if causal else rule
    allowed = _allowed(full_rule, block_mask, 2, heads, seq_q, seq_k, bq, bk)
    want = _value_and_vjp(functools.partial(token_reference, allowed=allowed), q, k, v, cot)
    attend = lambda backend: lambda q, k, v: block_sparse_attention(
        q, k, v, block_mask, mask_fn=rule, causal=causal, block_q=bq, block_k=bk, backend=backend, interpret=True
    )
    xla = _value_and_vjp(attend("xla"), q, k, v, cot)
    return (q, k, v, cot), attend, want, xla


def _assert_close(got, want, atol=2e-5, what=""):
    (out, grads), (want_out, want_grads) = got, want
    for name, g, w in zip(["out", "dq", "dk", "dv"], (out,) + tuple(grads), (want_out,) + tuple(want_grads)):
        assert bool(jnp.isfinite(g).all()), f"{what} {name} has NaN/inf"
        np.testing.assert_allclose(g, w, atol=atol, rtol=atol, err_msg=f"{what} {name}")


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rules_xla_matches_dense_token_reference(case):
    _, _, want, xla = _rule_case(case)
    _assert_close(xla, want, what=case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rules_kernels_match_xla_and_reference(backend, case):
    """Forward, dq and dk/dv kernels in interpret mode, 3-6 row and column tiles per grid."""
    args, attend, want, xla = _rule_case(case)
    got = _value_and_vjp(attend(backend), *args)
    _assert_close(got, xla, atol=1e-5, what=f"{case} {backend} vs xla")
    _assert_close(got, want, what=f"{case} {backend} vs reference")


@pytest.mark.compat
@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_over_traced_segment_ids_under_jit(backend):
    """Segment ids passed to jit: the rule closes over a tracer, every visited block is partial,
    and kernels take the ids as inputs. Also a query whose segment has no key: zeros, zero grads."""
    q, k, v = _random((2, 2, 64, 16), 20), _random((2, 1, 64, 16), 21), _random((2, 1, 64, 16), 22)
    seg = _segments(2, 64, 1)
    kv_seg = np.where(seg == seg[:, :1], -1, seg)  # the first document of each example has no keys
    mask = am.causal_mask(64, 64, block_q=16, block_k=16)

    @jax.jit
    def run(q, k, v, seg, kv_seg):
        attend = lambda q, k, v: block_sparse_attention(
            q, k, v, mask, mask_fn=am.document_fn(seg, kv_seg), causal=True, block_q=16, block_k=16,
            backend=backend, interpret=True,
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(jnp.ones_like(out))

    out, grads = run(q, k, v, seg, kv_seg)
    allowed = _allowed(am.and_fn(am.document_fn(seg, kv_seg), am.causal_fn()), mask, 2, 2, 64, 64, 16, 16)
    want = _value_and_vjp(functools.partial(token_reference, allowed=allowed), q, k, v, jnp.ones(q.shape))
    _assert_close((out, grads), want, what=backend)
    empty = ~allowed.any(-1)  # [B, H, Sq]
    assert empty.any() and not np.asarray(out)[empty].any() and not np.asarray(grads[0])[empty].any()


def test_rule_bf16_and_full_blocks_without_rule():
    """bf16 inputs; a rule whose blocks are all full (a wide window) gives plain block attention."""
    q, k, v = (_random((1, 2, 64, 32), s).astype(jnp.bfloat16) for s in (30, 31, 32))
    rule = am.and_fn(am.document_fn(np.repeat(np.arange(4), 16)), am.causal_fn())
    out = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, mask_fn=rule, block_q=16, block_k=16))(q, k, v)
    assert out.dtype == jnp.bfloat16
    want = token_reference(q, k, v, _allowed(rule, None, 1, 2, 64, 64, 16, 16))
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2)
    everything = am.sliding_window_fn(64, 64)
    assert (am.block_kinds(everything, 64, 64, block_q=16, block_k=16) == FULL).all()
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    np.testing.assert_allclose(block_sparse_attention(q32, k32, v32, mask_fn=everything, block_q=16, block_k=16),
                               token_reference(q32, k32, v32, True), atol=2e-5, rtol=2e-5)


@pytest.mark.compat
@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_topk_size_under_jit(backend):
    """A top-k mask with a traced top_k: the XLA path loops over the real pairs only."""
    q, k, v = _random((1, 2, 64, 16), 40), _random((1, 2, 64, 16), 41), _random((1, 2, 64, 16), 42)

    @jax.jit
    def run(q, k, v, top_k):
        mask = am.topk_mask(q, k, top_k, block_q=16, block_k=16, causal=True)
        out = block_sparse_attention(q, k, v, mask, causal=True, block_q=16, block_k=16, backend=backend, interpret=True, max_blocks=3)
        return out, mask

    for top_k in (1, 3):
        out, mask = run(q, k, v, top_k)
        assert (np.asarray(mask).sum(-1) == np.minimum(top_k, np.arange(1, 5))).all()
        np.testing.assert_allclose(out, dense_reference(q, k, v, mask, 16, 16, True), atol=2e-5, rtol=2e-5)

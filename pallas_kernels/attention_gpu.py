"""Pallas GPU (Triton backend) kernels for block-sparse attention.

One program per (query block, batch x head). It reads its row of the compressed block mask inside
the kernel, and a ``fori_loop`` with the row's count as trip count walks only the real entries
(padding is never touched), slicing each listed key/value block out of the full-sequence refs.
Forward: FlashAttention's online softmax (Dao et al. 2022, arXiv:2205.14135; the same row-wise
schedule as FlashAttention-2, Dao 2023, arXiv:2307.08691) in registers, writing the output and the
log-sum-exp. Backward: a ``dq`` kernel over the row lists and a ``dk``/``dv`` kernel over the
transposed lists (per key block, its query blocks), so each program owns the gradient it writes
and no atomics are needed; under grouped-query attention ``dk``/``dv`` come per query head (f32)
and XLA sums each group. The per-block math is ``attention_xla``'s.

Block sizes and head_dim must be powers of two (Triton tensors), at least 16 (``tl.dot``).
Tests run these kernels with ``interpret=True`` on CPU and check that they lower to Triton.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention_xla import (
    block_keep,
    finish,
    flat_lists,
    grad_step,
    init_carry,
    scores,
    softmax_residuals,
    softmax_step,
    sum_head_groups,
)

__all__ = ["forward", "backward"]


def _params(interpret, num_warps: int):
    return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2), interpret=interpret)


def _program(heads: int):
    """(block index, batch, head) of this program; grid axis 1 enumerates batch x heads."""
    bh = pl.program_id(1)
    return pl.program_id(0), bh // heads, bh % heads


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, row, slots, heads, block_q, block_k, causal, scale):
    i, b, h = _program(heads)
    r = row(b, h, i)
    q = q_ref[...]

    def body(s, carry):
        start = idx_ref[r * slots + s] * block_k
        keep = block_keep(i * block_q, start, block_q, block_k, causal, True)
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        return softmax_step(carry, scores(q, k, scale), keep, v)

    out, lse = finish(lax.fori_loop(0, cnt_ref[r], body, init_carry(q.shape)))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _specs(batch_heads_map, shapes):
    return [pl.BlockSpec(shape, batch_heads_map) for shape in shapes]


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal", "scale", "interpret"))
def forward(q, k, v, indices, counts, *, block_q: int, block_k: int, causal: bool, scale: float, interpret=False):
    """Forward kernel; same arguments and results as ``attention_xla.forward``."""
    batch, heads, seq_q, dim = q.shape
    seq_k, group = k.shape[2], heads // k.shape[1]
    flat_idx, flat_cnt, row, slots = flat_lists(indices, counts)
    own_q = lambda i, bh: (bh // heads, bh % heads, i, 0)
    whole_kv = lambda i, bh: (bh // heads, bh % heads // group, 0, 0)
    whole = lambda i, bh: (0,)
    kernel = functools.partial(_fwd_kernel, row=row, slots=slots, heads=heads, block_q=block_q, block_k=block_k, causal=causal, scale=scale)
    out, lse = pl.pallas_call(
        kernel,
        grid=(seq_q // block_q, batch * heads),
        in_specs=[
            pl.BlockSpec(flat_idx.shape, whole),
            pl.BlockSpec(flat_cnt.shape, whole),
            pl.BlockSpec((None, None, block_q, dim), own_q),
            *_specs(whole_kv, [(None, None, seq_k, dim)] * 2),
        ],
        out_specs=_specs(own_q, [(None, None, block_q, dim), (None, None, block_q, 1)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq_q, 1), jnp.float32)],
        **_params(interpret, num_warps=4 if dim <= 64 else 8),
    )(flat_idx, flat_cnt, q, k, v)
    return out, lse[..., 0]


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, row, slots, heads, block_q, block_k, causal, scale):
    i, b, h = _program(heads)
    r = row(b, h, i)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(s, dq):
        start = idx_ref[r * slots + s] * block_k
        keep = block_keep(i * block_q, start, block_q, block_k, causal, True)
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        return dq + grad_step(q, k, v, do, lse, delta, keep, scale, want_dkv=False)[0]

    dq = lax.fori_loop(0, cnt_ref[r], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, row, slots, heads, block_q, block_k, causal, scale):
    j, b, h = _program(heads)
    r = row(b, h, j)
    k, v = k_ref[...], v_ref[...]

    def body(s, carry):
        start = idx_ref[r * slots + s] * block_q
        keep = block_keep(start, j * block_k, block_q, block_k, causal, True)
        rows = pl.ds(start, block_q)
        _, dk, dv = grad_step(q_ref[rows, :], k, v, do_ref[rows, :], lse_ref[rows, :], delta_ref[rows, :], keep, scale, want_dq=False)
        return carry[0] + dk, carry[1] + dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cnt_ref[r], body, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk, dv


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal", "scale", "interpret"))
def backward(q, k, v, out, lse, do, indices, counts, indices_t, counts_t, *, block_q: int, block_k: int, causal: bool, scale: float, interpret=False):
    """Backward kernels; ``indices_t``/``counts_t`` are the compressed transposed mask (per key
    block, its query blocks). Returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``."""
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1:3]
    group = heads // kv_heads
    lse, delta = softmax_residuals(out, do, lse)
    static = dict(heads=heads, block_q=block_q, block_k=block_k, causal=causal, scale=scale)
    params = _params(interpret, num_warps=4 if dim <= 64 else 8)
    whole = lambda n, bh: (0,)
    own = lambda n, bh: (bh // heads, bh % heads, n, 0)
    own_kv = lambda n, bh: (bh // heads, bh % heads // group, n, 0)
    whole_q = lambda n, bh: (bh // heads, bh % heads, 0, 0)
    whole_kv = lambda n, bh: (bh // heads, bh % heads // group, 0, 0)
    q_rows, k_rows = (None, None, block_q, dim), (None, None, block_k, dim)

    flat_idx, flat_cnt, row, slots = flat_lists(indices, counts)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, row=row, slots=slots, **static),
        grid=(seq_q // block_q, batch * heads),
        in_specs=[
            pl.BlockSpec(flat_idx.shape, whole),
            pl.BlockSpec(flat_cnt.shape, whole),
            pl.BlockSpec(q_rows, own),
            *_specs(whole_kv, [(None, None, seq_k, dim)] * 2),
            *_specs(own, [q_rows, (None, None, block_q, 1), (None, None, block_q, 1)]),
        ],
        out_specs=pl.BlockSpec(q_rows, own),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **params,
    )(flat_idx, flat_cnt, q, k, v, do, lse, delta)

    flat_idx_t, flat_cnt_t, row_t, slots_t = flat_lists(indices_t, counts_t)
    grad_shape = jax.ShapeDtypeStruct((batch, heads, seq_k, dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, row=row_t, slots=slots_t, **static),
        grid=(seq_k // block_k, batch * heads),
        in_specs=[
            pl.BlockSpec(flat_idx_t.shape, whole),
            pl.BlockSpec(flat_cnt_t.shape, whole),
            pl.BlockSpec((None, None, seq_q, dim), whole_q),
            *_specs(own_kv, [k_rows, k_rows]),
            *_specs(whole_q, [(None, None, seq_q, dim), (None, None, seq_q, 1), (None, None, seq_q, 1)]),
        ],
        out_specs=_specs(own, [k_rows, k_rows]),
        out_shape=[grad_shape, grad_shape],
        **params,
    )(flat_idx_t, flat_cnt_t, q, k, v, do, lse, delta)
    return dq, sum_head_groups(dk, k), sum_head_groups(dv, v)

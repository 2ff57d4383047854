"""Pallas TPU kernels for block-sparse attention, driven by scalar-prefetched block lists.

The compressed block mask (per query block, its padded list of key blocks) is scalar-prefetched
into SMEM, so the ``BlockSpec`` index maps read it to decide which key/value block to DMA at each
grid step (the technique of JAX's splash attention). Grid ``(batch, heads, q blocks, slots)``:
the last axis walks a query block's list and is sequential ("arbitrary"). Padding slots repeat
the row's last key block, so the pipeline sees an unchanged block index and issues no copy, and
``pl.when(slot < count)`` skips their compute.

Forward: FlashAttention's online softmax (Dao et al. 2022, arXiv:2205.14135) with the running
max, normaliser and output in VMEM scratch; it writes the output and the log-sum-exp.
Backward: a ``dq`` kernel over the same row lists, and a ``dk``/``dv`` kernel over the transposed
lists (per key block, its query blocks) so that each program owns its key block's gradient and no
atomics are needed. Under grouped-query attention the ``dk``/``dv`` kernel writes one gradient
per query head (f32) and XLA sums each group. The per-block math is ``attention_xla``'s.

Not run on TPU hardware in this repository's tests: they run the kernels with ``interpret=True``
on CPU and check that they lower to Mosaic for TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, row, slots, block_q, block_k, causal, scale):
    b, h, i, s = (pl.program_id(a) for a in range(4))
    r = row(b, h, i)

    @pl.when(s == 0)
    def _init():
        m_sc[...], l_sc[...], acc_sc[...] = init_carry(acc_sc.shape)

    @pl.when(s < cnt_ref[r])
    def _step():
        keep = block_keep(i * block_q, idx_ref[r * slots + s] * block_k, block_q, block_k, causal, True)
        carry = (m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = softmax_step(carry, scores(q_ref[...], k_ref[...], scale), keep, v_ref[...])

    @pl.when(s == slots - 1)
    def _finish():
        out, lse = finish((m_sc[...], l_sc[...], acc_sc[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal", "scale", "interpret"))
def forward(q, k, v, indices, counts, *, block_q: int, block_k: int, causal: bool, scale: float, interpret=False):
    """Forward kernel; same arguments and results as ``attention_xla.forward``."""
    batch, heads, seq_q, dim = q.shape
    group = heads // k.shape[1]
    flat_idx, flat_cnt, row, slots = flat_lists(indices, counts)
    nq = seq_q // block_q

    def q_map(b, h, i, s, idx, cnt):
        return b, h, i, 0

    def kv_map(b, h, i, s, idx, cnt):
        return b, lax.div(h, group), idx[row(b, h, i) * slots + s], 0

    kernel = functools.partial(_fwd_kernel, row=row, slots=slots, block_q=block_q, block_k=block_k, causal=causal, scale=scale)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, nq, slots),
            in_specs=[
                pl.BlockSpec((None, None, block_q, dim), q_map),
                pl.BlockSpec((None, None, block_k, dim), kv_map),
                pl.BlockSpec((None, None, block_k, dim), kv_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, block_q, dim), q_map),
                pl.BlockSpec((None, None, block_q, 1), q_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, dim), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq_q, 1), jnp.float32)],
        **_params(interpret),
    )(flat_idx, flat_cnt, q, k, v)
    return out, lse[..., 0]


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, row, slots, block_q, block_k, causal, scale):
    b, h, i, s = (pl.program_id(a) for a in range(4))
    r = row(b, h, i)

    @pl.when(s == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(s < cnt_ref[r])
    def _step():
        keep = block_keep(i * block_q, idx_ref[r * slots + s] * block_k, block_q, block_k, causal, True)
        dq, _, _ = grad_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], keep, scale, want_dkv=False)
        dq_sc[...] += dq

    @pl.when(s == slots - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, row, slots, block_q, block_k, causal, scale):
    b, h, j, s = (pl.program_id(a) for a in range(4))
    r = row(b, h, j)

    @pl.when(s == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(s < cnt_ref[r])
    def _step():
        keep = block_keep(idx_ref[r * slots + s] * block_q, j * block_k, block_q, block_k, causal, True)
        _, dk, dv = grad_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], keep, scale, want_dq=False)
        dk_sc[...] += dk
        dv_sc[...] += dv

    @pl.when(s == slots - 1)
    def _finish():
        dk_ref[...] = dk_sc[...]
        dv_ref[...] = dv_sc[...]


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal", "scale", "interpret"))
def backward(q, k, v, out, lse, do, indices, counts, indices_t, counts_t, *, block_q: int, block_k: int, causal: bool, scale: float, interpret=False):
    """Backward kernels; ``indices_t``/``counts_t`` are the compressed transposed mask (per key
    block, its query blocks). Returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``."""
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1:3]
    group = heads // kv_heads
    lse, delta = softmax_residuals(out, do, lse)
    static = dict(block_q=block_q, block_k=block_k, causal=causal, scale=scale)
    q_spec = lambda index_map: pl.BlockSpec((None, None, block_q, dim), index_map)
    col_spec = lambda index_map: pl.BlockSpec((None, None, block_q, 1), index_map)
    kv_spec = lambda index_map: pl.BlockSpec((None, None, block_k, dim), index_map)

    # dq: per query block, over its key blocks (as the forward).
    flat_idx, flat_cnt, row, slots = flat_lists(indices, counts)

    def own_q(b, h, i, s, idx, cnt):
        return b, h, i, 0

    def listed_kv(b, h, i, s, idx, cnt):
        return b, lax.div(h, group), idx[row(b, h, i) * slots + s], 0

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, row=row, slots=slots, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_q // block_q, slots),
            in_specs=[q_spec(own_q), kv_spec(listed_kv), kv_spec(listed_kv), q_spec(own_q), col_spec(own_q), col_spec(own_q)],
            out_specs=q_spec(own_q),
            scratch_shapes=[pltpu.VMEM((block_q, dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **_params(interpret),
    )(flat_idx, flat_cnt, q, k, v, do, lse, delta)

    # dk, dv: per key block, over its query blocks; one gradient per query head.
    flat_idx_t, flat_cnt_t, row_t, slots_t = flat_lists(indices_t, counts_t)

    def own_kv(b, h, j, s, idx, cnt):
        return b, lax.div(h, group), j, 0

    def own_kv_per_head(b, h, j, s, idx, cnt):
        return b, h, j, 0

    def listed_q(b, h, j, s, idx, cnt):
        return b, h, idx[row_t(b, h, j) * slots_t + s], 0

    grad_shape = jax.ShapeDtypeStruct((batch, heads, seq_k, dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, row=row_t, slots=slots_t, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_k // block_k, slots_t),
            in_specs=[q_spec(listed_q), kv_spec(own_kv), kv_spec(own_kv), q_spec(listed_q), col_spec(listed_q), col_spec(listed_q)],
            out_specs=[kv_spec(own_kv_per_head), kv_spec(own_kv_per_head)],
            scratch_shapes=[pltpu.VMEM((block_k, dim), jnp.float32), pltpu.VMEM((block_k, dim), jnp.float32)],
        ),
        out_shape=[grad_shape, grad_shape],
        **_params(interpret),
    )(flat_idx_t, flat_cnt_t, q, k, v, do, lse, delta)
    return dq, sum_head_groups(dk, k), sum_head_groups(dv, v)

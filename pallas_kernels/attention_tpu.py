"""Pallas TPU kernels for block-sparse attention: a flat grid over the nonzero block pairs.

The block mask arrives as one row-major list of its nonzero (query block, key block) pairs
(``block_index.pairs_by_row``), scalar-prefetched into SMEM, so the ``BlockSpec`` index maps read
it to decide which query, key and value blocks to DMA at each grid step (the technique of JAX's
splash attention). Grid ``(batch, heads, pairs)``: the last axis walks the list and is
sequential ("arbitrary"); the output block follows the pair's query block, so consecutive pairs
of one row revisit it and it stays in VMEM until the row's last pair. The grid therefore has one
step per nonzero pair (plus one stand-in step per empty row, which writes zeros), however uneven
the rows: no row is padded to the longest. Per-pair flags say where a row starts and ends and
whether the pair is partial, i.e. cut by the token-level rule (``mask_fn``): a partial pair loads
its token mask, which XLA evaluated from the rule before the call (splash attention's partial
mask blocks; the mask's slot is prefetched per pair), so any rule runs, gathers from segment ids
included; full pairs skip the mask.

Forward: FlashAttention's online softmax (Dao et al. 2022, arXiv:2205.14135) with the running
max, normaliser and output in VMEM scratch; it writes the output and the log-sum-exp.
Backward: a ``dq`` kernel over the same row-major list, and a ``dk``/``dv`` kernel over the
column-major list (per key block, its query blocks) so that each program owns its key block's
gradient and no atomics are needed. Under grouped-query attention the ``dk``/``dv`` kernel writes
one gradient per query head (f32) and XLA sums each group. The per-block math is
``attention_xla``'s.

Not run on TPU hardware in this repository's tests: they run the kernels with ``interpret=True``
on CPU and check that they lower to Mosaic for TPU. The six scalar-prefetched lists take
``24 * pairs`` bytes of SMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention_xla import (
    finish,
    grad_step,
    init_carry,
    scores,
    softmax_residuals,
    softmax_step,
    sum_head_groups,
)
from pallas_kernels.block_index import COMPUTE, FIRST, LAST, PARTIAL_BIT

__all__ = ["forward", "backward"]

_STATIC = ("block_q", "block_k", "scale", "mask_dims", "interpret")
_PREFETCH = 6  # pairs (b, h, row, col, flags) and each pair's partial-mask slot


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


def _grid(q_shape, pairs, mask_dims):
    """Grid ``(B', H', pairs)``: the whole batch (heads) on the grid where the mask is shared,
    else 1 and the pair's own batch (head) index."""
    return (q_shape[0] if mask_dims[0] == 1 else 1, q_shape[1] if mask_dims[1] == 1 else 1, pairs.row.shape[0])


def _where(mask_dims):
    """``(b, h, p, refs) -> (batch, head, row, col)`` of pair ``p`` (grid or prefetched indices)."""

    def at(gb, gh, p, b_ref, h_ref, row_ref, col_ref, *_):
        return (b_ref[p] if mask_dims[0] > 1 else gb, h_ref[p] if mask_dims[1] > 1 else gh, row_ref[p], col_ref[p])

    return at


def _mask_spec(block_q: int, block_k: int):
    """The partial pair's token mask (``[n, block_q, block_k]`` int8, slot prefetched per pair)."""
    return pl.BlockSpec((None, block_q, block_k), lambda gb, gh, p, *refs: (refs[5][p], 0, 0))


def _pair_steps(flags, on_first, on_pair, on_last, mask_ref):
    """Run ``on_first``, ``on_pair(keep)`` (``True`` for a full pair, the loaded token mask for a
    partial one) and ``on_last`` as the pair's flags say."""
    compute = (flags & COMPUTE) != 0
    partial = (flags & PARTIAL_BIT) != 0
    pl.when((flags & FIRST) != 0)(on_first)
    pl.when(compute & ~partial)(lambda: on_pair(True))
    pl.when(compute & partial)(lambda: on_pair(mask_ref[...] != 0))
    pl.when((flags & LAST) != 0)(on_last)


def _fwd_kernel(b_ref, h_ref, row_ref, col_ref, flags_ref, slot_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale):
    p = pl.program_id(2)

    def first():
        m_sc[...], l_sc[...], acc_sc[...] = init_carry(acc_sc.shape)

    def pair(keep):
        carry = (m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = softmax_step(carry, scores(q_ref[...], k_ref[...], scale), keep, v_ref[...])

    def last():
        out, lse = finish((m_sc[...], l_sc[...], acc_sc[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse

    _pair_steps(flags_ref[p], first, pair, last, mask_ref)


def _index_maps(at, group: int):
    """Index maps of a pair grid: the pair's query-side block and its key/value-side block."""

    def q_map(gb, gh, p, *refs):
        b, h, i, _ = at(gb, gh, p, *refs)
        return b, h, i, 0

    def kv_map(gb, gh, p, *refs):
        b, h, _, j = at(gb, gh, p, *refs)
        return b, lax.div(h, group), j, 0

    return q_map, kv_map


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(q, k, v, plan, consts=(), *, block_q: int, block_k: int, scale: float, mask_dims, interpret=False):
    """Forward kernel over ``plan["rows"]`` (``block_index.pairs_by_row``), ``plan["row_slots"]``
    and ``plan["masks"]`` (the partial pairs' token masks); results as ``attention_xla.forward``."""
    del consts  # the rule arrives evaluated, as plan["masks"]
    batch, heads, seq_q, dim = q.shape
    pairs = plan["rows"]
    q_map, kv_map = _index_maps(_where(mask_dims), heads // k.shape[1])
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=_PREFETCH,
            grid=_grid(q.shape, pairs, mask_dims),
            in_specs=[
                pl.BlockSpec((None, None, block_q, dim), q_map),
                pl.BlockSpec((None, None, block_k, dim), kv_map),
                pl.BlockSpec((None, None, block_k, dim), kv_map),
                _mask_spec(block_q, block_k),
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
    )(*pairs, plan["row_slots"], q, k, v, plan["masks"])
    return out, lse[..., 0]


def _dq_kernel(b_ref, h_ref, row_ref, col_ref, flags_ref, slot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, mask_ref, dq_ref, dq_sc, *, scale):
    p = pl.program_id(2)

    def first():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def pair(keep):
        dq, _, _ = grad_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], keep, scale, want_dkv=False)
        dq_sc[...] += dq

    def last():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)

    _pair_steps(flags_ref[p], first, pair, last, mask_ref)


def _dkv_kernel(b_ref, h_ref, row_ref, col_ref, flags_ref, slot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, mask_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale):
    p = pl.program_id(2)  # pairs column by column: rows are key blocks

    def first():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def pair(keep):
        _, dk, dv = grad_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], keep, scale, want_dq=False)
        dk_sc[...] += dk
        dv_sc[...] += dv

    def last():
        dk_ref[...] = dk_sc[...]
        dv_ref[...] = dv_sc[...]

    _pair_steps(flags_ref[p], first, pair, last, mask_ref)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(q, k, v, out, lse, do, plan, consts=(), *, block_q: int, block_k: int, scale: float, mask_dims, interpret=False):
    """Backward kernels; ``plan["cols"]`` lists the pairs column by column (``pairs_by_row`` of
    the transposed mask: rows are key blocks), with ``plan["col_slots"]``. Returns ``(dq, dk, dv)``
    in the dtypes of ``q, k, v``."""
    del consts
    pairs, pairs_t, masks = plan["rows"], plan["cols"], plan["masks"]
    batch, heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    group = heads // k.shape[1]
    lse, delta = softmax_residuals(out, do, lse)
    at = _where(mask_dims)
    static = dict(scale=scale)
    q_spec = lambda index_map: pl.BlockSpec((None, None, block_q, dim), index_map)
    col_spec = lambda index_map: pl.BlockSpec((None, None, block_q, 1), index_map)
    kv_spec = lambda index_map: pl.BlockSpec((None, None, block_k, dim), index_map)

    # dq: pairs row by row (as the forward); the output follows the query block.
    own_q, listed_kv = _index_maps(at, group)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=_PREFETCH,
            grid=_grid(q.shape, pairs, mask_dims),
            in_specs=[q_spec(own_q), kv_spec(listed_kv), kv_spec(listed_kv), q_spec(own_q), col_spec(own_q), col_spec(own_q),
                      _mask_spec(block_q, block_k)],
            out_specs=q_spec(own_q),
            scratch_shapes=[pltpu.VMEM((block_q, dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **_params(interpret),
    )(*pairs, plan["row_slots"], q, k, v, do, lse, delta, masks)

    # dk, dv: pairs column by column (row = key block, col = query block); one gradient per query head.
    def listed_q(gb, gh, p, *refs):
        b, h, _, i = at(gb, gh, p, *refs)
        return b, h, i, 0

    def own_kv(gb, gh, p, *refs):
        b, h, j, _ = at(gb, gh, p, *refs)
        return b, lax.div(h, group), j, 0

    def own_kv_per_head(gb, gh, p, *refs):
        b, h, j, _ = at(gb, gh, p, *refs)
        return b, h, j, 0

    grad_shape = jax.ShapeDtypeStruct((batch, heads, seq_k, dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=_PREFETCH,
            grid=_grid(q.shape, pairs_t, mask_dims),
            in_specs=[q_spec(listed_q), kv_spec(own_kv), kv_spec(own_kv), q_spec(listed_q), col_spec(listed_q), col_spec(listed_q),
                      _mask_spec(block_q, block_k)],
            out_specs=[kv_spec(own_kv_per_head), kv_spec(own_kv_per_head)],
            scratch_shapes=[pltpu.VMEM((block_k, dim), jnp.float32), pltpu.VMEM((block_k, dim), jnp.float32)],
        ),
        out_shape=[grad_shape, grad_shape],
        **_params(interpret),
    )(*pairs_t, plan["col_slots"], q, k, v, do, lse, delta, masks)
    return dq, sum_head_groups(dk, k), sum_head_groups(dv, v)

"""Pallas GPU (Triton backend) kernels for block-sparse attention.

One program per (query block, batch x head). It reads its row of the compressed block mask inside
the kernel (``block_index.compress_block_kinds``: full blocks first, then partial ones), and two
``fori_loop``s with the row's counts as trip counts walk only the real entries (padding is never
touched, so the grid's cost follows each row's own length, not the longest row's): the full
blocks with nothing masked, then the partial ones with their token masks, which XLA evaluated
from the token-level rule before the call (splash attention's partial mask blocks; any rule runs,
gathers from segment ids included), loaded at each entry's slot. Each step slices its key/value
block out of the full-sequence refs.
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

_STATIC = ("block_q", "block_k", "scale", "mask_dims", "interpret")


def _params(interpret, num_warps: int):
    return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2), interpret=interpret)


def _program(heads: int):
    """(block index, batch, head) of this program; grid axis 1 enumerates batch x heads."""
    bh = pl.program_id(1)
    return pl.program_id(0), bh // heads, bh % heads


def _whole(x):
    """BlockSpec of a whole array (the flattened lists, the partial pairs' token masks)."""
    return pl.BlockSpec(x.shape, lambda n, bh, nd=x.ndim: (0,) * nd)


def _walk(body, carry, refs, r, slots):
    """Fold ``body(other_block, keep, carry)`` over row ``r``'s list: its full blocks with nothing
    masked, then its partial ones with their token masks (loaded from ``refs[4]`` at the entry's
    slot). Only real entries are visited (trip counts = the row's counts)."""
    idx_ref, full_ref, cnt_ref, slot_ref, mask_ref = refs

    def step(partial):
        def run(s, carry):
            e = r * slots + s
            keep = mask_ref[slot_ref[e]] != 0 if partial else True
            return body(idx_ref[e], keep, carry)

        return run

    carry = lax.fori_loop(0, full_ref[r], step(False), carry)
    return lax.fori_loop(full_ref[r], cnt_ref[r], step(True), carry)


def _fwd_kernel(idx_ref, full_ref, cnt_ref, slot_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, row, slots, heads, block_k, scale):
    i, b, h = _program(heads)
    q = q_ref[...]

    def body(j, keep, carry):
        start = j * block_k
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        return softmax_step(carry, scores(q, k, scale), keep, v)

    lists = (idx_ref, full_ref, cnt_ref, slot_ref, mask_ref)
    out, lse = finish(_walk(body, init_carry(q.shape), lists, row(b, h, i), slots))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _specs(batch_heads_map, shapes):
    return [pl.BlockSpec(shape, batch_heads_map) for shape in shapes]


def _lists(lists, slot_ids):
    """Flattened row lists with the partial-mask slot of every entry: ``(idx, full, counts,
    slots_of_entries), row, list_length``."""
    flat_idx, flat_full, flat_cnt, row, slots = flat_lists(*lists)
    return (flat_idx, flat_full, flat_cnt, slot_ids.reshape(-1)), row, slots


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(q, k, v, plan, consts=(), *, block_q: int, block_k: int, scale: float, mask_dims, interpret=False):
    """Forward kernel over ``plan["rows"]`` (``block_index.compress_block_kinds`` lists),
    ``plan["row_slots"]`` and ``plan["masks"]``; results as ``attention_xla.forward``."""
    del consts, mask_dims  # the rule arrives evaluated (plan["masks"]); the lists say which dims are shared
    batch, heads, seq_q, dim = q.shape
    seq_k, group = k.shape[2], heads // k.shape[1]
    lists, row, slots = _lists(plan["rows"], plan["row_slots"])
    own_q = lambda i, bh: (bh // heads, bh % heads, i, 0)
    whole_kv = lambda i, bh: (bh // heads, bh % heads // group, 0, 0)
    kernel = functools.partial(_fwd_kernel, row=row, slots=slots, heads=heads, block_k=block_k, scale=scale)
    out, lse = pl.pallas_call(
        kernel,
        grid=(seq_q // block_q, batch * heads),
        in_specs=[
            *map(_whole, lists),
            pl.BlockSpec((None, None, block_q, dim), own_q),
            *_specs(whole_kv, [(None, None, seq_k, dim)] * 2),
            _whole(plan["masks"]),
        ],
        out_specs=_specs(own_q, [(None, None, block_q, dim), (None, None, block_q, 1)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq_q, 1), jnp.float32)],
        **_params(interpret, num_warps=4 if dim <= 64 else 8),
    )(*lists, q, k, v, plan["masks"])
    return out, lse[..., 0]


def _dq_kernel(idx_ref, full_ref, cnt_ref, slot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, mask_ref, dq_ref, *, row, slots,
               heads, block_q, block_k, scale):
    i, b, h = _program(heads)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, keep, dq):
        start = j * block_k
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        return dq + grad_step(q, k, v, do, lse, delta, keep, scale, want_dkv=False)[0]

    lists = (idx_ref, full_ref, cnt_ref, slot_ref, mask_ref)
    dq = _walk(body, jnp.zeros(q.shape, jnp.float32), lists, row(b, h, i), slots)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, full_ref, cnt_ref, slot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, mask_ref, dk_ref, dv_ref, *, row,
                slots, heads, block_q, block_k, scale):
    j, b, h = _program(heads)
    k, v = k_ref[...], v_ref[...]

    def body(i, keep, carry):
        rows = pl.ds(i * block_q, block_q)
        _, dk, dv = grad_step(q_ref[rows, :], k, v, do_ref[rows, :], lse_ref[rows, :], delta_ref[rows, :], keep, scale, want_dq=False)
        return carry[0] + dk, carry[1] + dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    lists = (idx_ref, full_ref, cnt_ref, slot_ref, mask_ref)
    dk, dv = _walk(body, (zeros, zeros), lists, row(b, h, j), slots)
    dk_ref[...], dv_ref[...] = dk, dv


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(q, k, v, out, lse, do, plan, consts=(), *, block_q: int, block_k: int, scale: float, mask_dims, interpret=False):
    """Backward kernels; ``plan["cols"]`` are the lists of the transposed mask (per key block, its
    query blocks) with ``plan["col_slots"]``. Returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``."""
    del consts, mask_dims
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1:3]
    group = heads // kv_heads
    lse, delta = softmax_residuals(out, do, lse)
    static = dict(heads=heads, block_q=block_q, block_k=block_k, scale=scale)
    params = _params(interpret, num_warps=4 if dim <= 64 else 8)
    own = lambda n, bh: (bh // heads, bh % heads, n, 0)
    own_kv = lambda n, bh: (bh // heads, bh % heads // group, n, 0)
    whole_q = lambda n, bh: (bh // heads, bh % heads, 0, 0)
    whole_kv = lambda n, bh: (bh // heads, bh % heads // group, 0, 0)
    q_rows, k_rows = (None, None, block_q, dim), (None, None, block_k, dim)
    masks = plan["masks"]

    lists, row, slots = _lists(plan["rows"], plan["row_slots"])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, row=row, slots=slots, **static),
        grid=(seq_q // block_q, batch * heads),
        in_specs=[
            *map(_whole, lists),
            pl.BlockSpec(q_rows, own),
            *_specs(whole_kv, [(None, None, seq_k, dim)] * 2),
            *_specs(own, [q_rows, (None, None, block_q, 1), (None, None, block_q, 1)]),
            _whole(masks),
        ],
        out_specs=pl.BlockSpec(q_rows, own),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **params,
    )(*lists, q, k, v, do, lse, delta, masks)

    lists_t, row_t, slots_t = _lists(plan["cols"], plan["col_slots"])
    grad_shape = jax.ShapeDtypeStruct((batch, heads, seq_k, dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, row=row_t, slots=slots_t, **static),
        grid=(seq_k // block_k, batch * heads),
        in_specs=[
            *map(_whole, lists_t),
            pl.BlockSpec((None, None, seq_q, dim), whole_q),
            *_specs(own_kv, [k_rows, k_rows]),
            *_specs(whole_q, [(None, None, seq_q, dim), (None, None, seq_q, 1), (None, None, seq_q, 1)]),
            _whole(masks),
        ],
        out_specs=_specs(own, [k_rows, k_rows]),
        out_shape=[grad_shape, grad_shape],
        **params,
    )(*lists_t, q, k, v, do, lse, delta, masks)
    return dq, sum_head_groups(dk, k), sum_head_groups(dv, v)

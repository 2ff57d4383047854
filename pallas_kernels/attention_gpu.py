"""Pallas GPU (Triton backend) kernels for block-sparse attention.

One program per (query block, batch x head). It reads its row of the compressed block mask inside
the kernel (``block_index.compress_block_kinds``: full blocks first, then partial ones), and two
``fori_loop``s with the row's counts as trip counts walk only the real entries (padding is never
touched, so the grid's cost follows each row's own length, not the longest row's): the full
blocks without the token-level rule, then the partial ones with it. Each step slices its
key/value block out of the full-sequence refs. Arrays the rule closes over are whole-array inputs.
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
    token_indices,
)

__all__ = ["forward", "backward"]

_STATIC = ("block_q", "block_k", "scale", "rule", "mask_dims", "interpret")


def _params(interpret, num_warps: int):
    return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2), interpret=interpret)


def _program(heads: int):
    """(block index, batch, head) of this program; grid axis 1 enumerates batch x heads."""
    bh = pl.program_id(1)
    return pl.program_id(0), bh // heads, bh % heads


def _whole(x):
    """BlockSpec of a whole array (the flattened lists, the rule's closed-over arrays)."""
    return pl.BlockSpec(x.shape, lambda n, bh, nd=x.ndim: (0,) * nd)


def _walk(body, carry, idx_ref, full_ref, cnt_ref, r, slots, rule, const_refs, keep_of):
    """Fold ``body(other_block, keep, carry)`` over row ``r``'s list: its full blocks without the
    rule, then its partial ones with it. Only real entries are visited (trip counts = counts)."""
    consts = [c[...] for c in const_refs]

    def step(with_rule):
        def run(s, carry):
            other = idx_ref[r * slots + s]
            keep = keep_of(other, consts) if with_rule else True
            return body(other, keep, carry)

        return run

    carry = lax.fori_loop(0, full_ref[r], step(False), carry)
    if rule is not None:
        carry = lax.fori_loop(full_ref[r], cnt_ref[r], step(True), carry)
    return carry


def _rule_keep(rule, b, h, q_block, k_block, consts):
    return rule.fn(b, h, *token_indices(q_block, k_block, rule.block_q, rule.block_k), *consts)


def _fwd_kernel(idx_ref, full_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, n_consts, row, slots, heads, block_q, block_k, rule, scale):
    const_refs, (o_ref, lse_ref) = refs[:n_consts], refs[n_consts:]
    i, b, h = _program(heads)
    q = q_ref[...]

    def body(j, keep, carry):
        start = j * block_k
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        return softmax_step(carry, scores(q, k, scale), keep, v)

    keep_of = lambda j, consts: _rule_keep(rule, b, h, i, j, consts)
    carry = _walk(body, init_carry(q.shape), idx_ref, full_ref, cnt_ref, row(b, h, i), slots, rule, const_refs, keep_of)
    out, lse = finish(carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _specs(batch_heads_map, shapes):
    return [pl.BlockSpec(shape, batch_heads_map) for shape in shapes]


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(q, k, v, rows, consts=(), *, block_q: int, block_k: int, scale: float, rule, mask_dims, interpret=False):
    """Forward kernel over ``block_index.compress_block_kinds`` row lists; results as
    ``attention_xla.forward``."""
    del mask_dims  # the lists' own shape says which dims are shared
    batch, heads, seq_q, dim = q.shape
    seq_k, group = k.shape[2], heads // k.shape[1]
    flat_idx, flat_full, flat_cnt, row, slots = flat_lists(*rows)
    own_q = lambda i, bh: (bh // heads, bh % heads, i, 0)
    whole_kv = lambda i, bh: (bh // heads, bh % heads // group, 0, 0)
    kernel = functools.partial(_fwd_kernel, n_consts=len(consts), row=row, slots=slots, heads=heads, block_q=block_q,
                               block_k=block_k, rule=rule, scale=scale)
    out, lse = pl.pallas_call(
        kernel,
        grid=(seq_q // block_q, batch * heads),
        in_specs=[
            *map(_whole, (flat_idx, flat_full, flat_cnt)),
            pl.BlockSpec((None, None, block_q, dim), own_q),
            *_specs(whole_kv, [(None, None, seq_k, dim)] * 2),
            *map(_whole, consts),
        ],
        out_specs=_specs(own_q, [(None, None, block_q, dim), (None, None, block_q, 1)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq_q, 1), jnp.float32)],
        **_params(interpret, num_warps=4 if dim <= 64 else 8),
    )(flat_idx, flat_full, flat_cnt, q, k, v, *consts)
    return out, lse[..., 0]


def _dq_kernel(idx_ref, full_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, n_consts, row, slots, heads,
               block_q, block_k, rule, scale):
    const_refs, (dq_ref,) = refs[:n_consts], refs[n_consts:]
    i, b, h = _program(heads)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, keep, dq):
        start = j * block_k
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        return dq + grad_step(q, k, v, do, lse, delta, keep, scale, want_dkv=False)[0]

    keep_of = lambda j, consts: _rule_keep(rule, b, h, i, j, consts)
    dq = _walk(body, jnp.zeros(q.shape, jnp.float32), idx_ref, full_ref, cnt_ref, row(b, h, i), slots, rule, const_refs, keep_of)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, full_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, n_consts, row, slots, heads,
                block_q, block_k, rule, scale):
    const_refs, (dk_ref, dv_ref) = refs[:n_consts], refs[n_consts:]
    j, b, h = _program(heads)
    k, v = k_ref[...], v_ref[...]

    def body(i, keep, carry):
        rows = pl.ds(i * block_q, block_q)
        _, dk, dv = grad_step(q_ref[rows, :], k, v, do_ref[rows, :], lse_ref[rows, :], delta_ref[rows, :], keep, scale, want_dq=False)
        return carry[0] + dk, carry[1] + dv

    keep_of = lambda i, consts: _rule_keep(rule, b, h, i, j, consts)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _walk(body, (zeros, zeros), idx_ref, full_ref, cnt_ref, row(b, h, j), slots, rule, const_refs, keep_of)
    dk_ref[...], dv_ref[...] = dk, dv


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(q, k, v, out, lse, do, rows, cols, consts=(), *, block_q: int, block_k: int, scale: float, rule, mask_dims, interpret=False):
    """Backward kernels; ``cols`` are the lists of the transposed mask (per key block, its query
    blocks). Returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``."""
    del mask_dims
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1:3]
    group = heads // kv_heads
    lse, delta = softmax_residuals(out, do, lse)
    static = dict(n_consts=len(consts), heads=heads, block_q=block_q, block_k=block_k, rule=rule, scale=scale)
    params = _params(interpret, num_warps=4 if dim <= 64 else 8)
    own = lambda n, bh: (bh // heads, bh % heads, n, 0)
    own_kv = lambda n, bh: (bh // heads, bh % heads // group, n, 0)
    whole_q = lambda n, bh: (bh // heads, bh % heads, 0, 0)
    whole_kv = lambda n, bh: (bh // heads, bh % heads // group, 0, 0)
    q_rows, k_rows = (None, None, block_q, dim), (None, None, block_k, dim)

    flat_idx, flat_full, flat_cnt, row, slots = flat_lists(*rows)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, row=row, slots=slots, **static),
        grid=(seq_q // block_q, batch * heads),
        in_specs=[
            *map(_whole, (flat_idx, flat_full, flat_cnt)),
            pl.BlockSpec(q_rows, own),
            *_specs(whole_kv, [(None, None, seq_k, dim)] * 2),
            *_specs(own, [q_rows, (None, None, block_q, 1), (None, None, block_q, 1)]),
            *map(_whole, consts),
        ],
        out_specs=pl.BlockSpec(q_rows, own),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **params,
    )(flat_idx, flat_full, flat_cnt, q, k, v, do, lse, delta, *consts)

    flat_idx_t, flat_full_t, flat_cnt_t, row_t, slots_t = flat_lists(*cols)
    grad_shape = jax.ShapeDtypeStruct((batch, heads, seq_k, dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, row=row_t, slots=slots_t, **static),
        grid=(seq_k // block_k, batch * heads),
        in_specs=[
            *map(_whole, (flat_idx_t, flat_full_t, flat_cnt_t)),
            pl.BlockSpec((None, None, seq_q, dim), whole_q),
            *_specs(own_kv, [k_rows, k_rows]),
            *_specs(whole_q, [(None, None, seq_q, dim), (None, None, seq_q, 1), (None, None, seq_q, 1)]),
            *map(_whole, consts),
        ],
        out_specs=_specs(own, [k_rows, k_rows]),
        out_shape=[grad_shape, grad_shape],
        **params,
    )(flat_idx_t, flat_full_t, flat_cnt_t, q, k, v, do, lse, delta, *consts)
    return dq, sum_head_groups(dk, k), sum_head_groups(dv, v)

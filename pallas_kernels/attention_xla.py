"""XLA path of block-sparse attention: online softmax over one flat list of nonzero block pairs.

The reference implementation beside the Pallas kernels (``attention_tpu``, ``attention_gpu``),
the default on CPU, and the source of the per-block math the kernels share (``softmax_step``,
``finish``, ``grad_step``, ``closure_rule``).

Forward: the block mask arrives as one flat list of its nonzero (query block, key block) pairs
(``block_index.pairs_by_kind``): first the pairs whose every token pair is allowed ("full"), then
the pairs where a token-level rule (``mask_fn``) cuts some ("partial"). A ``fori_loop`` visits the
list a chunk of pairs at a time, so work follows the number of pairs however they spread over
the rows (a row-by-row loop would pad every row to the longest). Each step gathers its query and
key/value blocks, computes the scores, and merges them into per-query-row running maxima,
normalisers and outputs with scatter operations: a segment-wise online softmax (FlashAttention,
Dao et al. 2022, arXiv:2205.14135; Milakov & Gimelshein 2018, arXiv:1805.02867, for the online
normaliser). Full pairs skip the rule; partial pairs evaluate it per token. The loop bounds are
the pair counts, traced when the mask is (a ``topk_mask`` under ``jit``), so the cost follows the
mask's real pairs, not the static list length. The forward also returns the log-sum-exp of each
query row, the only softmax statistic the backward needs.

Backward (FlashAttention's recomputation): the same loop recomputes each pair's probabilities
from the stored log-sum-exp and scatter-adds the ``dq``, ``dk`` and ``dv`` contributions to their
blocks (several pairs, and the heads of a GQA group, may hit one block). The Pallas kernels
instead own one block per program (TPU: revisited output over a row-major pair list; GPU: a loop
per row) because a kernel cannot scatter-add across programs without atomics.

Masked entries get a finite very negative score and a probability forced to exactly zero by
``where``, so a query row with no allowed key keeps a zero normaliser and returns zeros (and zero
gradients), never NaN.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

from pallas_kernels.block_index import Pairs

__all__ = [
    "forward",
    "backward",
    "closure_rule",
    "rule_keep",
    "token_indices",
    "init_carry",
    "softmax_step",
    "finish",
    "grad_step",
    "scores",
    "flat_lists",
    "softmax_residuals",
    "sum_head_groups",
]

# Running-max start and the score given to masked entries: finite, so that max/exp of a row that
# has seen nothing stays finite (exp(NEG - NEG) = 1 rescales zeros), and far below any real score.
NEG = -1e30


class Rule(NamedTuple):
    """A token-level rule in the form every path evaluates: ``fn(b, h, q_index, k_index, *consts)``
    for int32 scalars ``b, h`` and int32 ``[block_q, block_k]`` token positions, returning bool
    ``[block_q, block_k]``. ``consts`` are the arrays the user's ``mask_fn`` closes over, made
    explicit arguments (a Pallas kernel cannot capture arrays; they become its inputs)."""

    fn: Callable
    block_q: int
    block_k: int


def closure_rule(mask_fn, block_q: int, block_k: int):
    """``(Rule, consts, static)`` for ``mask_fn(batch, head, q_index, k_index)``.

    The rule is traced once at the kernels' index shapes; the arrays it closes over (segment ids,
    prefix lengths) are hoisted out of the trace as ``consts`` (0-d ones as shape ``(1,)``, which a
    kernel can take as a block). ``static`` is False when any of them is traced (closed over a
    ``jit`` argument): then the rule cannot classify blocks ahead of time.
    """
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    out_shape = (block_q, block_k)

    def rule(b, h, q, k):
        return jnp.broadcast_to(jnp.asarray(mask_fn(b, h, q, k), bool), out_shape)

    try:
        closed = jax.make_jaxpr(rule)(i32(), i32(), i32(*out_shape), i32(*out_shape))
    except ValueError as e:
        raise ValueError(
            f"mask_fn(batch, head, q_index, k_index) must give a bool array broadcasting to "
            f"{out_shape} for scalar batch/head and {out_shape} index arrays: {e}"
        ) from None
    static = not any(isinstance(c, jax.core.Tracer) for c in closed.consts)
    shapes = [jnp.shape(c) for c in closed.consts]
    consts = tuple(jnp.reshape(c, (1,)) if jnp.ndim(c) == 0 else jnp.asarray(c) for c in closed.consts)
    jaxpr = closed.jaxpr

    def fn(b, h, q, k, *consts):
        consts = [c.reshape(shape) for c, shape in zip(consts, shapes)]
        return jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(jaxpr, consts))(b, h, q, k)[0]

    return Rule(fn, block_q, block_k), consts, static


def token_indices(q_block, k_block, block_q: int, block_k: int):
    """Token positions ``[block_q, block_k]`` (int32) of the query and key of every entry of the
    score block of query block ``q_block`` and key block ``k_block``."""
    shape = (block_q, block_k)
    q = lax.broadcasted_iota(jnp.int32, shape, 0) + q_block * block_q
    k = lax.broadcasted_iota(jnp.int32, shape, 1) + k_block * block_k
    return q, k


def flat_lists(indices, *counts):
    """Block lists ``[Bm, Hm, n, slots]`` flattened to 1-D for the GPU kernels. Returns
    ``(indices, counts..., row, slots)`` where ``row(b, h, r)`` is the flat number of row ``r`` for
    batch ``b``, head ``h`` (size-1 mask dims broadcast): its counts are ``counts[row]`` and its
    entries start at ``indices[row * slots]``."""
    mask_batch, mask_heads, rows, slots = indices.shape

    def row(b, h, r):
        b = b if mask_batch > 1 else 0
        h = h if mask_heads > 1 else 0
        return (b * mask_heads + h) * rows + r

    return (indices.reshape(-1), *(c.reshape(-1) for c in counts), row, slots)


def _dot(a, b, contract_a: int, contract_b: int):
    """Batched matmul over leading dims, contracting one of the last two dims of each, f32 result."""
    nd = a.ndim
    batch = tuple(range(nd - 2))
    dims = (((nd - 2 + contract_a,), (nd - 2 + contract_b,)), (batch, batch))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def scores(q, k, scale: float):
    """``q @ k^T * scale`` in f32 for blocks ``[..., bq, d]`` and ``[..., bk, d]``."""
    return _dot(q, k, 1, 1) * scale


def softmax_step(carry, s, keep, v):
    """Fold one score block ``s [.., bq, bk]`` and its values ``v [.., bk, d]`` into the running
    ``(max, normaliser, output)`` = ``carry`` (``[.., bq, 1]``, ``[.., bq, 1]``, ``[.., bq, d]`` f32)."""
    m_prev, l_prev, acc_prev = carry
    s = jnp.where(keep, s, NEG)
    m = jnp.maximum(m_prev, s.max(-1, keepdims=True))
    alpha = jnp.exp(m_prev - m)  # rescales what was accumulated under the old max
    p = jnp.where(keep, jnp.exp(s - m), 0.0)
    l = alpha * l_prev + p.sum(-1, keepdims=True)
    acc = alpha * acc_prev + _dot(p.astype(v.dtype), v, 1, 0)
    return m, l, acc


def init_carry(shape_q):
    """The online-softmax state before any block, for output blocks of shape ``[.., bq, d]``."""
    col = shape_q[:-1] + (1,)
    return jnp.full(col, NEG, jnp.float32), jnp.zeros(col, jnp.float32), jnp.zeros(shape_q, jnp.float32)


def finish(carry):
    """Output (zeros for rows that saw no key) and log-sum-exp ``[.., bq, 1]`` from the final carry."""
    m, l, acc = carry
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
    return out, lse


def grad_step(q, k, v, do, lse, delta, keep, scale: float, *, want_dq: bool = True, want_dkv: bool = True):
    """Gradient contributions of one block pair, recomputing the probabilities from ``lse``.

    Args are blocks ``q, do [.., bq, d]``, ``k, v [.., bk, d]``, ``lse, delta [.., bq, 1]``
    (``delta`` = rowsum(dO * O)). Returns f32 ``(dq [.., bq, d], dk [.., bk, d], dv [.., bk, d])``,
    with ``None`` for what is not wanted (a kernel that owns only ``dq`` skips two matmuls).
    """
    s = scores(q, k, scale)
    p = jnp.where(keep, jnp.exp(jnp.where(keep, s, NEG) - lse), 0.0)
    ds = p * (_dot(do, v, 1, 1) - delta) * scale
    dq = _dot(ds.astype(k.dtype), k, 1, 0) if want_dq else None
    dk = _dot(ds.astype(q.dtype), q, 0, 0) if want_dkv else None
    dv = _dot(p.astype(do.dtype), do, 0, 0) if want_dkv else None
    return dq, dk, dv


def softmax_residuals(out, do, lse):
    """The backward's per-row statistics as ``[B, H, S, 1]`` f32 columns: ``lse`` and
    ``delta = rowsum(dO * O)`` (FlashAttention's ``D``, the softmax Jacobian's diagonal term)."""
    delta = (do.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)
    return lse[..., None], delta


def sum_head_groups(grad, like):
    """Sum per-query-head key/value gradients ``[B, H, S, d]`` over each GQA group of ``heads //
    kv_heads`` heads, giving ``like``'s shape ``[B, kv_heads, S, d]`` and dtype."""
    batch, kv_heads = like.shape[:2]
    return grad.reshape(batch, kv_heads, -1, *grad.shape[2:]).sum(2).astype(like.dtype)


def _blocked(x, block: int):
    """``[B, H, S, d] -> [B, H, S // block, block, d]``."""
    b, h, s, d = x.shape
    return x.reshape(b, h, s // block, block, d)


def _map_broadcast(fn, args, shape):
    """``fn`` on scalars (leading dims ``shape``) of ``args`` whose leading dims broadcast to
    ``shape``: nested ``vmap``s, mapping an argument only along the dims where it varies."""
    if not shape:
        return fn(*args)
    axes = [0 if a.shape[0] > 1 else None for a in args]
    args = [a if ax == 0 else a[0] for a, ax in zip(args, axes)]
    inner = lambda *xs: _map_broadcast(fn, xs, shape[1:])
    return jax.vmap(inner, in_axes=axes, axis_size=shape[0])(*args)


class _Chunk(NamedTuple):
    """Index arrays of one chunk of pairs: ``b, h`` broadcast to ``[B', H', C]`` (the whole batch /
    all heads where the mask is shared), ``row, col`` ``[1, 1, C]``, ``keep`` ``[B', H', C, bq, bk]``."""

    b: jax.Array
    h: jax.Array
    row: jax.Array
    col: jax.Array
    keep: jax.Array


def rule_keep(rule: Rule, consts, b, h, row, col):
    """The rule's token masks ``[*shape, block_q, block_k]`` (bool) of the block pairs
    ``(b, h, row, col)``, int32 arrays of one rank whose shapes broadcast to ``shape``."""

    def token_rule(b, h, row, col):
        return rule.fn(b, h, *token_indices(row, col, rule.block_q, rule.block_k), *consts)

    shape = jnp.broadcast_shapes(b.shape, h.shape, row.shape, col.shape)
    return _map_broadcast(token_rule, [b, h, row, col], shape)


def _chunk(pairs: Pairs, start, stop, chunk: int, q_shape, mask_dims, rule, consts):
    """Pairs ``start .. start + chunk`` of the list (those at or past ``stop`` are not kept)."""
    batch, heads = q_shape[:2]
    take = lambda a: lax.dynamic_slice_in_dim(a, start, chunk)[None, None, :]
    b = take(pairs.b) if mask_dims[0] > 1 else jnp.arange(batch, dtype=jnp.int32)[:, None, None]
    h = take(pairs.h) if mask_dims[1] > 1 else jnp.arange(heads, dtype=jnp.int32)[None, :, None]
    row, col = take(pairs.row), take(pairs.col)
    keep = (start + jnp.arange(chunk) < stop)[None, None, :, None, None]
    if rule is not None:
        keep = keep & rule_keep(rule, consts, b, h, row, col)
    return _Chunk(b, h, row, col, keep)


def _visit(body, carry, pairs, n_full, n_partial, chunk: int, q_shape, mask_dims, rule, consts):
    """Run ``body(chunk, carry)`` over the full pairs (no rule) and then the partial ones (rule),
    ``chunk`` pairs per step; the counts may be traced (a loop with a traced trip count)."""
    for first, count, step_rule in ((0, n_full, None), (n_full, n_partial, rule)):
        if isinstance(count, int) and count == 0:
            continue
        stop = first + count

        def step(t, carry, first=first, stop=stop, step_rule=step_rule):
            c = _chunk(pairs, first + t * chunk, stop, chunk, q_shape, mask_dims, step_rule, consts)
            return body(c, carry)

        carry = lax.fori_loop(0, (count + chunk - 1) // chunk, step, carry)
    return carry


def _pair_plan(plan):
    return plan["pairs"], plan["n_full"], plan["n_partial"]


def forward(q, k, v, plan, consts=(), *, block_q: int, block_k: int, scale: float, rule: Rule | None, mask_dims, chunk: int):
    """Block-sparse attention forward over a flat pair list.

    Args:
      q: ``[B, H, Sq, d]``; k, v: ``[B, Hkv, Sk, d]``.
      plan: ``{"pairs", "n_full", "n_partial"}`` from ``block_index.pairs_by_kind`` (padded by at
        least ``chunk``); the counts are ints for a concrete mask, traced scalars otherwise.
      consts, rule: the token rule of the partial pairs (``closure_rule``), or ``rule=None``.
      mask_dims: ``(Bm, Hm)``, the mask's batch and head dims (1: shared by all).
      chunk: pairs per loop step.

    Returns:
      ``(out [B, H, Sq, d] in q's dtype, lse [B, H, Sq] f32)``.
    """
    group = q.shape[1] // k.shape[1]
    qb, kb, vb = _blocked(q, block_q), _blocked(k, block_k), _blocked(v, block_k)

    def body(c: _Chunk, carry):
        m, l, acc = carry  # per query row: [B, H, nq, bq], [B, H, nq, bq], [B, H, nq, bq, d]
        at = (c.b, c.h, c.row)
        kv = (c.b, c.h // group, c.col)
        s = jnp.where(c.keep, scores(qb[at], kb[kv], scale), NEG)  # [B', H', C, bq, bk]
        m_old = m[at]
        m = m.at[at].max(s.max(-1))  # segment max: pairs of one row in a chunk meet here
        m_new = m[at]
        p = jnp.where(c.keep, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_old - m_new)
        # Rescale each touched row once (duplicate rows write identical values), then add.
        l = l.at[at].set(alpha * l[at]).at[at].add(p.sum(-1))
        acc = acc.at[at].set(alpha[..., None] * acc[at]).at[at].add(_dot(p.astype(v.dtype), vb[kv], 1, 0))
        return m, l, acc

    m, l, acc = init_carry(qb.shape)
    carry = (m[..., 0], l[..., 0], acc)
    m, l, acc = _visit(body, carry, *_pair_plan(plan), chunk, q.shape, mask_dims, rule, consts)
    out, lse = finish((m[..., None], l[..., None], acc))
    return out.astype(q.dtype).reshape(q.shape), lse.reshape(q.shape[:3])


def backward(q, k, v, out, lse, do, plan, consts=(), *, block_q: int, block_k: int, scale: float, rule: Rule | None,
             mask_dims, chunk: int):
    """Gradients ``(dq, dk, dv)`` of block-sparse attention, visiting only the listed pairs.

    ``out``/``lse`` come from ``forward``; ``do`` is the output cotangent; the other arguments as in
    ``forward``. The gradients have the dtypes of ``q``, ``k``, ``v``.
    """
    group = q.shape[1] // k.shape[1]
    qb, kb, vb, dob = _blocked(q, block_q), _blocked(k, block_k), _blocked(v, block_k), _blocked(do, block_q)
    lse_b, delta_b = (x.reshape(qb.shape[:-1] + (1,)) for x in softmax_residuals(out, do, lse))

    def body(c: _Chunk, carry):
        dq, dk, dv = carry
        at = (c.b, c.h, c.row)
        kv = (c.b, c.h // group, c.col)
        dq_c, dk_c, dv_c = grad_step(qb[at], kb[kv], vb[kv], dob[at], lse_b[at], delta_b[at], c.keep, scale)
        # Several pairs (and the heads of a GQA group) may hit one block: add, not set.
        return dq.at[at].add(dq_c), dk.at[kv].add(dk_c), dv.at[kv].add(dv_c)

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    carry = (zeros(qb), zeros(kb), zeros(vb))
    dq, dk, dv = _visit(body, carry, *_pair_plan(plan), chunk, q.shape, mask_dims, rule, consts)
    return dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype), dv.reshape(v.shape).astype(v.dtype)

"""XLA path of block-sparse attention: flash-style online softmax over the nonzero block pairs.

The reference implementation beside the Pallas kernels (``attention_tpu``, ``attention_gpu``),
the default on CPU, and the source of the per-block math the kernels share (``block_keep``,
``softmax_step``, ``finish``, ``grad_step``).

Forward: the block mask arrives compressed (``block_index.compress_block_mask``) into, for each
query block, the padded list of its key blocks. A ``lax.scan`` walks the list slot by slot; each
step gathers one key/value block per query block (all query blocks of all heads at once) and
folds it into a running max, normaliser and output, the online softmax of FlashAttention
(Dao et al. 2022, arXiv:2205.14135; Milakov & Gimelshein 2018, arXiv:1805.02867, for the online normaliser). Work
and memory scale with the number of nonzero block pairs, never with ``seq_q * seq_k``. The
forward also returns the log-sum-exp of each query row, the only softmax statistic the backward
needs.

Backward (FlashAttention's recomputation): the same scan recomputes each block's probabilities
from the stored log-sum-exp, accumulates ``dq`` per query block, and scatter-adds the ``dk``/``dv``
contributions to their key blocks. The Pallas kernels instead walk the transposed lists (per key
block, its query blocks) because a kernel cannot scatter-add across programs without atomics;
XLA can, and the scatter lets one pass compute the probabilities once for all three gradients.

Masked entries get a finite very negative score and a probability forced to exactly zero by
``where``, so a query row with no allowed key keeps a zero normaliser and returns zeros (and zero
gradients), never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "forward",
    "backward",
    "block_keep",
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


def block_keep(q_start, k_start, block_q: int, block_k: int, causal: bool, valid):
    """Which entries of a ``[block_q, block_k]`` score block count.

    ``q_start``/``k_start`` are the first query/key positions of the block and ``valid`` whether the
    block is a real entry of its list (not padding); all three broadcast (scalars in a kernel,
    ``[..., 1, 1]`` arrays in the XLA path). With ``causal``, keys after the query are cut.
    """
    shape = (block_q, block_k)
    if not causal:
        return jnp.broadcast_to(valid, jnp.broadcast_shapes(jnp.shape(valid), shape))
    rows = lax.broadcasted_iota(jnp.int32, shape, 0) + q_start
    cols = lax.broadcasted_iota(jnp.int32, shape, 1) + k_start
    return (cols <= rows) & valid


def flat_lists(indices, counts):
    """Block lists ``[Bm, Hm, n, slots]`` flattened to 1-D for the kernels (compact in TPU SMEM,
    plain offsets on GPU). Returns ``(indices, counts, row, slots)`` where ``row(b, h, r)`` is the
    flat number of row ``r`` for batch ``b``, head ``h`` (size-1 mask dims broadcast): its count
    is ``counts[row]`` and its entries start at ``indices[row * slots]``."""
    mask_batch, mask_heads, rows, slots = indices.shape

    def row(b, h, r):
        b = b if mask_batch > 1 else 0
        h = h if mask_heads > 1 else 0
        return (b * mask_heads + h) * rows + r

    return indices.reshape(-1), counts.reshape(-1), row, slots


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


def _gather_plan(q_shape, kv_heads: int, indices, counts):
    """Broadcast the block lists to every (batch, head) and index arrays for the key gathers."""
    batch, heads = q_shape[:2]
    indices = jnp.broadcast_to(indices, (batch, heads) + indices.shape[2:])
    counts = jnp.broadcast_to(counts, (batch, heads) + counts.shape[2:])
    b_ix = jnp.arange(batch)[:, None, None]
    kvh_ix = (jnp.arange(heads) // (heads // kv_heads))[None, :, None]  # GQA: head h reads kv head h // group
    return indices, counts, b_ix, kvh_ix


def _slot_keep(slot, idx_s, counts, block_q: int, block_k: int, causal: bool):
    """Keep mask ``[B, H, nq, bq, bk]`` for slot ``slot`` of every query block's list."""
    nq = counts.shape[-1]
    q_start = (jnp.arange(nq) * block_q)[:, None, None]
    k_start = idx_s[..., None, None] * block_k
    valid = (slot < counts)[..., None, None]
    return block_keep(q_start, k_start, block_q, block_k, causal, valid)


def forward(q, k, v, indices, counts, *, block_q: int, block_k: int, causal: bool, scale: float):
    """Block-sparse attention forward.

    Args:
      q: ``[B, H, Sq, d]``; k, v: ``[B, Hkv, Sk, d]``.
      indices, counts: the compressed block mask, ``[Bm, Hm, nq, max_blocks]`` and ``[Bm, Hm, nq]``
        with ``Bm`` in ``{1, B}`` and ``Hm`` in ``{1, H}``.

    Returns:
      ``(out [B, H, Sq, d] in q's dtype, lse [B, H, Sq] f32)``.
    """
    indices, counts, b_ix, kvh_ix = _gather_plan(q.shape, k.shape[1], indices, counts)
    qb, kb, vb = _blocked(q, block_q), _blocked(k, block_k), _blocked(v, block_k)

    def step(carry, xs):
        slot, idx_s = xs  # idx_s [B, H, nq]: the slot-th key block of every query block
        s = scores(qb, kb[b_ix, kvh_ix, idx_s], scale)
        keep = _slot_keep(slot, idx_s, counts, block_q, block_k, causal)
        return softmax_step(carry, s, keep, vb[b_ix, kvh_ix, idx_s]), None

    slots = jnp.arange(indices.shape[-1])
    carry, _ = lax.scan(step, init_carry(qb.shape), (slots, jnp.moveaxis(indices, -1, 0)))
    out, lse = finish(carry)
    return out.astype(q.dtype).reshape(q.shape), lse.reshape(q.shape[:3])


def backward(q, k, v, out, lse, do, indices, counts, *, block_q: int, block_k: int, causal: bool, scale: float):
    """Gradients ``(dq, dk, dv)`` of block-sparse attention, visiting only the listed block pairs.

    ``out``/``lse`` come from ``forward``; ``do`` is the output cotangent. Shapes as in ``forward``;
    the gradients have the dtypes of ``q``, ``k``, ``v``.
    """
    indices, counts, b_ix, kvh_ix = _gather_plan(q.shape, k.shape[1], indices, counts)
    qb, kb, vb, dob = _blocked(q, block_q), _blocked(k, block_k), _blocked(v, block_k), _blocked(do, block_q)
    lse_b, delta_b = (x.reshape(qb.shape[:-1] + (1,)) for x in softmax_residuals(out, do, lse))

    def step(carry, xs):
        dq, dk, dv = carry
        slot, idx_s = xs
        keep = _slot_keep(slot, idx_s, counts, block_q, block_k, causal)
        k_s, v_s = kb[b_ix, kvh_ix, idx_s], vb[b_ix, kvh_ix, idx_s]
        dq_c, dk_c, dv_c = grad_step(qb, k_s, v_s, dob, lse_b, delta_b, keep, scale)
        # Several query blocks (and the heads of a GQA group) may hit one key block: add, not set.
        dk = dk.at[b_ix, kvh_ix, idx_s].add(dk_c)
        dv = dv.at[b_ix, kvh_ix, idx_s].add(dv_c)
        return (dq + dq_c, dk, dv), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    slots = jnp.arange(indices.shape[-1])
    (dq, dk, dv), _ = lax.scan(step, (zeros(qb), zeros(kb), zeros(vb)), (slots, jnp.moveaxis(indices, -1, 0)))
    return dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype), dv.reshape(v.shape).astype(v.dtype)

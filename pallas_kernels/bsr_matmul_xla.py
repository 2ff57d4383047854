"""Pure-XLA block-sparse products: the path that runs everywhere and the oracle in tests.

Two products cover the forward pass and both gradients of ``y = x @ W`` (``W`` block-sparse,
``bsr_format``):

* ``dsd_matmul`` (dense x sparse -> dense): ``out[:, c] = sum_j lhs[:, idx[c, j]] @ op(B[slot[c, j]])``
  over the first ``counts[c]`` entries of each output block column's list. With the column lists
  it is ``x @ W``; with the row lists and ``op = transpose`` it is ``dy @ W.T``.
* ``sddmm`` (sampled dense-dense): ``dW[n, j] = x[:, k]^T @ dy[:, n]`` for each stored block
  ``(k, n)`` only, zero in padding slots.

Why a loop and not gathers: on CPU a gather of the needed ``x`` blocks followed by a batched
matmul and a segment sum moves several full copies of the operands through memory and reaches
only ~3x over dense at 10% density, and padded static-shape batching wastes the padding (a random
mask's fullest column often has 3x the mean count). Instead one ``fori_loop`` with a *dynamic*
trip count visits exactly the real blocks, in column order: each step slices the ``(M, bk)``
panel of ``x`` a block needs, multiplies it by the block and adds the product into its output
tile in place, so work is proportional to the number of nonzero blocks and the loop carries no
copy of the output. Measured on CPU and not kept: loops over 256- to 1024-row panels (no faster,
and a traced row offset makes the slices slower), output tiles stored contiguously, writing a
column's first block without a read, concatenating a column's blocks into one larger matmul, and
one batched matmul over all blocks plus a segment sum (2x slower).

At 10% density on 2 CPU cores the block matmuls alone cost ~1/6.6 of a dense product, and with
the panel slices and tile updates the loop is ~4.2x faster than dense (~5.3x against dense on
one core); see ``benchmarks/RESULTS.md``.

Reference for the block-sparse decomposition: S. Gray, A. Radford, D. P. Kingma, "GPU Kernels for
Block-Sparse Weights" (OpenAI, 2017); T. Gale, M. Zaharia, C. Young, E. Elsen, "Sparse GPU Kernels
for Deep Learning" (SC 2020) for the SDDMM/SpMM pair that makes training sparse.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["dsd_matmul", "sddmm"]

_ZERO = np.int32(0)  # static offsets typed like the int32 block indices (also under jax_enable_x64)


def _real_entries(counts, list_len):
    """Flat positions of the real entries of padded lists, first, in (list, position) order."""
    valid = (jnp.arange(list_len)[None, :] < counts[:, None]).reshape(-1)
    return jnp.argsort(~valid, stable=True).astype(jnp.int32), counts.sum(dtype=jnp.int32)


def dsd_matmul(lhs, blocks, idx, slots, counts, *, transpose_blocks=False, out_dtype=None):
    """Dense ``lhs`` times a block-sparse matrix given by per-output-block-column lists.

    Args:
      lhs: ``(M, L * bl)``: ``L`` input blocks of width ``bl``.
      blocks: ``(S, bk, bn)`` stored blocks. ``op(B)`` is ``B`` (``bl = bk``, output blocks of
        width ``bn``) or, with ``transpose_blocks``, ``B.T`` (``bl = bn``, width ``bk``).
      idx, slots: int32 ``(C, J)``: input block index and stored block of each list entry.
      counts: int32 ``(C,)``: real entries per list; the rest is padding and is never read.
      out_dtype: dtype of the result (default ``lhs.dtype``); accumulation is in float32
        (float64 for float64 inputs).

    Returns:
      ``(M, C * bo)``; output block columns with an empty list are zero.
    """
    lhs, blocks, idx, slots, counts = map(jnp.asarray, (lhs, blocks, idx, slots, counts))
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    num_cols, list_len = idx.shape
    bo = blocks.shape[1] if transpose_blocks else blocks.shape[2]
    bl = blocks.shape[2] if transpose_blocks else blocks.shape[1]
    contract = (((1,), (1,)), ((), ())) if transpose_blocks else (((1,), (0,)), ((), ()))
    order, total = _real_entries(counts, list_len)
    idx, slots = idx.reshape(-1), slots.reshape(-1)

    m = lhs.shape[0]

    def step(t, out):
        e = order[t]
        col = e // list_len
        part = lax.dynamic_slice(lhs, (_ZERO, idx[e] * bl), (m, bl))
        prod = lax.dot_general(part, blocks[slots[e]], contract, preferred_element_type=acc_dtype)
        acc = lax.dynamic_slice(out, (_ZERO, col * bo), (m, bo))
        return lax.dynamic_update_slice(out, acc + prod, (_ZERO, col * bo))

    out = lax.fori_loop(0, total, step, jnp.zeros((m, num_cols * bo), acc_dtype))
    return out.astype(out_dtype or lhs.dtype)


def sddmm(x, dy, col_rows, col_counts, block_shape, *, out_dtype=None):
    """``x^T @ dy`` sampled at the stored blocks: ``[Nb, max_k, bk, bn]``, zero in padding slots.

    Args:
      x: ``(M, K)``; dy: ``(M, N)``.
      col_rows, col_counts: the pattern's per-block-column lists (``bsr_format``).
      block_shape: ``(bk, bn)``.
      out_dtype: result dtype (default ``x.dtype``); accumulation is in float32
        (float64 for float64 inputs).
    """
    x, dy, col_rows, col_counts = map(jnp.asarray, (x, dy, col_rows, col_counts))
    bk, bn = block_shape
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    num_cols, max_k = col_rows.shape
    order, total = _real_entries(col_counts, max_k)
    rows = col_rows.reshape(-1)

    m = x.shape[0]

    def step(t, out):
        s = order[t]
        xk = lax.dynamic_slice(x, (_ZERO, rows[s] * bk), (m, bk))
        dyn = lax.dynamic_slice(dy, (_ZERO, (s // max_k) * bn), (m, bn))
        grad = lax.dot_general(xk, dyn, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
        return lax.dynamic_update_slice(out, grad[None], (s, _ZERO, _ZERO))  # each stored block once

    out = lax.fori_loop(0, total, step, jnp.zeros((num_cols * max_k, bk, bn), acc_dtype))
    return out.reshape(num_cols, max_k, bk, bn).astype(out_dtype or x.dtype)

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
trip count visits exactly the real blocks, in column order, one panel of 256 rows of ``x`` at a
time: each step slices a ``(256, bk)`` tile of ``x``, multiplies it by the stored block and adds
the product into its output tile in place. The three tiles (64-128 KiB each) stay in L2 cache,
which measured faster than whole-height steps; work is proportional to the number of nonzero
blocks, and the loop carries no copy of the output (XLA updates it in place). Concatenating a
column's blocks into one larger matmul measured slower (its gathers cost more than it saves).
The loop's small matmuls run at about one core's speed: at 10% density on 2 cores it is
~3-3.7x faster than a dense product that uses both cores, ~5.4x against dense on one core
(``benchmarks/RESULTS.md``).

Reference for the block-sparse decomposition: S. Gray, A. Radford, D. P. Kingma, "GPU Kernels for
Block-Sparse Weights" (OpenAI, 2017); T. Gale, M. Zaharia, C. Young, E. Elsen, "Sparse GPU Kernels
for Deep Learning" (SC 2020) for the SDDMM/SpMM pair that makes training sparse.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["dsd_matmul", "sddmm"]

_PANEL_ROWS = 256  # rows of lhs per matmul step: operands of 64-128 KiB stay in L2 (fastest measured on CPU)


def _real_entries(counts, list_len):
    """Flat positions of the real entries of padded lists, first, in (list, position) order."""
    valid = (jnp.arange(list_len)[None, :] < counts[:, None]).reshape(-1)
    return jnp.argsort(~valid, stable=True).astype(jnp.int32), counts.sum(dtype=jnp.int32)


def _over_panels(m, total, step, init):
    """``carry = step(t, row, rows, carry)`` for each of ``total`` entries in each panel of rows.

    Panels of ``_PANEL_ROWS`` rows keep one step's operands in L2 cache; a last, shorter panel
    takes the remaining rows. ``rows`` is a static int, ``t`` and ``row`` are traced.
    """

    def sweep(carry, first_row, rows, num_panels):
        body = lambda i, carry: step(i % total, first_row + (i // total) * rows, rows, carry)
        return lax.fori_loop(0, total * num_panels, body, carry)

    if m == 0:
        return init
    rows = min(m, _PANEL_ROWS)
    carry = sweep(init, 0, rows, m // rows)
    return sweep(carry, m - m % rows, m % rows, 1) if m % rows else carry


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

    def step(t, row, rows, out):
        e = order[t]
        col = e // list_len
        part = lax.dynamic_slice(lhs, (row, idx[e] * bl), (rows, bl))
        prod = lax.dot_general(part, blocks[slots[e]], contract, preferred_element_type=acc_dtype)
        acc = lax.dynamic_slice(out, (row, col * bo), (rows, bo))
        return lax.dynamic_update_slice(out, acc + prod, (row, col * bo))

    out = _over_panels(lhs.shape[0], total, step, jnp.zeros((lhs.shape[0], num_cols * bo), acc_dtype))
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

    def step(t, row, panel_rows, out):
        s = order[t]
        xk = lax.dynamic_slice(x, (row, rows[s] * bk), (panel_rows, bk))
        dyn = lax.dynamic_slice(dy, (row, (s // max_k) * bn), (panel_rows, bn))
        grad = lax.dot_general(xk, dyn, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
        return out.at[s].add(grad)

    out = _over_panels(x.shape[0], total, step, jnp.zeros((num_cols * max_k, bk, bn), acc_dtype))
    return out.reshape(num_cols, max_k, bk, bn).astype(out_dtype or x.dtype)

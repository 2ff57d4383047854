"""Block-sparse matrix format for a weight ``W`` of shape ``(K, N)`` used as ``x @ W``.

``W`` is cut into a grid of ``(Kb, Nb) = (K // bk, N // bn)`` blocks of shape ``(bk, bn)``. Only
the nonzero blocks are stored, grouped by block column (one output block of ``x @ W`` each)::

    data        [Nb, max_k, bk, bn]  values of the j-th nonzero block of block column n
    col_rows    [Nb, max_k]  int32   its block-row index k (increasing in j)
    col_counts  [Nb]         int32   how many of the max_k slots of column n are real

This is the padded block-CSR of ``W.T`` (DESIGN.md, "Kernels": per block row of the
``(out, in)`` weight, the indices of its nonzero blocks). The product ``x @ W`` walks, for each
output block column, its list of k-blocks. The input gradient ``dy @ W.T`` needs the transposed
pattern, which is stored too, pointing into the same ``data`` so no value is duplicated::

    row_cols    [Kb, max_n]  int32   block-column indices n of the nonzero blocks of block row k
    row_slots   [Kb, max_n]  int32   where each is stored: flat slot ``n * max_k + j`` of ``data``
    row_counts  [Kb]         int32

Lists are padded to a static length fixed at construction (``max_k``, ``max_n``) by repeating the
last real entry (see ``block_index.compress_block_mask``): a kernel walking a padded list asks
again for the block it already holds, so nothing is re-fetched, and it stops at the count. Padded
``data`` slots hold zeros, so a path that does touch them adds exactly zero.

The index arrays form a ``BlockSparsePattern`` (integer leaves only) and ``BlockSparseMatrix``
pairs it with ``data`` (the only floating leaf): ``jax.grad(f, allow_int=True)`` with respect to a
``BlockSparseMatrix`` returns a ``BlockSparseMatrix`` holding the values' gradient, and layers can
keep ``data`` as a trainable parameter and the pattern elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_index import compress_block_mask
from pallas_kernels.block_index import max_blocks_per_row as _longest_row

__all__ = ["BlockSparsePattern", "BlockSparseMatrix"]


def _int_pair(block_shape):
    try:
        bk, bn = (int(b) for b in block_shape)
    except (TypeError, ValueError):
        raise ValueError(f"block_shape must be a pair of ints (bk, bn); got {block_shape!r}") from None
    return bk, bn


def _check_block_shape(shape, block_shape):
    """Validated ``(bk, bn)`` that divides a ``(K, N)`` matrix shape."""
    if len(shape) != 2:
        raise ValueError(f"a block-sparse matrix must be 2-D (K, N); got shape {tuple(shape)}")
    bk, bn = _int_pair(block_shape)
    if bk < 1 or bn < 1 or shape[0] % bk or shape[1] % bn:
        raise ValueError(
            f"block_shape {(bk, bn)} must be positive and divide the matrix shape {tuple(shape)}"
        )
    return bk, bn


def _rank_in_lists(mask, axis):
    """Position of each True entry of ``mask`` among the True entries of its line along ``axis``."""
    return jnp.cumsum(mask.astype(jnp.int32), axis=axis) - 1


@functools.partial(jax.jit, static_argnums=2)
def _apply_mask(w, mask, block_shape):
    """``(w with entries outside an element mask zeroed, [Kb, Nb] block mask)`` (see ``from_dense``)."""
    bk, bn = block_shape
    blocked = (w.shape[0] // bk, bk, w.shape[1] // bn, bn)
    if mask is None:
        return w, jnp.any(w.reshape(blocked) != 0, axis=(1, 3))
    if mask.shape == w.shape:
        return jnp.where(mask, w, jnp.zeros((), w.dtype)), jnp.any(mask.reshape(blocked), axis=(1, 3))
    return w, mask


@functools.partial(jax.jit, static_argnums=(1, 2))
def _block_lists(block_mask, max_k, max_n):
    """The five index arrays of a pattern (jitted: built eagerly it would be dozens of dispatches)."""
    # Keep only blocks that fit in both lists (a no-op unless a traced mask exceeds a cap).
    kept = block_mask & (_rank_in_lists(block_mask, 0) < max_k)
    kept = kept & (_rank_in_lists(kept, 1) < max_n)
    col_rows, col_counts = compress_block_mask(kept.T, max_k)
    row_cols, row_counts = compress_block_mask(kept, max_n)
    # Slot of block (k, n) in column n's list is its rank among the kept blocks of that column.
    rank = jnp.maximum(_rank_in_lists(kept, 0), 0)
    row_slots = row_cols * max_k + jnp.take_along_axis(rank, row_cols, axis=1)
    return col_rows, col_counts, row_cols, row_slots.astype(jnp.int32), row_counts


@jax.tree_util.register_pytree_with_keys_class
class BlockSparsePattern:
    """Where the nonzero blocks of a ``(K, N)`` matrix with blocks ``(bk, bn)`` are.

    Holds the per-block-column lists (``col_rows``, ``col_counts``) and the transposed per-block-row
    lists (``row_cols``, ``row_slots``, ``row_counts``) described in the module docstring; all are
    int32 pytree leaves. ``shape`` and ``block_shape`` are static. Build it with
    ``from_block_mask``; the constructor takes already consistent arrays and does not check them.
    """

    def __init__(self, col_rows, col_counts, row_cols, row_slots, row_counts, *, shape, block_shape):
        self.col_rows = col_rows
        self.col_counts = col_counts
        self.row_cols = row_cols
        self.row_slots = row_slots
        self.row_counts = row_counts
        self.shape = tuple(shape)
        self.block_shape = tuple(block_shape)

    #: Names of the integer index arrays, in constructor order.
    INDEX_FIELDS = ("col_rows", "col_counts", "row_cols", "row_slots", "row_counts")

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(f), getattr(self, f)) for f in self.INDEX_FIELDS]
        return children, (self.shape, self.block_shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, block_shape = aux
        return cls(*children, shape=shape, block_shape=block_shape)

    @classmethod
    def from_block_mask(cls, block_mask, block_shape, *, max_blocks_per_col=None, max_blocks_per_row=None):
        """Pattern of the True blocks of a ``[Kb, Nb]`` boolean block mask, blocks ``(bk, bn)``.

        Args:
          block_mask: boolean ``[Kb, Nb]``; the matrix is ``(Kb * bk, Nb * bn)``.
          block_shape: ``(bk, bn)``.
          max_blocks_per_col: static list length ``max_k`` of each block column (``None``: the
            fullest column of a concrete mask; under ``jit``, where the mask is traced, every
            block row, so that nothing can be dropped, at the memory of a dense matrix: pass a
            bound to save it). Blocks beyond a given bound are dropped from both lists, so all
            products stay consistent.
          max_blocks_per_row: static list length ``max_n`` of each block row, likewise.
        """
        traced = isinstance(block_mask, jax.core.Tracer)
        # A concrete mask is handled in numpy: its maxima are host values anyway.
        block_mask = block_mask.astype(bool) if traced else np.asarray(block_mask).astype(bool)
        if block_mask.ndim != 2:
            raise ValueError(f"block_mask must be 2-D [Kb, Nb]; got shape {block_mask.shape}")
        kb, nb = block_mask.shape
        bk, bn = _int_pair(block_shape)
        bk, bn = _check_block_shape((kb * bk, nb * bn), (bk, bn))
        if max_blocks_per_col is None:  # a traced mask's counts are unknown: room for every block
            max_blocks_per_col = kb if traced else _longest_row(block_mask.T)
        if max_blocks_per_row is None:
            max_blocks_per_row = nb if traced else _longest_row(block_mask)
        max_k, max_n = int(max_blocks_per_col), int(max_blocks_per_row)
        if max_k < 1 or max_n < 1:
            raise ValueError(f"max_blocks_per_col and max_blocks_per_row must be >= 1; got {max_k}, {max_n}")
        if not traced and (block_mask.sum(0).max(initial=0) > max_k or block_mask.sum(1).max(initial=0) > max_n):
            raise ValueError(
                f"block mask of shape {block_mask.shape} has a block column with "
                f"{block_mask.sum(0).max()} and a block row with {block_mask.sum(1).max()} nonzero blocks, "
                f"more than max_blocks_per_col={max_k} or max_blocks_per_row={max_n}"
            )
        lists = _block_lists(block_mask, max_k, max_n)
        return cls(*lists, shape=(kb * bk, nb * bn), block_shape=(bk, bn))

    def with_block_shape(self, block_shape):
        """The same block lists on a grid of ``block_shape`` blocks (shape scaled to match).

        Used to zero-pad every block up to a kernel's tile: the lists index blocks, not
        elements, so they stay valid.
        """
        kb, nb = self.grid
        return BlockSparsePattern(*(getattr(self, f) for f in self.INDEX_FIELDS),
                                  shape=(kb * block_shape[0], nb * block_shape[1]), block_shape=block_shape)

    @property
    def grid(self):
        """``(Kb, Nb)``: the number of blocks along each dimension."""
        return self.shape[0] // self.block_shape[0], self.shape[1] // self.block_shape[1]

    @property
    def max_blocks_per_col(self) -> int:
        """Static length ``max_k`` of each block column's list (slots per column of ``data``)."""
        return self.col_rows.shape[-1]

    @property
    def max_blocks_per_row(self) -> int:
        """Static length ``max_n`` of each block row's list."""
        return self.row_cols.shape[-1]

    def valid_slots(self):
        """Boolean ``[Nb, max_k]``: which slots of ``data`` hold real (not padding) blocks."""
        return jnp.arange(self.max_blocks_per_col)[None, :] < self.col_counts[:, None]

    def column_lists(self):
        """``(rows, slots, counts)`` for ``x @ W``: per block column n, its k-blocks and their slots.

        ``slots[n, j]`` is the flat index into ``data.reshape(-1, bk, bn)``; padding entries
        repeat the last real slot so that a kernel following them fetches nothing new.
        """
        max_k = self.max_blocks_per_col
        j = jnp.minimum(jnp.arange(max_k, dtype=jnp.int32)[None, :], jnp.maximum(self.col_counts - 1, 0)[:, None])
        slots = jnp.arange(self.grid[1], dtype=jnp.int32)[:, None] * max_k + j
        return self.col_rows, slots, self.col_counts

    def row_lists(self):
        """``(cols, slots, counts)`` for ``dy @ W.T``: per block row k, its n-blocks and their slots."""
        return self.row_cols, self.row_slots, self.row_counts

    @jax.jit
    def block_mask(self):
        """Boolean ``[Kb, Nb]`` mask of the stored (nonzero) blocks."""
        kb, nb = self.grid
        cols = jnp.broadcast_to(jnp.arange(nb)[:, None], self.col_rows.shape)
        return jnp.zeros((kb, nb), bool).at[self.col_rows, cols].max(self.valid_slots())

    @jax.jit
    def take_blocks(self, dense):
        """The blocks of a dense ``(K, N)`` matrix at this pattern's slots, ``[Nb, max_k, bk, bn]``.

        Padding slots are zero. This is how ``from_dense`` fills ``data`` and how a dense
        gradient is projected onto the pattern.
        """
        dense = jnp.asarray(dense)
        if dense.shape != self.shape:
            raise ValueError(f"dense matrix of shape {dense.shape} does not match the pattern's shape {self.shape}")
        kb, nb = self.grid
        bk, bn = self.block_shape
        by_col = dense.reshape(kb, bk, nb, bn).transpose(2, 0, 1, 3)  # [Nb, Kb, bk, bn]
        blocks = jnp.take_along_axis(by_col, self.col_rows[:, :, None, None], axis=1)
        return jnp.where(self.valid_slots()[:, :, None, None], blocks, jnp.zeros((), dense.dtype))

    def __repr__(self):  # leaves may be anything here (tree_map results), so only static fields
        return f"BlockSparsePattern(shape={self.shape}, block_shape={self.block_shape})"


@jax.tree_util.register_pytree_with_keys_class
class BlockSparseMatrix:
    """A ``(K, N)`` matrix stored as its nonzero ``(bk, bn)`` blocks: ``data`` plus a pattern.

    ``data`` is ``[Nb, max_k, bk, bn]`` (see the module docstring) and ``pattern`` a
    ``BlockSparsePattern``. Build one with ``from_dense``; ``x @ w`` calls ``bsr_matmul``.
    """

    def __init__(self, data, pattern: BlockSparsePattern):
        self.data = data
        self.pattern = pattern

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey("data"), self.data), (jax.tree_util.GetAttrKey("pattern"), self.pattern)], None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @classmethod
    def from_dense(cls, w, block_shape, mask=None, *, max_blocks_per_col=None, max_blocks_per_row=None):
        """Store the nonzero blocks of a dense ``(K, N)`` matrix.

        Args:
          w: floating ``(K, N)`` array.
          block_shape: ``(bk, bn)``, dividing ``(K, N)``.
          mask: which blocks to keep. ``None`` keeps the blocks that are not all zero; a boolean
            ``[Kb, Nb]`` array is a block mask; a boolean ``(K, N)`` array is an element mask: the
            matrix stored is ``where(mask, w, 0)`` and a block is kept if any of its entries is.
          max_blocks_per_col, max_blocks_per_row: static list lengths (see
            ``BlockSparsePattern.from_block_mask``); under ``jit`` they default to the whole grid.
        """
        w = jnp.asarray(w)
        bk, bn = _check_block_shape(w.shape, block_shape)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"w must have a floating dtype; got {w.dtype} for shape {w.shape}")
        grid = (w.shape[0] // bk, w.shape[1] // bn)
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.dtype != bool:
                raise ValueError(f"mask must be boolean; got dtype {mask.dtype} for shape {mask.shape}")
            if mask.shape not in (w.shape, grid):
                raise ValueError(
                    f"mask of shape {mask.shape} is neither an element mask {w.shape} nor a block "
                    f"mask {grid} for w of shape {w.shape} with block_shape {(bk, bn)}"
                )
        w, block_mask = _apply_mask(w, mask, (bk, bn))
        pattern = BlockSparsePattern.from_block_mask(
            block_mask, (bk, bn), max_blocks_per_col=max_blocks_per_col, max_blocks_per_row=max_blocks_per_row
        )
        return cls(pattern.take_blocks(w), pattern)

    @jax.jit
    def to_dense(self):
        """The ``(K, N)`` dense matrix (zeros outside the stored blocks)."""
        kb, nb = self.pattern.grid
        bk, bn = self.block_shape
        valid = self.pattern.valid_slots()
        values = jnp.where(valid[:, :, None, None], self.data, jnp.zeros((), self.dtype))
        cols = jnp.broadcast_to(jnp.arange(nb)[:, None], valid.shape)
        # Padding repeats the last real index; adding its zeros leaves that block unchanged.
        by_col = jnp.zeros((nb, kb, bk, bn), self.dtype).at[cols, self.pattern.col_rows].add(values)
        return by_col.transpose(1, 2, 0, 3).reshape(self.shape)

    def with_data(self, data):
        """The same pattern with new block values (e.g. after an optimizer step)."""
        if data.shape != self.data.shape:
            raise ValueError(f"data of shape {data.shape} does not match the stored blocks' shape {self.data.shape}")
        return BlockSparseMatrix(data, self.pattern)

    @property
    def shape(self):
        """``(K, N)``."""
        return self.pattern.shape

    @property
    def block_shape(self):
        """``(bk, bn)``."""
        return self.pattern.block_shape

    @property
    def dtype(self):
        """The dtype of the block values."""
        return self.data.dtype

    @property
    def ndim(self) -> int:
        """Always 2."""
        return 2

    def nnz_blocks(self):
        """Number of stored (nonzero) blocks, a traced int32 scalar."""
        return self.pattern.col_counts.sum()

    def __rmatmul__(self, x):
        from pallas_kernels.bsr_matmul import bsr_matmul  # the product module imports this one

        return bsr_matmul(x, self)

    def __repr__(self):
        data = f"{getattr(self.data, 'dtype', '?')}{list(getattr(self.data, 'shape', ()))}"
        return f"BlockSparseMatrix(shape={self.shape}, block_shape={self.block_shape}, data={data})"

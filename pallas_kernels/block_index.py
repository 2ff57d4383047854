"""Compression of a boolean block mask into padded per-row block lists.

Both kernels (block-sparse matmul and attention) iterate over the nonzero blocks of a row.
Pallas grids and XLA gathers need static shapes, so each row's list of nonzero column-block
indices is padded to a fixed length ``max_blocks``. The padding repeats the row's last valid
index: a kernel that walks the padded list then asks for the block it already holds, so the
pipeline skips the copy (TPU) and nothing new is fetched, and ``counts`` tells it where the
real entries end.

Attention with a token-level rule (``attention_masks``) classifies each block pair as empty,
partial or full; ``compress_block_kinds`` lists full blocks before partial ones, and
``pairs_by_kind`` / ``pairs_by_row`` flatten the lists into one list of nonzero block pairs, so
that a loop or a kernel grid follows the number of pairs however they spread over the rows
(no row padded to the longest).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "compress_block_mask",
    "max_blocks_per_row",
    "compress_block_kinds",
    "Pairs",
    "pairs_by_kind",
    "pairs_by_row",
    "EMPTY",
    "PARTIAL",
    "FULL",
]


def max_blocks_per_row(block_mask) -> int:
    """The longest row of a concrete block mask (at least 1), for sizing ``max_blocks``.

    Raises a ValueError when the mask is a tracer (under ``jit``): then ``max_blocks`` must be
    given explicitly because shapes cannot depend on traced values.
    """
    if isinstance(block_mask, jax.core.Tracer):
        raise ValueError(
            "max_blocks must be given explicitly when the block mask is traced (under jit); "
            f"got a traced mask of shape {block_mask.shape}"
        )
    counts = np.asarray(block_mask).astype(bool).sum(-1)
    return max(int(counts.max(initial=0)), 1)


def compress_block_mask(block_mask, max_blocks: int | None = None):
    """Per-row column indices of the True entries of a block mask, padded to ``max_blocks``.

    Args:
      block_mask: boolean array ``[..., rows, cols]``.
      max_blocks: static length of each row's list. ``None`` takes the longest row of a
        concrete mask, and every column of a traced one (under ``jit``). Rows with more True
        entries than ``max_blocks`` keep their first ``max_blocks`` (a ValueError is raised when
        that is detectable, i.e. the mask is concrete).

    Returns:
      ``(indices, counts)``: ``indices`` int32 ``[..., rows, max_blocks]`` with each row's
      True columns in increasing order, padded by repeating the last one (0 for an empty row);
      ``counts`` int32 ``[..., rows]``, the number of real entries per row.
    """
    block_mask = jnp.asarray(block_mask)
    if block_mask.ndim < 2:
        raise ValueError(f"block_mask must have at least 2 dims [rows, cols]; got shape {block_mask.shape}")
    block_mask = block_mask.astype(bool)
    longest = None if isinstance(block_mask, jax.core.Tracer) else max_blocks_per_row(block_mask)
    if max_blocks is None:
        max_blocks = block_mask.shape[-1] if longest is None else longest
    max_blocks = int(max_blocks)
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1; got {max_blocks}")
    if longest is not None and longest > max_blocks:
        raise ValueError(
            f"a row of the block mask (shape {block_mask.shape}) has {longest} nonzero blocks, "
            f"more than max_blocks={max_blocks}"
        )
    cols = block_mask.shape[-1]
    counts = jnp.minimum(block_mask.sum(-1), max_blocks).astype(jnp.int32)
    # Stable sort of "not selected" puts the selected columns first, in increasing order.
    order = jnp.argsort(~block_mask, axis=-1, stable=True).astype(jnp.int32)
    if max_blocks <= cols:
        order = order[..., :max_blocks]
    else:  # more slots than columns: pad with the last column, overwritten below anyway
        pad = jnp.broadcast_to(order[..., -1:], order.shape[:-1] + (max_blocks - cols,))
        order = jnp.concatenate([order, pad], axis=-1)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    slot = jnp.arange(max_blocks, dtype=jnp.int32)
    indices = jnp.where(slot < counts[..., None], order, last)
    return indices, counts


# Kinds of a block pair under a token-level rule (``attention_masks.block_kinds``): no allowed token
# pair (never visited), some (visited with the per-token rule applied), all (visited unmasked).
EMPTY, PARTIAL, FULL = 0, 1, 2


def compress_block_kinds(kinds, max_blocks: int | None = None):
    """Per-row lists of the visited blocks of a kinds array, full blocks first, then partial ones.

    Args:
      kinds: int ``[..., rows, cols]`` of ``EMPTY``/``PARTIAL``/``FULL``.
      max_blocks: static list length, as in ``compress_block_mask``.

    Returns:
      ``(indices, full_counts, counts)``: ``indices`` int32 ``[..., rows, max_blocks]``, each row's
      full columns then its partial columns (each group in increasing order), padded by repeating the
      last entry; ``full_counts`` and ``counts`` int32 ``[..., rows]``: the row's first
      ``full_counts`` entries are full, the next ``counts - full_counts`` partial.
    """
    kinds = jnp.asarray(kinds)
    indices, counts = compress_block_mask(kinds != EMPTY, max_blocks)
    # Stable sort of the listed columns by kind (full first); padding, repeated, stays last.
    slot = jnp.arange(indices.shape[-1], dtype=jnp.int32)
    listed_kind = jnp.take_along_axis(kinds, indices, axis=-1)
    key = jnp.where(slot < counts[..., None], jnp.where(listed_kind == FULL, 0, 1), 2)
    order = jnp.argsort(key, axis=-1, stable=True)
    indices = jnp.take_along_axis(indices, order, axis=-1)
    last = jnp.take_along_axis(indices, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    indices = jnp.where(slot < counts[..., None], indices, last)
    full_counts = jnp.sum((key == 0), axis=-1, dtype=jnp.int32)
    return indices.astype(jnp.int32), full_counts, counts


class Pairs(NamedTuple):
    """A flat list of (mask batch, mask head, row block, column block) pairs and a flag per pair.

    Built from the lists of ``compress_block_kinds`` by ``pairs_by_kind`` (the XLA path: all full
    pairs, then all partial ones) or ``pairs_by_row`` (the TPU kernels' flat grids: row by row).
    """

    b: jax.Array
    h: jax.Array
    row: jax.Array
    col: jax.Array
    flags: jax.Array  # pairs_by_kind: unused zeros; pairs_by_row: FIRST | LAST | COMPUTE | PARTIAL bits


# Flag bits of ``pairs_by_row``: first / last entry of its row, a real pair (not the stand-in of an
# empty row or padding), and a partial (rule-masked) pair.
FIRST, LAST, COMPUTE, PARTIAL_BIT = 1, 2, 4, 8


def _flat_fields(indices, flat):
    """(b, h, row, col) of the flat positions ``flat`` of padded lists ``[Bm, Hm, rows, slots]``."""
    _, mask_heads, rows, slots = indices.shape
    entry = flat // slots
    return entry // (mask_heads * rows), entry // rows % mask_heads, entry % rows, indices.reshape(-1)[flat]


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def pairs_by_kind(indices, full_counts, counts, pad: int):
    """All full pairs, then all partial ones, as one flat list; the XLA path visits them in chunks.

    Args are ``[Bm, Hm, rows, ...]`` lists from ``compress_block_kinds``. Returns ``(pairs,
    n_full, n_partial)``. Concrete lists give exactly ``n_full + n_partial`` pairs (numpy, counts
    as ints); traced ones every slot of every row (counts traced), real pairs first. Either way
    ``pad`` pairs are appended so that a chunk starting at any real pair stays in bounds.
    """
    slot = jnp.arange(indices.shape[-1], dtype=jnp.int32)
    kind = jnp.where(slot < full_counts[..., None], 0, jnp.where(slot < counts[..., None], 1, 2)).reshape(-1)
    order = jnp.argsort(kind, stable=True).astype(jnp.int32)
    n_full, n_partial = jnp.sum(full_counts), jnp.sum(counts - full_counts)
    if _concrete(order):
        n_full, n_partial = int(n_full), int(n_partial)
        order = order[: n_full + n_partial]
    order = jnp.concatenate([order, jnp.zeros(pad, jnp.int32)])
    b, h, row, col = _flat_fields(indices, order)
    pairs = Pairs(b, h, row, col, jnp.zeros_like(order))
    return pairs, n_full, n_partial


def pairs_by_row(indices, full_counts, counts):
    """The pairs row by row (rows of each mask batch and head in order), for a flat kernel grid
    whose output block follows the pair's row (consecutive pairs revisit it).

    An empty row gets one stand-in entry (flags ``FIRST | LAST``, no ``COMPUTE``) so that its output
    is still written. Concrete lists give exactly that many entries (numpy); traced ones every slot
    of every row, the real entries first and the rest repeating the last real entry with no flags
    (a kernel fetches nothing new and does nothing for them).
    """
    slot = jnp.arange(indices.shape[-1], dtype=jnp.int32)
    entries = jnp.maximum(counts, 1)[..., None]
    valid = (slot < entries).reshape(-1)
    order = jnp.argsort(~valid, stable=True).astype(jnp.int32)
    total = jnp.sum(valid, dtype=jnp.int32)
    if _concrete(order):
        order = order[: int(total)]
    position = jnp.arange(order.shape[0], dtype=jnp.int32)
    order = order[jnp.minimum(position, total - 1)]
    s = order % indices.shape[-1]
    flat_rows = order // indices.shape[-1]
    row_counts, row_full, row_entries = (x.reshape(-1)[flat_rows] for x in (counts, full_counts, entries[..., 0]))
    flags = (
        jnp.where(s == 0, FIRST, 0)
        | jnp.where(s == row_entries - 1, LAST, 0)
        | jnp.where(s < row_counts, COMPUTE, 0)
        | jnp.where(s >= row_full, PARTIAL_BIT, 0)
    )
    flags = jnp.where(position < total, flags, 0).astype(jnp.int32)
    b, h, row, col = _flat_fields(indices, order)
    return Pairs(b, h, row, col, flags)

"""Compression of a boolean block mask into padded per-row block lists.

Both kernels (block-sparse matmul and attention) iterate over the nonzero blocks of a row.
Pallas grids and XLA gathers need static shapes, so each row's list of nonzero column-block
indices is padded to a fixed length ``max_blocks``. The padding repeats the row's last valid
index: a kernel that walks the padded list then asks for the block it already holds, so the
pipeline skips the copy (TPU) and nothing new is fetched, and ``counts`` tells it where the
real entries end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["compress_block_mask", "max_blocks_per_row"]


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

"""From dense kernels and block masks to block-sparse matrices, and block-mask initializers.

Kept free of flax: it works on any params pytree (flax linen dicts, nnx states, plain dicts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.selection import top_k_mask
from pallas_kernels import BlockSparseMatrix

__all__ = ["to_block_sparse", "kernel_to_block_sparse", "all_blocks", "random_block_mask"]


def kernel_to_block_sparse(kernel, mask, *, block_shape=None) -> BlockSparseMatrix:
    """One ``(K, N)`` kernel and its mask as a ``BlockSparseMatrix``.

    ``mask`` is a block mask ``[Kb, Nb]`` (one boolean per block; the block shape is
    ``(K // Kb, N // Nb)``) or, with ``block_shape`` given, an element mask of the kernel's shape
    (a block is kept if any of its entries is; entries outside the mask are zeroed).
    """
    kernel, mask = jnp.asarray(kernel), jnp.asarray(mask)
    if kernel.ndim != 2 or mask.ndim != 2:
        raise ValueError(
            f"block-sparse layers take 2-D (in, out) kernels and 2-D masks; got kernel {kernel.shape}, mask {mask.shape}"
        )
    if block_shape is None:
        if mask.shape == kernel.shape and mask.size > 1:
            raise ValueError(
                f"mask has the kernel's shape {kernel.shape}: pass block_shape to read it as an element mask"
            )
        if kernel.shape[0] % mask.shape[0] or kernel.shape[1] % mask.shape[1]:
            raise ValueError(f"block mask of shape {mask.shape} does not tile a kernel of shape {kernel.shape}")
        block_shape = (kernel.shape[0] // mask.shape[0], kernel.shape[1] // mask.shape[1])
    return BlockSparseMatrix.from_dense(kernel, block_shape, mask)


def to_block_sparse(params, block_masks, *, block_shape=None):
    """Replace each masked leaf of a dense-trained params tree by a ``BlockSparseMatrix``.

    Args:
      params: any pytree of arrays.
      block_masks: a tree with the structure of ``params`` (or a prefix of it): a boolean mask at
        each kernel to convert, ``None`` elsewhere. See ``kernel_to_block_sparse`` for the masks.
      block_shape: only for element masks.

    Returns:
      ``params`` with every masked leaf replaced by a ``BlockSparseMatrix`` (other leaves as they
      were). Its ``.data`` is the layer's ``kernel`` parameter and its ``.pattern`` the layer's
      block pattern.
    """

    def convert(mask, leaf):
        return leaf if mask is None else kernel_to_block_sparse(leaf, mask, block_shape=block_shape)

    return jax.tree_util.tree_map(convert, block_masks, params, is_leaf=lambda m: m is None)


def all_blocks(key, grid_shape):
    """Block-mask initializer keeping every block (the layer starts dense in block terms)."""
    del key
    return np.ones(grid_shape, bool)


def random_block_mask(density: float):
    """Block-mask initializer keeping ``round(density * Kb * Nb)`` blocks chosen uniformly (>= 1)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1]; got {density}")

    def init(key, grid_shape):
        size = int(np.prod(grid_shape))
        keep = max(1, round(density * size))
        # The library's exact static-shape selection: exactly `keep` blocks, even on tied scores.
        return top_k_mask(jax.random.uniform(key, (size,)), keep).reshape(grid_shape)

    return init

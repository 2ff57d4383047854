"""From dense kernels and block masks to block-sparse matrices, and block-mask initializers.

Kept free of flax: it works on any params pytree (flax linen dicts, nnx states, plain dicts).

The masks of a sparsifier trained with ``structure=js.blocks(r, c)`` (``js.get_masks(state)``,
element masks of the kernels' shapes made of whole tiles) convert directly: the block shape is
read off the mask (:func:`block_shape_of`). An element mask that is not made of whole blocks (an
unstructured mask) keeps every block holding a kept entry, which at 90% unstructured sparsity is
nearly every block, so such a conversion warns with the kept-block density.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.selection import top_k_mask
from pallas_kernels import BlockSparseMatrix

__all__ = ["to_block_sparse", "kernel_to_block_sparse", "block_shape_of", "all_blocks", "random_block_mask"]

#: the largest block side :func:`block_shape_of` reads off a mask (kernels tile at most this)
MAX_BLOCK = 512


def block_shape_of(mask, max_block: int = MAX_BLOCK) -> tuple[int, int]:
    """The largest ``(r, c)`` (each dividing the mask's side and at most ``max_block``) such that a
    2-D element mask is a union of whole ``(r, c)`` tiles; ``(1, 1)`` for an unstructured mask.

    A mask is made of ``(r, c)`` tiles exactly when its rows are equal within every band of ``r``
    rows and its columns within every band of ``c`` columns, so each side is found on its own.
    The masks of ``structure=js.blocks(r, c)`` give back ``(r, c)`` (or a multiple, when the
    kept tiles happen to pair up: the same nonzeros, in fewer, larger blocks).
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"block_shape_of takes a 2-D mask; got shape {m.shape}")

    def side(lines):
        n = lines.shape[0]
        for d in sorted((d for d in range(1, min(n, max_block) + 1) if n % d == 0), reverse=True):
            bands = lines.reshape(n // d, d, -1)
            if (bands == bands[:, :1]).all():
                return d
        return 1

    return side(m), side(m.T)


def _tiled(mask, block_shape):
    """``(is a union of whole tiles, kept-block density)`` of a concrete element mask."""
    m = np.asarray(mask, bool)
    (k, n), (bk, bn) = m.shape, block_shape
    blocks = m.reshape(k // bk, bk, n // bn, bn)
    kept = blocks.any(axis=(1, 3))
    return bool((blocks.all(axis=(1, 3)) == kept).all()), float(kept.mean())


def kernel_to_block_sparse(kernel, mask, *, block_shape=None) -> BlockSparseMatrix:
    """One ``(K, N)`` kernel and its mask as a ``BlockSparseMatrix``.

    ``mask`` is a block mask ``[Kb, Nb]`` (one boolean per block; the block shape is
    ``(K // Kb, N // Nb)``) or an element mask of the kernel's shape, such as a mask from
    ``js.get_masks`` of a ``structure=js.blocks(r, c)`` sparsifier: a block is kept if any of its
    entries is, and entries outside the mask are zeroed. For an element mask the block shape is
    read off the mask (:func:`block_shape_of`) unless ``block_shape`` is given. An element mask
    not made of whole blocks warns with the fraction of blocks kept (an unstructured 90% mask
    keeps nearly all of them, and the block-sparse layer then runs slower than the dense one):
    train with ``structure=js.blocks(r, c)`` instead.
    """
    kernel, mask = jnp.asarray(kernel), jnp.asarray(mask)
    if kernel.ndim != 2 or mask.ndim != 2:
        raise ValueError(
            f"block-sparse layers take 2-D (in, out) kernels and 2-D masks; got kernel {kernel.shape}, mask {mask.shape}"
        )
    element = mask.shape == kernel.shape and mask.size > 1
    if element and not isinstance(mask, jax.core.Tracer):
        if block_shape is None:
            block_shape = block_shape_of(mask)
            if block_shape == (1, 1):
                raise ValueError(
                    f"the mask of the {kernel.shape} kernel is an element mask not made of whole blocks "
                    f"({int(np.asarray(mask).sum())} of {mask.size} entries kept): pass block_shape to read it in "
                    "blocks (keeping every block that holds a kept entry), or train with "
                    "structure=js.blocks(r, c) so that its masks are made of whole tiles"
                )
        else:
            whole, density = _tiled(mask, tuple(block_shape))
            if not whole:
                warnings.warn(
                    f"the mask of the {kernel.shape} kernel is not made of whole {tuple(block_shape)} blocks: "
                    f"{density:.1%} of the blocks hold a kept entry and are kept (the mask keeps "
                    f"{float(np.asarray(mask).mean()):.1%} of the entries), so the block-sparse layer does "
                    f"{density:.1%} of the dense layer's work. Train with structure=js.blocks{tuple(block_shape)} "
                    "to get masks of whole blocks",
                    UserWarning,
                    stacklevel=2,
                )
    if block_shape is None:
        if element:
            raise ValueError(
                f"mask has the kernel's shape {kernel.shape} and is traced: pass block_shape to read it as an element mask"
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
        each kernel to convert, ``None`` elsewhere, such as ``js.get_masks(opt_state)`` of a
        ``structure=js.blocks(r, c)`` sparsifier. See ``kernel_to_block_sparse`` for the masks.
      block_shape: only for element masks; default: read off each mask.

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

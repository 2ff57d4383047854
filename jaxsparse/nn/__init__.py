"""Block-sparse layers for flax, backed by ``pallas_kernels.bsr_matmul``.

* ``jaxsparse.nn.linen.BlockSparseDense`` and ``jaxsparse.nn.nnx.BlockSparseDense``: dense layers
  whose kernel is stored as its nonzero ``(bk, bn)`` blocks. The block values are the trainable
  ``kernel`` parameter; the block pattern (integer indices) lives outside the parameters, so
  ``jax.grad`` and optax see only floating values.
* ``jaxsparse.nn.attention.BlockSparseSelfAttention`` (linen) and
  ``jaxsparse.nn.nnx.BlockSparseSelfAttention``: self-attention computed by
  ``pallas_kernels.block_sparse_attention`` over the blocks of a block mask (``mask_builder``) and
  a token-level rule (``mask_fn``).
* ``to_block_sparse``: turn a dense-trained params tree plus block masks (one boolean per block, as a
  block-structured sparsifier produces) into block-sparse matrices; ``linen.variables_from_dense``
  and ``nnx.BlockSparseDense.from_dense`` build the layers' variables from it.

flax is optional: this package imports it only in its ``linen``, ``nnx`` and ``attention``
submodules, which are loaded on first access (``jaxsparse.nn.linen``).
"""

import importlib

from jaxsparse.nn.convert import all_blocks, block_shape_of, kernel_to_block_sparse, random_block_mask, to_block_sparse

__all__ = [
    "all_blocks", "random_block_mask", "to_block_sparse", "kernel_to_block_sparse", "block_shape_of", "linen", "nnx",
    "attention",
]


def __getattr__(name):
    if name in ("linen", "nnx", "attention"):
        return importlib.import_module(f"jaxsparse.nn.{name}")
    raise AttributeError(f"module 'jaxsparse.nn' has no attribute {name!r}")

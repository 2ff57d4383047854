"""flax linen ``BlockSparseDense``: a dense layer with a block-sparse kernel.

Variables of a layer with input width ``K`` and ``features = N``:

* ``params/kernel``: the block values ``[Nb, max_k, bk, bn]`` (``BlockSparseMatrix.data``);
* ``params/bias``: ``[N]``;
* ``block_pattern/kernel``: the ``BlockSparsePattern`` (integer indices). It is a separate
  collection so that ``jax.grad`` over ``params`` and optax see floating values only; pass it to
  ``apply`` like ``batch_stats``: ``model.apply({"params": p, "block_pattern": bp}, x)``.

``variables_from_dense`` builds both collections from a dense-trained params tree plus block masks.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsparse.nn import flax_serialization  # noqa: F401  (registers the block-sparse types)
from jaxsparse.nn.convert import all_blocks, to_block_sparse
from pallas_kernels import BlockSparseMatrix, BlockSparsePattern, bsr_matmul

__all__ = ["BlockSparseDense", "variables_from_dense", "PATTERN_COLLECTION"]

PATTERN_COLLECTION = "block_pattern"


class BlockSparseDense(nn.Module):
    """``y = x @ W + b`` with ``W`` stored as its nonzero ``block_shape`` blocks.

    Attributes:
      features: output width ``N``.
      block_shape: ``(bk, bn)``, dividing ``(K, N)``.
      use_bias: add a bias.
      dtype: computation dtype (default: promoted from inputs and params).
      param_dtype: dtype of the parameters.
      kernel_init: initializer of the dense ``(K, N)`` kernel; only its kept blocks are stored.
      bias_init: initializer of the bias.
      block_mask_init: ``(key, (Kb, Nb)) -> bool mask`` of the blocks kept at initialization
        (``jaxsparse.nn.random_block_mask(density)``, default all blocks).
      max_blocks_per_col, max_blocks_per_row: static list lengths of the pattern (default: the
        fullest column/row of the initial mask, or all blocks when initializing under ``jit``).
        Raise them to leave room for patterns that grow.
      backend: ``bsr_matmul`` backend (default: the best for the device).
    """

    features: int
    block_shape: tuple[int, int]
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    block_mask_init: Callable = all_blocks
    max_blocks_per_col: int | None = None
    max_blocks_per_row: int | None = None
    backend: str | None = None

    def _init_pattern(self, in_features):
        bk, bn = self.block_shape
        if in_features % bk or self.features % bn:
            raise ValueError(
                f"block_shape {tuple(self.block_shape)} does not divide the kernel shape {(in_features, self.features)}"
            )
        grid = (in_features // bk, self.features // bn)
        mask = jnp.asarray(self.block_mask_init(self.make_rng("params"), grid), bool)
        traced = isinstance(mask, jax.core.Tracer)
        return BlockSparsePattern.from_block_mask(
            mask, self.block_shape,
            max_blocks_per_col=self.max_blocks_per_col or (grid[0] if traced else None),
            max_blocks_per_row=self.max_blocks_per_row or (grid[1] if traced else None),
        )

    @nn.compact
    def __call__(self, x):
        in_features = jnp.shape(x)[-1]
        pattern = self.variable(PATTERN_COLLECTION, "kernel", self._init_pattern, in_features).value
        if pattern.shape != (in_features, self.features):
            raise ValueError(
                f"block pattern of shape {pattern.shape} does not match input width {in_features} "
                f"and features {self.features}"
            )
        data = self.param(
            "kernel", lambda key: pattern.take_blocks(self.kernel_init(key, pattern.shape, self.param_dtype))
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, data, bias = nn.dtypes.promote_dtype(x, data, bias, dtype=self.dtype)
        y = bsr_matmul(x, BlockSparseMatrix(data, pattern), backend=self.backend)
        return y if bias is None else y + bias


def variables_from_dense(params, block_masks, *, block_shape=None):
    """linen variables for ``BlockSparseDense`` layers from a dense-trained ``params`` tree.

    Args:
      params: the ``params`` collection of the dense model (e.g. with ``nn.Dense`` layers).
      block_masks: same structure, a boolean block mask ``[Kb, Nb]`` at each kernel to convert and
        ``None`` elsewhere (see ``jaxsparse.nn.to_block_sparse``).
      block_shape: only for element masks.

    Returns:
      ``{"params": ..., "block_pattern": ...}`` for a model in which each converted ``nn.Dense``
      is replaced by a ``BlockSparseDense`` with the same name and ``block_shape``.
    """
    converted = to_block_sparse(params, block_masks, block_shape=block_shape)
    is_bsm = lambda leaf: isinstance(leaf, BlockSparseMatrix)
    new_params = jax.tree_util.tree_map(lambda l: l.data if is_bsm(l) else l, converted, is_leaf=is_bsm)
    return {"params": new_params, PATTERN_COLLECTION: _patterns_only(converted) or {}}


def _patterns_only(tree):
    """The nested dict of the patterns of a converted params dict (subtrees without one dropped)."""
    if isinstance(tree, BlockSparseMatrix):
        return tree.pattern
    if not hasattr(tree, "items"):
        return None
    kept = {key: _patterns_only(value) for key, value in tree.items()}
    return {key: value for key, value in kept.items() if value is not None} or None

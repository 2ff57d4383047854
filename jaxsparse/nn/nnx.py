"""flax nnx ``BlockSparseDense``: a dense layer with a block-sparse kernel.

The block values are an ``nnx.Param`` (``kernel``, ``[Nb, max_k, bk, bn]``); the block pattern is a
``BlockPattern`` variable, not a ``Param``, so ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``
only see floating values. ``BlockSparseDense.from_dense`` / ``from_linear`` convert dense-trained
weights plus a block mask, and ``sparsify_linears`` swaps the masked ``nnx.Linear`` layers of a model.
``BlockSparseSelfAttention`` is the nnx twin of ``jaxsparse.nn.attention.BlockSparseSelfAttention``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.nn import flax_serialization  # noqa: F401  (registers the block-sparse types)
from jaxsparse.nn.convert import kernel_to_block_sparse
from pallas_kernels import BlockSparseMatrix, BlockSparsePattern, block_sparse_attention, bsr_matmul

__all__ = ["BlockSparseDense", "BlockPattern", "BlockSparseSelfAttention", "sparsify_linears"]


class BlockPattern(nnx.Variable):
    """The integer block pattern of a block-sparse kernel (not trained)."""


class BlockSparseDense(nnx.Module):
    """``y = x @ W + b`` with ``W`` stored as its nonzero ``block_shape`` blocks.

    Args:
      in_features, out_features: ``K`` and ``N``.
      block_shape: ``(bk, bn)``, dividing ``(K, N)``.
      block_mask: concrete boolean ``[Kb, Nb]`` mask of the blocks to keep (default: all).
      max_blocks_per_col, max_blocks_per_row: static list lengths (default: from the mask).
      use_bias, dtype, param_dtype, kernel_init, bias_init: as for ``nnx.Linear``; ``kernel_init``
        initializes the dense ``(K, N)`` kernel, of which only the kept blocks are stored.
      backend: ``bsr_matmul`` backend (default: the best for the device).
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, in_features: int, out_features: int, *, block_shape, block_mask=None,
                 max_blocks_per_col=None, max_blocks_per_row=None, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(), backend: str | None = None, rngs: nnx.Rngs):
        bk, bn = block_shape
        if in_features % bk or out_features % bn:
            raise ValueError(f"block_shape {tuple(block_shape)} does not divide the kernel shape {(in_features, out_features)}")
        grid = (in_features // bk, out_features // bn)
        block_mask = np.ones(grid, bool) if block_mask is None else block_mask
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        w = BlockSparseMatrix.from_dense(kernel, block_shape, jnp.asarray(block_mask, bool),
                                         max_blocks_per_col=max_blocks_per_col, max_blocks_per_row=max_blocks_per_row)
        bias = bias_init(rngs.params(), (out_features,), param_dtype) if use_bias else None
        self._set(w, bias, dtype=dtype, backend=backend)

    def _set(self, w: BlockSparseMatrix, bias, *, dtype, backend):
        self.in_features, self.out_features = w.shape
        self.block_shape = w.block_shape
        self.kernel = nnx.Param(w.data)
        self.pattern = BlockPattern(w.pattern)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.dtype = dtype
        self.backend = backend

    @classmethod
    def from_dense(cls, kernel, block_mask, bias=None, *, block_shape=None, dtype=None, backend=None):
        """A layer holding the kept blocks of a dense-trained ``(K, N)`` kernel.

        ``block_mask`` is one boolean per block (``[Kb, Nb]``), or an element mask with
        ``block_shape`` given (see ``jaxsparse.nn.to_block_sparse``).
        """
        w = kernel_to_block_sparse(kernel, block_mask, block_shape=block_shape)
        # Build through __init__ (nnx modules need it), then put the converted values in.
        layer = cls(*w.shape, block_shape=w.block_shape, block_mask=w.pattern.block_mask(),
                    max_blocks_per_col=w.pattern.max_blocks_per_col, max_blocks_per_row=w.pattern.max_blocks_per_row,
                    use_bias=bias is not None, param_dtype=w.dtype, rngs=nnx.Rngs(0))
        layer._set(w, bias, dtype=dtype, backend=backend)
        return layer

    @classmethod
    def from_linear(cls, linear: nnx.Linear, block_mask, *, block_shape=None, backend=None):
        """The block-sparse version of a trained ``nnx.Linear``."""
        bias = None if linear.bias is None else linear.bias[...]
        return cls.from_dense(linear.kernel[...], block_mask, bias, block_shape=block_shape, dtype=linear.dtype,
                              backend=backend)

    @property
    def weight(self) -> BlockSparseMatrix:
        """The kernel as a ``BlockSparseMatrix``."""
        pattern: BlockSparsePattern = self.pattern.get_value()
        return BlockSparseMatrix(self.kernel[...], pattern)

    def __call__(self, x):
        w = self.weight
        bias = None if self.bias is None else self.bias[...]
        x, data, bias = nnx.nn.dtypes.promote_dtype((x, w.data, bias), dtype=self.dtype)
        y = bsr_matmul(x, w.with_data(data), backend=self.backend)
        return y if bias is None else y + bias


def sparsify_linears(model: nnx.Module, block_masks, *, block_shape=None, backend=None) -> nnx.Module:
    """Replace, in place, each ``nnx.Linear`` of ``model`` whose kernel has a mask by a ``BlockSparseDense``.

    Args:
      model: an nnx module.
      block_masks: a nested dict like ``nnx.state(model, nnx.Param)`` (e.g. from
        ``state.to_pure_dict()``): at ``<path to the Linear>/kernel`` a boolean block mask, or
        ``None`` to keep the layer dense. Paths without an entry stay dense.
      block_shape: only for element masks.

    Returns:
      ``model`` (modified in place).
    """
    for path, module in list(nnx.iter_modules(model)):
        if not isinstance(module, nnx.Linear) or not path:
            continue
        masks = block_masks
        for key in path:
            masks = masks.get(key) if hasattr(masks, "get") else None
        mask = masks.get("kernel") if hasattr(masks, "get") else None
        if mask is None:
            continue
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        layer = BlockSparseDense.from_linear(module, mask, block_shape=block_shape, backend=backend)
        if isinstance(path[-1], int):
            parent[path[-1]] = layer
        else:
            setattr(parent, path[-1], layer)
    return model


class BlockSparseSelfAttention(nnx.Module):
    """Self-attention over ``x [batch, seq, in_features]`` restricted to a block mask and a
    token-level rule, computed by ``pallas_kernels.block_sparse_attention`` (the nnx twin of the
    linen ``jaxsparse.nn.attention.BlockSparseSelfAttention``, with the same parameters).

    Args:
      in_features: width of ``x`` (and of the output).
      num_heads, num_kv_heads: query heads and key/value heads (grouped-query attention; default
        ``num_heads``).
      head_dim: per-head width; default ``in_features // num_heads``.
      block_q, block_k: block sizes; the sequence length must be divisible by both.
      causal: cut keys after the query.
      mask_fn: token-level rule ``(batch, head, q_index, k_index) -> bool``
        (``pallas_kernels.attention_masks``); ``__call__``'s ``mask_fn`` overrides it.
      mask_builder: ``(seq_len, block_q, block_k) -> block mask`` used when ``__call__`` gets no
        block mask (e.g. ``jaxsparse.nn.attention.local_global_mask``); default all blocks.
      backend, interpret: passed to ``block_sparse_attention``.
      dtype, param_dtype, kernel_init: as for ``nnx.LinearGeneral``.
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, in_features: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 block_q: int = 128, block_k: int = 128, causal: bool = False, mask_fn=None, mask_builder=None,
                 backend: str | None = None, interpret: Any = False, dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init=nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
        kv_heads = num_kv_heads or num_heads
        if num_heads % kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({kv_heads})")
        head_dim = head_dim or in_features // num_heads
        layer = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **layer)
        self.key = nnx.LinearGeneral(in_features, (kv_heads, head_dim), **layer)
        self.value = nnx.LinearGeneral(in_features, (kv_heads, head_dim), **layer)
        self.out = nnx.LinearGeneral((num_heads, head_dim), in_features, axis=(-2, -1), **layer)
        self.block_q, self.block_k, self.causal = block_q, block_k, causal
        self.mask_fn, self.mask_builder = mask_fn, mask_builder
        self.backend, self.interpret = backend, interpret

    def __call__(self, x, block_mask=None, mask_fn=None):
        """``x [batch, seq, in_features] -> [batch, seq, in_features]``; ``block_mask`` overrides
        ``mask_builder`` and ``mask_fn`` the layer's ``mask_fn``."""
        to_heads = lambda t: t.transpose(0, 2, 1, 3)  # [batch, seq, heads, d] -> the kernel's [batch, heads, seq, d]
        q, k, v = (to_heads(proj(x)) for proj in (self.query, self.key, self.value))
        if block_mask is None and self.mask_builder is not None:
            block_mask = self.mask_builder(x.shape[1], self.block_q, self.block_k)
        out = block_sparse_attention(
            q, k, v, block_mask, mask_fn=self.mask_fn if mask_fn is None else mask_fn, block_q=self.block_q,
            block_k=self.block_k, causal=self.causal, backend=self.backend, interpret=self.interpret,
        )
        return self.out(to_heads(out))

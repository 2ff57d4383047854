"""A flax (linen) self-attention layer computed with block-sparse attention.

Flax is an optional dependency of jaxsparse, so it is imported here only: ``import
jaxsparse.nn.attention`` needs flax, ``import jaxsparse`` does not.

The layer is ordinary multi-head (or grouped-query) self-attention whose score matrix is
restricted to the blocks of a block mask, computed by ``pallas_kernels.block_sparse_attention``
(flash-style, only nonzero blocks; Dao et al. 2022). The mask is a static pattern from
``pallas_kernels.attention_masks`` (sliding window + global tokens as in Longformer, Beltagy et
al. 2020, and BigBird, Zaheer et al. 2020), given per call or built from the sequence length.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from pallas_kernels import attention_masks
from pallas_kernels.attention import block_sparse_attention

__all__ = ["BlockSparseSelfAttention", "local_global_mask"]


def local_global_mask(window: int, num_global: int, *, causal: bool = True) -> Callable:
    """A ``mask_fn`` for ``BlockSparseSelfAttention``: a sliding window of ``window`` tokens plus the
    first ``num_global`` tokens as global tokens (Longformer / BigBird)."""

    def mask_fn(seq_len: int, block_q: int, block_k: int):
        blocks = dict(block_q=block_q, block_k=block_k)
        local = attention_masks.sliding_window_mask(seq_len, seq_len, window, causal=causal, **blocks)
        glob = attention_masks.global_tokens_mask(seq_len, seq_len, num_global, **blocks)
        if causal:
            glob = attention_masks.intersection(glob, attention_masks.causal_mask(seq_len, seq_len, **blocks))
        return attention_masks.union(local, glob)

    return mask_fn


class BlockSparseSelfAttention(nn.Module):
    """Self-attention over ``x [batch, seq, features]`` restricted to a block mask.

    Attributes:
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention); default ``num_heads``.
      head_dim: per-head width; default ``features // num_heads``.
      block_q, block_k: block sizes of the mask; the sequence length must be divisible by both.
      causal: cut keys after the query (autoregressive models).
      mask_fn: ``(seq_len, block_q, block_k) -> block mask`` used when ``__call__`` gets no mask;
        default all blocks (dense, or causal when ``causal``).
      backend, interpret: passed to ``block_sparse_attention``.
      dtype: computation dtype (default: the input's); param_dtype: parameter dtype.
      kernel_init: initializer of the projections.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    block_q: int = 128
    block_k: int = 128
    causal: bool = False
    mask_fn: Callable | None = None
    backend: str | None = None
    interpret: Any = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, block_mask=None):
        """``x [batch, seq, features] -> [batch, seq, features]``; ``block_mask`` overrides ``mask_fn``."""
        batch, seq, features = x.shape
        kv_heads = self.num_kv_heads or self.num_heads
        head_dim = self.head_dim or features // self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv_heads})")
        dense = lambda heads, name: nn.DenseGeneral(
            (heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name
        )
        # [batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim], the kernel's layout.
        to_heads = lambda t: t.transpose(0, 2, 1, 3)
        q = to_heads(dense(self.num_heads, "query")(x))
        k = to_heads(dense(kv_heads, "key")(x))
        v = to_heads(dense(kv_heads, "value")(x))
        if block_mask is None:
            if self.mask_fn is not None:
                block_mask = self.mask_fn(seq, self.block_q, self.block_k)
            else:
                block_mask = attention_masks.full_mask(seq, seq, block_q=self.block_q, block_k=self.block_k)
        out = block_sparse_attention(
            q, k, v, block_mask,
            block_q=self.block_q, block_k=self.block_k, causal=self.causal,
            backend=self.backend, interpret=self.interpret,
        )
        return nn.DenseGeneral(
            features, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name="out",
        )(out.transpose(0, 2, 1, 3))

"""A flax (linen) self-attention layer computed with block-sparse attention.

Flax is an optional dependency of jaxsparse, so it is imported here only: ``import
jaxsparse.nn.attention`` needs flax, ``import jaxsparse`` does not.

The layer is ordinary multi-head (or grouped-query) self-attention whose score matrix is
restricted to the blocks of a block mask and, inside them, to a token-level rule, computed by
``pallas_kernels.block_sparse_attention`` (flash-style, only nonzero blocks; Dao et al. 2022,
arXiv:2205.14135). The block mask is a pattern from ``pallas_kernels.attention_masks`` (sliding
window + global tokens as in Longformer, Beltagy et al. 2020, and BigBird, Zaheer et al. 2020),
given per call or built from the sequence length by ``mask_builder``; the rule (``mask_fn``,
e.g. ``attention_masks.sliding_window_fn`` or a ``document_fn`` over per-call segment ids) makes
it token-exact, with blocks the rule fills completely computed without per-token masking.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from pallas_kernels import attention_masks
from pallas_kernels.attention import block_sparse_attention

__all__ = ["BlockSparseSelfAttention", "local_global_mask"]


def local_global_mask(window: int, num_global: int, *, causal: bool = True) -> Callable:
    """A ``mask_builder`` for ``BlockSparseSelfAttention``: the blocks of a sliding window of
    ``window`` tokens plus the first ``num_global`` tokens as global tokens (Longformer / BigBird).
    Whole blocks; for the token-exact pattern give ``mask_fn=or_fn(sliding_window_fn(window),
    global_tokens_fn(num_global))`` as well (``attention_masks``)."""

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
      mask_fn: token-level rule ``(batch, head, q_index, k_index) -> bool`` applied inside the
        visited blocks (``pallas_kernels.attention_masks.causal_fn``, ``sliding_window_fn``,
        ``global_tokens_fn``, ``document_fn``, ``prefix_lm_fn``, ``and_fn``, ``or_fn``); ``__call__``'s
        ``mask_fn`` overrides it (e.g. a ``document_fn`` over the batch's segment ids).
      mask_builder: ``(seq_len, block_q, block_k) -> block mask`` used when ``__call__`` gets no
        block mask (e.g. ``local_global_mask``); default all blocks, from which a ``mask_fn`` keeps
        only the blocks it allows.
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
    mask_builder: Callable | None = None
    backend: str | None = None
    interpret: Any = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, block_mask=None, mask_fn=None):
        """``x [batch, seq, features] -> [batch, seq, features]``; ``block_mask`` overrides
        ``mask_builder`` and ``mask_fn`` the layer's ``mask_fn``."""
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
        if block_mask is None and self.mask_builder is not None:
            block_mask = self.mask_builder(seq, self.block_q, self.block_k)
        out = block_sparse_attention(
            q, k, v, block_mask, mask_fn=self.mask_fn if mask_fn is None else mask_fn,
            block_q=self.block_q, block_k=self.block_k, causal=self.causal,
            backend=self.backend, interpret=self.interpret,
        )
        return nn.DenseGeneral(
            features, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name="out",
        )(out.transpose(0, 2, 1, 3))

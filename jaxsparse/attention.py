"""Old import path of the flax block-sparse attention layer, now :mod:`jaxsparse.nn.attention`.

Kept as a re-export so ``from jaxsparse.attention import BlockSparseSelfAttention`` still works;
the kernels themselves are ``pallas_kernels.block_sparse_attention``.
"""

from jaxsparse.nn.attention import BlockSparseSelfAttention, local_global_mask

__all__ = ["BlockSparseSelfAttention", "local_global_mask"]

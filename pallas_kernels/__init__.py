"""pallas_kernels: block-sparse matmul and attention for JAX, with Pallas TPU/GPU kernels and an XLA path.

Depends only on jax. See DESIGN.md ("Kernels").
"""

from pallas_kernels import attention_masks
from pallas_kernels.attention import block_sparse_attention

__all__ = []
__all__ += ["attention_masks", "block_sparse_attention"]

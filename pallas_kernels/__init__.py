"""pallas_kernels: block-sparse matmul and attention for JAX, with Pallas TPU/GPU kernels and an XLA path.

Depends only on jax. See DESIGN.md ("Kernels").
"""

from pallas_kernels import attention_masks
from pallas_kernels.attention import block_sparse_attention
from pallas_kernels.bsr_format import BlockSparseMatrix, BlockSparsePattern
from pallas_kernels.bsr_matmul import bsr_matmul, default_bsr_backend

__all__ = [
    "attention_masks",
    "block_sparse_attention",
    "BlockSparseMatrix",
    "BlockSparsePattern",
    "bsr_matmul",
    "default_bsr_backend",
]

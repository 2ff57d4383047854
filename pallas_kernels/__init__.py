"""pallas_kernels: block-sparse matmul and attention for JAX, with Pallas TPU/GPU kernels and an XLA path.

Depends only on jax. See DESIGN.md ("Kernels").
"""

__all__ = []

"""jaxsparse: functional sparsity for JAX.

Masks are pytrees alongside params; sparsifiers are optax gradient transformations.
"""

__version__ = "0.1.0"
__all__ = []

"""Calibration statistics of a layer's inputs, accumulated chunk by chunk.

SparseGPT needs the Hessian of the layer-wise reconstruction loss, ``H = 2 X^T X / tokens`` for
inputs ``X`` of shape ``(tokens, in)``; Wanda needs only its diagonal, the squared norms
``||X_j||^2`` of the input features. Neither needs all calibration tokens at once:
:func:`hessian_update` adds one ``(tokens, in)`` chunk (or any ``(..., in)`` batch) to a running
sum, in float32 whatever the inputs' dtype.

Data-parallel calibration: the sum is a reduction over tokens, so

- under ``jax.jit`` with the inputs sharded over their token axis, XLA reduces the partial sums
  across devices by itself;
- under ``shard_map`` (or ``pmap``), pass the mapped axis as ``axis_name`` and each device's
  chunk is summed over all devices with ``lax.psum``: every device ends with the same state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["HessianState", "hessian_init", "hessian_update"]


class HessianState(NamedTuple):
    """Running sums of a layer's inputs.

    Attributes:
      hessian: ``sum_t x_t x_t^T`` over the tokens seen, float32 ``(in, in)``; or only its
        diagonal ``sum_t x_t**2`` of shape ``(in,)`` for a state made with ``diagonal=True``.
      count: number of tokens seen (int32 scalar).
    """

    hessian: jax.Array
    count: jax.Array

    @property
    def diagonal(self) -> jax.Array:
        """The squared norms of the input features, ``||X_j||_2^2`` (what Wanda uses)."""
        return self.hessian if self.hessian.ndim == 1 else jnp.diagonal(self.hessian)


def hessian_init(n_in: int, *, diagonal: bool = False) -> HessianState:
    """An empty :class:`HessianState` for a layer with ``n_in`` input features.

    ``diagonal=True`` keeps only the diagonal (``n_in`` floats instead of ``n_in**2``): enough for
    Wanda and magnitude pruning, not for SparseGPT.
    """
    shape = (int(n_in),) if diagonal else (int(n_in), int(n_in))
    return HessianState(jnp.zeros(shape, jnp.float32), jnp.zeros([], jnp.int32))


def hessian_update(state: HessianState, inputs: jax.Array, *, axis_name=None) -> HessianState:
    """Add a chunk of layer inputs ``(..., in)`` (all leading axes are tokens) to ``state``.

    Products are accumulated in float32 (bfloat16 activations are upcast first). With
    ``axis_name`` (inside ``shard_map`` / ``pmap``) the chunk's sums are ``psum``-ed over that
    axis, so each device's state counts the tokens of all devices.
    """
    n_in = state.hessian.shape[0]
    if inputs.ndim < 1 or inputs.shape[-1] != n_in:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not match a Hessian of {n_in} input features")
    x = jnp.reshape(inputs, (-1, n_in)).astype(jnp.float32)
    if state.hessian.ndim == 1:
        add = jnp.sum(x * x, axis=0)
    else:
        add = jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST)
    count = jnp.asarray(x.shape[0], jnp.int32)
    if axis_name is not None:
        add, count = lax.psum((add, count), axis_name)
    return HessianState(state.hessian + add, state.count + count)

"""The sparse start of a flax nnx training run: ``nnx.Optimizer`` with the model's params masked.

``nnx.Optimizer(model, tx, wrt=...)`` calls ``tx.init`` itself, which cannot change the model, so
the model still holds dense weights while the masks already hold the initial topology. This is
the nnx form of :func:`jaxsparse.init`. Flax is imported here only.
"""

from __future__ import annotations

from flax import nnx

from jaxsparse.core import get_masks, sparsifier_states
from jaxsparse.masks import apply_masks

__all__ = ["nnx_optimizer"]


def nnx_optimizer(model: nnx.Module, tx, *, wrt=nnx.Param) -> nnx.Optimizer:
    """``nnx.Optimizer(model, tx, wrt=wrt)`` with the model's params masked in place.

    The initial masks of the jaxsparse sparsifiers in ``tx`` are applied to the model, so the
    first ``optimizer.update`` already trains the sparse model::

        optimizer = js.nnx_optimizer(model, js.rigl(optax.adam(1e-3), sparsity=0.9, end_step=30_000))

    Args:
      model: the nnx module to train (changed in place: its params are zeroed off the masks).
      tx: an optax transformation containing jaxsparse sparsifiers (with none, a dense baseline,
        the model is left as it is).
      wrt: the filter of the trained variables, as for ``nnx.Optimizer``.
    """
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    if sparsifier_states(optimizer):
        state = nnx.state(model, wrt)
        nnx.update(model, apply_masks(state, get_masks(optimizer, state)))
    return optimizer

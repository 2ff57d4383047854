"""AutoSparse: gradient annealing with learnable per-layer thresholds.

Kundu, Mellempudi, Vooturi, Kaul & Dubey (2023), "AutoSparse: Towards Automated Sparse Training of
Deep Neural Networks", arXiv 2304.06941. The method combines

- the learnable-threshold reparametrisation of STR (Kusupati et al., 2020, "Soft Threshold Weight
  Reparameterization for Learnable Sparsity", ICML, arXiv 2002.03231), per layer ``l``::

      W~_l = sign(W_l) * h(|W_l| - tau_l),   tau_l = sigmoid(s_l)        (forward weights)

  with ``s_l`` a trained scalar and ``h`` the ReLU, so the mask is ``|W_l| > tau_l`` and the
  sparsity of every layer is learned rather than fixed;
- **gradient annealing (GA)**: in the backward pass ``h'(x) = 1`` for ``x > 0`` and ``alpha(t)``
  (not 0) for ``x <= 0``, so a pruned weight still receives ``alpha(t)`` times its gradient and
  can recover, with ``alpha(t)`` decaying non-linearly to 0 (the sigmoid-cosine decay,
  :func:`jaxsparse.schedules.sigmoid_cosine_decay`)::

      alpha(t) = alpha_0 * max( (1 + cos(pi t / T)) / 2,  1 - sigmoid(L0 + (L1 - L0) t / T) ),
      L0 = -6, L1 = 6,  and alpha(t) = 0 for t >= T.

Through ``h`` the gradients are, with ``g = dL/dW~`` (what the loss gives for params)::

      dL/dW   = g                       where |W| > tau,   alpha(t) g elsewhere
      dL/ds_l = -sigmoid'(s_l) * sum( g * sign(W) * h'(|W| - tau_l) )

The first is exactly the core's gradient annealing (the dense weights are the core's shadow
weights); the second trains the thresholds with ``threshold_optimizer`` (by default a copy of the
inner optimizer, so the thresholds are trained like the other parameters, weight decay included,
which is what pushes them up, as in STR).

How this was checked: this session could not retrieve the paper's text (only its abstract, which
states the non-linear decay and the learnable thresholds), so the equations above are written
from the published description and a public re-implementation (PQuant's ``AutoSparse`` layer:
``sign(W) * ReLU(|W| - sigmoid(s))`` with gradient ``alpha`` for ``x <= 0`` and a
``max(cosine, sigmoid)`` decay with ``L0 = -6``, ``L1 = 6``); the equation numbers of the paper
are not quoted for that reason. That implementation multiplies ``alpha`` by the decay once per
epoch; here ``alpha(t)`` is the decay itself evaluated at the step (no compounding), an option
away (``gradient_annealing=`` any ``step -> alpha`` function).

On a device mesh (:mod:`jaxsparse.sharding`): the dense shadow weights shard like their params;
the masks are elementwise compares with each layer's threshold (a replicated scalar, with its
optimizer state), and the threshold's gradient is a sum over the layer (per-device partial sums
and an all-reduce), so nothing gathers a param. With a budget (``sparsity=``), the masks are
the structure's top-k (:func:`jaxsparse.ste.magnitude_masks`), partitioned radix selects.

With ``sparsity`` given, the mask is instead the top ``1 - sparsity`` of ``|W|`` per layer (a
fixed budget) with GA, the paper's "GA on a fixed-budget (Top-K) method" (their TopKAST + GA
comparison); the thresholds are then unused.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsparse.core import Topology, TopologyInputs, every_step, sparsifier
from jaxsparse.schedules import sigmoid_cosine_decay
from jaxsparse.ste import magnitude_masks

__all__ = ["AutoSparseAux", "autosparse", "autosparse_alpha"]


class AutoSparseAux(NamedTuple):
    """AutoSparse's part of the sparsifier state.

    Attributes:
      thresholds: per sparsified leaf, the trained scalar ``s_l`` (``tau_l = sigmoid(s_l)``).
      opt_state: the threshold optimizer's state.
    """

    thresholds: list
    opt_state: object


def autosparse_alpha(alpha: float = 0.5, end_step: int = 1) -> object:
    """AutoSparse's annealing factor ``alpha(t)`` (the formula in the module docstring), a
    ``step -> alpha`` function; the same as :func:`jaxsparse.schedules.sigmoid_cosine_decay`."""
    return sigmoid_cosine_decay(alpha, end_step)


def _learned_topology(optimizer: optax.GradientTransformation, threshold_init: float) -> Topology:
    def tau(s):
        return jax.nn.sigmoid(s)

    def masks_of(weights, thresholds):
        return [jnp.abs(w.astype(jnp.float32)) > tau(s) for w, s in zip(weights, thresholds)]

    def init(inputs: TopologyInputs):
        thresholds = [jnp.full((), threshold_init, jnp.float32) for _ in inputs.plan]
        return masks_of(inputs.params, thresholds), AutoSparseAux(thresholds, optimizer.init(thresholds))

    def observe(inputs: TopologyInputs):
        thresholds, opt_state = inputs.aux
        alpha = jnp.float32(0.0) if inputs.alpha is None else inputs.alpha
        threshold_grads = []
        for g, w, m, s in zip(inputs.grads, inputs.params, inputs.masks, thresholds):
            slope = jnp.where(m, 1.0, alpha)  # h'(|W| - tau) with GA
            d_tau = -jnp.sum(g.astype(jnp.float32) * jnp.sign(w.astype(jnp.float32)) * slope)
            threshold_grads.append(d_tau * tau(s) * (1.0 - tau(s)))
        updates, opt_state = optimizer.update(threshold_grads, opt_state, thresholds)
        thresholds = optax.apply_updates(thresholds, updates)
        return inputs.grads, AutoSparseAux(list(thresholds), opt_state)

    def update(inputs: TopologyInputs):
        return masks_of(inputs.params, inputs.aux.thresholds), inputs.aux

    def forward(inputs: TopologyInputs):
        out = []
        for w, m, s in zip(inputs.params, inputs.masks, inputs.aux.thresholds):
            x = w.astype(jnp.float32)
            out.append(jnp.where(m, jnp.sign(x) * jnp.maximum(jnp.abs(x) - tau(s), 0.0), 0.0).astype(w.dtype))
        return out

    return Topology(init=init, update=update, is_update_step=every_step, observe=observe, forward=forward)


def _budget_topology() -> Topology:
    masks = lambda inputs: magnitude_masks(inputs.plan, inputs.params)
    return Topology(
        init=lambda inputs: (masks(inputs), ()), update=lambda inputs: (masks(inputs), inputs.aux), is_update_step=every_step
    )


def autosparse(
    inner: optax.GradientTransformation,
    *,
    end_step: int,
    alpha: float = 0.5,
    sparsity=None,
    threshold_init: float = -5.0,
    threshold_optimizer: optax.GradientTransformation | None = None,
    gradient_annealing=None,
    structure=None,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
    dense_if_untileable: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AutoSparse (Kundu et al., 2023, arXiv 2304.06941): learnable per-layer thresholds and
    gradient annealing (see the module docstring for the equations).

    Params hold ``sign(W) * max(|W| - sigmoid(s_l), 0)`` (exactly 0 where ``|W| <= tau_l``); the
    dense ``W`` are in ``state.shadow``, the thresholds ``s_l`` in ``state.aux.thresholds``.
    ``js.init`` returns the initial weights masked (``W`` where ``|W| > tau_l``, not yet
    shifted by ``tau_l``: ``tx.init`` cannot see the soft threshold); from the first step on,
    params are the soft-thresholded weights.

    Example::

        tx = js.autosparse(optax.adamw(1e-3, weight_decay=5e-4), end_step=20_000)
        params, opt_state = js.init(tx, params)
        # fixed budget instead of learned sparsity: GA on a top-k mask
        tx = js.autosparse(optax.adam(1e-3), sparsity=0.9, end_step=20_000)

    Args:
      inner: the optax transformation that trains the dense weights.
      end_step: ``T``, the step where ``alpha(t)`` reaches 0.
      alpha: ``alpha_0``, the initial annealing factor (0.5, the default of the public
        re-implementation; its ResNet-50 configuration, written after the paper's ImageNet run,
        uses 0.75 with ``threshold_init = -5``, the sigmoid threshold, and alpha set to 0 at
        epoch 90 of 100, which ``end_step`` at 90% of training approximates).
      sparsity: None (learned thresholds, the paper's AutoSparse) or a float / distribution (a
        top-k mask per layer with GA, thresholds unused; None with an N:M ``structure``).
      threshold_init: initial ``s_l`` (``tau = sigmoid(-5) = 0.0067``: almost nothing pruned at first).
      threshold_optimizer: trains the thresholds; None: the inner transformation itself (its
        learning rate and weight decay), applied to the list of thresholds.
      structure, dense_if_untileable: with a fixed budget, its structure (``js.n_of_m(2, 4)``:
        GA on N:M; see :func:`jaxsparse.sparsifier`).
      gradient_annealing: overrides the sigmoid-cosine ``alpha(t)`` (any float or ``step ->
        alpha`` function).
      include, exclude, overrides, seed: see :func:`jaxsparse.core`.
    """
    if gradient_annealing is None:
        gradient_annealing = sigmoid_cosine_decay(alpha, end_step)
    if sparsity is None and structure is None:
        topology = _learned_topology(inner if threshold_optimizer is None else threshold_optimizer, float(threshold_init))
        sparsity = 0.0  # every chosen leaf is sparsified; its sparsity is learned
    else:
        topology = _budget_topology()
    return sparsifier(
        inner, sparsity=sparsity, topology=topology, include=include, exclude=exclude, overrides=overrides,
        seed=seed, structure=structure, dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )

"""SRigL: RigL with a constant fan-in per output neuron, and neuron ablation.

Lasby, Golubeva, Evci, Nica & Ioannou (2024), "Dynamic Sparse Training with Structured
Sparsity", ICLR. Constant fan-in (every active output neuron has exactly the same number ``k``
of nonzero inputs) is what lets a condensed dense kernel of shape ``(k, n_out)`` compute the
layer fast.

A leaf is viewed as a matrix ``(fan_in, n_out)`` with the output axis (``output_axis``, default
the last one, flax's ``(in, out)`` kernels and ``(h, w, in, out)`` convolutions) as columns.
At init every column gets ``k0 = floor(budget / n_out)`` random nonzeros, so the leaf holds
``B = k0 * n_out`` of its distribution's budget ``N - floor(s N)``; when the budget is smaller
than ``n_out`` (very high sparsity), ``B = budget`` random neurons get one weight each and the
others start ablated, so a leaf never holds more than its budget. Every ``update_every`` steps
until ``end_step``, with RigL's cosine drop fraction ``f(t)`` and ``nnz`` active weights:

1. RigL's layer-wise selection: the ``nnz - d`` active weights with the largest magnitude are
   kept, ``d = floor(f(t) * nnz)``, and the ``d`` inactive positions with the largest dense
   gradient magnitude are the growth candidates.
2. Neuron ablation: a neuron with fewer than ``gamma_sal * k`` salient weights (kept or
   candidate, ``k`` its current fan-in) is ablated (all its weights removed); at least the most
   salient neuron stays, and at most ``B`` neurons (the most salient) stay active. The fan-in
   becomes ``k' = min(fan_in, floor(B / active))`` so the layer keeps its density (exactly ``B``
   nonzeros while no neuron is ablated) and never exceeds ``B``.
3. Every active neuron keeps its ``min(k', kept)`` largest kept weights and grows the rest up to
   ``k'`` by gradient magnitude among its positions inactive before the update (only when a
   neuron runs out of those, a weight dropped in step 1 comes back, keeping its value).

Ablated neurons may come back at a later update when enough of their gradients are salient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsparse.distributions import erk
from jaxsparse.dst import drop_and_grow, drop_count, at_update, dst_update_steps, update_fractions, paper_distribution
from jaxsparse.selection import top_k_mask
from jaxsparse.selection import top_k_per_column as neuron_top_k  # re-exported: the per-neuron selection
from jaxsparse.core import LeafPlan, Topology, TopologyInputs, sparsifier
from jaxsparse.structures import ConstantFanIn

__all__ = ["srigl", "fan_in_counts", "neuron_top_k"]


def fan_in_counts(mask, output_axis: int = -1):
    """Nonzeros per output neuron of a mask (its fan-in), a vector of length ``n_out``."""
    return ConstantFanIn(output_axis).cell_counts(mask)


def _fan_in(leaf: LeafPlan, output_axis: int):
    """``(fan_in, n_out, k0, n_active0)``: the leaf as a ``(fan_in, n_out)`` matrix, the initial
    fan-in ``k0`` and number of active neurons. The leaf holds ``k0 * n_active0 <= budget``
    weights: every neuron ``floor(budget / n_out)`` of them, or, when the budget is smaller than
    the number of neurons, ``budget`` neurons one weight each (the others ablated from the start)."""
    if len(leaf.shape) < 2:
        raise ValueError(
            f"srigl needs leaves with an input and an output axis; leaf {leaf.name!r} has shape {leaf.shape}"
        )
    if not -len(leaf.shape) <= output_axis < len(leaf.shape):
        raise ValueError(f"output_axis {output_axis} is out of range for leaf {leaf.name!r} of shape {leaf.shape}")
    n_out = leaf.shape[output_axis]
    fan_in = leaf.size // n_out
    if leaf.keep >= n_out:
        return fan_in, n_out, min(leaf.keep // n_out, fan_in), n_out
    return fan_in, n_out, 1, leaf.keep


def _srigl_topology(drop_fraction, end_step, update_every, gamma_sal, output_axis) -> Topology:
    # The constant fan-in structure's view of a leaf as a (fan_in, n_out) matrix; selections per
    # neuron are its per-column top-k (neuron_top_k).
    layout = ConstantFanIn(output_axis)
    fractions = update_fractions(drop_fraction, update_every, end_step).astype(np.float32)

    def init(inputs: TopologyInputs):
        keys = jax.random.split(inputs.key, max(len(inputs.plan), 1))
        masks = []
        for leaf, key in zip(inputs.plan, keys):
            fan_in, n_out, k0, n_active = _fan_in(leaf, output_axis)
            weight_key, neuron_key = jax.random.split(key)
            active = top_k_mask(jax.random.uniform(neuron_key, (n_out,)), n_active)
            chosen = neuron_top_k(jax.random.uniform(weight_key, (fan_in, n_out)), jnp.where(active, k0, 0))
            masks.append(layout.from_matrix(chosen, leaf.shape))
        return masks, ()

    def neuron_update(leaf, m, magnitude, gradient, counts, kept, candidates):
        fan_in, n_out, k0, n_active = _fan_in(leaf, output_axis)
        budget = k0 * n_active
        # 2. Ablate neurons with too few salient weights; the others share the budget.
        salient = jnp.sum(kept | candidates, axis=0, dtype=jnp.int32)
        active = salient.astype(jnp.float32) >= gamma_sal * jnp.max(counts).astype(jnp.float32)
        most_salient = jnp.arange(n_out) == jnp.argmax(salient)
        active = jnp.where(jnp.any(active), active, most_salient)
        if budget < n_out:  # at most one neuron per budgeted weight: keep the most salient ones
            active = active & top_k_mask(jnp.where(active, salient, -1).astype(jnp.float32), budget)
        fan = jnp.minimum(fan_in, budget // jnp.sum(active, dtype=jnp.int32))
        # 3. Per active neuron: its largest kept weights, then growth up to the fan-in.
        kept_per_neuron = jnp.sum(kept, axis=0, dtype=jnp.int32)
        n_keep = jnp.where(active, jnp.minimum(kept_per_neuron, fan), 0)
        # A neuron has more kept weights than the fan-in only when revived neurons lower it.
        keep = lax.cond(
            jnp.any(kept_per_neuron > fan),
            lambda: neuron_top_k(magnitude, n_keep, where=kept),
            lambda: kept & active,
        )
        # Growth prefers positions inactive before the update (scored by |g| >= 0); a weight
        # dropped in step 1 (-1) is taken back only when a neuron has too few of them.
        grow_scores = jnp.where(m, -1.0, gradient)
        grown = neuron_top_k(grow_scores, jnp.where(active, fan - n_keep, 0), where=~keep)
        return layout.from_matrix(keep | grown, leaf.shape)

    def update(inputs: TopologyInputs):
        fraction = at_update(fractions, inputs.step, update_every)
        m = [layout.as_matrix(x) for x in inputs.masks]
        magnitude = [layout.as_matrix(jnp.abs(x)) for x in inputs.params]
        gradient = [layout.as_matrix(jnp.abs(x)) for x in inputs.grads]
        counts = [jnp.sum(x, axis=0, dtype=jnp.int32) for x in m]
        nnz = [jnp.sum(c) for c in counts]
        d = [drop_count(n, leaf.size, fraction, regrow_dropped=False) for n, leaf in zip(nnz, inputs.plan)]
        # 1. RigL's layer-wise selection: kept weights and growth candidates (among positions
        # inactive before the update; step 3 decides what a just-dropped weight gets).
        _, kept, candidates = drop_and_grow(m, magnitude, gradient, d, d, regrow_dropped=False)
        return [
            neuron_update(leaf, *args) for leaf, *args in zip(inputs.plan, m, magnitude, gradient, counts, kept, candidates)
        ], inputs.aux

    return Topology(init=init, update=update, is_update_step=dst_update_steps(update_every, end_step))


def srigl(
    inner: optax.GradientTransformation,
    *,
    sparsity,
    update_every: int = 100,
    end_step: int,
    drop_fraction: float = 0.3,
    gamma_sal: float = 0.3,
    output_axis: int = -1,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
    gradient_annealing=None,
) -> optax.GradientTransformationExtraArgs:
    """SRigL (Lasby et al., 2024, "Dynamic Sparse Training with Structured Sparsity", ICLR):
    RigL with a constant fan-in per output neuron and neuron ablation.

    See the module docstring for the update. A float ``sparsity`` is spread with ERK (as in the
    paper); each leaf keeps ``floor(budget / n_out)`` nonzeros per output neuron (one per neuron
    on ``budget`` neurons when the budget is below ``n_out``), never more than its budget.

    On a device mesh (:mod:`jaxsparse.sharding`): the per-neuron selections (:func:`jaxsparse.top_k_per_column`)
    are compare-and-count passes whose counts are reductions over each column (partial counts and
    an all-reduce), the saliency for neuron ablation a column reduction too; nothing is gathered.

    Example::

        tx = js.srigl(optax.adam(1e-3), sparsity=0.9, update_every=100, end_step=30_000)
        params, opt_state = js.init(tx, params)   # params masked: step 0 trains the sparse model

    Args:
      inner: the optax transformation to wrap.
      sparsity: a float (spread by ERK) or a distribution.
      update_every, end_step, drop_fraction: as in :func:`jaxsparse.rigl`.
      gamma_sal: minimum fraction of a neuron's fan-in that must be salient for the neuron to
        stay active (the paper's ``gamma_sal``, 0.3); 0 disables ablation.
      output_axis: the axis of output neurons in every sparsified leaf (-1 for flax/haiku
        ``(in, out)`` kernels, 0 for equinox/PyTorch ``(out, in)`` weights).
      seed, include, exclude, overrides: see :func:`jaxsparse.core`.
      gradient_annealing: None (default), or a float or ``step -> alpha`` function: dropped
        weights keep training as dense shadow weights with gradients scaled by ``alpha(t)``, and
        drop scores read the dense weights (see :func:`jaxsparse.core`).
    """
    if end_step is None:
        raise ValueError("srigl needs end_step, the step at which its cosine drop fraction reaches 0")
    if not 0.0 <= float(gamma_sal) <= 1.0:
        raise ValueError(f"gamma_sal must be in [0, 1]; got {gamma_sal!r}")
    if not isinstance(output_axis, int) or isinstance(output_axis, bool):
        raise ValueError(f"output_axis must be an int; got {output_axis!r}")
    topology = _srigl_topology(drop_fraction, end_step, update_every, float(gamma_sal), output_axis)
    return sparsifier(
        inner, sparsity=paper_distribution(sparsity, erk), topology=topology,
        include=include, exclude=exclude, overrides=overrides, seed=seed,
        gradient_annealing=gradient_annealing,
    )

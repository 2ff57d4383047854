"""Top-KAST: always-sparse training with a top-k forward set and a larger backward set.

Jayakumar, Pascanu, Rae, Osindero & Elsen (2020), "Top-KAST: Top-K Always Sparse Training",
NeurIPS. The method keeps weights ``theta`` and, per layer,

- the forward set ``A``: the top-``D`` fraction of ``|theta|`` (the sparse model),
- the backward set ``B``: the top-``(D + M)`` fraction, a superset of ``A``; gradients computed
  through the sparse forward pass update ``theta`` on ``B`` only, so weights just outside ``A``
  can grow into it,
- an exploration penalty, L2 on ``A`` and L2 scaled by ``1 / D`` on ``B \\ A``, so a weight
  outside ``A`` must earn its way in.

How it fits "params are the sparse model" (DESIGN.md invariant 1): params hold ``theta`` on
``A`` and exactly 0 elsewhere, ``get_masks`` returns ``A``, and the dense ``theta`` lives in the
sparsifier state as shadow weights (``state.aux.shadow``, one array per sparsified leaf, plus
the backward masks ``state.aux.backward``). The loss gradient with respect to params is the
gradient with respect to the forward weights the paper uses; the inner optimizer sees it on
``B`` (its moments are kept on ``B`` and reset where ``B`` changes) and receives the shadow
weights as its ``params`` (so adamw's weight decay or ``add_decayed_weights`` decay ``theta``, the
weights it trains), the shadow takes the inner update on ``B``, and params become ``theta * A``.
The shadow costs one params-sized buffer, and it is the source of truth: params changed outside
the optimizer are overwritten at its next step.

``A`` and ``B`` are recomputed from ``|theta|`` every ``update_every`` steps (exact budgets
``N - floor(s N)`` per leaf, ties to the lowest index). The paper defines them at every step
(``update_every=1``); since the loss of a step is computed before the optimizer runs, the sets
used by a step's forward pass are those computed from the weights one step earlier.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from jaxsparse.distributions import Distribution, as_distribution, check_sparsity, keep_count
from jaxsparse.dst import dst_update_steps
from jaxsparse.selection import top_k_masks_nested
from jaxsparse.structures import Structure
from jaxsparse.core import Topology, TopologyInputs, as_annealing, sparsifier

__all__ = ["TopKastAux", "topkast"]


class TopKastAux(NamedTuple):
    """Top-KAST's part of the sparsifier state: lists aligned with the sparsified leaves.

    Attributes:
      shadow: the dense weights ``theta`` (params hold ``theta`` on the forward set only).
      backward: the backward-set masks ``B`` (a superset of the forward masks).
    """

    shadow: list
    backward: list


def _topkast_topology(backward: Distribution, penalty: float, update_every: int, annealing=None) -> Topology:
    def backward_keeps(plan):
        targets = backward.solve({leaf.name: leaf.shape for leaf in plan})
        # In units of each leaf's structure, per cell times cells; at least the forward budget: an
        # override may make a leaf denser forward than backward.
        keeps = []
        for leaf in plan:
            cells, per_cell = leaf.layout.cells(leaf.shape), leaf.layout.cell_units(leaf.shape)
            keeps.append(max(cells * keep_count(per_cell, targets[leaf.name]), leaf.keep_units))
        return keeps

    def sets(plan, shadow):
        # Both sets are top-k of the same (aggregated) magnitudes: one nested search per leaf (a
        # NaN weight ranks lowest); a per-cell structure (N:M) selects both per cell.
        forward, back = [], []
        for theta, leaf, k in zip(shadow, plan, backward_keeps(plan)):
            layout, cells = leaf.layout, leaf.layout.cells(leaf.shape)
            units = layout.to_units(jnp.abs(theta))
            if cells == 1:
                f, b = top_k_masks_nested(units, [leaf.keep_units, k])
            else:
                f, b = layout.select_units(units, leaf.keep_units // cells), layout.select_units(units, k // cells)
            forward.append(layout.expand(f, leaf.shape))
            back.append(layout.expand(b, leaf.shape))
        return forward, back

    def init(inputs: TopologyInputs):
        forward, back = sets(inputs.plan, inputs.params)
        return forward, TopKastAux(shadow=list(inputs.params), backward=back)

    def update(inputs: TopologyInputs):
        forward, back = sets(inputs.plan, inputs.aux.shadow)
        return forward, inputs.aux._replace(backward=back)

    def observe(inputs: TopologyInputs):
        # Gradient of the exploration penalty penalty/2 * (|theta_A|^2 + |theta_{B\A}|^2 / D).
        grads = []
        for leaf, g, a, b, theta in zip(inputs.plan, inputs.grads, inputs.masks, inputs.aux.backward, inputs.aux.shadow):
            scale = jnp.where(a, penalty, jnp.where(b, penalty * leaf.size / leaf.keep, 0.0))
            g = (g + scale * theta.astype(jnp.float32)).astype(g.dtype)
            if annealing is not None:  # outside B: the annealed gradient instead of none
                g = jnp.where(b, g, (annealing(inputs.step) * g.astype(jnp.float32)).astype(g.dtype))
            grads.append(g)
        return grads, inputs.aux

    def finish(inputs: TopologyInputs, inner_updates):
        shadow, updates = [], []
        moves = False if annealing is None else annealing(inputs.step) > 0  # theta outside B trains while alpha > 0
        for u, a, b, theta, p in zip(inner_updates, inputs.masks, inputs.aux.backward, inputs.aux.shadow, inputs.params):
            theta = jnp.where(b | moves, (theta + u).astype(theta.dtype), theta)
            shadow.append(theta)
            # params become theta on A and exactly 0 elsewhere
            updates.append((jnp.where(a, theta, jnp.zeros((), theta.dtype)) - p).astype(u.dtype))
        return updates, inputs.aux._replace(shadow=shadow)

    return Topology(
        init=init,
        update=update,
        is_update_step=dst_update_steps(update_every, None),
        observe=observe if penalty > 0 or annealing is not None else None,
        # with annealing every weight is trained (gradients outside B scaled by alpha(t)), so the
        # core neither zeroes them nor resets moments
        trained=(lambda masks, aux: aux.backward) if annealing is None else (lambda masks, aux: [jnp.ones_like(b) for b in aux.backward]),
        finish=finish,
        inner_params=lambda inputs: inputs.aux.shadow,  # the inner optimizer updates theta
    )


class _DoubledDensity(Distribution):
    """Per leaf, twice the density of a forward distribution (capped at dense)."""

    def __init__(self, forward: Distribution):
        super().__init__(max(0.0, 2 * forward.sparsity - 1), f"doubled_density({forward!r})")
        self.forward = forward

    def solve(self, shapes):
        return {name: max(0.0, 2 * s - 1) for name, s in self.forward.solve(shapes).items()}


def topkast(
    inner: optax.GradientTransformation,
    *,
    sparsity=None,
    backward_sparsity=None,
    penalty: float = 0.0,
    update_every: int = 100,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
    structure=None,
    dense_if_untileable: bool = False,
    gradient_annealing=None,
) -> optax.GradientTransformationExtraArgs:
    """Top-KAST (Jayakumar et al., 2020, "Top-KAST: Top-K Always Sparse Training", NeurIPS).

    The forward weights (params) are the top ``1 - sparsity`` fraction of the shadow weights by
    magnitude in each leaf; gradients update the shadow weights on the larger top
    ``1 - backward_sparsity`` fraction (see the module docstring).

    On a device mesh (:mod:`jaxsparse.sharding`): the dense shadow weights and backward masks
    in the state take their param's sharding; the forward and backward sets are nested radix
    selects per leaf through partitioned histograms.

    Example (the paper's 90% forward / 80% backward setting)::

        tx = js.topkast(optax.adam(1e-3), sparsity=0.9, backward_sparsity=0.8, update_every=1)
        params, opt_state = js.init(tx, params)   # params = the forward set of the weights

    Args:
      inner: the optax transformation to wrap.
      sparsity: forward sparsity, a float (the same in every leaf, as in the paper) or a
        distribution.
      backward_sparsity: backward-set sparsity, a float (uniform) or a distribution, at most
        ``sparsity`` (each leaf's backward set holds at least its forward set). None: twice the
        forward density in every leaf, ``max(0, 2 s - 1)`` (the paper's 90%/80% setting).
      penalty: coefficient of the exploration penalty (L2 on the forward set, scaled by
        ``1 / D`` on the rest of the backward set, ``D`` the forward density); 0 disables it.
      update_every: steps between recomputations of both sets (1 = every step, as in the paper).
      seed: taken like every preset's; the sets come from magnitudes, so no random number is
        drawn.
      include, exclude, overrides: see :func:`jaxsparse.core` (overrides apply to the
        forward sparsity).
      structure, dense_if_untileable: see :func:`jaxsparse.sparsifier`: both sets are chosen in
        whole groups of the structure (tiles by the L2 norm of ``theta``; N:M: the forward set
        ``n`` of every ``m``, the backward set the same number per group as its sparsity gives).
      gradient_annealing: None (default: no gradient outside the backward set), or a float or
        ``step -> alpha`` function: weights outside the backward set are trained too, their
        gradients scaled by ``alpha(t)`` (the "Top-KAST + GA" of Kundu et al., 2023, arXiv
        2304.06941). Top-KAST keeps its own shadow weights, so this is its own hook rather than
        the core's (:func:`jaxsparse.sparsifier`).
    """
    if sparsity is None and isinstance(structure, Structure) and structure.implied_sparsity is not None:
        sparsity = structure.implied_sparsity
    forward = as_distribution(sparsity)
    if backward_sparsity is None:
        backward_sparsity = _DoubledDensity(forward)
    if not isinstance(backward_sparsity, Distribution):
        backward_sparsity = check_sparsity(backward_sparsity, "backward_sparsity")
    backward = as_distribution(backward_sparsity)
    if not isinstance(sparsity, Distribution) and not isinstance(backward_sparsity, Distribution):
        if backward_sparsity > check_sparsity(sparsity):
            raise ValueError(
                f"backward_sparsity ({backward_sparsity}) must not exceed sparsity ({sparsity}): "
                "the backward set is a superset of the forward set"
            )
    if float(penalty) < 0:
        raise ValueError(f"penalty must be >= 0; got {penalty!r}")
    topology = _topkast_topology(backward, float(penalty), update_every, as_annealing(gradient_annealing))
    return sparsifier(
        inner, sparsity=forward, topology=topology, include=include, exclude=exclude, overrides=overrides, seed=seed,
        structure=structure, dense_if_untileable=dense_if_untileable,
    )

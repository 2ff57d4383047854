"""SET and RigL: dynamic sparse training by drop and grow, and the same rule with any pair of scores.

Every ``update_every`` steps (from step ``update_every`` until ``end_step``), each sparsified leaf
with ``n`` active weights

1. drops the ``d = floor(f(t) * n)`` active weights with the lowest drop score (``|w|``), and
2. grows ``d`` positions with the highest grow score (random for SET, Mocanu et al. 2018; the
   dense gradient's magnitude ``|g|`` on the current batch for RigL, Evci et al. 2020: this is
   RigL's grow rule, :func:`jaxsparse.scores.gradient_magnitude`).

So every leaf keeps exactly its budget ``N - floor(s N)`` of nonzeros (DESIGN.md invariant 5).
As in RigL's Algorithm 1 and its reference code, growth chooses among all positions not kept,
so a weight dropped in an update may be regrown in the same update, and then keeps its value
and its optimizer moments (the default, ``regrow_dropped=True``). With ``regrow_dropped=False``
growth chooses only among positions inactive before the update, so an update changes exactly
``2 d`` positions (``d`` is then at most the number of inactive positions). A grown weight that
was inactive is exactly 0, with every params-shaped leaf of the inner optimizer state 0 at its
position, after the update step; it trains from the next step on (see :func:`jaxsparse.core`),
like RigL's zero-initialised connections.

The drop fraction ``f(t)`` is SET's constant zeta (``drop_fraction_anneal="constant"``), RigL's
cosine decay (``"cosine"``, the formula of :func:`~jaxsparse.schedules.cosine_drop_fraction`),
or any ``step -> fraction`` schedule, tabulated on the host in float64 at every update step so
counts are exact; 0 from ``end_step`` on. Selections are exact static-shape top-k
(:mod:`jaxsparse.selection`), ties to the lowest flat index, so a run is reproducible bit for
bit from its seed.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxsparse import scores as score_fns
from jaxsparse.core import Topology, TopologyInputs, function_name, sparsifier
from jaxsparse.distributions import as_distribution, er, erk
from jaxsparse.dst import at_update, drop_and_grow, dst_update_steps, paper_distribution, update_fractions
from jaxsparse.masks import random_masks

__all__ = ["dynamic_sparse", "set_sparse", "rigl"]


def _drop_grow_topology(drop_score, grow_score, drop_fraction, anneal, update_every, end_step, regrow_dropped) -> Topology:
    is_update_step = dst_update_steps(update_every, end_step)
    fractions = update_fractions(drop_fraction, update_every, end_step, anneal)

    def update(inputs: TopologyInputs):
        drop_key, grow_key = jax.random.split(inputs.key)
        plan = inputs.plan
        # Counts are in units: whole tiles or channels under a structure, entries otherwise.
        changing = [i for i, leaf in enumerate(plan) if leaf.keep_units < leaf.units]  # ERK may make leaves dense
        n_drop = []
        for i in changing:
            # Counts are constant, so each leaf's drop counts are exact integers from the host.
            counts = np.floor(fractions * plan[i].keep_units)
            if not regrow_dropped:  # growth needs as many positions inactive before the update
                counts = np.minimum(counts, plan[i].units - plan[i].keep_units)
            n_drop.append(at_update(counts.astype(np.int32), inputs.step, update_every))
        pick = lambda xs: [xs[i] for i in changing]
        new, _, _ = drop_and_grow(
            pick(inputs.masks),
            pick(score_fns.per_leaf(drop_score, inputs.params, inputs.grads, drop_key)),
            pick(score_fns.per_leaf(grow_score, inputs.params, inputs.grads, grow_key)),
            n_drop,
            n_drop,
            regrow_dropped=regrow_dropped,
            structures=pick([leaf.structure for leaf in plan]),
        )
        masks = list(inputs.masks)
        for i, m in zip(changing, new):
            masks[i] = m
        return masks, inputs.aux

    return Topology(
        init=lambda inputs: (random_masks(inputs.plan, inputs.key), ()), update=update, is_update_step=is_update_step,
        name=f"drop_and_grow(drop={function_name(drop_score)}, grow={function_name(grow_score)})",
    )


def dynamic_sparse(
    inner: optax.GradientTransformation,
    *,
    sparsity=None,
    grow_score,
    drop_score=score_fns.magnitude,
    update_every: int = 100,
    end_step: int | None = None,
    drop_fraction=0.3,
    drop_fraction_anneal: str = "constant",
    regrow_dropped: bool = True,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
    structure=None,
    dense_if_untileable: bool = False,
    gradient_annealing=None,
) -> optax.GradientTransformationExtraArgs:
    """Drop-and-grow dynamic sparse training with any scores (the family of SET and RigL).

    Starts from a random mask with exactly ``N - floor(s N)`` nonzeros per leaf and, every
    ``update_every`` steps, drops the active weights with the lowest ``drop_score`` and grows as
    many positions with the highest ``grow_score`` (see the module docstring).

    Example::

        tx = js.dynamic_sparse(optax.adam(1e-3), sparsity=js.erk(0.9), grow_score=js.scores.saliency,
                               end_step=30_000, drop_fraction_anneal="cosine")
        params, opt_state = js.init(tx, params)   # params masked: step 0 trains the sparse model

    Args:
      inner: the optax transformation to wrap.
      sparsity: a float (uniform over the leaves) or a distribution (``jaxsparse.erk(0.9)``).
      grow_score, drop_score: ``score(param, grad, key) -> array`` of non-negative scores
        (:mod:`jaxsparse.scores`: magnitude, random, gradient_magnitude, saliency); higher is
        grown / kept, NaN and negative values count as 0. ``grad`` is the step's dense gradient.
      update_every: steps between topology updates (the first at step ``update_every``).
      end_step: last step (exclusive) of topology updates; None: they never stop.
      drop_fraction: fraction of each leaf's active weights dropped at an update: a float, or any
        ``step -> fraction`` schedule (e.g. an optax schedule; needs ``end_step``), evaluated on
        the host at every update step.
      drop_fraction_anneal: for a float ``drop_fraction``, ``"constant"`` or ``"cosine"`` (RigL's
        decay from ``drop_fraction`` at step 0 to 0 at ``end_step``).
      regrow_dropped: whether a weight dropped in an update may be regrown in the same update
        (True, as in RigL's Algorithm 1 and reference code) or growth uses only positions
        inactive before the update (False).
      seed, include, exclude, overrides: see :func:`jaxsparse.core`.
      gradient_annealing: None (default), or a float or ``step -> alpha`` function: dropped
        weights keep training as dense shadow weights with gradients scaled by ``alpha(t)``, and
        drop scores read the dense weights (see :func:`jaxsparse.core`).
      structure, dense_if_untileable: see :func:`jaxsparse.sparsifier`: drop and grow whole
        groups (``js.blocks(128, 128)``: tiles by the L2 norm of their scores; ``js.n_of_m(2, 4)``:
        each group of 4 regrows what it lost, and ``sparsity`` may be omitted). Budgets and drop
        counts are in whole groups, constant across updates.
    """
    topology = _drop_grow_topology(
        drop_score, grow_score, drop_fraction, drop_fraction_anneal, update_every, end_step, bool(regrow_dropped)
    )
    return sparsifier(
        inner, sparsity=None if sparsity is None else as_distribution(sparsity), topology=topology,
        include=include, exclude=exclude, overrides=overrides, seed=seed, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def set_sparse(
    inner: optax.GradientTransformation,
    *,
    sparsity=None,
    update_every: int = 100,
    end_step: int | None = None,
    drop_fraction=0.3,
    drop_fraction_anneal: str = "constant",
    regrow_dropped: bool = True,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
    structure=None,
    dense_if_untileable: bool = False,
    gradient_annealing=None,
) -> optax.GradientTransformationExtraArgs:
    """SET, Sparse Evolutionary Training (Mocanu et al., 2018, "Scalable training of artificial
    neural networks with adaptive sparse connectivity inspired by network science", Nature
    Communications).

    Every ``update_every`` steps, each leaf drops the fraction ``drop_fraction`` (SET's zeta) of
    its active weights with the smallest magnitude and regrows as many at uniformly random
    positions. A float ``sparsity`` is spread with the Erdős–Rényi distribution
    (:func:`jaxsparse.er`) as in the paper; pass ``jaxsparse.uniform(s)`` or ``jaxsparse.erk(s)``
    otherwise. The drop fraction stays constant (the paper's zeta) until ``end_step`` (None:
    forever); ``drop_fraction_anneal="cosine"`` gives the SET baseline of Evci et al. (2020),
    whose fraction decays as RigL's. See :func:`dynamic_sparse` for the arguments.

    On a device mesh (:mod:`jaxsparse.sharding`): as RigL: per-leaf radix selects through partitioned
    histograms; the random growth scores are an elementwise position hash, sharded like the leaf.

    Example::

        tx = js.set_sparse(optax.sgd(0.05, momentum=0.9), sparsity=0.9, update_every=500)
        params, opt_state = js.init(tx, params)   # params masked: step 0 trains the sparse model
    """
    return dynamic_sparse(
        inner, sparsity=paper_distribution(sparsity, er, structure), grow_score=score_fns.random,
        update_every=update_every, end_step=end_step, drop_fraction=drop_fraction,
        drop_fraction_anneal=drop_fraction_anneal, regrow_dropped=regrow_dropped,
        seed=seed, include=include, exclude=exclude, overrides=overrides, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def rigl(
    inner: optax.GradientTransformation,
    *,
    sparsity=None,
    update_every: int = 100,
    end_step: int,
    drop_fraction=0.3,
    drop_fraction_anneal: str = "cosine",
    regrow_dropped: bool = True,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
    structure=None,
    dense_if_untileable: bool = False,
    gradient_annealing=None,
) -> optax.GradientTransformationExtraArgs:
    """RigL, Rigged Lottery (Evci et al., 2020, "Rigging the Lottery: Making All Tickets
    Winners", ICML).

    Every ``update_every`` steps until ``end_step``, each leaf drops ``floor(f(t) * nnz)`` of its
    active weights by magnitude, with ``f(t) = drop_fraction / 2 * (1 + cos(pi t / end_step))``,
    and grows as many positions with the largest magnitude of the dense gradient on the current
    batch, among all positions not kept (a just-dropped weight may come back, keeping its value,
    as in the paper's Algorithm 1). Newly grown weights are exactly 0 and their moments in the
    inner optimizer state are 0 (every params-shaped leaf of any optax state is reset); there is
    no topology change after ``end_step``.

    A float ``sparsity`` is spread with ERK (:func:`jaxsparse.erk`), the distribution of the
    paper's main results; pass ``jaxsparse.uniform(s)`` for the same sparsity in every leaf.
    See :func:`dynamic_sparse` for the arguments.

    On a device mesh (:mod:`jaxsparse.sharding`): the state shards like params; each leaf's drop and grow
    selections are radix selects whose histograms are scatter-adds XLA partitions into per-device
    partial histograms and an all-reduce, and the masks come from elementwise compares, so no
    param, gradient or score leaves its devices. With ``structure=js.blocks(r, c)`` the tile
    scores are L2 norms (partial sums and an all-reduce where a tile spans devices) selected the
    same way; tiles that divide the shards keep even that local.

    Example::

        tx = js.rigl(optax.adam(1e-3), sparsity=0.9, update_every=100, end_step=30_000)
        params, opt_state = js.init(tx, params)   # params masked: step 0 trains the sparse model
    """
    if end_step is None:
        raise ValueError("rigl needs end_step, the step at which its cosine drop fraction reaches 0")
    return dynamic_sparse(
        inner, sparsity=paper_distribution(sparsity, erk, structure), grow_score=score_fns.gradient_magnitude,
        update_every=update_every, end_step=end_step, drop_fraction=drop_fraction,
        drop_fraction_anneal=drop_fraction_anneal, regrow_dropped=regrow_dropped,
        seed=seed, include=include, exclude=exclude, overrides=overrides, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )

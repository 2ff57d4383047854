"""Pruning: masks that only lose entries, on a schedule, by a score; and static random sparsity.

Every preset is :func:`jaxsparse.core` with a pruning topology:

- :func:`magnitude_pruning`: ``|w|`` per layer. One-shot by default; gradual with
  :func:`~jaxsparse.schedules.polynomial_schedule` (Zhu & Gupta, 2018).
- :func:`random_pruning`, :func:`saliency_pruning` (``|w * g|``): the same with other scores.
- :func:`global_magnitude_pruning`: one ``|w|`` threshold over all sparsified leaves, so layers
  end up at different sparsities (Han et al., 2015; Blalock et al., 2020).
- :func:`lamp_pruning`: global selection on LAMP scores (Lee et al., 2021).
- :func:`static_sparse`: a random mask drawn at init with the given distribution and never
  changed (the "static" baseline of SET/RigL; Mocanu et al., 2018; Evci et al., 2020).

At an update step with schedule fraction ``f``, a leaf of size ``N`` at target ``s`` keeps
``N - floor(f * s * N)`` entries (exactly ``N - floor(s * N)`` once ``f = 1``), chosen among the
entries it still has, so pruned entries never come back. The counts of every update step are
computed exactly on the host when the step is traced (one integer per leaf per update step).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import counts
from jaxsparse import scores as score_fns
from jaxsparse.distributions import as_distribution, keep_count
from jaxsparse.leaves import path_to_str
from jaxsparse.schedules import SparsitySchedule, one_shot_schedule
from jaxsparse.masks import random_masks
from jaxsparse.selection import select_top_k
from jaxsparse.core import Topology, TopologyInputs, periodic_updates, sparsifier

__all__ = [
    "pruning",
    "magnitude_pruning",
    "random_pruning",
    "saliency_pruning",
    "global_magnitude_pruning",
    "lamp_pruning",
    "static_sparse",
]


def keep_table(size: int, sparsity: float, fractions) -> list[int]:
    """Entries a leaf (or pooled group) of ``size`` entries keeps at each schedule fraction:
    ``size - floor(f * sparsity * size)``, exact Python ints computed on the host.

    Once ``f = 1`` it is exactly the final budget ``size - floor(sparsity * size)``; before, at
    most that many entries are pruned, so float rounding never overshoots the target.
    """
    final_pruned = size - keep_count(size, sparsity)
    table = []
    for f in np.asarray(fractions, np.float64).tolist():
        pruned = final_pruned if f >= 1.0 else min(math.floor(f * sparsity * size), final_pruned)
        table.append(size - pruned)
    return table


def _pruning_topology(score, schedule: SparsitySchedule, update_every: int, global_sparsity):
    """Topology that prunes active entries by ``score`` to the scheduled budget.

    ``global_sparsity`` None: each leaf to its own target. A float: leaves not fixed by an
    override share one budget at that sparsity (global selection). The budgets of every update
    step are tabulated on the host (:func:`keep_table`); the step looks its row up.
    """
    is_update_step = periodic_updates(update_every, schedule.begin_step, schedule.end_step)  # checks update_every
    steps = schedule.update_steps(update_every)
    fractions = schedule.fractions(steps)

    def update(inputs: TopologyInputs):
        row = jnp.searchsorted(jnp.asarray(steps, jnp.int32), inputs.step)  # steps are update steps
        active = [jnp.sum(m, dtype=jnp.int32) for m in inputs.masks]
        # Group leaves: each leaf its own budget, except that global scope pools every leaf not
        # fixed by an override into one group sharing one budget (exact counts: a pool may hold
        # more than 2**31 weights). One search serves all groups.
        group_of, budgets = [], []
        pooled = [i for i, leaf in enumerate(inputs.plan) if global_sparsity is not None and not leaf.overridden]
        if pooled:
            table = counts.count(keep_table(sum(inputs.plan[i].size for i in pooled), global_sparsity, fractions))
            pooled_active = counts.sum(jnp.stack([active[i] for i in pooled]))
            budgets.append(counts.minimum(jax.tree.map(lambda words: jnp.asarray(words)[row], table), pooled_active))
        for i, leaf in enumerate(inputs.plan):
            if i in pooled:
                group_of.append(0)
            else:
                group_of.append(len(budgets))
                table = jnp.asarray(keep_table(leaf.size, leaf.sparsity, fractions), jnp.int32)  # a leaf < 2**31
                budgets.append(jnp.minimum(table[row], active[i]))
        # Only active entries are eligible, so a pruned entry never comes back.
        scores = score_fns.per_leaf(score, inputs.params, inputs.grads, inputs.key)
        new = select_top_k(scores, counts.stack(budgets), group_of, where=inputs.masks)
        return new, inputs.aux

    return Topology(
        init=lambda inputs: (inputs.masks, ()),
        update=update,
        is_update_step=is_update_step,
    )


def pruning(
    inner: optax.GradientTransformation,
    *,
    score,
    sparsity,
    schedule: SparsitySchedule | None = None,
    update_every: int = 100,
    scope: str = "layer",
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
) -> optax.GradientTransformationExtraArgs:
    """Prune by any score (see :mod:`jaxsparse.scores`) on a schedule.

    Example (pruning by any score, here the gradient-weighted magnitude)::

        tx = js.pruning(optax.adam(1e-3), score=js.scores.saliency, sparsity=0.8,
                        schedule=js.polynomial_schedule(0, 5_000), update_every=500)
        params, opt_state = js.init(tx, params)

    Args:
      inner: the optax transformation to wrap.
      score: ``score(param, grad, key) -> array``; higher is kept.
      sparsity: final sparsity, a float or a distribution (``erk(0.9)``); with
        ``scope="global"`` a float (the sparsity of all non-overridden leaves together).
      schedule: a :class:`~jaxsparse.schedules.SparsitySchedule`: the fraction of the final
        sparsity reached per step, with its update window (default: one-shot at step 0). Any
        optax schedule works wrapped with its window,
        ``js.SparsitySchedule(optax.linear_schedule(0.0, 1.0, 4_000), begin_step=0, end_step=4_000)``;
        it is evaluated on the host at every update step, where the budgets are computed exactly.
      update_every: steps between topology updates inside the schedule's window.
      scope: ``"layer"`` (each leaf to its own target) or ``"global"`` (one threshold).
      include, exclude, overrides, seed: see :func:`jaxsparse.core`.
    """
    schedule = one_shot_schedule(0) if schedule is None else schedule
    if not isinstance(schedule, SparsitySchedule):
        hint = (
            "; for a plain step -> fraction function such as an optax schedule, give its window: "
            "js.SparsitySchedule(fn, begin_step=..., end_step=...)" if callable(schedule) else ""
        )
        raise ValueError(
            f"schedule must be a jaxsparse SparsitySchedule (polynomial_schedule, one_shot_schedule, or any "
            f"function with its window){hint}; got {schedule!r}"
        )
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global'; got {scope!r}")
    distribution = as_distribution(sparsity)
    global_sparsity = None
    if scope == "global":
        if distribution.name != "uniform":
            raise ValueError(f"global pruning takes a float sparsity, not the distribution {distribution!r}")
        global_sparsity = distribution.sparsity
    topology = _pruning_topology(score, schedule, update_every, global_sparsity)
    return sparsifier(
        inner, sparsity=distribution, topology=topology, include=include, exclude=exclude, overrides=overrides, seed=seed
    )


def magnitude_pruning(inner, *, sparsity, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None):
    """Magnitude pruning, per layer (Han et al., 2015; gradual: Zhu & Gupta, 2018).

    One-shot at step 0 by default; pass ``schedule=polynomial_schedule(begin, end)`` for gradual
    pruning every ``update_every`` steps. See :func:`pruning` for the arguments.

    Example (gradual magnitude pruning to 90%, Zhu & Gupta's cubic schedule)::

        tx = js.magnitude_pruning(optax.adam(1e-3), sparsity=0.9, update_every=100,
                                  schedule=js.polynomial_schedule(begin_step=1_000, end_step=20_000))
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.magnitude, sparsity=sparsity, schedule=schedule, update_every=update_every,
        include=include, exclude=exclude, overrides=overrides, seed=seed,
    )


def random_pruning(inner, *, sparsity, schedule=None, update_every=100, include=None, exclude=None, overrides=None, seed=0):
    """Random pruning, per layer: the baseline of Liu et al. (2022), "The unreasonable
    effectiveness of random pruning", ICLR. See :func:`pruning`.

    Example::

        tx = js.random_pruning(optax.adam(1e-3), sparsity=js.erk(0.9), seed=0)
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.random, sparsity=sparsity, schedule=schedule, update_every=update_every,
        include=include, exclude=exclude, overrides=overrides, seed=seed,
    )


def saliency_pruning(inner, *, sparsity, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None):
    """Pruning by first-order saliency ``|w * g|`` on the step's gradient (Molchanov et al.,
    2017; SNIP, Lee et al., 2019), per layer. See :func:`pruning`.

    Example (one-shot at the first step, which sees the first batch's gradient)::

        tx = js.saliency_pruning(optax.adam(1e-3), sparsity=0.9)
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.saliency, sparsity=sparsity, schedule=schedule, update_every=update_every,
        include=include, exclude=exclude, overrides=overrides, seed=seed,
    )


def global_magnitude_pruning(inner, *, sparsity: float, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None):
    """Magnitude pruning with one threshold over all sparsified leaves (Han et al., 2015;
    compared in Blalock et al., 2020). See :func:`pruning`.

    Example::

        tx = js.global_magnitude_pruning(optax.adam(1e-3), sparsity=0.9,
                                         schedule=js.polynomial_schedule(1_000, 20_000))
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.magnitude, sparsity=sparsity, schedule=schedule, update_every=update_every,
        scope="global", include=include, exclude=exclude, overrides=overrides, seed=seed,
    )


def lamp_pruning(inner, *, sparsity: float, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None):
    """LAMP: global selection on layer-adaptive magnitude scores (Lee et al., 2021, ICLR).
    See :func:`jaxsparse.scores.lamp` and :func:`pruning`.

    Example::

        tx = js.lamp_pruning(optax.adam(1e-3), sparsity=0.95)
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.lamp, sparsity=sparsity, schedule=schedule, update_every=update_every,
        scope="global", include=include, exclude=exclude, overrides=overrides, seed=seed,
    )


def static_sparse(inner, *, sparsity=None, masks=None, seed=0, include=None, exclude=None, overrides=None):
    """Static sparse training: a random mask drawn at init (exactly ``N - floor(s N)`` entries
    per leaf, spread by the distribution: ``erk(0.9)``, ``er(0.9)`` or a float), fixed afterwards;
    or the given ``masks`` instead, fixed.

    The baseline of Mocanu et al. (2018) and Evci et al. (2020). ``tx.init`` cannot change
    params: start with ``js.init(tx, params)``, which returns them masked, so the first step
    already trains the sparse model (otherwise the first update zeroes them off the mask).

    ``masks``: a params-shaped tree of bool keep masks (``None`` for dense leaves), e.g. from
    :func:`jaxsparse.prune_oneshot` or :func:`jaxsparse.get_masks`: the sparse fine-tune of a
    pruned model. It replaces ``sparsity``, ``include``, ``exclude`` and ``overrides`` (the masks
    say which leaves are sparse and how much).

    Example::

        tx = js.static_sparse(optax.adam(1e-3), sparsity=js.erk(0.9), seed=0)
        params, opt_state = js.init(tx, params)   # params masked: step 0 trains the sparse model

        tx = js.static_sparse(optax.adam(1e-4), masks=masks)   # fine-tune a pruned model
    """
    if masks is None:
        if sparsity is None:
            raise ValueError("static_sparse needs a sparsity (a float or a Distribution) or masks")
        topology = Topology(init=lambda inputs: (random_masks(inputs.plan, inputs.key), ()), update=None, is_update_step=None)
        return sparsifier(
            inner, sparsity=sparsity, topology=topology, include=include, exclude=exclude, overrides=overrides, seed=seed
        )
    if sparsity is not None or include is not None or exclude is not None or overrides is not None:
        raise ValueError("static_sparse: masks fix the sparse leaves and their sparsity; give no sparsity, include, exclude or overrides with them")
    given = {path_to_str(p): np.asarray(m, bool) for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
    if not given:
        raise ValueError("static_sparse: masks hold no mask (every leaf is None)")
    exact = {f"^{re.escape(name)}$": _exact_sparsity(m) for name, m in given.items()}

    def init(inputs):
        for leaf in inputs.plan:
            if given[leaf.name].shape != leaf.shape:
                raise ValueError(f"static_sparse: mask of leaf {leaf.name!r} has shape {given[leaf.name].shape}, the leaf {leaf.shape}")
        return [jnp.asarray(given[leaf.name]) for leaf in inputs.plan], ()

    topology = Topology(init=init, update=None, is_update_step=None)
    return sparsifier(inner, sparsity=0.0, topology=topology, include=list(exact), overrides=exact, seed=seed)


def _exact_sparsity(mask: np.ndarray) -> float:
    """A sparsity ``s`` whose exact budget ``N - floor(s N)`` is the mask's count of True."""
    size, pruned = mask.size, mask.size - int(mask.sum())
    s = pruned / size if size else 0.0
    while math.floor(s * size) < pruned:  # float rounding just below the integer
        s = float(np.nextafter(s, 1.0))
    return s

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

On a device mesh (:mod:`jaxsparse.sharding`) every preset's masks, moments and scores shard like
the params. Magnitude, random and saliency pruning select per leaf, global magnitude pruning over
all pooled leaves at once; both are radix selects whose histograms are scatter-adds XLA
partitions into per-device partial histograms and an all-reduce (a global selection sums the
leaves' histograms into one small histogram), so no param leaves its devices. LAMP finds each
layer's count from two histograms of ``w**2`` (counts and sums, :func:`lamp_budgets`) instead of
sorting each layer (a sort would gather a sharded leaf), then selects per layer by magnitude.
With a structure, tile and channel scores are norms that reduce across devices and N:M ranks
within each group (:mod:`jaxsparse.structures`); with gradient annealing the dense shadow
weights shard like the params.

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
from jax import lax

from jaxsparse import counts
from jaxsparse import scores as score_fns
from jaxsparse.distributions import as_distribution, keep_count
from jaxsparse.leaves import path_to_str
from jaxsparse.schedules import SparsitySchedule, one_shot_schedule
from jaxsparse.masks import random_masks
from jaxsparse.structures import select_top_k
from jaxsparse.core import Topology, TopologyInputs, function_name, periodic_updates, sparsifier

__all__ = [
    "pruning",
    "magnitude_pruning",
    "random_pruning",
    "saliency_pruning",
    "global_magnitude_pruning",
    "lamp_pruning",
    "lamp_budgets",
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


def leaf_keep_table(leaf, fractions) -> list[int]:
    """Units a planned leaf keeps at each schedule fraction: :func:`keep_table` per cell of its
    structure, times the number of cells (one cell unless N:M or constant fan-in), so it ends at
    exactly the leaf's budget in whole units. N:M goes from ``m`` to ``n`` per group (``m -
    floor(f (m - n))``)."""
    layout = leaf.layout
    cells, quota = layout.cells(leaf.shape), layout.cell_quota(leaf.shape, leaf.sparsity, leaf.name)
    table = keep_table(layout.cell_units(leaf.shape), leaf.sparsity, fractions)
    fractions = np.asarray(fractions, np.float64).tolist()
    return [cells * (quota if f >= 1.0 else max(k, quota)) for k, f in zip(table, fractions)]


_BIN_BITS = 16  # LAMP's value histograms: the top 16 bits of w**2, then the low 16 bits of one bin


def _value_bins(b):
    """The smallest non-negative float32 of each top-16-bit key bin ``b`` (int32 array)."""
    return lax.bitcast_convert_type((b.astype(jnp.uint32) << _BIN_BITS), jnp.float32)


def lamp_budgets(params, masks, k) -> jax.Array:
    """Per leaf, how many active weights global LAMP selection keeps (Lee et al., 2021), without
    sorting: ``int32[len(params)]`` summing to ``min(k, active)``.

    With ``x = w**2``, a weight's LAMP score is ``x / S(x)``, ``S(x)`` the sum of the layer's
    ``x`` that are at least as large (equal weights share the score of their group, the lowest the
    paper's stable sort gives them); it increases with ``x`` within a layer, so each layer keeps its
    largest weights, and only the per-layer counts are to be found: the layers' counts at the k-th
    largest score ``s``. Two histograms of ``x``'s float bits, both scatter-adds XLA partitions
    into per-device partial histograms and an all-reduce (no leaf is gathered, unlike a sort):

    1. counts and sums per top-16-bit bin, once. A weight of bin ``b`` scores in
       ``[lo_b / S_b, lo_{b+1} / S_{b+1})`` (``lo`` the bin's smallest value, ``S_b`` the sum of
       the bins from ``b`` up): bins above the one holding ``tau`` are kept, bins below are not;
    2. counts and sums per exact value (low 16 bits) of that one bin per layer, for a ``tau``:
       exact scores there, so the exact number of weights scoring at least ``tau``.

    ``s`` is found by bisection on ``tau``'s float bits (30 steps on ``[0, 1]``); a step costs a
    pass (2.) only while bins (1.) cannot decide it. Weights tied at ``s`` (equal scores in
    several layers) are kept in leaf order. Counts are int32: the pooled leaves hold fewer than
    2**31 weights.
    """
    n, bins = len(params), 1 << _BIN_BITS
    xs = [jnp.where(jnp.isnan(w), 0.0, jnp.square(w.astype(jnp.float32))) for w in params]  # NaN lowest
    keys = [lax.bitcast_convert_type(x, jnp.uint32) for x in xs]
    spare = n * bins  # inactive entries are counted in a spare bin and dropped

    def histograms(digits, include):
        count = jnp.zeros(spare + 1, jnp.int32)
        total = jnp.zeros(spare + 1, jnp.float32)
        for i, (d, x, ok) in enumerate(zip(digits, xs, include)):
            index = jnp.where(ok, d.astype(jnp.int32) + i * bins, spare)  # no reshape: that would gather
            count = count.at[index].add(1)
            total = total.at[index].add(x)
        return count[:spare].reshape(n, bins), total[:spare].reshape(n, bins)

    def suffix(x):  # sums over this bin and every one above, with a zero column past the top
        return jnp.concatenate([jnp.cumsum(x[:, ::-1], axis=1)[:, ::-1], jnp.zeros((n, 1), x.dtype)], axis=1)

    count1, sum1 = histograms([u >> _BIN_BITS for u in keys], masks)
    at_least, sum_at_least = suffix(count1), suffix(sum1)  # (n, bins + 1)
    lo = _value_bins(jnp.arange(bins, dtype=jnp.int32))
    lo = jnp.where(jnp.isfinite(lo), lo, jnp.inf)
    floor = jnp.where(sum_at_least[:, :bins] > 0, lo / jnp.where(sum_at_least[:, :bins] > 0, sum_at_least[:, :bins], 1.0), jnp.inf)
    k = jnp.minimum(jnp.asarray(k, jnp.int32), at_least[:, 0].sum())
    rows = jnp.arange(n)

    def open_bins(tau):
        """Per layer, the bin whose weights may score on either side of ``tau``."""
        # floor increases over the non-empty bins (lo_b grows, S_b shrinks); -1: every bin scores above
        # tau. Empty bins are skipped: with denormals flushed to zero, bins 1..127 share floor 0.
        candidates = jnp.where((count1 > 0) & (floor <= tau), jnp.arange(bins, dtype=jnp.int32), -1)
        return jnp.max(candidates, axis=1)

    def exact_scores(b):
        """Counts and exact scores of the distinct values of bin ``b[l]`` of each layer."""
        count2, sum2 = histograms([u & jnp.uint32(bins - 1) for u in keys],
                                  [m & ((u >> _BIN_BITS).astype(jnp.int32) == b[i]) for i, (u, m) in enumerate(zip(keys, masks))])
        value = lax.bitcast_convert_type((b[:, None].astype(jnp.uint32) << _BIN_BITS) | jnp.arange(bins, dtype=jnp.uint32), jnp.float32)
        tail = sum_at_least[rows, b + 1][:, None] + suffix(sum2)[:, :bins]
        return count2, jnp.where(tail > 0, value / jnp.where(tail > 0, tail, 1.0), 0.0)

    def kept(tau):  # exact number of weights scoring >= tau, per layer
        b = open_bins(tau)
        count2, score = exact_scores(b)
        return at_least[rows, b + 1] + jnp.sum(jnp.where(score >= tau, count2, 0), axis=1)

    def enough(tau):  # whether at least k weights score >= tau; a pass only if the bins cannot tell
        b = open_bins(tau)
        sure, maybe = at_least[rows, b + 1].sum(), at_least[rows, jnp.maximum(b, 0)].sum()
        return lax.cond((sure >= k) | (maybe < k), lambda: sure >= k, lambda: kept(tau).sum() >= k)

    def bisect(i, lo_hi):  # the largest float tau in [0, 1] with enough(tau): the k-th largest score
        lo_bits, hi_bits = lo_hi
        mid = lo_bits + (hi_bits - lo_bits + 1) // 2
        ok = enough(lax.bitcast_convert_type(mid, jnp.float32))
        return jnp.where(ok, mid, lo_bits), jnp.where(ok, hi_bits, mid - 1)

    one = lax.bitcast_convert_type(jnp.float32(1.0), jnp.uint32)
    s_bits, _ = lax.fori_loop(0, 31, bisect, (jnp.uint32(0), one))
    s = lax.bitcast_convert_type(s_bits, jnp.float32)
    b = open_bins(s)
    count2, score = exact_scores(b)
    above = at_least[rows, b + 1] + jnp.sum(jnp.where(score > s, count2, 0), axis=1)
    tied = jnp.sum(jnp.where(score == s, count2, 0), axis=1)
    before = jnp.cumsum(tied) - tied  # ties at s go to the earlier leaves first
    return above + jnp.clip(k - above.sum() - before, 0, tied)


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
        layouts = [leaf.layout for leaf in inputs.plan]
        # Counts are in units: whole tiles or channels under a structure, entries otherwise.
        active = [jnp.sum(s.unit_mask(m), dtype=jnp.int32) for s, m in zip(layouts, inputs.masks)]
        # Group leaves: each leaf its own budget, except that global scope pools every leaf not
        # fixed by an override (nor selecting per cell, as N:M does) into one group sharing one
        # budget (exact counts: a pool may hold more than 2**31 weights). One search serves all.
        group_of, budgets = [], []
        pooled = [
            i for i, leaf in enumerate(inputs.plan)
            if global_sparsity is not None and not leaf.overridden and leaf.layout.cells(leaf.shape) == 1
        ]
        if pooled:
            table = counts.count(keep_table(sum(inputs.plan[i].units for i in pooled), global_sparsity, fractions))
            pooled_active = counts.sum(jnp.stack([active[i] for i in pooled]))
            budgets.append(counts.minimum(jax.tree.map(lambda words: jnp.asarray(words)[row], table), pooled_active))
        for i, leaf in enumerate(inputs.plan):
            if i in pooled:
                group_of.append(0)
            else:
                group_of.append(len(budgets))
                budgets.append(jnp.minimum(jnp.asarray(leaf_keep_table(leaf, fractions), jnp.int32)[row], active[i]))
        # Only active entries are eligible, so a pruned entry never comes back; with gradient
        # annealing at alpha > 0 every entry is (params are then the dense shadow weights).
        eligible = inputs.masks if inputs.alpha is None else [m | (inputs.alpha > 0) for m in inputs.masks]
        unstructured = all(inputs.plan[i].layout.is_unstructured for i in pooled)
        if score is score_fns.lamp and pooled and unstructured and sum(inputs.plan[i].size for i in pooled) < 2**31:
            # LAMP keeps each layer's largest weights: find the layers' counts (partitioned
            # histograms, no sort), then select per layer by magnitude
            pooled_ks = lamp_budgets([inputs.params[i] for i in pooled], [eligible[i] for i in pooled],
                                     counts.to_int32(budgets[0]))
            ks = [None] * len(inputs.plan)
            for j, i in enumerate(pooled):
                ks[i] = pooled_ks[j]
            for i in range(len(inputs.plan)):
                if i not in pooled:
                    ks[i] = budgets[group_of[i]]
            magnitudes = score_fns.per_leaf(score_fns.magnitude, inputs.params, None, inputs.key)
            return select_top_k(layouts, magnitudes, jnp.stack([jnp.reshape(k, ()) for k in ks]),
                                list(range(len(ks))), where=eligible), inputs.aux
        scores = score_fns.per_leaf(score, inputs.params, inputs.grads, inputs.key)
        new = select_top_k(layouts, scores, counts.stack(budgets), group_of, where=eligible)
        return new, inputs.aux

    return Topology(
        init=lambda inputs: (inputs.masks, ()),
        update=update,
        is_update_step=is_update_step,
        name=f"pruning(score={function_name(score)}, scope={'layer' if global_sparsity is None else 'global'})",
    )


def pruning(
    inner: optax.GradientTransformation,
    *,
    score,
    sparsity=None,
    schedule: SparsitySchedule | None = None,
    update_every: int = 100,
    scope: str = "layer",
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
    structure=None,
    dense_if_untileable: bool = False,
    gradient_annealing=None,
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
      structure, dense_if_untileable: see :func:`jaxsparse.sparsifier`: prune whole groups by
        their aggregated scores (``js.blocks(r, c)``: tiles; ``js.channels()``: output units,
        which ``scope="global"`` pools across leaves) or to N:M (``js.n_of_m(2, 4)``, with
        ``sparsity`` omitted; a gradual schedule lowers the count per group from ``m`` to ``n``).
      gradient_annealing: None (default), or a float or ``step -> alpha`` function: pruned
        weights keep training as dense shadow weights with their gradients scaled by ``alpha(t)``,
        and every update step chooses among all of them by their dense score, so a pruned weight
        can come back while ``alpha > 0`` (Kundu et al., 2023; see :func:`jaxsparse.core`). Give
        a schedule with several update steps for that to happen.
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
    distribution = None if sparsity is None else as_distribution(sparsity)
    global_sparsity = None
    if scope == "global" and distribution is not None:
        if distribution.name != "uniform":
            raise ValueError(f"global pruning takes a float sparsity, not the distribution {distribution!r}")
        global_sparsity = distribution.sparsity
    topology = _pruning_topology(score, schedule, update_every, global_sparsity)
    return sparsifier(
        inner, sparsity=distribution, topology=topology, include=include, exclude=exclude, overrides=overrides, seed=seed,
        structure=structure, dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def magnitude_pruning(
    inner, *, sparsity=None, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None,
    structure=None, dense_if_untileable=False, gradient_annealing=None
):
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
        include=include, exclude=exclude, overrides=overrides, seed=seed, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def random_pruning(
    inner, *, sparsity=None, schedule=None, update_every=100, include=None, exclude=None, overrides=None, seed=0,
    structure=None, dense_if_untileable=False, gradient_annealing=None
):
    """Random pruning, per layer: the baseline of Liu et al. (2022), "The unreasonable
    effectiveness of random pruning", ICLR. See :func:`pruning`.

    Example::

        tx = js.random_pruning(optax.adam(1e-3), sparsity=js.erk(0.9), seed=0)
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.random, sparsity=sparsity, schedule=schedule, update_every=update_every,
        include=include, exclude=exclude, overrides=overrides, seed=seed, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def saliency_pruning(
    inner, *, sparsity=None, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None,
    structure=None, dense_if_untileable=False, gradient_annealing=None
):
    """Pruning by first-order saliency ``|w * g|`` on the step's gradient (Molchanov et al.,
    2017; SNIP, Lee et al., 2019), per layer. See :func:`pruning`.

    Example (one-shot at the first step, which sees the first batch's gradient)::

        tx = js.saliency_pruning(optax.adam(1e-3), sparsity=0.9)
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.saliency, sparsity=sparsity, schedule=schedule, update_every=update_every,
        include=include, exclude=exclude, overrides=overrides, seed=seed, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def global_magnitude_pruning(
    inner, *, sparsity: float | None = None, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None,
    structure=None, dense_if_untileable=False, gradient_annealing=None
):
    """Magnitude pruning with one threshold over all sparsified leaves (Han et al., 2015;
    compared in Blalock et al., 2020). See :func:`pruning`.

    Example::

        tx = js.global_magnitude_pruning(optax.adam(1e-3), sparsity=0.9,
                                         schedule=js.polynomial_schedule(1_000, 20_000))
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.magnitude, sparsity=sparsity, schedule=schedule, update_every=update_every,
        scope="global", include=include, exclude=exclude, overrides=overrides, seed=seed, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def lamp_pruning(
    inner, *, sparsity: float | None = None, schedule=None, update_every=100, seed=0, include=None, exclude=None, overrides=None,
    structure=None, dense_if_untileable=False, gradient_annealing=None
):
    """LAMP: global selection on layer-adaptive magnitude scores (Lee et al., 2021, ICLR).
    See :func:`jaxsparse.scores.lamp` and :func:`pruning`.

    The selection does not compute every score: LAMP's score grows with ``|w|`` within a layer,
    so :func:`lamp_budgets` finds how many weights each layer keeps at the global threshold from
    partitioned histograms (no sort, nothing gathered on a mesh; about one histogram pass per
    bisection step that the coarse histogram cannot decide), then each layer keeps its largest
    weights. Equal weights of a layer share one score (the lowest the paper's stable sort gives
    them); leaves of more than 2**31 weights in all are scored by :func:`jaxsparse.scores.lamp`.

    Example::

        tx = js.lamp_pruning(optax.adam(1e-3), sparsity=0.95)
        params, opt_state = js.init(tx, params)
    """
    return pruning(
        inner, score=score_fns.lamp, sparsity=sparsity, schedule=schedule, update_every=update_every,
        scope="global", include=include, exclude=exclude, overrides=overrides, seed=seed, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )


def static_sparse(inner, *, sparsity=None, masks=None, seed=0, include=None, exclude=None, overrides=None,
                  structure=None, dense_if_untileable=False, gradient_annealing=None):
    """Static sparse training: a random mask drawn at init (exactly ``N - floor(s N)`` entries
    per leaf, spread by the distribution: ``erk(0.9)``, ``er(0.9)`` or a float), fixed afterwards;
    or the given ``masks`` instead, fixed. With ``structure`` (see :func:`jaxsparse.sparsifier`)
    the random mask is of whole groups (random tiles, a random ``n`` of every ``m``).

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
        topology = Topology(init=lambda inputs: (random_masks(inputs.plan, inputs.key), ()), update=None, is_update_step=None)
        return sparsifier(
            inner, sparsity=sparsity, topology=topology, include=include, exclude=exclude, overrides=overrides,
            seed=seed, structure=structure, dense_if_untileable=dense_if_untileable,
            gradient_annealing=gradient_annealing,
        )
    if any(x is not None for x in (sparsity, include, exclude, overrides, structure)):
        raise ValueError(
            "static_sparse: masks fix the sparse leaves and their sparsity; give no sparsity, include, exclude, "
            "overrides or structure with them"
        )
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
    return sparsifier(inner, sparsity=0.0, topology=topology, include=list(exact), overrides=exact, seed=seed,
                      gradient_annealing=gradient_annealing)


def _exact_sparsity(mask: np.ndarray) -> float:
    """A sparsity ``s`` whose exact budget ``N - floor(s N)`` is the mask's count of True."""
    size, pruned = mask.size, mask.size - int(mask.sum())
    s = pruned / size if size else 0.0
    while math.floor(s * size) < pruned:  # float rounding just below the integer
        s = float(np.nextafter(s, 1.0))
    return s

"""Dynamic sparse training by drop and grow: SET, RigL, and any pair of scores.

Every ``update_every`` steps (from step ``update_every`` until ``end_step``), each sparsified leaf
with ``n`` active weights

1. drops the ``d = floor(f(t) * n)`` active weights with the lowest drop score (``|w|``), and
2. grows ``d`` positions with the highest grow score (random for SET, the dense gradient's
   magnitude ``|g|`` for RigL), chosen among the positions that were inactive *before* this
   update.

So every leaf keeps exactly its budget ``N - floor(s N)`` of nonzeros (DESIGN.md invariant 5), and
an update changes exactly ``2 d`` positions of a leaf: ``d`` dropped, ``d`` grown. Because growth
never picks a weight dropped in the same update, every weight that stays active keeps its value
and its optimizer moments. (RigL's reference code lets a just-dropped position be regrown, which
then keeps its value; that only makes fewer than ``d`` positions change.) A grown weight is
exactly 0, with every params-shaped leaf of the inner optimizer state 0 at its position, after
the update step; it trains from the next step on (see :func:`jaxsparse.core`).

The drop fraction ``f(t)`` is constant (SET) or RigL's cosine decay (the formula of
:func:`~jaxsparse.schedules.cosine_drop_fraction`, evaluated in float64 on the host so counts
are exact), 0 from ``end_step`` on. Selections are exact
static-shape top-k (:mod:`jaxsparse.selection`), ties to the lowest flat index, so a run is
reproducible bit for bit from its seed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsparse import scores as score_fns
from jaxsparse.distributions import Distribution, as_distribution, check_sparsity, er, erk
from jaxsparse.pruning import random_masks
from jaxsparse.selection import top_k_masks_nested
from jaxsparse.core import Topology, TopologyInputs, check_positive_int, sparsifier

__all__ = [
    "drop_count",
    "drop_and_grow",
    "dst_update_steps",
    "update_fractions",
    "at_update",
    "paper_distribution",
    "dynamic_sparse",
    "set_sparse",
    "rigl",
]


def paper_distribution(sparsity, default: Callable[[float], Distribution]) -> Distribution:
    """``sparsity`` as a distribution: a :class:`Distribution` as given, a number spread by the
    method's published ``default`` (``erk`` for RigL, ``er`` for SET, ...)."""
    if isinstance(sparsity, Distribution):
        return sparsity
    return default(check_sparsity(sparsity))


def _check_steps(update_every, end_step):
    check_positive_int(update_every, "update_every")
    check_positive_int(end_step, "end_step", none_ok=True)


def update_fractions(drop_fraction: float, update_every: int, end_step: int | None) -> np.ndarray:
    """The drop fraction ``f(t)`` at steps ``0, update_every, 2 update_every, ...`` (float64).

    With ``end_step`` None, one entry: the constant ``drop_fraction`` (SET). Otherwise RigL's
    cosine decay ``f(t) = drop_fraction / 2 * (1 + cos(pi t / end_step))`` up to the last update
    step before ``end_step``, and 0 after it. Evaluated on the host in float64, so a count
    ``floor(f(t) * n)`` is exact when ``f(t) * n`` is an integer (float32 would miss some).
    """
    _check_steps(update_every, end_step)
    if not 0.0 <= float(drop_fraction) <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1]; got {drop_fraction!r}")
    d = float(drop_fraction)
    if end_step is None:
        return np.array([d])
    steps = np.arange(0, end_step + update_every, update_every, dtype=np.float64)
    return np.where(steps < end_step, d / 2.0 * (1.0 + np.cos(np.pi * steps / end_step)), 0.0)


def at_update(table, step, update_every: int):
    """``table[step // update_every]`` (the last entry beyond the table), traced."""
    table = jnp.asarray(table)
    return table[jnp.minimum(step // update_every, table.shape[0] - 1)]


def dst_update_steps(update_every: int, end_step: int | None):
    """``step -> bool``: True at ``update_every, 2 update_every, ...`` strictly before ``end_step``.

    Step 0 is skipped: the initial random mask has seen no gradient yet.
    """
    _check_steps(update_every, end_step)

    def is_update_step(step):
        on = (step > 0) & (step % update_every == 0)
        return on if end_step is None else on & (step < end_step)

    return is_update_step


def drop_count(active, size: int, fraction):
    """Weights to drop from a leaf of ``size`` entries with ``active`` nonzeros at drop fraction
    ``fraction``: ``floor(fraction * active)`` (float32), at most the ``size - active`` inactive
    positions so the same number can be grown."""
    active = jnp.asarray(active, jnp.int32)
    d = jnp.floor(jnp.asarray(fraction, jnp.float32) * active.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(d, 0, jnp.minimum(active, size - active))


def _finite(scores):
    """Scores with NaN and infinities mapped to finite extremes, so -inf can mark excluded entries."""
    big = jnp.finfo(jnp.float32).max
    return jnp.nan_to_num(scores.astype(jnp.float32), nan=-big, posinf=big, neginf=-big)


def _banded(mask, drop_scores, grow_scores):
    """One float32 score array ordering a leaf's entries for drop and grow at once: active
    entries first (positive), by increasing drop score; then inactive ones (negative), by
    decreasing grow score. Built from the float bit patterns, so the order (and every tie) of
    the non-negative scores is kept exactly; NaN counts as 0."""
    top = jnp.int32(0x7F7FFFFF)  # bit pattern of the largest finite float32

    def reversed_bits(x):  # non-negative finite float -> non-negative float, order reversed
        x = jnp.clip(jnp.nan_to_num(x.astype(jnp.float32), nan=0.0), 0.0, jnp.finfo(jnp.float32).max)
        return lax.bitcast_convert_type(top - lax.bitcast_convert_type(x, jnp.int32), jnp.float32)

    return jnp.where(mask, reversed_bits(drop_scores), -reversed_bits(grow_scores))


def drop_and_grow(masks, drop_scores, grow_scores, n_drop, n_grow):
    """The drop-and-grow selection of all leaves: per leaf, drop the ``n_drop[i]`` active entries
    of ``masks[i]`` with the lowest ``drop_scores`` and grow the ``n_grow[i]`` inactive entries
    with the highest ``grow_scores``. Returns ``(new_masks, kept, grown)`` lists.

    Scores are magnitudes (non-negative; negative values count as 0). Growth is chosen among
    positions inactive before the update only, so no weight is dropped and regrown. Both sets
    are exact top-k selections of one score array per leaf (:func:`_banded`): the dropped set
    is its top ``n_drop`` and the active set plus the grown one its top ``active + n_grow``,
    found together by :func:`jaxsparse.selection.top_k_masks_nested` (the passes over the
    array are shared), ties to the lowest flat index (dropped first, grown first).
    """
    new, kept, grown = [], [], []
    for m, ds, gs, d, g in zip(masks, drop_scores, grow_scores, n_drop, n_grow):
        dropped, top = top_k_masks_nested(_banded(m, ds, gs), [d, jnp.sum(m, dtype=jnp.int32) + g])
        new.append(top & ~dropped)
        kept.append(m & ~dropped)
        grown.append(top & ~m)
    return new, kept, grown


def _leaf_scores(score, inputs: TopologyInputs, key):
    keys = jax.random.split(key, max(len(inputs.plan), 1))
    return [score(p, g, k) for p, g, k in zip(inputs.params, inputs.grads, keys)]


def _drop_grow_topology(drop_score, grow_score, drop_fraction, update_every, end_step) -> Topology:
    is_update_step = dst_update_steps(update_every, end_step)
    fractions = update_fractions(drop_fraction, update_every, end_step)

    def update(inputs: TopologyInputs):
        drop_key, grow_key = jax.random.split(inputs.key)
        plan = inputs.plan
        changing = [i for i, leaf in enumerate(plan) if leaf.keep < leaf.size]  # ERK may make leaves dense
        n_drop = []
        for i in changing:
            # Counts are constant, so each leaf's drop counts are exact integers from the host.
            counts = np.minimum(np.floor(fractions * plan[i].keep), plan[i].size - plan[i].keep).astype(np.int32)
            n_drop.append(at_update(counts, inputs.step, update_every))
        pick = lambda xs: [xs[i] for i in changing]
        new, _, _ = drop_and_grow(
            pick(inputs.masks),
            pick(_leaf_scores(drop_score, inputs, drop_key)),
            pick(_leaf_scores(grow_score, inputs, grow_key)),
            n_drop,
            n_drop,
        )
        masks = list(inputs.masks)
        for i, m in zip(changing, new):
            masks[i] = m
        return masks, inputs.aux

    return Topology(init=lambda inputs: (random_masks(inputs), ()), update=update, is_update_step=is_update_step)


def dynamic_sparse(
    inner: optax.GradientTransformation,
    *,
    sparsity,
    grow_score,
    drop_score=score_fns.magnitude,
    update_every: int = 100,
    end_step: int | None = None,
    drop_fraction: float = 0.3,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
) -> optax.GradientTransformationExtraArgs:
    """Drop-and-grow dynamic sparse training with any scores (the family of SET and RigL).

    Starts from a random mask with exactly ``N - floor(s N)`` nonzeros per leaf and, every
    ``update_every`` steps, drops the active weights with the lowest ``drop_score`` and grows as
    many inactive positions with the highest ``grow_score`` (see the module docstring).

    Args:
      inner: the optax transformation to wrap.
      sparsity: a float (uniform over the leaves) or a distribution (``jaxsparse.erk(0.9)``).
      grow_score, drop_score: ``score(param, grad, key) -> array`` of non-negative scores
        (:mod:`jaxsparse.scores`: magnitude, random, gradient_magnitude, saliency); higher is
        grown / kept, negative values count as 0. ``grad`` is the step's dense gradient.
      update_every: steps between topology updates (the first at step ``update_every``).
      end_step: last step (exclusive) of topology updates; with it the drop fraction decays as
        RigL's cosine, without it (None) it stays ``drop_fraction`` forever.
      drop_fraction: fraction of each leaf's active weights replaced at an update (at step 0 of
        the cosine schedule).
      seed, include, exclude, overrides: see :func:`jaxsparse.core`.
    """
    topology = _drop_grow_topology(drop_score, grow_score, drop_fraction, update_every, end_step)
    return sparsifier(
        inner, sparsity=as_distribution(sparsity), topology=topology,
        include=include, exclude=exclude, overrides=overrides, seed=seed,
    )


def set_sparse(
    inner: optax.GradientTransformation,
    *,
    sparsity,
    update_every: int = 100,
    end_step: int | None = None,
    drop_fraction: float = 0.3,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
) -> optax.GradientTransformationExtraArgs:
    """SET, Sparse Evolutionary Training (Mocanu et al., 2018, "Scalable training of artificial
    neural networks with adaptive sparse connectivity inspired by network science", Nature
    Communications).

    Every ``update_every`` steps, each leaf drops the fraction ``drop_fraction`` (SET's zeta) of
    its active weights with the smallest magnitude and regrows as many at uniformly random
    inactive positions. A float ``sparsity`` is spread with the Erdős–Rényi distribution
    (:func:`jaxsparse.er`) as in the paper; pass ``jaxsparse.uniform(s)`` or ``jaxsparse.erk(s)``
    otherwise. With ``end_step`` the drop fraction decays as RigL's cosine and updates stop there
    (the SET baseline of Evci et al., 2020); without it SET runs forever at constant zeta. See
    :func:`dynamic_sparse` for the arguments.
    """
    return dynamic_sparse(
        inner, sparsity=paper_distribution(sparsity, er), grow_score=score_fns.random,
        update_every=update_every, end_step=end_step, drop_fraction=drop_fraction,
        seed=seed, include=include, exclude=exclude, overrides=overrides,
    )


def rigl(
    inner: optax.GradientTransformation,
    *,
    sparsity,
    update_every: int = 100,
    end_step: int,
    drop_fraction: float = 0.3,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
) -> optax.GradientTransformationExtraArgs:
    """RigL, Rigged Lottery (Evci et al., 2020, "Rigging the Lottery: Making All Tickets
    Winners", ICML).

    Every ``update_every`` steps until ``end_step``, each leaf drops ``floor(f(t) * nnz)`` of its
    active weights by magnitude, with ``f(t) = drop_fraction / 2 * (1 + cos(pi t / end_step))``,
    and grows as many inactive positions with the largest magnitude of the dense gradient on the
    current batch. Grown weights are exactly 0 and their moments in the inner optimizer state
    are 0 (every params-shaped leaf of any optax state is reset); there is no topology change
    after ``end_step``.

    A float ``sparsity`` is spread with ERK (:func:`jaxsparse.erk`), the distribution of the
    paper's main results; pass ``jaxsparse.uniform(s)`` for the same sparsity in every leaf.
    See :func:`dynamic_sparse` for the arguments.
    """
    if end_step is None:
        raise ValueError("rigl needs end_step, the step at which its cosine drop fraction reaches 0")
    return dynamic_sparse(
        inner, sparsity=paper_distribution(sparsity, erk), grow_score=score_fns.gradient_magnitude,
        update_every=update_every, end_step=end_step, drop_fraction=drop_fraction,
        seed=seed, include=include, exclude=exclude, overrides=overrides,
    )

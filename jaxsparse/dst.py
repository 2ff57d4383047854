"""Shared machinery of dynamic sparse training: update steps, drop fractions, drop and grow.

The methods live in their own modules and use these pieces: SET and RigL in
:mod:`jaxsparse.rigl`, SNFS in :mod:`jaxsparse.snfs`, SRigL in :mod:`jaxsparse.srigl`, Top-KAST
in :mod:`jaxsparse.topkast`.

- :func:`dst_update_steps`: topology updates every ``update_every`` steps before ``end_step``.
- :func:`update_fractions` and :func:`at_update`: the drop fraction ``f(t)`` of every update step,
  tabulated on the host in float64 so drop counts ``floor(f(t) * n)`` are exact integers.
- :func:`drop_count`: the same count in-graph, for methods whose per-leaf counts move (SNFS).
- :func:`drop_and_grow`: per leaf, drop the active weights with the lowest drop score and grow
  positions with the highest grow score (a just-dropped weight may be regrown, as in the papers,
  or not), as exact static-shape top-k selections
  (:mod:`jaxsparse.selection`), ties to the lowest flat index, so a run is reproducible bit for
  bit from its seed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse.distributions import Distribution, check_sparsity, uniform
from jaxsparse.structures import Structure, as_structure
from jaxsparse.selection import top_k_masks_nested, top_k_masks_per_leaf
from jaxsparse.core import check_positive_int
from jaxsparse.schedules import host_fractions

__all__ = [
    "drop_count",
    "drop_and_grow",
    "dst_update_steps",
    "update_fractions",
    "at_update",
    "paper_distribution",
]


def __getattr__(name):
    # Old import path: the SET / RigL presets moved to jaxsparse.rigl (which imports this module).
    if name in ("dynamic_sparse", "set_sparse", "rigl"):
        import importlib  # not ``from jaxsparse import rigl``: the package's ``rigl`` is the function

        return getattr(importlib.import_module("jaxsparse.rigl"), name)
    raise AttributeError(f"module 'jaxsparse.dst' has no attribute {name!r}")


def paper_distribution(sparsity, default: Callable[[float], Distribution], structure=None) -> Distribution | None:
    """``sparsity`` as a distribution: a :class:`Distribution` as given, a number spread by the
    method's published ``default`` (``erk`` for RigL, ``er`` for SET, ...).

    Under a structure that implies its sparsity (N:M: ``1 - n/m`` in every leaf) a number is the
    same in every leaf (uniform; checked against the structure per leaf), and None stays None.
    """
    if isinstance(sparsity, Distribution) or sparsity is None:
        return sparsity
    if isinstance(structure, Structure) and structure.implied_sparsity is not None:
        return uniform(check_sparsity(sparsity))
    return default(check_sparsity(sparsity))


def _check_steps(update_every, end_step):
    check_positive_int(update_every, "update_every")
    check_positive_int(end_step, "end_step", none_ok=True)


ANNEALS = ("constant", "cosine")


def update_fractions(drop_fraction, update_every: int, end_step: int | None, anneal: str | None = None) -> np.ndarray:
    """The drop fraction ``f(t)`` at steps ``0, update_every, 2 update_every, ...`` (float64).

    Args:
      drop_fraction: a float in [0, 1], or any ``step -> fraction`` function (an optax schedule),
        evaluated here on the host at every update step (it then needs ``end_step``).
      update_every, end_step: the update period and the step (exclusive) where updates stop.
      anneal: for a float ``drop_fraction``: ``"constant"`` (SET's zeta) or ``"cosine"`` (RigL's
        ``f(t) = drop_fraction / 2 * (1 + cos(pi t / end_step))``, Evci et al. 2020, which needs
        ``end_step``). ``None`` keeps the old rule of this helper: cosine when ``end_step`` is
        given, else constant. The presets always pass it explicitly.

    Returns one entry per update step up to ``end_step`` and a last entry 0 (no change from
    ``end_step`` on); with ``end_step`` None and a constant fraction, the single entry
    ``drop_fraction``. In float64, so a count ``floor(f(t) * n)`` is exact when ``f(t) * n`` is an
    integer (float32 would miss some).
    """
    _check_steps(update_every, end_step)
    if anneal is None:
        anneal = "constant" if end_step is None else "cosine"
    if anneal not in ANNEALS:
        raise ValueError(f"drop_fraction_anneal must be one of {ANNEALS}; got {anneal!r}")
    if callable(drop_fraction):
        if end_step is None:
            raise ValueError("a drop_fraction schedule needs end_step, the step where topology updates stop")
        fractions = host_fractions(drop_fraction, range(0, end_step, update_every), "the drop_fraction schedule")
        return np.append(fractions, 0.0)
    if not 0.0 <= float(drop_fraction) <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1]; got {drop_fraction!r}")
    d = float(drop_fraction)
    if end_step is None:
        if anneal == "cosine":
            raise ValueError("drop_fraction_anneal='cosine' needs end_step, the step where the fraction reaches 0")
        return np.array([d])
    steps = np.arange(0, end_step + update_every, update_every, dtype=np.float64)
    decayed = d / 2.0 * (1.0 + np.cos(np.pi * steps / end_step)) if anneal == "cosine" else np.full(steps.shape, d)
    return np.where(steps < end_step, decayed, 0.0)


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


def drop_count(active, size: int, fraction, *, regrow_dropped: bool = True):
    """Weights to drop from a leaf of ``size`` entries with ``active`` nonzeros at drop fraction
    ``fraction``: ``floor(fraction * active)`` (float32). With ``regrow_dropped=False`` growth
    may only use positions inactive before the update, so the count is at most their number
    ``size - active``, so that as many can be grown."""
    active = jnp.asarray(active, jnp.int32)
    d = jnp.floor(jnp.asarray(fraction, jnp.float32) * active.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(d, 0, active if regrow_dropped else jnp.minimum(active, size - active))


def _magnitudes(x):
    """Scores as non-negative finite float32: NaN and negative values count as 0."""
    return jnp.clip(jnp.nan_to_num(x.astype(jnp.float32), nan=0.0), 0.0, jnp.finfo(jnp.float32).max)


def _banded(mask, drop_scores, grow_scores):
    """One float32 score array ordering a leaf's entries for drop and grow at once: active
    entries first (positive), by increasing drop score; then inactive ones (negative), by
    decreasing grow score. Built from the float bit patterns, so the order (and every tie) of
    the non-negative scores is kept exactly."""
    top = jnp.int32(0x7F7FFFFF)  # bit pattern of the largest finite float32

    def reversed_bits(x):  # non-negative finite float -> non-negative float, order reversed
        return lax.bitcast_convert_type(top - lax.bitcast_convert_type(_magnitudes(x), jnp.int32), jnp.float32)

    return jnp.where(mask, reversed_bits(drop_scores), -reversed_bits(grow_scores))


def drop_and_grow(masks, drop_scores, grow_scores, n_drop, n_grow, *, regrow_dropped: bool = True, structures=None):
    """The drop-and-grow selection of all leaves: per leaf, drop the ``n_drop[i]`` active entries
    of ``masks[i]`` with the lowest ``drop_scores`` and grow ``n_grow[i]`` entries with the
    highest ``grow_scores``. Returns ``(new_masks, kept, grown)`` lists: the new masks, the active
    entries that survived the drop, and the grown entries (``new = kept | grown``).

    Scores are magnitudes (non-negative; NaN and negative values count as 0).

    - ``regrow_dropped=True`` (RigL's Algorithm 1 and reference code, Evci et al. 2020; the sparse
      momentum reference code, Dettmers & Zettlemoyer 2019): growth chooses among every position
      not kept, so a weight dropped in this update can be regrown at once; it then keeps its value
      and optimizer moments, as in the reference code (only positions inactive before the update
      start from 0). Two exact top-k selections, each over all leaves in the same passes: the kept
      sets (top ``active - n_drop`` by drop score among active entries, ties kept lowest flat
      index first), then the grown sets (top ``n_grow`` by grow score among the rest, ties to the
      lowest flat index). The second depends on the first, so this costs one histogram pass more
      than the nested selection of ``regrow_dropped=False``.
    - ``regrow_dropped=False``: growth chooses only among positions inactive before the update, so
      an update changes exactly ``n_drop + n_grow`` positions. Both sets are top-k selections of
      one banded score array per leaf (:func:`_banded`), found together by
      :func:`jaxsparse.selection.top_k_masks_nested` (shared passes): the dropped set is its top
      ``n_drop`` (ties dropped lowest flat index first) and active plus grown its top ``active +
      n_grow``.

    ``structures`` (one per leaf, None: unstructured) make it drop and grow whole groups: counts
    are in units (tiles, channels), the scores are aggregated per unit
    (:meth:`~jaxsparse.structures.Structure.to_units`), the rule above runs on the unit arrays
    and the unit masks are expanded back. Per-cell structures (N:M, constant fan-in) drop the
    ``n_drop`` active entries of lowest drop score anywhere in the leaf, then every cell grows
    back what it lost (its deficit, by grow score), so each cell keeps its quota and the leaf
    grows exactly ``n_drop`` (``n_grow`` is not used for them). With ``regrow_dropped=False``
    the just-dropped entries of a cell are grown back only when it has too few others.
    """
    masks = list(masks)
    if not masks:
        return [], [], []
    layouts = [as_structure(s) for s in (structures or [None] * len(masks))]
    if all(s.is_unstructured for s in layouts):
        return _drop_and_grow_units(masks, drop_scores, grow_scores, n_drop, n_grow, regrow_dropped)
    shapes = [tuple(m.shape) for m in masks]
    whole = [i for i, (s, shape) in enumerate(zip(layouts, shapes)) if s.cells(shape) == 1]
    per_cell = [i for i in range(len(masks)) if i not in whole]
    out = [None] * len(masks)
    if whole:
        units = _drop_and_grow_units(
            [layouts[i].unit_mask(masks[i]) for i in whole],
            [layouts[i].to_units(_magnitudes(drop_scores[i])) for i in whole],
            [layouts[i].to_units(_magnitudes(grow_scores[i])) for i in whole],
            [n_drop[i] for i in whole], [n_grow[i] for i in whole], regrow_dropped,
        )
        for j, i in enumerate(whole):
            out[i] = tuple(layouts[i].expand(u[j], shapes[i]) for u in units)
    if per_cell:
        kept = top_k_masks_per_leaf(
            [_magnitudes(drop_scores[i]) for i in per_cell],
            [jnp.sum(masks[i], dtype=jnp.int32) - n_drop[i] for i in per_cell],
            where=[masks[i] for i in per_cell],
        )
        for k, i in zip(kept, per_cell):
            s, m = layouts[i], masks[i]
            g = _magnitudes(grow_scores[i])
            if not regrow_dropped:  # just-dropped entries rank below every other candidate
                g = jnp.where(m, -1.0, g)
            grown = s.select_units(g, s.cell_counts(m) - s.cell_counts(k), where=~k)
            out[i] = (k | grown, k, grown)
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def _drop_and_grow_units(masks, drop_scores, grow_scores, n_drop, n_grow, regrow_dropped):
    if regrow_dropped:  # the kept sets of all leaves, then growth among the rest, each in shared passes
        n_keep = [jnp.sum(m, dtype=jnp.int32) - d for m, d in zip(masks, n_drop)]
        kept = top_k_masks_per_leaf([_magnitudes(s) for s in drop_scores], n_keep, where=masks)
        grown = top_k_masks_per_leaf([_magnitudes(s) for s in grow_scores], n_grow, where=[~k for k in kept])
        return [k | g for k, g in zip(kept, grown)], kept, grown
    new, kept, grown = [], [], []
    for m, ds, gs, d, g in zip(masks, drop_scores, grow_scores, n_drop, n_grow):
        dropped, top = top_k_masks_nested(_banded(m, ds, gs), [d, jnp.sum(m, dtype=jnp.int32) + g])
        new.append(top & ~dropped)
        kept.append(m & ~dropped)
        grown.append(top & ~m)
    return new, kept, grown

"""Shared machinery of dynamic sparse training: update steps, drop fractions, drop and grow.

The methods live in their own modules and use these pieces: SET and RigL in
:mod:`jaxsparse.rigl`, SNFS in :mod:`jaxsparse.snfs`, SRigL in :mod:`jaxsparse.srigl`, Top-KAST
in :mod:`jaxsparse.topkast`.

- :func:`dst_update_steps`: topology updates every ``update_every`` steps before ``end_step``.
- :func:`update_fractions` and :func:`at_update`: the drop fraction ``f(t)`` of every update step,
  tabulated on the host in float64 so drop counts ``floor(f(t) * n)`` are exact integers.
- :func:`drop_count`: the same count in-graph, for methods whose per-leaf counts move (SNFS).
- :func:`drop_and_grow`: per leaf, drop the active weights with the lowest drop score and grow
  positions with the highest grow score, as exact static-shape top-k selections
  (:mod:`jaxsparse.selection`), ties to the lowest flat index, so a run is reproducible bit for
  bit from its seed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse.distributions import Distribution, check_sparsity
from jaxsparse.selection import top_k_masks_nested
from jaxsparse.core import check_positive_int

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



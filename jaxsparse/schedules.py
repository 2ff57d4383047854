"""Schedules: optax-style ``step -> value`` functions that drive topology updates.

A :class:`SparsitySchedule` gives the fraction of the final sparsity reached at a step, and
carries the window ``[begin_step, end_step]`` in which topology updates happen (so a sparsifier
can skip update steps outside it). Dynamic sparse training uses :func:`cosine_drop_fraction`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

__all__ = [
    "SparsitySchedule",
    "polynomial_schedule",
    "constant_schedule",
    "one_shot_schedule",
    "cosine_drop_fraction",
]


def _check_window(begin_step, end_step):
    for name, v in (("begin_step", begin_step), ("end_step", end_step)):
        if v is not None and (not isinstance(v, (int,)) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name} must be a non-negative int; got {v!r}")
    if end_step is not None and end_step < begin_step:
        raise ValueError(f"end_step ({end_step}) precedes begin_step ({begin_step})")


class SparsitySchedule:
    """``schedule(step)`` is the fraction (0..1) of the final sparsity reached at ``step``.

    Attributes:
      begin_step: first step at which the topology is updated.
      end_step: last step at which it is updated (``None``: never stops).
    """

    def __init__(self, fn, begin_step: int, end_step: int | None, name: str):
        _check_window(begin_step, end_step)
        self._fn, self.begin_step, self.end_step, self.name = fn, begin_step, end_step, name

    def __call__(self, step):
        return self._fn(jnp.asarray(step, jnp.float32))

    def __repr__(self):
        return f"{self.name}(begin_step={self.begin_step}, end_step={self.end_step})"


def polynomial_schedule(begin_step: int, end_step: int, power: float = 3.0) -> SparsitySchedule:
    """Gradual pruning schedule of Zhu & Gupta (2018), "To prune, or not to prune", ICLR-W.

    ``fraction(t) = 1 - (1 - p) ** power`` with ``p = clip((t - begin) / (end - begin), 0, 1)``:
    sparsity ``s_t = s * fraction(t)`` rises fast at first and levels off at ``s`` at ``end_step``.
    ``begin_step == end_step`` gives one-shot pruning at that step.
    """
    _check_window(begin_step, end_step)
    power = float(power)
    if not power > 0:
        raise ValueError(f"power must be > 0; got {power}")
    span = float(end_step - begin_step)

    def fn(t):
        if span == 0:
            return jnp.where(t >= begin_step, 1.0, 0.0).astype(jnp.float32)
        p = jnp.clip((t - begin_step) / span, 0.0, 1.0)
        return 1.0 - (1.0 - p) ** power

    return SparsitySchedule(fn, begin_step, end_step, f"polynomial_schedule(power={power})")


def one_shot_schedule(step: int = 0) -> SparsitySchedule:
    """Reach the full sparsity at ``step`` in a single topology update (one-shot pruning)."""
    return polynomial_schedule(step, step)


def constant_schedule(begin_step: int = 0, end_step: int | None = None) -> SparsitySchedule:
    """The full sparsity from ``begin_step`` on, updated until ``end_step`` (``None``: forever).

    Used by methods that hold the target fixed and change which entries are kept (e.g. pruning
    with a random or saliency score refreshed periodically).
    """

    def fn(t):
        return jnp.where(t >= begin_step, 1.0, 0.0).astype(jnp.float32)

    return SparsitySchedule(fn, begin_step, end_step, "constant_schedule")


def cosine_drop_fraction(drop_fraction: float, end_step: int):
    """RigL's drop-fraction annealing (Evci et al., 2020): ``f(t) = d/2 * (1 + cos(pi * t / end_step))``.

    Returns a ``step -> fraction`` function, 0 from ``end_step`` on (no topology change after it).
    """
    if not 0.0 <= float(drop_fraction) <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1]; got {drop_fraction!r}")
    _check_window(0, end_step)
    if end_step == 0:
        raise ValueError("end_step must be > 0 for the cosine drop-fraction schedule")
    d = float(drop_fraction)

    def fn(step):
        t = jnp.asarray(step, jnp.float32)
        value = d / 2.0 * (1.0 + jnp.cos(math.pi * t / end_step))
        return jnp.where(t < end_step, value, 0.0)

    return fn

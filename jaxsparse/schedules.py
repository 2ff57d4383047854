"""Schedules: ``step -> value`` functions that drive topology updates.

A :class:`SparsitySchedule` is any ``step -> fraction`` function (an optax schedule, or one of the
builders here) together with its *window* ``[begin_step, end_step]``: the fraction of the final
sparsity reached at a step, and the steps in which pruning updates the topology. Pruning
evaluates the fraction on the host at every update step of the window and turns it into exact
integer budgets there (:meth:`SparsitySchedule.fractions`), so the jit-compiled step only looks
its budget up; float32 rounding never changes a count.

- :func:`polynomial_schedule`: Zhu & Gupta's gradual pruning (cubic by default).
- :func:`one_shot_schedule`: all at once at one step.
- ``SparsitySchedule(optax.linear_schedule(0.0, 1.0, 5_000, 1_000), begin_step=1_000, end_step=6_000)``:
  any optax schedule with its window.

Gradient annealing takes a ``step -> alpha`` factor for the gradients of pruned weights:
:func:`sigmoid_cosine_decay` (AutoSparse, Kundu et al. 2023) and :func:`mask_decay` (MDGF,
Bambhaniya et al. 2024), or any function of the step.

Dynamic sparse training takes a drop fraction instead: a float with
``drop_fraction_anneal="constant"`` or ``"cosine"`` (:func:`cosine_drop_fraction` is RigL's
decay), or any ``step -> fraction`` function.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

__all__ = [
    "host_fractions",
    "SparsitySchedule",
    "polynomial_schedule",
    "one_shot_schedule",
    "cosine_drop_fraction",
    "sigmoid_cosine_decay",
    "mask_decay",
]


def _check_window(begin_step, end_step):
    for name, v in (("begin_step", begin_step), ("end_step", end_step)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int; got {v!r}")
    if end_step < begin_step:
        raise ValueError(f"end_step ({end_step}) precedes begin_step ({begin_step})")


def host_fractions(fn: Callable, steps, what) -> np.ndarray:
    """``fn`` (any ``step -> fraction`` function) at each of ``steps``, evaluated on the host, as
    float64; a ValueError names ``what`` and a step whose fraction is outside [0, 1]. Sparsity
    schedules and drop-fraction schedules are both tabulated this way."""
    values = []
    for t in np.asarray(steps).tolist():
        f = float(fn(t))
        if not 0.0 <= f <= 1.0:  # also refuses NaN
            raise ValueError(f"{what} gives the fraction {f!r} at step {t}; fractions must be in [0, 1]")
        values.append(f)
    return np.asarray(values, np.float64)


class SparsitySchedule:
    """A ``step -> fraction`` function (fraction of the final sparsity, in [0, 1]) with its window.

    Args:
      fn: any function of the step returning the fraction: an optax schedule, a lambda, or the
        builders of this module. It is evaluated on the host, once per update step.
      begin_step: first step at which the topology is updated.
      end_step: last step at which it is updated; it is always an update step, so the final
        fraction (``fn(end_step)``, normally 1) is reached there.
      name: for ``repr``.

    ``schedule(step)`` evaluates ``fn`` (also traced); :meth:`fractions` is what the sparsifiers
    use.
    """

    def __init__(self, fn: Callable, begin_step: int, end_step: int, name: str | None = None, *, host_fn=None):
        if not callable(fn):
            raise ValueError(f"a SparsitySchedule needs a step -> fraction function; got {fn!r}")
        _check_window(begin_step, end_step)
        self._fn, self._host_fn = fn, host_fn
        self.begin_step, self.end_step = int(begin_step), int(end_step)
        self.name = name or getattr(fn, "__name__", "schedule")

    def __call__(self, step):
        return self._fn(jnp.asarray(step, jnp.float32))

    def __repr__(self):
        return f"{self.name}(begin_step={self.begin_step}, end_step={self.end_step})"

    def update_steps(self, update_every: int) -> np.ndarray:
        """The steps where pruning updates the topology: ``begin_step + j * update_every`` up to
        ``end_step``, and ``end_step`` itself."""
        steps = list(range(self.begin_step, self.end_step + 1, update_every))
        if steps[-1] != self.end_step:
            steps.append(self.end_step)
        return np.asarray(steps, np.int64)

    def fractions(self, steps) -> np.ndarray:
        """``fn`` at each of ``steps``, on the host, as float64; a ValueError names a step whose
        fraction is outside [0, 1]."""
        fn = self._fn if self._host_fn is None else (lambda t: self._host_fn(float(t)))
        return host_fractions(fn, steps, repr(self))


def polynomial_schedule(begin_step: int, end_step: int, power: float = 3.0) -> SparsitySchedule:
    """Gradual pruning schedule of Zhu & Gupta (2018), "To prune, or not to prune", ICLR-W.

    ``fraction(t) = 1 - (1 - p) ** power`` with ``p = clip((t - begin) / (end - begin), 0, 1)``:
    sparsity ``s_t = s * fraction(t)`` rises fast at first and levels off at ``s`` at ``end_step``.
    ``begin_step == end_step`` gives one-shot pruning at that step. On the host (where the
    sparsifiers evaluate it) the formula runs in float64.
    """
    _check_window(begin_step, end_step)
    power = float(power)
    if not power > 0:
        raise ValueError(f"power must be > 0; got {power}")
    span = float(end_step - begin_step)

    def formula(xp):
        def fn(t):
            if span == 0:
                return xp.where(t >= begin_step, 1.0, 0.0)
            p = xp.clip((t - begin_step) / span, 0.0, 1.0)
            return 1.0 - (1.0 - p) ** power

        return fn

    return SparsitySchedule(
        formula(jnp), begin_step, end_step, f"polynomial_schedule(power={power})", host_fn=formula(np)
    )


def one_shot_schedule(step: int = 0) -> SparsitySchedule:
    """Reach the full sparsity at ``step`` in a single topology update (one-shot pruning)."""
    return polynomial_schedule(step, step)


def cosine_drop_fraction(drop_fraction: float, end_step: int):
    """RigL's drop-fraction annealing (Evci et al., 2020): ``f(t) = d/2 * (1 + cos(pi * t / end_step))``.

    Returns a ``step -> fraction`` function, 0 from ``end_step`` on (no topology change after it);
    it can be given as the ``drop_fraction`` of the dynamic sparse training presets.
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


def sigmoid_cosine_decay(alpha: float, end_step: int, low: float = -6.0, high: float = 6.0):
    """AutoSparse's gradient-annealing factor (Kundu et al., 2023, "AutoSparse: Towards Automated
    Sparse Training of Deep Neural Networks", arXiv 2304.06941): a non-linear decay from
    ``alpha`` at step 0, the larger of a cosine and a sigmoid decay over ``[0, end_step]``::

        alpha(t) = alpha * max( (1 + cos(pi p)) / 2,  1 - sigmoid(low + (high - low) p) ),  p = t / end_step

    and ``alpha(t) = 0`` from ``end_step`` on (pruned weights then get no gradient, and nothing
    pruned returns). The sigmoid term is the larger over the first part of the window (alpha stays
    near its start), the cosine term over the last; ``low = -6``, ``high = 6`` make the sigmoid
    span the window. See :mod:`jaxsparse.autosparse`
    for how this form was checked. Returns a ``step -> alpha`` function (traced or host).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
    _check_window(0, end_step)
    if end_step == 0:
        raise ValueError("end_step must be > 0 for the sigmoid-cosine decay")
    low, high = float(low), float(high)

    def fn(step):
        t = jnp.asarray(step, jnp.float32)
        p = jnp.clip(t / end_step, 0.0, 1.0)
        cosine = (1.0 + jnp.cos(math.pi * p)) / 2.0
        sigmoid = 1.0 - 1.0 / (1.0 + jnp.exp(-(low + (high - low) * p)))
        return jnp.where(t < end_step, alpha * jnp.maximum(cosine, sigmoid), 0.0)

    return fn


def mask_decay(kind: str = "exponential", coef: float = 2e-4, begin_step: int = 0):
    """MDGF's decay of the pruned positions' factor (Bambhaniya et al., 2024, "Progressive Gradient
    Flow for Robust N:M Sparsity Training in Transformers", arXiv 2402.04744), as in their code:

    - ``"linear"``: ``beta(t) = max(0, 1 - coef * (t - begin_step))``
    - ``"exponential"``: ``beta(t) = exp(-coef * (t - begin_step))``

    and 1 before ``begin_step``; ``coef`` defaults to ``2e-4``, the reference code's
    ``--decay-coef``. Returns a ``step -> beta`` function (see :func:`jaxsparse.mdgf` for how it
    is used).
    """
    if kind not in ("linear", "exponential"):
        raise ValueError(f"kind must be 'linear' or 'exponential'; got {kind!r}")
    coef = float(coef)
    if not coef > 0:
        raise ValueError(f"coef must be > 0; got {coef!r}")
    _check_window(begin_step, begin_step)

    def fn(step):
        elapsed = jnp.maximum(jnp.asarray(step, jnp.float32) - begin_step, 0.0)
        if kind == "linear":
            return jnp.maximum(0.0, 1.0 - coef * elapsed)
        return jnp.exp(-coef * elapsed)

    return fn

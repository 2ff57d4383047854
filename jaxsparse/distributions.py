"""Sparsity distributions: how a model-wide sparsity target is spread over the leaves.

A distribution is a callable ``params -> tree of per-leaf target sparsity`` (``None`` for leaves
that stay dense). Calling it on a params tree uses the default leaf rule
(:func:`jaxsparse.leaves.is_sparsifiable`: kernels and token embeddings, not biases, norm
parameters or positional tables); the sparsifiers call :meth:`Distribution.solve` on the leaves
they chose.

- :func:`uniform`: every leaf at the same sparsity.
- :func:`erk`: Erdős–Rényi-Kernel (Evci et al., 2020, "Rigging the Lottery: Making All Tickets
  Winners", ICML; Appendix / ``sparse_utils.get_sparsities``): the density of a leaf of shape
  ``(d_1, ..., d_n)`` is ``eps * (sum_i d_i / prod_i d_i) ** power``, with one ``eps`` solved so
  that the total number of nonzeros equals that of uniform sparsity ``s``. Leaves whose density
  would exceed 1 are made dense and ``eps`` is solved again over the rest, until none does.
- :func:`er`: Erdős–Rényi (Mocanu et al., 2018, "Scalable training of artificial neural networks
  with adaptive sparse connectivity", Nature Communications): the same with only the two last
  dimensions (fan-in and fan-out), ``(n_in + n_out) / (n_in * n_out)``.

A zero-size leaf (a dimension of 0) gets target 0.0 under ERK and ER: it has nothing to prune,
and its density formula would divide by 0. The other leaves are solved as if it were absent.

Targets are Python floats computed in float64, so exact budgets (``N - floor(s * N)`` nonzeros)
do not suffer from float32 rounding.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np

from jaxsparse.leaves import path_to_str, select_leaves

__all__ = ["Distribution", "uniform", "erk", "er", "as_distribution", "check_sparsity", "keep_count"]


def check_sparsity(value, what: str = "sparsity") -> float:
    """Return ``value`` as a float, raising a ValueError naming ``what`` unless it is in [0, 1)."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1); got {value!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{what} must be in [0, 1); got {value!r}")
    return s


def keep_count(size: int, sparsity: float) -> int:
    """Number of entries kept in a leaf of ``size`` entries at ``sparsity``: ``size - floor(s * size)``."""
    return int(size) - math.floor(float(sparsity) * int(size))


class Distribution:
    """A per-leaf sparsity rule. ``dist(params)`` gives the tree of targets (``None`` = dense)."""

    def __init__(self, sparsity, name: str):
        self.sparsity = check_sparsity(sparsity)
        self.name = name

    def __repr__(self):
        return f"{self.name}({self.sparsity})"

    def solve(self, shapes: Mapping[str, tuple]) -> dict[str, float]:
        """Targets for the named leaves of the given shapes (all of them sparsified)."""
        raise NotImplementedError

    def __call__(self, params):
        chosen = select_leaves(params)
        shapes = {}
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = path_to_str(p)
            if chosen.get(name, False):
                shapes[name] = tuple(x.shape)
        targets = self.solve(shapes)
        return jax.tree_util.tree_map_with_path(lambda p, x: targets.get(path_to_str(p)), params)


class _Uniform(Distribution):
    def solve(self, shapes):
        return {name: self.sparsity for name in shapes}


class _ErdosRenyi(Distribution):
    def __init__(self, sparsity, name, raw_density):
        super().__init__(sparsity, name)
        self.raw_density = raw_density

    def solve(self, shapes):
        s = self.sparsity
        sizes = {n: math.prod(int(d) for d in shape) for n, shape in shapes.items()}
        # A zero-size leaf has nothing to prune: it is dense (target 0.0, the limit of ERK's
        # density, which grows without bound as a dimension shrinks to 0). It adds nothing to
        # the budget or to the divisor below, so the other leaves solve as if it were absent.
        # So is a leaf of one entry (a scalar, which has no dimensions to spread over): any
        # sparsity below 1 keeps its entry.
        out = {n: 0.0 for n in shapes if sizes[n] <= 1}
        sparse = [n for n in shapes if sizes[n] > 1]
        raw = {n: self.raw_density(shapes[n]) for n in sparse}
        dense: list[str] = []
        eps = 0.0
        while sparse:
            # Nonzeros to place in the sparse leaves: those of uniform sparsity s over all leaves,
            # minus what the dense leaves take beyond their uniform share.
            budget = sum((1.0 - s) * sizes[n] for n in sparse) - sum(s * sizes[n] for n in dense)
            divisor = sum(raw[n] * sizes[n] for n in sparse)
            if divisor <= 0.0:
                break
            eps = budget / divisor
            max_raw = max(raw[n] for n in sparse)
            if max_raw * eps <= 1.0:
                break
            dense += [n for n in sparse if raw[n] == max_raw]
            sparse = [n for n in sparse if raw[n] != max_raw]
        out.update({n: 0.0 for n in dense})
        out.update({n: min(max(1.0 - eps * raw[n], 0.0), 1.0) for n in sparse})
        return {n: out[n] for n in shapes}


def uniform(sparsity: float) -> Distribution:
    """Every sparsified leaf at the same ``sparsity`` (in [0, 1))."""
    return _Uniform(sparsity, "uniform")


def erk(sparsity: float, power: float = 1.0) -> Distribution:
    """Erdős–Rényi-Kernel distribution (Evci et al., 2020, RigL) at overall ``sparsity``.

    Density of a leaf of shape ``(d_1..d_n)`` is proportional to ``(sum d_i / prod d_i) ** power``
    (``power`` is RigL's ``erk_power_scale``; 0 gives uniform), scaled so the sparsified leaves
    together hold as many nonzeros as uniform ``sparsity``; leaves that would exceed density 1
    are made dense and the scale re-solved.
    """
    power = float(power)

    def raw(shape):
        return (float(np.sum(shape)) / float(np.prod(shape))) ** power

    return _ErdosRenyi(sparsity, f"erk(power={power})", raw)


def er(sparsity: float) -> Distribution:
    """Erdős–Rényi distribution (Mocanu et al., 2018, SET): density ∝ ``(n_in + n_out) / (n_in * n_out)``.

    Uses the last two dimensions of each leaf (input and output features; for a convolution
    kernel ``(h, w, in, out)``, the channels).
    """

    def raw(shape):
        n_in, n_out = (1, shape[0]) if len(shape) == 1 else shape[-2:]
        return float(n_in + n_out) / float(n_in * n_out)

    return _ErdosRenyi(sparsity, "er", raw)


def as_distribution(sparsity) -> Distribution:
    """A :class:`Distribution` as given, or :func:`uniform` for a plain number."""
    if isinstance(sparsity, Distribution):
        return sparsity
    return uniform(check_sparsity(sparsity))

"""Structures: how scores become a mask (unstructured, N:M, blocks, channels, constant fan-in).

A structure turns a leaf's scores into a mask with an exact budget counted in whole groups. Every
structure is the same three steps (DESIGN.md, "Structures compose with every topology"):

1. **aggregate** the entries' scores into *units* (:meth:`Structure.to_units`): a ``(r, c)`` tile
   for :func:`blocks`, an output unit for :func:`channels`, the entry itself for the others;
2. **select** units with the exact top-k of :mod:`jaxsparse.selection` (NaN lowest, ties to the
   lowest flat index), either over the whole leaf (one *cell*) or separately in each cell with
   the same quota: a group of ``m`` consecutive inputs for :func:`n_of_m`, an output neuron's
   fan-in for :func:`constant_fan_in`;
3. **expand** the unit mask back to the leaf's shape (:meth:`Structure.expand`).

=====================  ===============================  =========================  ==============
structure              unit                             cell (own quota)           quota at ``s``
=====================  ===============================  =========================  ==============
``unstructured()``     entry                            the leaf                   ``N - floor(sN)``
``blocks(r, c)``       ``(r, c)`` tile, last two axes   the leaf                   ``T - floor(sT)``
``channels(axis)``     output unit (a slice on axis)    the leaf                   ``C - floor(sC)``
``n_of_m(n, m, axis)``  entry                           ``m`` consecutive on axis  ``n`` (``s = 1 - n/m``)
``constant_fan_in()``  entry                            an output unit's inputs    ``F - floor(sF)``
=====================  ===============================  =========================  ==============

Every structure object has the contract methods ``select(scores, sparsity=None, *, where=None)``
(a bool mask of ``scores.shape`` with the exact budget) and ``check(name, shape)`` (a ValueError
naming the leaf, its shape and the structure when the structure cannot tile the leaf). The
topologies select in unit space with :func:`select_top_k` and :meth:`Structure.select_units`,
so a structure composes with every topology: ``rigl(..., structure=blocks(128, 128))`` drops and
grows whole tiles.

**On a device mesh** (:mod:`jaxsparse.sharding`) no structure gathers a sharded leaf. Aggregation
is a reduction (a tile's or a channel's L2 norm: per-device partial sums and an all-reduce when
the group spans devices, nothing when it lies in one), and the unit scores go through the same
partitioned radix select as unstructured scores. N:M ranks each group by ``m`` elementwise
compare passes: when the devices' slices of ``axis`` are multiples of ``m`` (every group on one
device, as for 2:4 on any even split) the selection adds no communication at all; a group that
spans devices gets each pass's slice by a collective-permute (2:32 on 16-row shards: 32 of them),
still never the leaf. Constant fan-in counts per column (reductions). Measured on the 2 x 4 mesh
of tests/sharded_runs.py: 2:4, ``blocks(8, 8)``, ``blocks(16, 16)``, ``blocks(32, 8)`` (tiles
spanning the data shards) and 2:32 compile with no all-gather of a whole param. Choose tiles and
``m`` that divide the shards to keep the selection local.

References: N:M sparsity, Mishra et al. (2021), "Accelerating Sparse Deep Neural Networks",
arXiv:2104.08378, and Zhou et al. (2021), "Learning N:M Fine-grained Structured Sparse Neural
Networks From Scratch", arXiv:2102.04010; block sparsity, Narang, Undersander & Diamos (2017),
"Block-Sparse Recurrent Neural Networks", arXiv:1711.02782, and Gray, Radford & Kingma (2017),
"GPU Kernels for Block-Sparse Weights"; channel pruning, Li et al. (2017), "Pruning Filters for
Efficient ConvNets", arXiv:1608.08710; constant fan-in, Lasby et al. (2024), "Dynamic Sparse
Training with Structured Sparsity", arXiv:2305.02299.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse import counts
from jaxsparse.distributions import check_sparsity, keep_count
from jaxsparse.leaves import match_overrides
from jaxsparse.selection import score_keys
from jaxsparse.selection import select_top_k as _select_unit_top_k
from jaxsparse.selection import top_k_mask, top_k_per_column

__all__ = [
    "Structure", "Unstructured", "NofM", "Blocks", "Channels", "ConstantFanIn",
    "unstructured", "n_of_m", "blocks", "channels", "constant_fan_in", "as_structure",
    "select_top_k", "select_units_top_k", "group_norm", "structures_by_leaf",
]

# N:M groups up to this size are ranked by pairwise comparisons (m compare passes, cheap for the
# 2:4 and 4:8 of hardware); larger groups use the bitwise per-column search of SRigL.
_PAIRWISE_MAX_M = 32


def group_norm(scores, axes) -> jax.Array:
    """The L2 norm of ``scores`` (float32) over ``axes``: the aggregated score of a group.

    Why L2: for magnitude scores it is the Frobenius norm of the group's weights, the quantity
    that bounds the group's contribution to the layer's output (``|W_g x| <= |W_g|_F |x|``); for
    gradient scores it is the norm of the gradient restricted to the group, the rate at which the
    loss falls when the whole group is grown along its gradient (RigL's criterion, Evci et al.
    2020, lifted from an entry to a group). The sum of squares is taken in float32; a NaN entry
    makes its group NaN, which ranks lowest.
    """
    x = scores.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=axes))


def _axis(axis: int, ndim: int) -> int | None:
    return axis % ndim if -ndim <= axis < ndim else None


class Structure:
    """Base of every structure; see the module docstring. Subclasses are frozen dataclasses, so a
    structure is hashable configuration (DESIGN.md invariant 3).

    A structure sees a leaf as ``cells`` independent cells of ``cell_units`` units each; every
    cell keeps the same quota. Units are groups of ``group_size`` entries (1 for entry units).
    """

    #: the sparsity the structure implies (N:M: ``1 - n/m``), or None when it takes any.
    implied_sparsity: float | None = None

    # -- tiling ------------------------------------------------------------------------------
    def _untileable(self, shape) -> str | None:
        """Why the structure cannot tile ``shape`` (None when it can)."""
        raise NotImplementedError

    def check(self, name, shape) -> None:
        """Raise a ValueError naming the leaf (``name``; None: "scores"), its shape and this
        structure when the structure cannot tile a leaf of ``shape``."""
        why = self._untileable(tuple(int(d) for d in shape))
        if why is not None:
            what = "scores" if name is None else f"leaf {name!r}"
            raise ValueError(
                f"{what} of shape {tuple(shape)} cannot take the structure {self!r}: {why}. Exclude the leaf "
                "(exclude=...), give it its own structure, or pass dense_if_untileable=True to keep such leaves dense"
            )

    def tileable(self, shape) -> bool:
        """Whether the structure can tile a leaf of ``shape``."""
        return self._untileable(tuple(int(d) for d in shape)) is None

    # -- units and cells ---------------------------------------------------------------------
    def unit_shape(self, shape) -> tuple:
        """Shape of the unit-score array of a leaf of ``shape``."""
        return tuple(shape)

    def cells(self, shape) -> int:
        """Number of cells (each keeps the same quota)."""
        return 1

    def units(self, shape) -> int:
        """Number of units of a leaf of ``shape`` (what budgets count)."""
        return math.prod(self.unit_shape(shape))

    def cell_units(self, shape) -> int:
        return self.units(shape) // self.cells(shape)

    def group_size(self, shape) -> int:
        """Entries per unit."""
        units = self.units(shape)
        return math.prod(shape) // units if units else 1

    def check_sparsity(self, sparsity, name=None) -> float:
        """The leaf's target sparsity, checked against the structure (None: the implied one)."""
        what = "sparsity" if name is None else f"sparsity of leaf {name!r}"
        if sparsity is None:
            if self.implied_sparsity is None:
                raise ValueError(f"{self!r} needs a sparsity; got None")
            return self.implied_sparsity
        return check_sparsity(sparsity, what)

    def cell_quota(self, shape, sparsity, name=None) -> int:
        """Units each cell keeps at ``sparsity``: ``cell_units - floor(s * cell_units)``."""
        return keep_count(self.cell_units(shape), self.check_sparsity(sparsity, name))

    def keep_units(self, shape, sparsity, name=None) -> int:
        """Units a leaf keeps at ``sparsity`` (the exact budget in whole units)."""
        return self.cells(shape) * self.cell_quota(shape, sparsity, name)

    def keep(self, shape, sparsity, name=None) -> int:
        """Entries a leaf keeps at ``sparsity``."""
        return self.keep_units(shape, sparsity, name) * self.group_size(shape)

    # -- the three steps ---------------------------------------------------------------------
    def to_units(self, scores) -> jax.Array:
        """Aggregate entry scores into unit scores (identity for entry units)."""
        return scores

    def units_where(self, where):
        """A unit is eligible when all its entries are (None stays None)."""
        return where

    def unit_mask(self, mask):
        """A mask as a unit mask: a unit is kept when all its entries are."""
        return self.units_where(mask)

    def expand(self, unit_mask, shape) -> jax.Array:
        """A unit mask as a mask of ``shape``."""
        return unit_mask

    def cell_counts(self, unit_mask) -> jax.Array:
        """True units per cell, shaped to broadcast as a quota for :meth:`select_units`."""
        return jnp.sum(unit_mask, dtype=jnp.int32)

    def select_units(self, unit_scores, quota, where=None) -> jax.Array:
        """Per cell, the ``quota`` units with the largest scores among the eligible ones
        (``where``); ``quota`` an int or an int array shaped like :meth:`cell_counts`."""
        return top_k_mask(unit_scores, quota, where)

    def select(self, scores, sparsity=None, *, where=None) -> jax.Array:
        """A bool mask of ``scores.shape`` keeping, in every cell, the exact quota of units with
        the largest aggregated scores (NaN lowest, ties to the lowest flat index) among those
        whose entries are all eligible (``where``, a bool array like ``scores``; None: all).

        ``sparsity``: the target in [0, 1); N:M takes None or exactly ``1 - n/m``.
        """
        shape = tuple(scores.shape)
        self.check(None, shape)
        quota = self.cell_quota(shape, sparsity)
        if where is not None:
            where = jnp.broadcast_to(jnp.asarray(where, bool), shape)
        chosen = self.select_units(self.to_units(scores), quota, self.units_where(where))
        return self.expand(chosen, shape)

    def complies(self, mask, keep_units=None) -> jax.Array:
        """Whether the nonzeros ``mask`` (``params != 0``, or a mask) fit the structure within a
        budget of ``keep_units`` whole units: here, the units holding a nonzero (tiles, channels)
        are at most ``keep_units``. A kept weight that is exactly 0 (a weight RigL grew at 0, a
        tile not yet trained) never breaks compliance; nonzeros spread over more units than the
        budget do. ``keep_units`` None: the fewest units that can hold the nonzeros,
        ``ceil(nonzeros / entries per unit)``. Per-cell structures check their quotas instead."""
        mask = jnp.asarray(mask, bool)
        touched = jnp.sum(~self.unit_mask(~mask), dtype=jnp.int32)  # units with any nonzero
        if keep_units is None:
            size = self.group_size(mask.shape)
            keep_units = (jnp.sum(mask, dtype=jnp.int32) + size - 1) // size
        return touched <= keep_units

    @property
    def is_unstructured(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Unstructured(Structure):
    """Any entries: the leaf's ``N - floor(s N)`` largest scores (the default)."""

    def _untileable(self, shape):
        return None

    def complies(self, mask, keep_units=None):
        """Any nonzeros fit; with a budget, at most ``keep_units`` of them."""
        if keep_units is None:
            return jnp.asarray(True)
        return jnp.sum(jnp.asarray(mask, bool), dtype=jnp.int32) <= keep_units

    @property
    def is_unstructured(self) -> bool:
        return True

    def __repr__(self):
        return "unstructured()"


@dataclasses.dataclass(frozen=True)
class Blocks(Structure):
    """Whole ``(r, c)`` tiles on the last two axes, scored by the L2 norm of their scores
    (:func:`group_norm`); leading axes (a stack of kernels) tile separately but share the budget.
    A leaf of ``T`` tiles at sparsity ``s`` keeps exactly ``T - floor(s T)`` tiles."""

    r: int
    c: int

    def __post_init__(self):
        for v, what in ((self.r, "r"), (self.c, "c")):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"blocks: {what} must be a positive int; got {v!r}")

    def _untileable(self, shape):
        if len(shape) < 2:
            return f"blocks tile the last two axes and the leaf has {len(shape)}"
        if shape[-2] % self.r or shape[-1] % self.c:
            return f"its last two dimensions {shape[-2:]} are not multiples of the block shape ({self.r}, {self.c})"
        return None

    def unit_shape(self, shape):
        return (*shape[:-2], shape[-2] // self.r, shape[-1] // self.c)

    def _tiles(self, x):
        *lead, rows, cols = x.shape
        return x.reshape(*lead, rows // self.r, self.r, cols // self.c, self.c)

    def to_units(self, scores):
        return group_norm(self._tiles(scores), (-3, -1))

    def units_where(self, where):
        return None if where is None else jnp.all(self._tiles(where), axis=(-3, -1))

    def expand(self, unit_mask, shape):
        *lead, rb, cb = unit_mask.shape
        full = jnp.broadcast_to(unit_mask[..., :, None, :, None], (*lead, rb, self.r, cb, self.c))
        return full.reshape(shape)

    def __repr__(self):
        return f"blocks({self.r}, {self.c})"


@dataclasses.dataclass(frozen=True)
class Channels(Structure):
    """Whole output units (neurons, filters): every slice ``x[..., j, ...]`` on ``axis`` (-1:
    flax's ``(..., in, out)`` kernels and ``(h, w, in, out)`` convolutions), scored by the L2
    norm of its scores (Li et al. 2017 score filters by their norm). ``C - floor(s C)`` of the
    ``C`` units are kept."""

    axis: int = -1

    def _untileable(self, shape):
        if _axis(self.axis, len(shape)) is None or len(shape) < 2:
            return f"channels need an output axis {self.axis} and at least one other axis"
        return None

    def _others(self, ndim):
        a = _axis(self.axis, ndim)
        return tuple(i for i in range(ndim) if i != a)

    def unit_shape(self, shape):
        return (shape[_axis(self.axis, len(shape))],)

    def to_units(self, scores):
        return group_norm(scores, self._others(scores.ndim))

    def units_where(self, where):
        return None if where is None else jnp.all(where, axis=self._others(where.ndim))

    def expand(self, unit_mask, shape):
        a = _axis(self.axis, len(shape))
        view = [1] * len(shape)
        view[a] = shape[a]
        return jnp.broadcast_to(unit_mask.reshape(view), shape)

    def __repr__(self):
        return f"channels(axis={self.axis})"


class _PerCell(Structure):
    """Entry units, partitioned into cells that each keep the same quota."""

    def units_where(self, where):
        return where

    def complies(self, mask, keep_units=None):
        """At most the quota in every cell (params may hold zeros at kept positions): N:M's ``n``
        whatever ``keep_units``; with a budget, ``keep_units / cells``."""
        mask = jnp.asarray(mask, bool)
        quota = self._max_per_cell(mask.shape) if keep_units is None else keep_units // self.cells(mask.shape)
        return jnp.all(self.cell_counts(mask) <= quota)


@dataclasses.dataclass(frozen=True)
class NofM(_PerCell):
    """N:M: exactly ``n`` nonzeros in every group of ``m`` consecutive entries along ``axis``
    (-2: the input axis of flax's ``(..., in, out)`` kernels, the contraction axis of ``x @ W``,
    as the 2:4 sparse tensor cores require; Mishra et al. 2021). The sparsity is ``1 - n/m``.

    Within a group the ``n`` largest scores are kept (ties to the lower index), found by ``m``
    pairwise compare passes for ``m <= 32`` (an ``m = 4`` group costs four elementwise passes;
    no sort) and by the bitwise per-column search of :func:`~jaxsparse.selection.top_k_per_column`
    beyond.
    """

    n: int
    m: int
    axis: int = -2

    def __post_init__(self):
        for v, what in ((self.n, "n"), (self.m, "m")):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"n_of_m: {what} must be a positive int; got {v!r}")
        if self.n > self.m:
            raise ValueError(f"n_of_m: n ({self.n}) must not exceed m ({self.m})")
        if not isinstance(self.axis, (int, np.integer)) or isinstance(self.axis, bool):
            raise ValueError(f"n_of_m: axis must be an int; got {self.axis!r}")

    @property
    def implied_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check_sparsity(self, sparsity, name=None) -> float:
        if sparsity is None:
            return self.implied_sparsity
        s = check_sparsity(sparsity, "sparsity" if name is None else f"sparsity of leaf {name!r}")
        if abs(s - self.implied_sparsity) > 1e-9:
            what = "" if name is None else f" for leaf {name!r}"
            raise ValueError(
                f"{self!r} implies sparsity 1 - {self.n}/{self.m} = {self.implied_sparsity:g}; got {s!r}{what}. "
                "Omit the sparsity (sparsity=None) or give exactly that value"
            )
        return self.implied_sparsity

    def cell_quota(self, shape, sparsity, name=None):
        self.check_sparsity(sparsity, name)
        return self.n

    def _untileable(self, shape):
        a = _axis(self.axis, len(shape))
        if a is None:
            return f"it has no axis {self.axis}"
        if shape[a] % self.m:
            return f"dimension {a} ({shape[a]}) is not a multiple of m={self.m}"
        return None

    def cells(self, shape):
        return math.prod(shape) // self.m

    def _view(self, x):
        """``x`` with the group axis split: ``(..., K/m, m, ...)``; returns it and the group axis."""
        a = _axis(self.axis, x.ndim)
        shape = x.shape
        return x.reshape(*shape[:a], shape[a] // self.m, self.m, *shape[a + 1:]), a + 1

    def cell_counts(self, unit_mask):
        view, g = self._view(unit_mask)
        return jnp.sum(view, axis=g, keepdims=True, dtype=jnp.int32)

    def _max_per_cell(self, shape):
        return self.n

    def select_units(self, unit_scores, quota, where=None):
        shape = unit_scores.shape
        if self.m > _PAIRWISE_MAX_M:  # long groups: the bitwise per-column search, a group per column
            view, g = self._view(unit_scores)
            columns = lambda x: jnp.moveaxis(x, g, 0).reshape(self.m, -1)
            q = jnp.broadcast_to(jnp.asarray(quota, jnp.int32), view.shape[:g] + (1,) + view.shape[g + 1:])
            w = None if where is None else columns(self._view(where)[0])
            chosen = top_k_per_column(columns(view), q.reshape(-1), where=w)
            rest = view.shape[:g] + view.shape[g + 1:]
            return jnp.moveaxis(chosen.reshape((self.m,) + rest), 0, g).reshape(shape)
        keys, g = self._view(score_keys(unit_scores, where))
        # rank of each entry in its group: entries with a larger key, or an equal key at a
        # lower index, come first; the first ``quota`` ranks are kept.
        index = lax.broadcasted_iota(jnp.int32, keys.shape, g)
        rank = jnp.zeros(keys.shape, jnp.int32)
        for i in range(self.m):
            other = lax.slice_in_dim(keys, i, i + 1, axis=g)
            rank = rank + ((other > keys) | ((other == keys) & (i < index))).astype(jnp.int32)
        chosen = rank < jnp.asarray(quota, jnp.int32)
        chosen = chosen & (keys != 0) if where is not None else chosen
        return chosen.reshape(shape)

    def __repr__(self):
        return f"n_of_m({self.n}, {self.m}, axis={self.axis})"


@dataclasses.dataclass(frozen=True)
class ConstantFanIn(_PerCell):
    """Constant fan-in: every output unit (on ``output_axis``) keeps the same number of inputs,
    ``F - floor(s F)`` of its ``F`` (Lasby et al. 2024; the structure of SRigL, which shares this
    class's view of a leaf as a ``(fan_in, n_out)`` matrix and its per-neuron selection,
    :func:`~jaxsparse.selection.top_k_per_column`)."""

    output_axis: int = -1

    def _untileable(self, shape):
        if len(shape) < 2:
            return "constant fan-in needs an input and an output axis"
        if _axis(self.output_axis, len(shape)) is None:
            return f"it has no output axis {self.output_axis}"
        return None

    def cells(self, shape):
        return shape[_axis(self.output_axis, len(shape))]

    def as_matrix(self, x):
        """``x`` as ``(fan_in, n_out)``: the output axis last, the others flattened."""
        x = jnp.moveaxis(x, self.output_axis, -1)
        return x.reshape(-1, x.shape[-1])

    def from_matrix(self, m, shape):
        """Inverse of :meth:`as_matrix` for a leaf of ``shape``."""
        moved = list(shape)
        n_out = moved.pop(_axis(self.output_axis, len(shape)))
        return jnp.moveaxis(m.reshape(*moved, n_out), -1, self.output_axis)

    def cell_counts(self, unit_mask):
        return jnp.sum(self.as_matrix(unit_mask), axis=0, dtype=jnp.int32)

    def complies(self, mask, keep_units=None):
        """With a budget, every output unit holds at most ``keep_units / n_out`` nonzeros (a kept
        weight may be exactly 0); without one, every output unit holds the same number of
        nonzeros, or none (an ablated neuron)."""
        c = self.cell_counts(jnp.asarray(mask, bool))
        if keep_units is not None:
            return jnp.all(c <= keep_units // self.cells(mask.shape))
        top = jnp.max(c)
        return jnp.all((c == top) | (c == 0))

    def select_units(self, unit_scores, quota, where=None):
        shape = unit_scores.shape
        n_out = self.cells(shape)
        ks = jnp.broadcast_to(jnp.asarray(quota, jnp.int32), (n_out,))
        w = None if where is None else self.as_matrix(where)
        return self.from_matrix(top_k_per_column(self.as_matrix(unit_scores), ks, where=w), shape)

    def __repr__(self):
        return f"constant_fan_in(output_axis={self.output_axis})"


def unstructured() -> Unstructured:
    """Any entries (the default of every preset)."""
    return Unstructured()


def n_of_m(n: int, m: int, axis: int = -2) -> NofM:
    """N:M sparsity: exactly ``n`` nonzeros in every ``m`` consecutive entries along ``axis``
    (-2, the input axis of ``(..., in, out)`` kernels). See :class:`NofM`."""
    return NofM(n, m, axis)


def blocks(r: int, c: int) -> Blocks:
    """Whole ``(r, c)`` tiles on the last two axes; a leaf of ``T`` tiles at sparsity ``s`` keeps
    exactly ``T - floor(s T)`` of them (NaN lowest, ties to the lowest tile index).

    A tile's score is the **L2 norm** of its entries' scores (:func:`group_norm`): with magnitude
    scores that is the tile's Frobenius norm, which bounds what the tile adds to the layer's
    output, and with RigL's gradient scores it is the norm of the gradient on the tile, the rate
    at which the loss falls when the whole tile is grown, so both of RigL's rules carry over from
    entries to tiles. (L1 would rank a tile of many small entries like one large entry; the max
    would let one entry decide for ``r * c``.) The block masks convert directly to
    ``jaxsparse.nn.BlockSparseDense`` and ``pallas_kernels.BlockSparseMatrix``. See
    :class:`Blocks`."""
    return Blocks(r, c)


def channels(axis: int = -1) -> Channels:
    """Whole output units (neurons, filters) on ``axis``. See :class:`Channels`."""
    return Channels(axis)


def constant_fan_in(output_axis: int = -1) -> ConstantFanIn:
    """The same fan-in for every output unit on ``output_axis``. See :class:`ConstantFanIn`."""
    return ConstantFanIn(output_axis)


def as_structure(structure) -> Structure:
    """``structure`` as a :class:`Structure` (None: unstructured); a ValueError otherwise."""
    if structure is None:
        return Unstructured()
    if isinstance(structure, Structure):
        return structure
    raise ValueError(
        f"structure must be a jaxsparse structure (js.n_of_m(2, 4), js.blocks(128, 128), js.channels(), "
        f"js.constant_fan_in(), js.unstructured()) or None; got {structure!r}"
    )


def structures_by_leaf(names, structure) -> dict:
    """``{leaf name: Structure}`` for the leaf paths ``names``, from one structure (None:
    unstructured) or ``{regex: structure or None}`` (first match wins, unmatched leaves are
    unstructured; a regex matching no leaf raises a ValueError)."""
    if isinstance(structure, dict):
        matched = match_overrides(list(names), structure)
        return {n: as_structure(matched.get(n)) for n in names}
    layout = as_structure(structure)
    return {n: layout for n in names}


def select_units_top_k(structures: Sequence[Structure], shapes, unit_scores, ks, group_of, unit_where=None) -> list:
    """Unit masks of the top ``ks`` units per group (``ks`` one per group, in units), over leaves
    of ``shapes`` with their ``structures``, given their unit scores (and unit eligibility).

    One-cell leaves (unstructured, blocks, channels) are selected by
    :func:`jaxsparse.selection.select_top_k` in the same shared passes, so several leaves may
    share one budget (global pruning over tiles). A per-cell leaf (N:M, constant fan-in) must be a
    group of its own; its ``k`` (a multiple of its cell count) is split evenly over its cells.
    """
    structures = [as_structure(s) for s in structures]
    unit_where = [None] * len(unit_scores) if unit_where is None else list(unit_where)
    shared = [i for i, (s, shape) in enumerate(zip(structures, shapes)) if s.cells(shape) == 1]
    masks = [None] * len(unit_scores)
    k_words = counts.count(ks)
    if shared:
        used = sorted({group_of[i] for i in shared})
        renumber = {g: j for j, g in enumerate(used)}
        any_where = any(unit_where[i] is not None for i in shared)
        found = _select_unit_top_k(
            [unit_scores[i] for i in shared],
            jax.tree.map(lambda w: jnp.reshape(w, (-1,))[np.array(used)], k_words),
            [renumber[group_of[i]] for i in shared],
            [jnp.ones(unit_scores[i].shape, bool) if unit_where[i] is None else unit_where[i] for i in shared]
            if any_where else None,
        )
        for i, m in zip(shared, found):
            masks[i] = m
    for i, (s, shape) in enumerate(zip(structures, shapes)):
        if masks[i] is None:
            if sum(g == group_of[i] for g in group_of) != 1:
                raise ValueError(f"{s!r} selects per cell: a leaf with it cannot share a budget with other leaves")
            k = counts.to_int32(jax.tree.map(lambda w: jnp.reshape(w, (-1,))[group_of[i]], k_words))
            masks[i] = s.select_units(unit_scores[i], k // s.cells(shape), unit_where[i])
    return masks


def select_top_k(structures: Sequence[Structure], scores, ks, group_of, where=None) -> list:
    """:func:`jaxsparse.selection.select_top_k` over leaves with structures: each leaf's scores
    aggregated into units, ``ks`` (per group, in units) selected by :func:`select_units_top_k`,
    and every mask expanded back. ``where``: a bool array per leaf (entry level) or None."""
    scores = list(scores)
    structures = [as_structure(s) for s in structures]
    where = [None] * len(scores) if where is None else list(where)
    shapes = [tuple(x.shape) for x in scores]
    found = select_units_top_k(
        structures, shapes, [s.to_units(x) for s, x in zip(structures, scores)], ks, group_of,
        [s.units_where(w) for s, w in zip(structures, where)],
    )
    return [s.expand(m, shape) for s, m, shape in zip(structures, found, shapes)]

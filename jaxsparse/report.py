"""Per-layer sparsity tables, printable and available as data for logging.

- :func:`sparsity_report`: what a params tree holds (nonzeros per leaf), and with ``structure=``
  or the sparsifier's ``state=`` whether each leaf's nonzeros comply with its structure (N:M,
  blocks, ...) within its budget.
- :func:`preview_sparsity`: what a sparsifier will aim for, before training (each leaf's target
  sparsity and exact budget under a distribution, filters and overrides).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jaxsparse.core import get_masks, get_plan, plan_leaves
from jaxsparse.export import bitmask_nbytes
from jaxsparse.leaves import path_to_str, select_leaves
from jaxsparse.structures import structures_by_leaf

__all__ = ["LeafReport", "SparsityReport", "sparsity_report", "LeafTarget", "SparsityPreview", "preview_sparsity"]


def _table(header, lines, left: int = 2) -> str:
    """An aligned text table; the first ``left`` columns left-aligned, the last line a total."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(header))
    body = [fmt(l) for l in lines]
    return "\n".join([fmt(header), rule, *body[:-1], rule, body[-1]])


class LeafReport(NamedTuple):
    """One row: a leaf's name, shape, number of nonzero entries, size and sparsity; its bytes
    dense and as :func:`jaxsparse.compress` stores it (bitmask format for the leaves sparsified
    by default, dense for the others); with a structure, its name (``""``: none given) and
    whether the leaf's nonzeros comply with it (None: the structure cannot tile the leaf)."""

    path: str
    shape: tuple
    nonzeros: int
    size: int
    sparsity: float
    dense_bytes: int = 0
    compressed_bytes: int = 0
    structure: str = ""
    complies: bool | None = None


class SparsityReport(NamedTuple):
    """Rows per leaf and the total over all of them. ``str()`` gives an aligned table."""

    rows: tuple[LeafReport, ...]
    total: LeafReport

    def as_dict(self) -> dict[str, float]:
        """``{"sparsity/<path>": sparsity, ..., "sparsity/total": ...}``, ready for a logger."""
        out = {f"sparsity/{r.path}": r.sparsity for r in self.rows}
        out["sparsity/total"] = self.total.sparsity
        out.update({f"complies/{r.path}": float(r.complies) for r in self.rows if r.complies is not None})
        return out

    def __str__(self) -> str:
        shape = lambda r: "" if r is self.total else "x".join(map(str, r.shape)) or "()"
        lines = [
            (r.path, shape(r), f"{r.nonzeros:,}", f"{r.size:,}", f"{r.sparsity:.2%}",
             f"{r.dense_bytes:,} -> {r.compressed_bytes:,}")
            for r in (*self.rows, self.total)
        ]
        header = ("path", "shape", "nonzeros", "size", "sparsity", "bytes dense -> bitmask")
        if any(r.structure for r in self.rows):
            verdict = {True: "yes", False: "NO", None: "untileable"}
            lines = [
                (*line, r.structure, verdict[r.complies] if r.structure else "")
                for line, r in zip(lines, (*self.rows, self.total))
            ]
            header = (*header, "structure", "complies")
        return _table(header, lines)


def sparsity_report(
    params, *, only_sparse: bool = False, structure=None, include=None, exclude=None, state=None
) -> SparsityReport:
    """Count the nonzero entries of every array leaf of ``params``.

    Args:
      params: any pytree of arrays (flax, nnx state, equinox module, dict...).
      only_sparse: list only leaves that have at least one zero entry (the total still
        covers every leaf).
      structure: the structure the params were trained with (``js.n_of_m(2, 4)``,
        ``js.blocks(128, 128)``, ... or ``{regex: structure}`` per leaf, as given to the
        sparsifier): adds a ``structure`` and a ``complies`` column for the leaves chosen by
        ``include`` / ``exclude`` (default: the leaves sparsifiers sparsify). Not needed with
        ``state``, which knows each leaf's structure.
      state: the optimizer state holding the sparsifier(s) that trained ``params`` (any nesting,
        as :func:`jaxsparse.get_masks` takes): each leaf's structure and budget are read from it
        (:func:`jaxsparse.get_plan`), so ``sparsity_report(params, state=opt_state)`` shows the
        ``complies`` column of a structured run with nothing passed by hand.

    A leaf **complies** when its nonzeros fit its structure within its budget; a kept weight that
    is exactly 0 (a weight grown at 0, as RigL grows them) never makes it fail:

    - N:M: at most ``n`` nonzeros in every group of ``m``;
    - blocks and channels: the tiles (channels) holding a nonzero are at most the budget; with
      ``state``, the budget is the number of whole tiles of the leaf's current mask (the exact
      ``T - floor(s T)`` once a schedule is complete) and the nonzeros must also lie on that
      mask; without it, the fewest tiles that can hold the leaf's nonzeros;
    - constant fan-in: with ``state``, at most the planned fan-in ``F - floor(s F)`` nonzeros per
      output unit; without it, the same number of nonzeros in every output unit, or none.

    ``complies`` is None (``untileable``) when the structure cannot tile the leaf.

    Returns:
      A :class:`SparsityReport`; ``print(report)`` shows the table, ``report.rows`` and
      ``report.total`` hold the numbers, ``report.as_dict()`` flattens them for logging.
    """
    layouts, plan, masks = {}, {}, {}
    if state is not None:
        plan = get_plan(state)
        masks = {path_to_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(get_masks(state))[0]}
        layouts = {name: leaf.layout for name, leaf in plan.items() if leaf.structure is not None}
    if structure is not None:
        chosen = select_leaves(params, include, exclude)
        layouts = structures_by_leaf([n for n, ok in chosen.items() if ok], structure)
    rows = []
    compressed = select_leaves(params)  # the leaves js.compress(params) compresses
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not hasattr(x, "shape"):
            continue
        name, size = path_to_str(path), int(np.prod(x.shape))
        nonzero = np.asarray(jax.device_get(x)) != 0
        nnz = int(np.count_nonzero(nonzero))
        dense = size * np.dtype(x.dtype).itemsize
        packed = bitmask_nbytes(x.shape, nnz, x.dtype) if compressed.get(name, False) else dense
        row = LeafReport(name, tuple(x.shape), nnz, size, 1.0 - nnz / size if size else 0.0, dense, packed)
        layout = layouts.get(name)
        if layout is not None and not layout.is_unstructured:
            row = row._replace(structure=repr(layout), complies=_complies(layout, nonzero, plan.get(name), masks.get(name)))
        rows.append(row)
    nnz = sum(r.nonzeros for r in rows)
    size = sum(r.size for r in rows)
    total = LeafReport("total", (), nnz, size, 1.0 - nnz / size if size else 0.0,
                       sum(r.dense_bytes for r in rows), sum(r.compressed_bytes for r in rows))
    if only_sparse:
        rows = [r for r in rows if r.nonzeros < r.size]
    return SparsityReport(tuple(rows), total)


def _complies(layout, nonzero, leaf, mask) -> bool | None:
    """Whether ``nonzero`` fits ``layout`` within the budget the state gives (``leaf``, its
    planned budget; ``mask``, its current mask), or within the fewest units without a state."""
    if not layout.tileable(nonzero.shape):
        return None
    if leaf is None or mask is None or leaf.layout != layout or tuple(mask.shape) != nonzero.shape:
        return bool(layout.complies(nonzero))
    mask = np.asarray(jax.device_get(mask), bool)
    if layout.cells(nonzero.shape) > 1:  # per-cell quotas (N:M, fan-in): the planned one
        budget = leaf.keep_units
    else:  # tiles, channels: the whole units of the current mask (a schedule may not be complete)
        budget = int(np.sum(layout.unit_mask(mask)))
    return bool(layout.complies(nonzero, budget)) and not bool(np.any(nonzero & ~mask))


class LeafTarget(NamedTuple):
    """One row of a preview: a leaf, its target sparsity and exact budget (``None``: dense)."""

    path: str
    shape: tuple
    size: int
    sparsity: float | None
    keep: int


class SparsityPreview(NamedTuple):
    """Per-leaf targets of a sparsifier before training. ``str()`` gives an aligned table."""

    rows: tuple[LeafTarget, ...]
    total: LeafTarget

    def as_dict(self) -> dict[str, float]:
        """``{"target_sparsity/<path>": sparsity}`` for the sparsified leaves, and the total."""
        out = {f"target_sparsity/{r.path}": r.sparsity for r in self.rows if r.sparsity is not None}
        out["target_sparsity/total"] = self.total.sparsity
        return out

    def __str__(self) -> str:
        lines = [
            (r.path, "x".join(map(str, r.shape)) or "()", f"{r.size:,}",
             "dense" if r.sparsity is None else f"{r.sparsity:.2%}", f"{r.keep:,}")
            for r in self.rows
        ]
        t = self.total
        lines.append((t.path, "", f"{t.size:,}", f"{t.sparsity:.2%}", f"{t.keep:,}"))
        return _table(("path", "shape", "size", "target", "kept"), lines)


def preview_sparsity(
    params, sparsity=None, *, include=None, exclude=None, overrides=None, structure=None, dense_if_untileable=False
) -> SparsityPreview:
    """The per-leaf target sparsities and exact budgets a sparsifier will use, before training.

    Takes the same ``sparsity`` (a float or a distribution such as ``jaxsparse.erk(0.9)``),
    ``include``, ``exclude`` and ``overrides`` as every preset, and ``params`` as arrays or
    ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)``: nothing is allocated)::

        print(js.preview_sparsity(params, js.erk(0.9), exclude="head"))

    Each sparsified leaf of size ``N`` at target ``s`` keeps exactly ``N - floor(s N)`` entries
    once the schedule (if any) is complete; other leaves stay dense. The total row counts every
    leaf, dense ones included. For presets that spread a float with a published distribution
    (RigL and SRigL: ERK; SET: ER), pass that distribution to see their targets. With
    ``structure`` (and ``dense_if_untileable``) as given to the sparsifier, budgets count whole
    groups (``js.blocks(r, c)``: ``T - floor(s T)`` tiles; ``js.n_of_m(n, m)``: ``n`` of every
    ``m``, and ``sparsity`` may be None).
    """
    plan = plan_leaves(
        params, sparsity, include=include, exclude=exclude, overrides=overrides, structure=structure,
        dense_if_untileable=dense_if_untileable,
    )
    plan = {leaf.name: leaf for leaf in plan}
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not hasattr(x, "shape"):
            continue
        name, size = path_to_str(path), int(np.prod(x.shape))
        leaf = plan.get(name)
        rows.append(LeafTarget(name, tuple(x.shape), size, leaf and leaf.sparsity, leaf.keep if leaf else size))
    size = sum(r.size for r in rows)
    keep = sum(r.keep for r in rows)
    total = LeafTarget("total", (), size, 1.0 - keep / size if size else 0.0, keep)
    return SparsityPreview(tuple(rows), total)

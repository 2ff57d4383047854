"""A per-layer sparsity table of a params tree, printable and available as data for logging."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jaxsparse.leaves import path_to_str

__all__ = ["LeafReport", "SparsityReport", "sparsity_report"]


class LeafReport(NamedTuple):
    """One row: a leaf's name, shape, number of nonzero entries, size and sparsity."""

    path: str
    shape: tuple
    nonzeros: int
    size: int
    sparsity: float


class SparsityReport(NamedTuple):
    """Rows per leaf and the total over all of them. ``str()`` gives an aligned table."""

    rows: tuple[LeafReport, ...]
    total: LeafReport

    def as_dict(self) -> dict[str, float]:
        """``{"sparsity/<path>": sparsity, ..., "sparsity/total": ...}``, ready for a logger."""
        out = {f"sparsity/{r.path}": r.sparsity for r in self.rows}
        out["sparsity/total"] = self.total.sparsity
        return out

    def __str__(self) -> str:
        header = ("path", "shape", "nonzeros", "size", "sparsity")
        shape = lambda r: "" if r is self.total else "x".join(map(str, r.shape)) or "()"
        lines = [
            (r.path, shape(r), f"{r.nonzeros:,}", f"{r.size:,}", f"{r.sparsity:.2%}")
            for r in (*self.rows, self.total)
        ]
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )
        rule = "-" * len(fmt(header))
        body = [fmt(l) for l in lines]
        return "\n".join([fmt(header), rule, *body[:-1], rule, body[-1]])


def sparsity_report(params, *, only_sparse: bool = False) -> SparsityReport:
    """Count the nonzero entries of every array leaf of ``params``.

    Args:
      params: any pytree of arrays (flax, nnx state, equinox module, dict...).
      only_sparse: list only leaves that have at least one zero entry (the total still
        covers every leaf).

    Returns:
      A :class:`SparsityReport`; ``print(report)`` shows the table, ``report.rows`` and
      ``report.total`` hold the numbers, ``report.as_dict()`` flattens them for logging.
    """
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not hasattr(x, "shape"):
            continue
        size = int(np.prod(x.shape))
        nnz = int(np.count_nonzero(np.asarray(jax.device_get(x))))
        rows.append(LeafReport(path_to_str(path), tuple(x.shape), nnz, size, 1.0 - nnz / size if size else 0.0))
    nnz = sum(r.nonzeros for r in rows)
    size = sum(r.size for r in rows)
    total = LeafReport("total", (), nnz, size, 1.0 - nnz / size if size else 0.0)
    if only_sparse:
        rows = [r for r in rows if r.nonzeros < r.size]
    return SparsityReport(tuple(rows), total)

"""Addressing leaves of any pytree by key path, and choosing which leaves are sparsified.

Every leaf is named by its key path joined with ``/`` (``"params/Dense_0/kernel"``,
``"layers/0/weight"``), which works the same for plain dicts, NamedTuples, flax linen param
dicts, flax nnx ``State`` and equinox modules. Filters and per-leaf overrides are regular
expressions matched against these names with :func:`re.search`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["path_to_str", "leaf_paths", "is_sparsifiable", "select_leaves", "match_overrides"]


def path_to_str(path: Sequence[Any]) -> str:
    """Join a jax key path into ``"a/b/c"`` (``jax.tree_util.keystr`` in its simple form).

    A trailing ``.value`` attribute (how flax nnx ``Variable`` objects expose their array) is
    dropped, so ``nnx.state(model)`` and its pure-array form give the same names.
    """
    keys = tuple(path)
    if len(keys) > 1 and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return jax.tree_util.keystr(keys, simple=True, separator="/")


def leaf_paths(tree) -> list[str]:
    """Names of the leaves of ``tree`` in flattening order (``None`` leaves excluded)."""
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "shape") and hasattr(x, "dtype")


def is_sparsifiable(x) -> bool:
    """Default rule: floating-point arrays with at least 2 dimensions (kernels, embeddings)."""
    return _is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) and len(x.shape) >= 2


def _compile(patterns, what: str):
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"{what}: invalid regular expression {e.pattern!r}: {e}") from None


def select_leaves(params, include=None, exclude=None) -> dict[str, bool]:
    """Which leaves of ``params`` are sparsified, by name.

    Args:
      params: any pytree of arrays.
      include: regex or list of regexes. ``None``: every leaf passing :func:`is_sparsifiable`.
        Otherwise exactly the floating array leaves whose name matches one of them (so a 1-D
        leaf such as a bias can be included explicitly).
      exclude: regex or list of regexes; matching leaves are never sparsified.

    Returns:
      ``{name: bool}`` for every array leaf, in flattening order.

    Raises:
      ValueError: a pattern that matches no leaf (a typo would otherwise silently sparsify
        nothing), or that is not a valid regular expression.
    """
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    flat = [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    names = [n for n, x in flat if _is_array(x)]
    for kind, pats in (("include", inc), ("exclude", exc)):
        for pat in pats:
            if not any(pat.search(n) for n in names):
                raise ValueError(f"{kind} pattern {pat.pattern!r} matches no leaf; leaves are {names}")
    chosen = {}
    for name, x in flat:
        if not _is_array(x):
            continue
        if inc:
            ok = any(p.search(name) for p in inc) and jnp.issubdtype(x.dtype, jnp.floating)
        else:
            ok = is_sparsifiable(x)
        chosen[name] = ok and not any(p.search(name) for p in exc)
    return chosen


def match_overrides(names: Sequence[str], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Resolve ``{regex: value}`` overrides to ``{leaf name: value}``; the first matching regex wins.

    Raises a ValueError naming the pattern when one matches none of ``names``.
    """
    if not overrides:
        return {}
    compiled = list(zip(_compile(list(overrides), "overrides"), overrides.values()))
    for pat, _ in compiled:
        if not any(pat.search(n) for n in names):
            raise ValueError(
                f"override pattern {pat.pattern!r} matches no sparsified leaf; leaves are {list(names)}"
            )
    resolved = {}
    for name in names:
        for pat, value in compiled:
            if pat.search(name):
                resolved[name] = value
                break
    return resolved

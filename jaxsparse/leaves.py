"""Addressing leaves of any pytree by key path, and choosing which leaves are sparsified.

Every leaf is named by its key path joined with ``/`` (``"params/Dense_0/kernel"``,
``"layers/0/weight"``), which works the same for plain dicts, NamedTuples, flax linen param
dicts, flax nnx ``State`` and equinox modules. Filters and per-leaf overrides are regular
expressions matched against these names with :func:`re.search`.

The default rule (:func:`is_sparsifiable`) sparsifies the weight matrices and tensors of dense,
convolution, attention-projection and token-embedding layers, and nothing else. A leaf is
sparsified by default when all of these hold:

1. it is a floating-point array;
2. at least two of its axes have size > 1 (a vector stays dense whatever its rank: an equinox
   ``Conv2d`` bias of shape ``(16, 1, 1)``, a ``(1, 1, d)`` class token, a ``(d, 1)`` kernel);
3. the last component of its name, lowercased, is not ``bias``, ``scale`` or ``offset`` (the
   biases and norm parameters of flax and haiku, which have several axes of size > 1 in
   ``DenseGeneral``, attention and multi-axis norms; equinox names them ``bias`` and ``weight``,
   and its norm weights are vectors, so rule 2 keeps them dense);
4. no component of its name names a positional table: lowercased, it is ``pos`` or ``wpe``,
   or it contains a match of ``pos(ition(al)?)?_?emb`` (``pos_embedding``, ``posembed_input``,
   ``pos_emb``, ``position_embeddings``, ``positional_embedding``), ``embed_?positions``
   (``embed_positions``), ``rel(ative)?_pos`` (``rel_pos_h``, ``relative_position_bias_table``)
   or ``relative_attention_bias`` (T5).

So kernels such as a ``DenseGeneral`` kernel of shape ``(features, heads, head_dim)``, a
``(3, 3, in, out)`` convolution kernel and a token table (``Embed_0/embedding``, ``wte``) are
sparsified; biases, norm scales and offsets, and positional tables are not. ``include=`` picks
any floating leaf explicitly, whatever this rule says; ``exclude=`` removes leaves from it.
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


# Rule 3 of the module docstring: the last name component of biases and norm parameters.
# (Haiku's bias ``b`` is left out on purpose: every haiku bias is a vector, which rule 2 already
# keeps dense, while plain-dict models often name a weight matrix ``b``.)
_BIAS_OR_NORM_NAMES = frozenset({"bias", "scale", "offset"})
# Rule 4: a name component naming a positional table (absolute or relative).
_POSITIONAL = re.compile(
    r"^(pos|wpe)$|pos(ition(al)?)?_?emb|embed_?positions|rel(ative)?_pos|relative_attention_bias"
)


def is_sparsifiable(name: str, x) -> bool:
    """The default rule: is the leaf ``x`` named ``name`` sparsified when no ``include`` is given?

    True when ``x`` is a floating-point array with at least two axes of size > 1, the last
    ``/``-separated component of ``name`` (lowercased) is not ``bias``, ``scale`` or ``offset``,
    and no component of ``name`` names a positional table (lowercased, it is ``pos`` or ``wpe``,
    or contains a match of ``pos(ition(al)?)?_?emb``, ``embed_?positions``, ``rel(ative)?_pos`` or
    ``relative_attention_bias``). See the module docstring for why.
    """
    if not (_is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)):
        return False
    if sum(int(d) > 1 for d in x.shape) < 2:
        return False
    parts = name.lower().split("/")
    return parts[-1] not in _BIAS_OR_NORM_NAMES and not any(_POSITIONAL.search(p) for p in parts)


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
      include: regex or list of regexes. ``None``: the default rule, every leaf for which
        :func:`is_sparsifiable` holds (floating, at least two axes of size > 1, not a bias /
        ``scale`` / ``offset``, not a positional table; see the module docstring). Otherwise
        exactly the floating array leaves whose name matches one of them (so a bias, a norm
        scale or a positional table can be included explicitly).
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
            ok = is_sparsifiable(name, x)
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

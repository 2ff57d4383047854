"""Mask pytrees (DESIGN.md invariant 2).

A mask tree has the structure of its params tree: a sparsified leaf holds a ``bool`` array of the
leaf's shape (True = kept), a leaf that is not sparsified holds ``None``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxsparse import scores as score_fns
from jaxsparse.leaves import path_to_str, select_leaves
from jaxsparse.structures import as_structure, select_units_top_k

__all__ = [
    "is_none",
    "map_masked",
    "dense_masks",
    "masks_from_params",
    "apply_masks",
    "count_nonzeros",
    "mask_sparsity",
    "check_structure",
    "random_masks",
]


def is_none(x) -> bool:
    """``is_leaf`` predicate that makes ``None`` entries of a mask tree visible to tree maps."""
    return x is None


def map_masked(fn: Callable, masks, *trees):
    """``fn(mask_leaf, *leaves)`` on every sparsified leaf; other leaves of ``trees[0]`` pass through.

    ``masks`` drives the traversal (its ``None`` entries are leaves), so ``trees`` must have the
    params structure.
    """

    def visit(m, *xs):
        return xs[0] if m is None else fn(m, *xs)

    return jax.tree.map(visit, masks, *trees, is_leaf=is_none)


def _named_map(fn, params):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_to_str(p), x), params)


def dense_masks(params, include=None, exclude=None):
    """All-True masks on the leaves chosen by :func:`jaxsparse.leaves.select_leaves`, ``None`` elsewhere."""
    chosen = select_leaves(params, include, exclude)
    return _named_map(lambda n, x: jnp.ones(x.shape, bool) if chosen.get(n, False) else None, params)


def masks_from_params(params, include=None, exclude=None):
    """Masks of the nonzero entries of the chosen leaves of ``params``."""
    chosen = select_leaves(params, include, exclude)
    return _named_map(lambda n, x: (x != 0) if chosen.get(n, False) else None, params)


def apply_masks(tree, masks):
    """Zero the entries of ``tree`` where ``masks`` is False (leaves whose mask is None are kept)."""
    return map_masked(lambda m, x: jnp.where(m, x, jnp.zeros((), x.dtype)), masks, tree)


def count_nonzeros(masks, *, batch_dims: int | None = None) -> dict[str, jax.Array]:
    """``{leaf name: number of True entries}`` for every sparsified leaf of a mask tree.

    Args:
      masks: a mask tree, or an optimizer state holding jaxsparse sparsifiers (their masks are
        found with :func:`jaxsparse.get_masks`).
      batch_dims: leading axes that index separate runs (a state vmapped over seeds), counted
        separately: each count then has the shape of those axes. Default: 0 for a mask tree; for
        a state, the axes of its step counter (so a state vmapped over 3 seeds gives 3 counts).
    """
    from jaxsparse.core import get_masks, sparsifier_states  # the core imports this module

    states = sparsifier_states(masks)
    if states:
        if batch_dims is None:
            step = states[0].step if hasattr(states[0], "step") else states[0]["step"]
            batch_dims = jnp.ndim(step)
        masks = get_masks(masks)
    batch_dims = batch_dims or 0
    flat = jax.tree_util.tree_flatten_with_path(masks)[0]
    return {path_to_str(p): jnp.sum(m, axis=tuple(range(batch_dims, m.ndim)), dtype=jnp.int32) for p, m in flat}


def mask_sparsity(masks) -> jax.Array:
    """Fraction of masked-out entries over all sparsified leaves (0.0 for an empty tree)."""
    leaves = jax.tree.leaves(masks)
    total = sum(m.size for m in leaves)
    if total == 0:
        return jnp.float32(0.0)
    return 1.0 - sum(jnp.sum(m, dtype=jnp.float32) for m in leaves) / total


def check_structure(masks, tree, what: str = "params") -> None:
    """Raise a ValueError naming the first leaf where ``tree`` differs from the masks' params tree.

    Compares key paths and, on sparsified leaves, shapes. Runs at trace time only.
    """
    mask_flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0]
    tree_flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]
    mask_paths = [path_to_str(p) for p, _ in mask_flat]
    tree_paths = [path_to_str(p) for p, _ in tree_flat]
    if mask_paths != tree_paths:
        missing = [p for p in mask_paths if p not in tree_paths]
        extra = [p for p in tree_paths if p not in mask_paths]
        raise ValueError(
            f"{what} has a different structure from the params the sparsifier was initialised with: "
            f"missing leaves {missing}, unexpected leaves {extra} "
            f"(expected {len(mask_paths)} leaves, got {len(tree_paths)})"
        )
    for name, (_, m), (_, x) in zip(mask_paths, mask_flat, tree_flat):
        if m is not None and x is not None and tuple(m.shape) != tuple(x.shape):
            raise ValueError(
                f"{what} leaf {name!r} has shape {tuple(x.shape)}, but the sparsifier was "
                f"initialised with shape {tuple(m.shape)}"
            )
    # Same names, other containers (a FrozenDict at init, a dict now): the step's lax.cond and
    # every tree map over the state would fail with a raw pytree error.
    mask_def = jax.tree.structure(masks, is_leaf=is_none)
    tree_def = jax.tree.structure(tree, is_leaf=is_none)
    if mask_def != tree_def:
        raise ValueError(
            f"{what} has the leaves the sparsifier was initialised with, but in other containers: "
            f"{_short(tree_def)} now, {_short(mask_def)} at init (e.g. a dict against a flax FrozenDict). "
            "Pass the same tree types to init and update (flax.core.freeze / unfreeze)"
        )


def _short(treedef, limit: int = 160) -> str:
    text = str(treedef)
    return text if len(text) <= limit else text[:limit] + "...)"


def random_masks(leaves, key) -> list:
    """Masks keeping exactly each leaf's budget at uniformly random positions.

    ``leaves`` are records with ``shape`` and ``keep``, and optionally a ``structure`` (the core's
    ``LeafPlan``); each leaf draws its positions (its whole groups under a structure: random tiles,
    a random ``n`` of every ``m``) from its own key split from ``key``. The initial topology of
    static sparse training and of every dynamic sparse training method (Mocanu et al., 2018; Evci
    et al., 2020).
    """
    leaves = list(leaves)
    if not leaves:
        return []
    keys = jax.random.split(key, len(leaves))
    layouts = [as_structure(getattr(leaf, "structure", None)) for leaf in leaves]
    shapes = [tuple(leaf.shape) for leaf in leaves]
    unit_shapes = [s.unit_shape(shape) for s, shape in zip(layouts, shapes)]
    scores = [score_fns.random(jax.ShapeDtypeStruct(u, jnp.float32), None, k) for u, k in zip(unit_shapes, keys)]
    ks = [leaf.keep // s.group_size(shape) for leaf, s, shape in zip(leaves, layouts, shapes)]
    found = select_units_top_k(layouts, shapes, scores, ks, list(range(len(leaves))))
    return [s.expand(m, shape) for s, m, shape in zip(layouts, found, shapes)]

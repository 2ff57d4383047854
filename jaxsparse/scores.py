"""Score functions: which entries matter. Higher score = more worth keeping.

A score is a pure function ``score(param, grad, key) -> float32 array of param's shape`` applied
leaf by leaf; most pruning and growing rules differ only in their score (JaxPruner's one good
idea). Scores of different leaves are comparable when used with global (whole-model) selection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["magnitude", "random", "saliency", "gradient_magnitude", "lamp"]


def magnitude(param, grad, key):
    """``|w|``: magnitude pruning (Han et al., 2015; Zhu & Gupta, 2018)."""
    del grad, key
    return jnp.abs(param).astype(jnp.float32)


def random(param, grad, key):
    """Uniform random scores: random pruning baseline and random regrowth (SET, Mocanu et al., 2018)."""
    del grad
    return jax.random.uniform(key, param.shape, jnp.float32)


def saliency(param, grad, key):
    """``|w * g|``: first-order Taylor saliency (Molchanov et al., 2017; SNIP, Lee et al., 2019)."""
    del key
    return jnp.abs(param.astype(jnp.float32) * grad.astype(jnp.float32))


def gradient_magnitude(param, grad, key):
    """``|g|``: RigL's growth criterion (Evci et al., 2020), the dense gradient's magnitude."""
    del param, key
    return jnp.abs(grad).astype(jnp.float32)


def lamp(param, grad, key):
    """Layer-adaptive magnitude-based pruning score (Lee et al., 2021, "Layer-adaptive sparsity for
    the magnitude-based pruning", ICLR).

    With a leaf's weights sorted by increasing magnitude, ``score(u) = w_u^2 / sum_{v >= u} w_v^2``:
    each weight's squared magnitude relative to all weights at least as large in its own layer.
    These scores are comparable across layers, so global selection on them chooses per-layer
    sparsities automatically. The largest weight of every layer scores 1, so no layer is emptied.

    Unlike the other scores, LAMP needs each weight's rank within its layer, i.e. one sort per
    leaf; it runs only on topology-update steps. Ties are ordered by flat index.
    """
    del grad, key
    w2 = jnp.square(param.astype(jnp.float32)).reshape(-1)
    order = jnp.argsort(w2, stable=True)
    sorted_w2 = w2[order]
    tail = jnp.cumsum(sorted_w2[::-1])[::-1]  # sum of w^2 over this and all larger weights
    sorted_score = jnp.where(tail > 0, sorted_w2 / jnp.where(tail > 0, tail, 1.0), 0.0)
    return jnp.zeros_like(w2).at[order].set(sorted_score).reshape(param.shape)

"""Score functions: which entries matter. Higher score = more worth keeping.

A score is a pure function ``score(param, grad, key) -> float32 array of param's shape`` applied
leaf by leaf; most pruning and growing rules differ only in their score (JaxPruner's one good
idea). Scores of different leaves are comparable when used with global (whole-model) selection.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["per_leaf", "magnitude", "random", "position_hash", "saliency", "gradient_magnitude", "lamp"]


def per_leaf(score, params, grads, key) -> list:
    """``score(param, grad, key_i)`` for each leaf of the lists ``params`` and ``grads``
    (``grads`` None: no gradient, as at init), each leaf with its own key split from ``key``."""
    keys = jax.random.split(key, max(len(params), 1))
    grads = [None] * len(params) if grads is None else grads
    return [score(p, g, k) for p, g, k in zip(params, grads, keys)]


def magnitude(param, grad, key):
    """``|w|``: magnitude pruning (Han et al., 2015; Zhu & Gupta, 2018)."""
    del grad, key
    return jnp.abs(param).astype(jnp.float32)


def random(param, grad, key):
    """Random scores: random pruning baseline and random regrowth (SET, Mocanu et al., 2018).

    Only the order of scores matters to selection, so these are random *order keys*, not uniform
    values: non-negative float32 whose ranking is a uniformly random permutation of the positions
    (30 random bits per entry, so ties, which selection breaks with an extra pass, are rare).
    They come from :func:`position_hash`, an elementwise pass, instead of threefry's ~50 ms per
    4M entries on CPU, which on the 16.8M-weight benchmark MLP cost more than a training step.
    """
    del grad
    # 30 bits above the smallest normal float's pattern: floats in [1.2e-38, 4), never subnormal
    # (which a flush-to-zero CPU would read as ties at 0).
    bits = (position_hash(key, param.shape) >> 2) + jnp.uint32(0x00800000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _mix32(x):
    # "lowbias32" integer finaliser (C. Wellons, 2018): xorshifts and odd multiplies, so it is a
    # bijection of uint32 with full avalanche.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0xD35A2D97)
    return x ^ (x >> 15)


def position_hash(key, shape) -> jax.Array:
    """Random uint32 bits of ``shape``: a keyed hash of each entry's flat position.

    Counter-based like threefry (Salmon et al., 2011, "Parallel random numbers: as easy as 1, 2,
    3"), but with a cheap integer mixer instead of 20 cipher rounds: two words drawn from ``key``
    with ``jax.random.bits`` key two rounds of a bijective mixer over the position, so distinct
    positions get distinct hashes. Good for ranking positions at random, not for cryptography.
    Elementwise, so it shards like the leaf.
    """
    k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
    x = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _mix32(_mix32(x ^ k0) + k1)


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
    leaf; it runs only on topology-update steps. Ties are ordered by flat index. (For selection,
    :func:`jaxsparse.lamp_pruning` needs only each layer's count, which it finds from histograms
    without sorting: :func:`jaxsparse.pruning.lamp_budgets`.)
    """
    del grad, key
    w2 = jnp.square(param.astype(jnp.float32)).reshape(-1)
    order = jnp.argsort(w2, stable=True)
    sorted_w2 = w2[order]
    tail = jnp.cumsum(sorted_w2[::-1])[::-1]  # sum of w^2 over this and all larger weights
    sorted_score = jnp.where(tail > 0, sorted_w2 / jnp.where(tail > 0, tail, 1.0), 0.0)
    return jnp.zeros_like(w2).at[order].set(sorted_score).reshape(param.shape)

"""Exact top-k selection with static shapes and without sorting.

Every topology update comes down to "keep the ``k`` entries with the largest score", per leaf or
over several leaves at once (global pruning). Sorting a 4M-entry tensor on CPU costs hundreds of
milliseconds (and ``lax.top_k`` with a large ``k`` is a sort), which is why a topology update in
other libraries costs ~100 ordinary steps. Here the k-th largest score is found by a radix
select over histograms instead:

1. Scores are mapped to ``uint32`` keys whose integer order is the float order.
2. A histogram of the keys' top 16 bits (one scatter-add pass) locates the bucket holding the
   k-th largest key and how many keys lie above that bucket.
3. A histogram of the low 16 bits of the keys in that bucket (a second pass) gives the key
   itself. The number of passes is fixed (2, or 3-4 with narrower digits when there are very
   many groups), so there is no data-dependent loop.
4. One compare pass builds the mask. Entries tied at the threshold are kept lowest flat index
   first (leaves in the order given): when ties straddle the threshold, the same radix select
   runs on position keys of the tied entries, under ``lax.cond`` so it costs nothing otherwise.

Leaves can be partitioned into groups that each keep their own ``k`` (one group: global
pruning; one group per leaf: per-layer budgets); all groups share the same passes, so a model
with hundreds of leaves compiles a handful of scatters, not hundreds of searches.

The histograms are scatter-adds that XLA partitions across devices (partial histograms and a
sum), so sharded scores are never gathered onto one device (DESIGN.md invariant 7).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["score_keys", "select_top_k", "top_k_masks", "top_k_masks_per_leaf", "top_k_masks_nested", "top_k_mask"]

_MAX_BINS = 1 << 22  # bound on groups x bins per histogram (16 MiB of int32)


def score_keys(scores: jax.Array) -> jax.Array:
    """Map float scores to ``uint32`` keys with the same order; NaN becomes the lowest key."""
    x = scores.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(jnp.isnan(x), jnp.uint32(0), keys)


class _Groups:
    """Leaves partitioned into groups that each keep their own k (static bookkeeping)."""

    def __init__(self, sizes: Sequence[int], group_of: Sequence[int]):
        self.group_of = list(group_of)
        self.n = max(self.group_of) + 1
        self.members = [[i for i, g in enumerate(self.group_of) if g == gi] for gi in range(self.n)]
        self.totals = [sum(sizes[i] for i in m) for m in self.members]

    def reduce(self, per_leaf):
        """Sum per-leaf scalars into a (groups,) vector."""
        return jnp.stack([sum(per_leaf[i] for i in m) for m in self.members])

    def digit_widths(self) -> list[int]:
        """Bits per radix pass: as wide as the histogram budget allows for this many groups."""
        width = 16
        while width > 8 and self.n << width > _MAX_BINS:
            width -= 1
        widths = []
        while sum(widths) < 32:
            widths.append(min(width, 32 - sum(widths)))
        return widths


def _histogram(keys, groups: _Groups, shift: int, width: int, prefix):
    """Per group, counts of the digit ``(key >> shift) & (2**width - 1)`` among keys whose bits
    above the digit equal ``prefix``'s; shape ``(groups, 2**width)``."""
    bins = 1 << width
    if shift + width == 32 and len({id(u) for u in keys}) < len(keys):
        # First digit of an array searched by several groups (nested selections): one pass.
        return _shared_first_histogram(keys, groups, shift, width)
    # Non-matching keys are counted in a spare histogram (the last one) by their own digit:
    # sending them all to one bin would serialise the scatter on that address.
    hist = jnp.zeros((groups.n + 1) * bins, jnp.int32)
    for u, g in zip(keys, groups.group_of):
        digit = ((u >> shift) & jnp.uint32(bins - 1)).astype(jnp.int32)
        index = digit + g * bins
        if shift + width < 32:
            matches = (u >> (shift + width)) == (prefix[g] >> (shift + width))
            index = jnp.where(matches, index, digit + groups.n * bins)
        hist = hist.at[index].add(1)  # no reshape: a flattened sharded array would be gathered
    return hist[: groups.n * bins].reshape(groups.n, bins)


def _shared_first_histogram(keys, groups: _Groups, shift: int, width: int):
    """Top-digit histograms per group, counting each distinct array once."""
    bins = 1 << width
    per_array = {}
    for u in keys:
        if id(u) not in per_array:
            digit = (u >> shift).astype(jnp.int32)
            per_array[id(u)] = jnp.zeros(bins, jnp.int32).at[digit].add(1)
    rows = [sum(per_array[id(keys[i])] for i in members) for members in groups.members]
    return jnp.stack(rows)


def _kth_largest_keys(keys, ks, groups: _Groups):
    """Per group, the k-th largest key (``1 <= k <= group total``) by radix select.

    Returns ``(t, keep_equal, n_equal)``: the key, how many entries equal to it are among the
    top k, and how many entries equal it in all.
    """
    prefix = jnp.zeros(groups.n, jnp.uint32)
    rank = ks  # rank of the answer among the keys that share the prefix, from the top
    shift = 32
    for width in groups.digit_widths():
        shift -= width
        hist = _histogram(keys, groups, shift, width, prefix)
        at_or_above = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # keys with digit >= d
        digit = jnp.sum(at_or_above >= rank[:, None], axis=1, dtype=jnp.int32) - 1
        above = jnp.take_along_axis(at_or_above, jnp.minimum(digit + 1, (1 << width) - 1)[:, None], axis=1)[:, 0]
        above = jnp.where(digit + 1 < (1 << width), above, 0)
        rank = rank - above
        equal = jnp.take_along_axis(hist, digit[:, None], axis=1)[:, 0]
        prefix = prefix | (digit.astype(jnp.uint32) << shift)
    return prefix, rank, equal


def _break_ties(keys, t, keep_equal, groups: _Groups):
    """Keep keys > t, and the first ``keep_equal`` keys == t by position (leaf order, then flat
    index), found by the same radix select on keys that decrease with position."""
    offsets = [sum(keys[j].size for j in groups.members[g] if j < i) for i, g in enumerate(groups.group_of)]
    position_keys = []  # group total - position for tied entries (>= 1), 0 for the others
    for u, g, offset in zip(keys, groups.group_of, offsets):
        position = lax.iota(jnp.uint32, u.size).reshape(u.shape) + jnp.uint32(offset)
        position_keys.append(jnp.where(u == t[g], jnp.uint32(groups.totals[g]) - position, jnp.uint32(0)))
    cut, _, _ = _kth_largest_keys(position_keys, jnp.maximum(keep_equal, 1), groups)
    return [
        (u > t[g]) | ((p >= cut[g]) & (keep_equal[g] > 0))
        for u, p, g in zip(keys, position_keys, groups.group_of)
    ]


def select_top_k(scores: Sequence[jax.Array], ks, group_of: Sequence[int]) -> list[jax.Array]:
    """Exact top-k masks for leaves partitioned into groups, each group keeping its own ``ks[g]``.

    ``group_of[i]`` is the group (0..G-1) of ``scores[i]``; ``ks`` has one entry per group,
    clipped to ``[0, group size]``. :func:`top_k_masks` (one group) and
    :func:`top_k_masks_per_leaf` (a group per leaf) are the common cases.
    """
    scores = list(scores)
    if not scores:
        return []
    nonempty = [i for i, x in enumerate(scores) if x.size > 0]
    if len(nonempty) < len(scores):  # empty arrays select nothing; search the others
        masks = [jnp.zeros(x.shape, bool) for x in scores]
        if nonempty:
            ks = jnp.asarray(ks, jnp.int32).reshape(-1)
            used = sorted({group_of[i] for i in nonempty})
            renumber = {g: j for j, g in enumerate(used)}
            found = select_top_k([scores[i] for i in nonempty], ks[jnp.array(used)], [renumber[group_of[i]] for i in nonempty])
            for i, m in zip(nonempty, found):
                masks[i] = m
        return masks
    return _select_keys([score_keys(s) for s in scores], ks, group_of)


def _select_keys(keys, ks, group_of):
    groups = _Groups([int(u.size) for u in keys], group_of)
    totals = jnp.array(groups.totals, jnp.int32)
    ks = jnp.clip(jnp.asarray(ks, jnp.int32).reshape(groups.n), 0, totals)
    if not any(u.size for u in keys):
        return [jnp.zeros(u.shape, bool) for u in keys]
    t, keep_equal, n_equal = _kth_largest_keys(keys, jnp.maximum(ks, 1), groups)
    t = jnp.where(ks == 0, jnp.uint32(0xFFFFFFFF), t)  # no key reaches it (+inf maps below)
    keep_equal = jnp.where(ks == 0, 0, keep_equal)
    at_or_above = [u >= t[g] for u, g in zip(keys, groups.group_of)]
    exact = (keep_equal == n_equal) | (ks == 0)
    return lax.cond(jnp.all(exact), lambda: at_or_above, lambda: _break_ties(keys, t, keep_equal, groups))


def top_k_masks(scores: Sequence[jax.Array], k) -> list[jax.Array]:
    """Boolean masks keeping exactly the ``k`` largest entries over all ``scores`` arrays jointly.

    Args:
      scores: arrays of any shapes (cast to float32). NaN counts as the smallest score.
      k: number of entries to keep, a Python int or a traced integer scalar; values outside
        ``[0, total size]`` are clipped.

    Returns:
      One boolean array per score array, with exactly ``clip(k, 0, total)`` True entries in all.
      Ties at the threshold are broken deterministically: lower flat index first, earlier arrays
      first. Shapes are static, so this jits, vmaps and runs inside ``lax.cond``.
    """
    scores = list(scores)
    return select_top_k(scores, jnp.reshape(jnp.asarray(k), (1,)), [0] * len(scores))


def top_k_masks_per_leaf(scores: Sequence[jax.Array], ks) -> list[jax.Array]:
    """Like :func:`top_k_mask` on each array with its own ``ks[i]``, all in the same passes."""
    scores = list(scores)
    if not scores:
        return []
    return select_top_k(scores, jnp.stack([jnp.asarray(k, jnp.int32) for k in ks]), list(range(len(scores))))


def top_k_masks_nested(scores: jax.Array, ks: Sequence) -> list[jax.Array]:
    """Masks of the ``ks[j]`` largest entries of one array, for several ``k`` at once.

    Each mask is exactly ``top_k_mask(scores, ks[j])`` (so they are nested); the histogram of
    the top digit is computed once for all of them. Dynamic sparse training encodes its drop
    and grow sets as the top ``n_keep`` and top ``n_active + n_grow`` of one banded score array.
    """
    ks = list(ks)
    if not ks:
        return []
    keys = score_keys(scores)  # one array object shared by every group
    return _select_keys([keys] * len(ks), jnp.stack([jnp.asarray(k, jnp.int32) for k in ks]), list(range(len(ks))))


def top_k_mask(scores: jax.Array, k) -> jax.Array:
    """:func:`top_k_masks` for a single array: a mask with exactly ``k`` True entries."""
    return top_k_masks([scores], k)[0]

"""Exact top-k selection with static shapes and without sorting.

Every topology update comes down to "keep the ``k`` eligible entries with the largest score", per
leaf or over several leaves at once (global pruning). Sorting a 4M-entry tensor on CPU costs
hundreds of milliseconds (and ``lax.top_k`` with a large ``k`` is a sort), which is why a topology
update in other libraries costs ~100 ordinary steps. Here the k-th largest score is found by a
radix select over histograms instead:

1. Scores are mapped to ``uint32`` keys whose integer order is the float order (:func:`score_keys`):
   NaN just below -inf, and entries outside ``where`` (ineligible) below everything, at key 0.
   Callers mark the entries that may be chosen with ``where`` rather than with -inf scores, so
   an eligible entry scored NaN still ranks above every ineligible one.
2. A histogram of the keys' top 16 bits (one scatter-add pass) locates the bucket holding the
   k-th largest key and how many keys lie above that bucket.
3. A histogram of the low 16 bits of the keys in that bucket (a second pass) gives the key
   itself. The number of passes is fixed (2, or 3-4 with narrower digits when there are very
   many groups), so there is no data-dependent loop.
4. One compare pass builds the mask, ineligible keys excluded, so an ineligible entry is never
   selected (``k`` beyond the eligible count selects every eligible entry). Entries tied at the
   threshold are kept lowest flat index first (leaves in the order given): when ties straddle
   the threshold (common in large float32 arrays, which repeat values), each leaf's share of
   the tied places is found from the tied counts of its rows (two reductions and a compare,
   :func:`_first_true`), under ``lax.cond`` so it costs nothing otherwise.

Leaves can be partitioned into groups that each keep their own ``k`` (one group: global
pruning; one group per leaf: per-layer budgets); all groups share the same passes, so a model
with hundreds of leaves compiles a handful of scatters, not hundreds of searches.

**Counts of any model size.** A leaf has fewer than 2**31 entries (:func:`check_leaf_size`), so
its histograms are exact ``int32`` scatters. A group may hold far more (global pruning of an LLM):
its leaves are then spread over several histogram rows of fewer than 2**31 entries each, and
the small ``(groups, bins)`` histograms, their cumulative sums, ``k`` and the ranks are exact
64-bit :mod:`jaxsparse.counts`. Tied places are shared out over a group's leaves in order with
exact counts, and positions count within a leaf, so tie order stays exact past 2**32 positions.
When every group fits one row (every ordinary model) the counts are narrow and this is plain
32-bit arithmetic; the choice is static.

**Two algorithms.** :func:`top_k_per_column` (SRigL's per-neuron selection: many short columns,
each with its own ``k``) builds each column's threshold bit by bit with 32 compare-and-count
passes instead: for many small columns a reduction per bit is cheaper than scattering into a
histogram row per column, while for large arrays the two histogram passes win.

The histograms are scatter-adds that XLA partitions across devices (partial histograms and a
sum), so sharded scores are never gathered onto one device (DESIGN.md invariant 7).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse import counts

__all__ = [
    "score_keys", "select_top_k", "top_k_masks", "top_k_masks_per_leaf", "top_k_masks_nested", "top_k_mask",
    "top_k_per_column", "check_leaf_size", "MAX_LEAF_SIZE",
]

MAX_LEAF_SIZE = 2**31 - 1  # entries of one array: its counts, histograms and positions are 32-bit
_ROW_SIZE = MAX_LEAF_SIZE  # entries counted by one int32 histogram row
_MAX_BINS = 1 << 22  # bound on rows x bins per histogram (16 MiB of int32)
# Keys below that of -inf (0x007FFFFF) come only from NaN bit patterns, so two are free to put
# NaN lowest among the scores and ineligible entries below every score.
_INELIGIBLE, _NAN = 0, 1


def check_leaf_size(name, shape) -> None:
    """Raise a ValueError naming the leaf when an array of ``shape`` has more than
    :data:`MAX_LEAF_SIZE` (``2**31 - 1``) entries, the most a leaf can have for selection.

    Counts over many leaves have no such limit (see the module docstring). ``name`` is the leaf's
    path for the message, or None for an anonymous score array.
    """
    size = math.prod(int(d) for d in shape)
    if size > MAX_LEAF_SIZE:
        what = "a score array" if name is None else f"leaf {name!r}"
        raise ValueError(
            f"{what} of shape {tuple(shape)} has {size} entries; selection supports at most "
            f"2**31 - 1 = {MAX_LEAF_SIZE} entries per leaf (split it into smaller leaves)"
        )


def score_keys(scores: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Map float scores to ``uint32`` keys with the same order; NaN gets the lowest key of a
    score (just below -inf's), and entries outside ``where`` (a bool array like ``scores``; None:
    all eligible) get a key below every score's."""
    x = scores.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    keys = jnp.where(jnp.isnan(x), jnp.uint32(_NAN), keys)
    return keys if where is None else jnp.where(where, keys, jnp.uint32(_INELIGIBLE))


class _Groups:
    """Leaves partitioned into groups that each keep their own k, and the histogram rows that
    count them (static bookkeeping).

    A row counts leaves of one group, fewer than 2**31 entries in all, so its ``int32``
    histogram is exact. A group gets several rows only when it is larger; then the selection is
    *wide*: the rows' histograms are summed per group into exact 64-bit counts.
    """

    def __init__(self, sizes: Sequence[int], group_of: Sequence[int]):
        self.group_of = list(group_of)
        self.n = max(self.group_of) + 1
        self.members = [[i for i, g in enumerate(self.group_of) if g == gi] for gi in range(self.n)]
        self.totals = [sum(sizes[i] for i in m) for m in self.members]
        # Rows: consecutive leaves of one group; a leaf's entries sit at row positions
        # offset[i] ... offset[i] + size - 1.
        self.row_of, self.offset, self.row_group, self.row_sizes = [0] * len(sizes), [0] * len(sizes), [], []
        for g, members in enumerate(self.members):
            self.row_group.append(g)
            self.row_sizes.append(0)
            for i in members:
                if self.row_sizes[-1] and self.row_sizes[-1] + sizes[i] > _ROW_SIZE:
                    self.row_group.append(g)
                    self.row_sizes.append(0)
                self.row_of[i], self.offset[i] = len(self.row_group) - 1, self.row_sizes[-1]
                self.row_sizes[-1] += sizes[i]
        self.wide = len(self.row_group) > self.n

    def group_counts(self, per_row: jax.Array) -> counts.Count:
        """Histograms of the rows ``(rows, bins)`` summed per group: narrow counts when every
        group is one row (no count of it reaches 2**31), exact wide sums otherwise."""
        if not self.wide:
            return counts.narrow(per_row)
        return counts.sum(per_row, np.array(self.row_group), self.n)

    def digit_widths(self) -> list[int]:
        """Bits per radix pass: as wide as the histogram budget allows for this many rows."""
        width = 16
        while width > 8 and len(self.row_group) << width > _MAX_BINS:
            width -= 1
        widths = []
        while sum(widths) < 32:
            widths.append(min(width, 32 - sum(widths)))
        return widths


def _at(x: counts.Count, index) -> counts.Count:
    return jax.tree.map(lambda w: w[index], x)


def _histogram(keys, groups: _Groups, shift: int, width: int, prefix, shared: bool) -> counts.Count:
    """Per group, counts of the digit ``(key >> shift) & (2**width - 1)`` among keys whose bits
    above the digit equal ``prefix``'s; shape ``(groups, 2**width)``.

    ``shared``: every group searches the one array ``keys[0]`` (nested selections), so the
    first digit's histogram is one pass for all of them.
    """
    bins = 1 << width
    if shared and shift + width == 32:
        row = jnp.zeros(bins, jnp.int32).at[(keys[0] >> shift).astype(jnp.int32)].add(1)
        return counts.narrow(jnp.broadcast_to(row, (groups.n, bins)))
    rows = len(groups.row_group)
    # Non-matching keys are counted in a spare histogram (the last one) by their own digit:
    # sending them all to one bin would serialise the scatter on that address.
    hist = jnp.zeros((rows + 1) * bins, jnp.int32)
    for u, r, g in zip(keys, groups.row_of, groups.group_of):
        digit = ((u >> shift) & jnp.uint32(bins - 1)).astype(jnp.int32)
        index = digit + r * bins
        if shift + width < 32:
            matches = (u >> (shift + width)) == (prefix[g] >> (shift + width))
            index = jnp.where(matches, index, digit + rows * bins)
        hist = hist.at[index].add(1)  # no reshape: a flattened sharded array would be gathered
    return groups.group_counts(hist[: rows * bins].reshape(rows, bins))


def _locate(hist: counts.Count, rank: counts.Count):
    """Per group (a row of ``hist``, ``(groups, bins)``), the digit holding the ``rank``-th
    largest key (``1 <= rank <= row total``), that key's rank among the keys with this digit, and
    how many keys have it."""
    bins = hist.lo.shape[1]
    at_or_above = counts.cumsum(hist, axis=1, reverse=True)  # keys with digit >= d
    digit = jnp.sum(counts.ge(at_or_above, _at(rank, (slice(None), None))), axis=1, dtype=jnp.int32) - 1
    next_digit = jnp.minimum(digit + 1, bins - 1)[:, None]
    above = _at(counts.take_along_axis(at_or_above, next_digit, axis=1), (slice(None), 0))
    above = counts.where(digit + 1 < bins, above, 0)
    equal = _at(counts.take_along_axis(hist, digit[:, None], axis=1), (slice(None), 0))
    return digit, counts.sub(rank, above), equal


def _kth_largest_keys(keys, ks: counts.Count, groups: _Groups, shared: bool = False):
    """Per group, the k-th largest key (``1 <= k <= group total``) by radix select.

    Returns ``(t, keep_equal, n_equal)``: the key, how many entries equal to it are among the
    top k, and how many entries equal it in all (counts).
    """
    prefix = jnp.zeros(groups.n, jnp.uint32)
    rank = ks  # rank of the answer among the keys that share the prefix, from the top
    shift = 32
    for width in groups.digit_widths():
        shift -= width
        digit, rank, equal = _locate(_histogram(keys, groups, shift, width, prefix, shared), rank)
        prefix = prefix | (digit.astype(jnp.uint32) << shift)
    return prefix, rank, equal


def _tie_quotas(keep_equal: counts.Count, groups: _Groups, tied) -> list:
    """Per leaf (int32), how many of the entries tied at its group's threshold it keeps: the
    leaves of group ``g`` take its ``keep_equal[g]`` tied places in order, each at most its
    ``tied(i)`` tied entries. A group's last leaf takes what is left, uncounted."""
    quota, left = [], {}
    for i, g in enumerate(groups.group_of):
        members = groups.members[g]
        if i == members[0]:
            left[g] = _at(keep_equal, g)
        take = left[g]
        if i != members[-1]:
            take = counts.minimum(left[g], tied(i))
            left[g] = counts.sub(left[g], take)
        quota.append(counts.to_int32(take))
    return quota


def _replicated_sum(values, index, size: int) -> jax.Array:
    """``values`` (int32) summed into ``size`` bins by ``index`` (an int32 array like ``values``).
    A scatter-add into a fresh array: XLA partitions it into partial sums and an all-reduce, so a
    sharded ``values`` is never gathered (a cumulative sum over a sharded axis would be)."""
    return jnp.zeros(size, jnp.int32).at[index].add(values)


def _first_true(mask: jax.Array, k) -> jax.Array:
    """The first ``k`` True entries of ``mask`` in flat order (``0 <= k <= mask.sum()``), exact.

    Three passes of reductions and compares instead of a position radix select (two scatters):
    the True count of every row (the last axis), a cumulative sum over rows to find the row where
    the ``k``-th lies, the True entries of that row by column, and a cumulative sum over them to
    find its column.
    """
    if mask.ndim == 0:
        return mask & (k > 0)
    lead, width = mask.shape[:-1], mask.shape[-1]
    n_rows = math.prod(lead)
    row = jnp.zeros(lead, jnp.int32)  # flat index of each row, built from iotas (no reshape)
    for axis, stride in enumerate(np.cumprod((1,) + lead[::-1])[::-1][1:]):
        row = row + lax.broadcasted_iota(jnp.int32, lead, axis) * int(stride)
    per_row = _replicated_sum(jnp.sum(mask, axis=-1, dtype=jnp.int32), row, n_rows)
    through = jnp.cumsum(per_row)
    cut_row = jnp.sum(through < k, dtype=jnp.int32)  # the row holding the k-th True entry
    need = k - (through[jnp.minimum(cut_row, n_rows - 1)] - per_row[jnp.minimum(cut_row, n_rows - 1)])
    in_cut = jnp.sum(jnp.where((row == cut_row)[..., None], mask, False), axis=tuple(range(len(lead))), dtype=jnp.int32)
    per_col = _replicated_sum(in_cut, lax.iota(jnp.int32, width), width)
    cut_col = jnp.sum(jnp.cumsum(per_col) < need, dtype=jnp.int32)
    column = lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    before = (row[..., None] < cut_row) | ((row[..., None] == cut_row) & (column <= cut_col))
    return mask & before & (k > 0)


def _break_ties(keys, t, keep_equal: counts.Count, groups: _Groups):
    """Keep keys > t, and the first ``keep_equal`` keys == t of each group by position (leaf
    order, then flat index).

    The group's leaves take its tied places in order, each as many as it has tied entries
    (exact counts, so a group may span any number of positions); each leaf's first ones are
    found by :func:`_first_true`.
    """
    tied = [u == t[g] for u, g in zip(keys, groups.group_of)]
    quota = _tie_quotas(keep_equal, groups, lambda i: jnp.sum(tied[i], dtype=jnp.int32))
    return [(u > t[g]) | _first_true(x, q) for u, g, x, q in zip(keys, groups.group_of, tied, quota)]


def _eligibility(where, scores, what: str = "scores"):
    """``where`` as a list aligned with ``scores`` (None: all eligible), shapes checked."""
    if where is None:
        return None
    where = [where] if not isinstance(where, (list, tuple)) else list(where)
    if len(where) != len(scores):
        raise ValueError(f"where has {len(where)} arrays for {len(scores)} {what} arrays")
    for w, s in zip(where, scores):
        if tuple(jnp.shape(w)) != tuple(s.shape):
            raise ValueError(f"where of shape {tuple(jnp.shape(w))} does not match {what} of shape {tuple(s.shape)}")
    return [jnp.asarray(w, bool) for w in where]


def select_top_k(scores: Sequence[jax.Array], ks, group_of: Sequence[int], where=None) -> list[jax.Array]:
    """Exact top-k masks for leaves partitioned into groups, each group keeping its own ``ks[g]``.

    ``group_of[i]`` is the group (0..G-1) of ``scores[i]``; ``ks`` has one entry per group
    (ints, an integer array, or a :class:`jaxsparse.counts.Count` for budgets of 2**31 and more),
    clipped to ``[0, group size]``. ``where`` (a bool array per score array, or None) marks the
    eligible entries: an ineligible entry is never selected, so a group with fewer eligible
    entries than ``k`` selects all of them. Among eligible entries the order is by score, NaN
    lowest, ties by leaf order then flat index. :func:`top_k_masks` (one group) and
    :func:`top_k_masks_per_leaf` (a group per leaf) are the common cases.
    """
    scores = list(scores)
    if not scores:
        return []
    where = _eligibility(where, scores)
    for s in scores:
        check_leaf_size(None, s.shape)
    nonempty = [i for i, x in enumerate(scores) if x.size > 0]
    if len(nonempty) < len(scores):  # empty arrays select nothing; search the others
        masks = [jnp.zeros(x.shape, bool) for x in scores]
        if nonempty:
            used = sorted({group_of[i] for i in nonempty})
            renumber = {g: j for j, g in enumerate(used)}
            found = select_top_k(
                [scores[i] for i in nonempty],
                jax.tree.map(lambda w: jnp.reshape(w, (-1,))[np.array(used)], counts.count(ks)),
                [renumber[group_of[i]] for i in nonempty],
                None if where is None else [where[i] for i in nonempty],
            )
            for i, m in zip(nonempty, found):
                masks[i] = m
        return masks
    keys = [score_keys(s, None if where is None else w) for s, w in zip(scores, where or scores)]
    return _select_keys(keys, ks, group_of, eligibility=where is not None)


def _select_keys(keys, ks, group_of, eligibility=False, shared=False):
    """Masks of the top ``ks`` keys per group. ``eligibility``: some keys are the ineligible key
    0, never selected. ``shared``: every group searches the one array ``keys[0]``."""
    groups = _Groups([int(u.size) for u in keys], group_of)
    if not any(u.size for u in keys):
        return [jnp.zeros(u.shape, bool) for u in keys]
    ks = jax.tree.map(lambda w: jnp.reshape(w, (groups.n,)), counts.count(ks))
    ks = counts.minimum(ks, groups.totals)
    if not groups.wide:
        ks = counts.narrow(ks)  # every group has fewer than 2**31 entries: so has every count
    t, keep_equal, n_equal = _kth_largest_keys(keys, counts.maximum(ks, 1), groups, shared)
    none = counts.eq(ks, 0)
    t = jnp.where(none, jnp.uint32(0xFFFFFFFF), t)  # no key reaches it (+inf maps below)
    keep_equal = counts.where(none, 0, keep_equal)

    def eligible_only(masks):  # ineligible entries have key 0: drop them in the same pass
        return [m & (u != _INELIGIBLE) for m, u in zip(masks, keys)] if eligibility else masks

    # No tie to break when every tied entry fits, when nothing is kept, or when the threshold is
    # the ineligible key (every eligible entry is kept, and only those).
    exact = counts.eq(keep_equal, n_equal) | none | (t == _INELIGIBLE)
    return lax.cond(
        jnp.all(exact),
        lambda: eligible_only([u >= t[g] for u, g in zip(keys, groups.group_of)]),
        lambda: eligible_only(_break_ties(keys, t, keep_equal, groups)),
    )


def top_k_masks(scores: Sequence[jax.Array], k, where=None) -> list[jax.Array]:
    """Boolean masks keeping exactly the ``k`` largest entries over all ``scores`` arrays jointly.

    Args:
      scores: arrays of any shapes (cast to float32), each of fewer than 2**31 entries (any
        number of entries in all). NaN counts as the smallest score.
      k: number of entries to keep, a Python int, a traced integer scalar or a
        :class:`jaxsparse.counts.Count`; values outside ``[0, total size]`` are clipped.
      where: None, or a bool array per score array marking the eligible entries; the others
        are never kept (with fewer than ``k`` eligible entries, all of them are kept).

    Returns:
      One boolean array per score array, with exactly ``clip(k, 0, eligible)`` True entries in
      all. Ties at the threshold are broken deterministically: lower flat index first, earlier
      arrays first. Shapes are static, so this jits, vmaps and runs inside ``lax.cond``.
    """
    scores = list(scores)
    return select_top_k(scores, jax.tree.map(lambda w: jnp.reshape(w, (1,)), counts.count(k)), [0] * len(scores), where)


def top_k_masks_per_leaf(scores: Sequence[jax.Array], ks, where=None) -> list[jax.Array]:
    """Like :func:`top_k_mask` on each array with its own ``ks[i]`` (and eligibility
    ``where[i]``), all in the same passes."""
    scores = list(scores)
    if not scores:
        return []
    return select_top_k(scores, counts.stack([counts.count(k) for k in ks]), list(range(len(scores))), where)


def top_k_masks_nested(scores: jax.Array, ks: Sequence, where=None) -> list[jax.Array]:
    """Masks of the ``ks[j]`` largest (eligible) entries of one array, for several ``k`` at once.

    Each mask is exactly ``top_k_mask(scores, ks[j], where)`` (so they are nested); the
    histogram of the top digit is computed once for all of them. Dynamic sparse training encodes
    its drop and grow sets as the top ``n_keep`` and top ``n_active + n_grow`` of one banded
    score array.
    """
    ks = list(ks)
    if not ks:
        return []
    check_leaf_size(None, scores.shape)
    where = None if where is None else _eligibility(where, [scores])[0]
    if scores.size == 0:
        return [jnp.zeros(scores.shape, bool) for _ in ks]
    keys = score_keys(scores, where)
    return _select_keys(
        [keys] * len(ks), counts.stack([counts.count(k) for k in ks]), list(range(len(ks))),
        eligibility=where is not None, shared=True,
    )


def top_k_mask(scores: jax.Array, k, where=None) -> jax.Array:
    """:func:`top_k_masks` for a single array: a mask with exactly ``k`` True entries (at most
    the number of eligible ones, with ``where``)."""
    return top_k_masks([scores], k, None if where is None else [where])[0]


def top_k_per_column(scores: jax.Array, ks, where=None) -> jax.Array:
    """Per column of ``scores`` ``(rows, columns)``, a mask of its ``ks[j]`` largest eligible
    entries (``ks`` clipped to ``[0, rows]``), exact, ties to the lowest row.

    Eligibility (``where``, a bool array like ``scores``) and NaN are as in :func:`select_top_k`.
    All columns are searched at once by building each column's k-th largest order key bit by
    bit from the top (32 compare-and-count passes, no sort, static shapes): the key ``t`` is the
    largest with at least ``k`` keys ``>= t``. Entries above ``t`` are kept, then entries equal
    to ``t`` in row order up to ``k``. For many small columns (SRigL's neurons) this beats the
    radix histograms of :func:`select_top_k`, which would need a histogram row per column.
    """
    if scores.ndim != 2:
        raise ValueError(f"top_k_per_column takes a (rows, columns) array; got shape {tuple(scores.shape)}")
    check_leaf_size(None, scores.shape)
    where = None if where is None else _eligibility(where, [scores])[0]
    keys = score_keys(scores, where)
    ks = jnp.clip(jnp.asarray(ks, jnp.int32), 0, scores.shape[0])

    def add_bit(i, prefix):
        candidate = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        enough = jnp.sum(keys >= candidate, axis=0, dtype=jnp.int32) >= ks
        return jnp.where(enough, candidate, prefix)

    threshold = lax.fori_loop(0, 32, add_bit, jnp.zeros(scores.shape[1], jnp.uint32))
    above = keys > threshold
    ties = keys == threshold
    quota = ks - jnp.sum(above, axis=0, dtype=jnp.int32)
    # The row-order cumsum costs as much as the search on CPU; it is needed only when some
    # column has more entries tied at its threshold than places left for them (a threshold at
    # the ineligible key keeps every eligible entry: eligibility below drops the others).
    fits = (jnp.sum(ties, axis=0, dtype=jnp.int32) <= quota) | (threshold == _INELIGIBLE)
    chosen = lax.cond(
        jnp.all(fits),
        lambda: above | ties,
        lambda: above | (ties & (jnp.cumsum(ties, axis=0, dtype=jnp.int32) <= quota)),
    )
    chosen = chosen & (ks > 0)
    return chosen if where is None else chosen & where


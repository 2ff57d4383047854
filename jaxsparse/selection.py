"""Exact top-k selection with static shapes and without sorting.

Every topology update comes down to "keep the ``k`` entries with the largest score", per leaf or
over several leaves at once (global pruning). Sorting a 4M-entry tensor on CPU costs hundreds of
milliseconds (and ``lax.top_k`` with a large ``k`` is a sort), which is why a topology update in
other libraries costs ~100 ordinary steps. Here the k-th largest score is found by a threshold
search instead, each probe being one fused compare-and-count pass over the scores:

1. Scores are mapped to ``uint32`` keys whose integer order is the float order.
2. A strided sample of the scores gives two guesses bracketing the k-th largest key.
3. A safeguarded interpolation search (regula falsi on the count, falling back to bisection of
   the key range whenever a probe fails to halve the bracket) narrows ``[lo, hi)`` until the
   answer is pinned: the bracket is one key wide, or exactly ``k`` keys lie at or above ``lo``
   (the answer is then the smallest key >= ``lo``), or exactly ``k - 1`` lie at or above ``hi``
   (the answer is the largest key < ``hi``). Both last cases finish with one min/max pass.

On smooth score distributions this takes ~5 passes; the worst case (adversarial gaps) is bounded
by the bisection fallback, ~64 passes, still with static shapes. Entries tied at the threshold
are kept lowest flat index first (leaves in the order given), which costs a cumulative sum and so
runs under ``lax.cond`` only when ties straddle the threshold.

All reductions are sums/min/max that XLA partitions across devices, so sharded scores are never
gathered onto one device (DESIGN.md invariant 7); only the rare tie-break's cumsum communicates.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["score_keys", "select_top_k", "top_k_masks", "top_k_masks_per_leaf", "top_k_masks_nested", "top_k_mask"]


_UMAX = 0xFFFFFFFF
_SAMPLE = 16384  # per-group size of the strided sample used to guess the threshold
_MAX_PROBES = 100  # interpolation + bisection needs at most ~66; this only bounds pathological input


class _Brackets(NamedTuple):
    """Search state per group: count(keys >= lo) = n_lo >= k > n_hi = count(keys >= hi)."""

    lo: jax.Array
    n_lo: jax.Array
    f_lo: jax.Array  # interpolation weight of lo (n_lo - target, halved by Illinois steps)
    hi: jax.Array
    n_hi: jax.Array
    f_hi: jax.Array
    it: jax.Array
    bisect: jax.Array  # next probe bisects the key range
    raised_lo: jax.Array  # which end the last probe moved


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

    def reduce(self, per_leaf, op=sum):
        """Combine per-leaf scalars into a (groups,) vector."""
        return jnp.stack([op([per_leaf[i] for i in m]) for m in self.members])


def _sample_guesses(keys, ks, groups: _Groups):
    """Per group, two keys from a strided sample likely bracketing its k-th largest: (below, above)."""
    samples = []
    for members, total in zip(groups.members, groups.totals):
        stride = max(1, total // _SAMPLE)
        samples.append(jnp.concatenate([keys[i].reshape(-1)[::stride] for i in members]))
    width = max(s.shape[0] for s in samples)
    sizes = jnp.array([s.shape[0] for s in samples], jnp.float32)
    # Pad with the lowest key: padding sorts first and the ranks below count from the top.
    padded = jnp.stack([jnp.pad(s, (width - s.shape[0], 0)) for s in samples])
    ordered = jnp.sort(padded, axis=1)
    rank = ks.astype(jnp.float32) * (sizes / jnp.array(groups.totals, jnp.float32))
    margin = 3.0 * jnp.sqrt(rank * jnp.maximum(1.0 - rank / sizes, 0.0)) + 2.0
    lowest = width - sizes.astype(jnp.int32)

    def at_rank(r):
        index = jnp.clip(width - r.astype(jnp.int32), lowest, width - 1)
        return jnp.take_along_axis(ordered, index[:, None], axis=1)[:, 0]

    return at_rank(jnp.ceil(rank + margin)), at_rank(jnp.floor(rank - margin))


def _count_ge(keys, c, groups: _Groups):
    return groups.reduce([jnp.sum(u >= c[g], dtype=jnp.int32) for u, g in zip(keys, groups.group_of)])


def _kth_largest_keys(keys, ks, groups: _Groups, bracket=None, guesses=None, count=_count_ge):
    """Per group, the k-th largest key (``1 <= k <= group total``), all groups in one search loop.

    ``bracket``: optional initial ``(lo, n_lo, hi, n_hi)`` with ``n_lo >= k > n_hi`` (default: the
    whole key range). ``guesses``: optional ``(below, above)`` keys to probe first.
    """
    one = jnp.uint32(1)
    target = ks.astype(jnp.float32) - 0.5  # aim between the k-th and (k+1)-th largest

    def pinned(s):
        return (s.hi - s.lo <= one) | (s.n_lo == ks) | (s.n_hi == ks - 1)

    def cond(s):
        return jnp.any(~pinned(s)) & (s.it < _MAX_PROBES)

    def probe(s):
        # Regula falsi on the count with the Illinois modification (halve the weight of an end
        # kept twice in a row) so brackets close from both sides; bisection of the key range
        # whenever interpolation fails to halve the count range; sample guesses first.
        width = s.hi - s.lo  # >= 2 where not pinned; uint32 arithmetic spans the full key range
        frac = s.f_lo / jnp.where(s.f_lo > s.f_hi, s.f_lo - s.f_hi, 1.0)
        offset = jnp.clip(width.astype(jnp.float32) * frac, 1.0, 4294967040.0).astype(jnp.uint32)
        interp = s.lo + jnp.clip(offset, one, jnp.maximum(width, 2 * one) - one)
        if guesses is None:
            use_guess, guess = jnp.zeros(groups.n, bool), s.lo
        else:
            guess = jnp.where(s.it == 0, guesses[0], guesses[1])
            use_guess = (s.it < 2) & (guess > s.lo) & (guess < s.hi)
        c = jnp.where(use_guess, guess, jnp.where(s.bisect, s.lo + width // 2, interp))
        n = count(keys, c, groups)
        live = ~pinned(s)
        raise_lo = n >= ks
        f = n.astype(jnp.float32) - target
        again = raise_lo == s.raised_lo  # the same end moved twice: halve the other end's weight
        new = _Brackets(
            lo=jnp.where(raise_lo, c, s.lo),
            n_lo=jnp.where(raise_lo, n, s.n_lo),
            f_lo=jnp.where(raise_lo, f, jnp.where(again, 0.5 * s.f_lo, s.f_lo)),
            hi=jnp.where(raise_lo, s.hi, c),
            n_hi=jnp.where(raise_lo, s.n_hi, n),
            f_hi=jnp.where(raise_lo, jnp.where(again, 0.5 * s.f_hi, s.f_hi), f),
            it=s.it + 1,
            # Interpolation that lands close to the target on one side leaves the far end in
            # place, so the count range need not halve while the search converges fast: bisect
            # only after the guesses and six interpolations (worst case ~8 + 66 probes).
            bisect=(2 * (jnp.where(raise_lo, n, s.n_lo) - jnp.where(raise_lo, s.n_hi, n)) > (s.n_lo - s.n_hi))
            & ~s.bisect
            & ~use_guess
            & (s.it >= 8),
            raised_lo=raise_lo,
        )
        return jax.tree.map(lambda a, b: jnp.where(live, a, b) if a.ndim else a, new, s)

    if bracket is None:
        totals = jnp.array(groups.totals, jnp.int32)
        bracket = (jnp.zeros(groups.n, jnp.uint32), totals, jnp.full(groups.n, _UMAX, jnp.uint32), jnp.zeros(groups.n, jnp.int32))
    lo, n_lo, hi, n_hi = bracket
    init = _Brackets(
        lo=lo, n_lo=n_lo, f_lo=n_lo.astype(jnp.float32) - target,
        hi=hi, n_hi=n_hi, f_hi=n_hi.astype(jnp.float32) - target,
        it=jnp.int32(0), bisect=jnp.zeros(groups.n, bool), raised_lo=jnp.zeros(groups.n, bool),
    )
    s = lax.while_loop(cond, probe, init)
    lo, hi = s.lo, s.hi
    # Pinned by a count: the answer is the nearest key inside the bracket (one min/max pass).
    need_min = (hi - lo > one) & (s.n_lo == ks)
    need_max = (hi - lo > one) & ~need_min

    def smallest_at_or_above():
        per_leaf = [jnp.min(jnp.where(u >= lo[g], u, jnp.uint32(_UMAX))) for u, g in zip(keys, groups.group_of)]
        return groups.reduce(per_leaf, lambda xs: jnp.min(jnp.stack(xs)))

    def largest_below():
        per_leaf = [jnp.max(jnp.where(u < hi[g], u, jnp.uint32(0))) for u, g in zip(keys, groups.group_of)]
        return groups.reduce(per_leaf, lambda xs: jnp.max(jnp.stack(xs)))

    t = lo
    t = jnp.where(need_min, lax.cond(jnp.any(need_min), smallest_at_or_above, lambda: lo), t)
    t = jnp.where(need_max, lax.cond(jnp.any(need_max), largest_below, lambda: lo), t)
    return t


def _break_ties(keys, t, ks, groups: _Groups):
    """Keep keys > t, then keys == t by position (leaf order, then flat index) until k are kept.

    The tied entries get distinct keys that decrease with their position in the group, and the
    same search picks exactly the ``need`` first ones: no cumulative sum (slow on CPU and slow
    to compile), one loop for all leaves.
    """
    above = [u > t[g] for u, g in zip(keys, groups.group_of)]
    ties = [u == t[g] for u, g in zip(keys, groups.group_of)]
    n_ties = groups.reduce([jnp.sum(e, dtype=jnp.int32) for e in ties])
    need = ks - groups.reduce([jnp.sum(a, dtype=jnp.int32) for a in above])
    offsets = [sum(keys[j].size for j in groups.members[g] if j < i) for i, g in enumerate(groups.group_of)]
    rank_keys = []  # group total - position: in [1, total] for tied entries, 0 for the others
    for u, eq, g, offset in zip(keys, ties, groups.group_of, offsets):
        position = lax.iota(jnp.uint32, u.size).reshape(u.shape) + jnp.uint32(offset)
        rank_keys.append(jnp.where(eq, jnp.uint32(groups.totals[g]) - position, jnp.uint32(0)))
    totals = jnp.array(groups.totals, jnp.uint32)
    bracket = (jnp.ones(groups.n, jnp.uint32), n_ties, totals + 1, jnp.zeros(groups.n, jnp.int32))
    cut = _kth_largest_keys(rank_keys, jnp.clip(need, 1, n_ties), groups, bracket)
    return [a | ((r >= cut[g]) & (need[g] > 0)) for a, r, g in zip(above, rank_keys, groups.group_of)]


def select_top_k(scores: Sequence[jax.Array], ks, group_of: Sequence[int], count=_count_ge) -> list[jax.Array]:
    """Exact top-k masks for leaves partitioned into groups, each group keeping its own ``ks[g]``.

    ``group_of[i]`` is the group (0..G-1) of ``scores[i]``; ``ks`` has one entry per group. All
    groups are searched in one loop. :func:`top_k_masks` (one group) and
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
    groups = _Groups([int(s.size) for s in scores], group_of)
    totals = jnp.array(groups.totals, jnp.int32)
    ks = jnp.clip(jnp.asarray(ks, jnp.int32).reshape(groups.n), 0, totals)
    keys = [score_keys(s) for s in scores]
    nontrivial = (ks > 0) & (ks < totals)
    ks_search = jnp.where(nontrivial, ks, 1)
    t = _kth_largest_keys(keys, ks_search, groups, guesses=_sample_guesses(keys, ks_search, groups), count=count)
    t = jnp.where(ks == 0, jnp.uint32(_UMAX), jnp.where(ks == totals, jnp.uint32(0), t))
    # No key reaches UMAX (+inf maps below it) and every key reaches 0: all False / all True.
    at_or_above = [u >= t[g] for u, g in zip(keys, groups.group_of)]
    exact = groups.reduce([jnp.sum(m, dtype=jnp.int32) for m in at_or_above]) == ks
    return lax.cond(jnp.all(exact), lambda: at_or_above, lambda: _break_ties(keys, t, ks, groups))


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
    """Like :func:`top_k_mask` on each array with its own ``ks[i]``, in one search loop.

    Searching all leaves together compiles one loop instead of one per leaf (compile time
    matters for models with hundreds of leaves) and takes as many passes as the slowest leaf.
    """
    scores = list(scores)
    if not scores:
        return []
    return select_top_k(scores, jnp.stack([jnp.asarray(k, jnp.int32) for k in ks]), list(range(len(scores))))


def _count_ge_same_array(keys, c, groups: _Groups):
    """:func:`_count_ge` when every group searches the same array ``keys[0]``: two thresholds per
    pass, as the 16-bit halves of one ``uint32`` row sum (rows shorter than 2^16). A pass is
    memory-bound on CPU, and two sibling reductions over one array run ~4x slower than one."""
    u = keys[0]
    rows = u.reshape(-1, u.shape[-1]) if u.ndim and u.shape[-1] < 65536 else None
    counts = []
    for j in range(0, groups.n, 2):
        if rows is None or j + 1 == groups.n:
            counts += [jnp.sum(u >= c[i], dtype=jnp.int32) for i in range(j, min(j + 2, groups.n))]
            continue
        packed = jnp.sum((rows >= c[j]).astype(jnp.uint32) + ((rows >= c[j + 1]).astype(jnp.uint32) << 16), axis=1)
        counts += [jnp.sum(packed & 0xFFFF, dtype=jnp.int32), jnp.sum(packed >> 16, dtype=jnp.int32)]
    return jnp.stack(counts)


def top_k_masks_nested(scores: jax.Array, ks: Sequence) -> list[jax.Array]:
    """Masks of the ``ks[j]`` largest entries of one array, for several ``k`` at once.

    The masks are nested (a larger ``k``'s mask contains a smaller one's) and each is exactly
    :func:`top_k_mask` ``(scores, ks[j])``, ties to the lowest flat index. All thresholds are
    found in one search loop whose passes read the array once for two thresholds, so two
    selections cost little more than one (e.g. dynamic sparse training's drop and grow sets,
    encoded as the top ``d`` and top ``n + d`` of one score array).
    """
    ks = list(ks)
    if scores.size == 0:
        return [jnp.zeros(scores.shape, bool) for _ in ks]
    return select_top_k([scores] * len(ks), jnp.stack([jnp.asarray(k, jnp.int32) for k in ks]), list(range(len(ks))), count=_count_ge_same_array)


def top_k_mask(scores: jax.Array, k) -> jax.Array:
    """:func:`top_k_masks` for a single array: a mask with exactly ``k`` True entries."""
    return top_k_masks([scores], k)[0]

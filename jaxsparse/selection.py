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

__all__ = ["score_keys", "top_k_masks", "top_k_mask"]


class _Bracket(NamedTuple):
    """Search state: count(keys >= lo) = n_lo >= k > n_hi = count(keys >= hi)."""

    lo: jax.Array
    n_lo: jax.Array
    f_lo: jax.Array  # interpolation weight of lo (n_lo - target, halved by Illinois steps)
    hi: jax.Array
    n_hi: jax.Array
    f_hi: jax.Array
    it: jax.Array
    bisect: jax.Array  # next probe bisects the key range
    raised_lo: jax.Array  # which end the last probe moved

_UMAX = 0xFFFFFFFF
_SAMPLE = 65536  # size of the strided sample used to guess the threshold
_MAX_PROBES = 100  # interpolation + bisection needs at most ~66; this only bounds pathological input


def score_keys(scores: jax.Array) -> jax.Array:
    """Map float scores to ``uint32`` keys with the same order; NaN becomes the lowest key."""
    x = scores.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(jnp.isnan(x), jnp.uint32(0), keys)


def _count_ge(keys, c):
    return sum(jnp.sum(u >= c, dtype=jnp.int32) for u in keys)


def _sample_guesses(keys, k, total):
    """Two keys from a strided sample that likely bracket the k-th largest: (below, above)."""
    stride = max(1, total // _SAMPLE)
    sample = jnp.sort(jnp.concatenate([u.reshape(-1)[::stride] for u in keys]))
    size = sample.shape[0]
    rank = k.astype(jnp.float32) * (size / total)  # expected rank of the answer, from the top
    margin = 3.0 * jnp.sqrt(rank * jnp.maximum(1.0 - rank / size, 0.0)) + 2.0
    below = sample[jnp.clip(size - jnp.ceil(rank + margin).astype(jnp.int32), 0, size - 1)]
    above = sample[jnp.clip(size - jnp.floor(rank - margin).astype(jnp.int32), 0, size - 1)]
    return jnp.stack([below, above])


def _kth_largest_key(keys, k, total):
    """The k-th largest key over all ``keys`` arrays, for ``1 <= k <= total``."""
    guesses = _sample_guesses(keys, k, total)
    one = jnp.uint32(1)
    target = k.astype(jnp.float32) - 0.5  # aim between the k-th and (k+1)-th largest

    def pinned(s):
        return (s.hi - s.lo <= one) | (s.n_lo == k) | (s.n_hi == k - 1)

    def cond(s):
        return ~pinned(s) & (s.it < _MAX_PROBES)

    def probe(s):
        # Regula falsi on the count with the Illinois modification (halve the weight of an end
        # kept twice in a row) so the bracket closes from both sides; bisection of the key range
        # whenever interpolation fails to halve the count range; sample guesses first.
        width = s.hi - s.lo  # >= 2 here; uint32 arithmetic handles the full key range
        frac = s.f_lo / (s.f_lo - s.f_hi)
        offset = jnp.clip(width.astype(jnp.float32) * frac, 1.0, 4294967040.0).astype(jnp.uint32)
        interp = s.lo + jnp.clip(offset, one, width - one)
        guess = guesses[jnp.minimum(s.it, 1)]
        use_guess = (s.it < 2) & (guess > s.lo) & (guess < s.hi)
        c = jnp.where(use_guess, guess, jnp.where(s.bisect, s.lo + width // 2, interp))
        n = _count_ge(keys, c)
        raise_lo = n >= k
        f = n.astype(jnp.float32) - target
        lo, n_lo = jnp.where(raise_lo, c, s.lo), jnp.where(raise_lo, n, s.n_lo)
        hi, n_hi = jnp.where(raise_lo, s.hi, c), jnp.where(raise_lo, s.n_hi, n)
        again = raise_lo == s.raised_lo  # the same end moved twice: halve the other end's weight
        f_lo = jnp.where(raise_lo, f, jnp.where(again, 0.5 * s.f_lo, s.f_lo))
        f_hi = jnp.where(raise_lo, jnp.where(again, 0.5 * s.f_hi, s.f_hi), f)
        slow = 2 * (n_lo - n_hi) > (s.n_lo - s.n_hi)
        return _Bracket(lo, n_lo, f_lo, hi, n_hi, f_hi, s.it + 1, slow & ~s.bisect & ~use_guess, raise_lo)

    n_total = jnp.int32(total)
    init = _Bracket(
        lo=jnp.uint32(0), n_lo=n_total, f_lo=n_total.astype(jnp.float32) - target,
        hi=jnp.uint32(_UMAX), n_hi=jnp.int32(0), f_hi=-target,
        it=jnp.int32(0), bisect=jnp.bool_(False), raised_lo=jnp.bool_(False),
    )
    s = lax.while_loop(cond, probe, init)
    lo, hi = s.lo, s.hi

    def smallest_at_or_above():
        return jnp.min(jnp.stack([jnp.min(jnp.where(u >= lo, u, jnp.uint32(_UMAX))) for u in keys]))

    def largest_below():
        return jnp.max(jnp.stack([jnp.max(jnp.where(u < hi, u, jnp.uint32(0))) for u in keys]))

    case = jnp.where(hi - lo <= one, 0, jnp.where(s.n_lo == k, 1, 2))
    return lax.switch(case, [lambda: lo, smallest_at_or_above, largest_below])


def _first_true(flags, quota):
    """Keep the first ``quota`` True entries of ``flags`` in flat (row-major) order.

    Avoids a cumulative sum over the whole array (slow on CPU): count per row, find the row
    holding the quota-th True from the short prefix sum of row counts, and take a prefix sum
    over that one row only.
    """
    rows = flags.reshape(-1, flags.shape[-1]) if flags.ndim else flags.reshape(1, 1)
    cum_rows = jnp.cumsum(jnp.sum(rows, axis=1, dtype=jnp.int32))
    r = jnp.sum(cum_rows < quota, dtype=jnp.int32)  # row holding the quota-th True
    before = jnp.where(r > 0, cum_rows[jnp.maximum(r - 1, 0)], 0)
    in_row = jnp.cumsum(lax.dynamic_index_in_dim(rows, jnp.minimum(r, rows.shape[0] - 1), 0, False), dtype=jnp.int32)
    c = jnp.sum(in_row < quota - before, dtype=jnp.int32)  # its column
    row_id = lax.broadcasted_iota(jnp.int32, rows.shape, 0)
    col_id = lax.broadcasted_iota(jnp.int32, rows.shape, 1)
    keep = rows & ((row_id < r) | ((row_id == r) & (col_id <= c))) & (quota > 0)
    return keep.reshape(flags.shape)


def _break_ties(keys, t, k):
    """Keep keys > t, then keys == t in flat order (leaf by leaf) until k are kept."""
    above = [u > t for u in keys]
    ties = [u == t for u in keys]
    need = k - sum(jnp.sum(a, dtype=jnp.int32) for a in above)
    masks = []
    for a, eq in zip(above, ties):
        n_eq = jnp.sum(eq, dtype=jnp.int32)
        quota = jnp.clip(need, 0, n_eq)
        masks.append(a | _first_true(eq, quota))
        need = need - quota
    return masks


def top_k_masks(scores: Sequence[jax.Array], k) -> list[jax.Array]:
    """Boolean masks keeping exactly the ``k`` largest entries over all ``scores`` arrays.

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
    if not scores:
        return []
    total = sum(int(s.size) for s in scores)
    if total == 0:
        return [jnp.zeros(s.shape, bool) for s in scores]
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
    keys = [score_keys(s) for s in scores]

    def select():
        t = _kth_largest_key(keys, jnp.maximum(k, 1), total)
        at_or_above = [u >= t for u in keys]
        n_t = sum(jnp.sum(m, dtype=jnp.int32) for m in at_or_above)
        return lax.cond(n_t == k, lambda: at_or_above, lambda: _break_ties(keys, t, k))

    def trivial():
        return [jnp.full(u.shape, k == total) for u in keys]

    return lax.cond((k == 0) | (k == total), trivial, select)


def top_k_mask(scores: jax.Array, k) -> jax.Array:
    """:func:`top_k_masks` for a single array: a mask with exactly ``k`` True entries."""
    return top_k_masks([scores], k)[0]

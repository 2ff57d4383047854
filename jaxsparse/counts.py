"""Exact wide counts: non-negative integers below 2**64 as two ``uint32`` words, without x64.

Per-leaf counts fit ``int32`` (a leaf has fewer than 2**31 entries), but a model-wide count does
not: global pruning of a 100B-parameter model pools budgets, histograms and ranks over more than
2**36 weights. JAX keeps 64-bit integers off by default (``jax_enable_x64``), so such a count is
a :class:`Count` ``(hi, lo)`` of ``uint32`` arrays worth ``hi * 2**32 + lo``, with the few exact
operations selection needs: add, subtract, compare, min/max, select, cumulative sum, gather,
exact sums of ``int32`` counts, and conversions.

**Narrow counts.** A count whose ``hi`` is ``None`` is known statically to be below 2**32, and
so is everything computed from narrow counts only: their arithmetic is plain ``uint32`` on the
``lo`` words. :func:`narrow` is the caller's promise (selection narrows its counts when every
group has fewer than 2**31 entries, since no count of a group exceeds its size), and it is what
keeps ordinary models on exactly the 32-bit arithmetic they had before wide counts existed.
Other operands (Python ints, integer arrays) take the width of the :class:`Count` they meet.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "Count", "count", "narrow", "add", "sub", "ge", "eq", "minimum", "maximum", "where",
    "cumsum", "take_along_axis", "sum", "stack", "to_int32", "to_float32", "to_numpy",
]

_WORD = 1 << 32


class Count(NamedTuple):
    """A non-negative integer array below 2**64: ``hi * 2**32 + lo``, both ``uint32`` of one shape.

    ``hi`` None: a narrow count, statically below 2**32 (see the module docstring). A pytree, so
    counts pass through ``jit``, ``lax.cond`` and ``lax.associative_scan``.
    """

    hi: jax.Array | None
    lo: jax.Array


def count(x) -> Count:
    """``x`` as a :class:`Count`: a Python int, a numpy or JAX integer, bool or floating array
    (float values must be integral), a list of any of these (stacked), or a Count (as it is).

    Negative values count as 0 (budgets computed as differences clip there). Python ints become
    constants XLA folds; an array of 32-bit integers gets a constant zero ``hi`` word.
    """
    if isinstance(x, Count):
        return x
    if isinstance(x, (list, tuple)) and not all(isinstance(v, (int, np.integer)) for v in x):
        return stack([count(v) for v in x])  # traced entries
    if isinstance(x, (int, np.integer, list, tuple)) or (isinstance(x, np.ndarray) and x.dtype.kind in "iub"):
        # Exact host arithmetic on Python ints (object arrays), whatever their size.
        v = np.maximum(np.asarray(x, dtype=object), 0)
        if np.any(v >= _WORD * _WORD):
            raise ValueError(f"counts must be below 2**64; got {x!r}")
        to_words = np.vectorize(lambda n, s: np.uint32((int(n) >> s) & (_WORD - 1)), otypes=[np.uint32])
        return Count(to_words(v, 32), to_words(v, 0))
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        # Exact for integral x below 2**64: scaling by 2**-32 is exact, and x mod 2**32 has no
        # more significant bits than x.
        x = jnp.floor(jnp.maximum(x.astype(jnp.float32), 0.0))
        hi = jnp.floor(x / np.float32(_WORD))
        return Count(hi.astype(jnp.uint32), (x - hi * np.float32(_WORD)).astype(jnp.uint32))
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.int32)
    if jnp.issubdtype(x.dtype, jnp.signedinteger):
        x = jnp.maximum(x, 0)
    if x.dtype.itemsize == 8:  # only with jax_enable_x64
        return Count((x >> 32).astype(jnp.uint32), (x & (_WORD - 1)).astype(jnp.uint32))
    return Count(jnp.zeros(x.shape, jnp.uint32), x.astype(jnp.uint32))


def narrow(x) -> Count:
    """``x`` without its ``hi`` word: the caller's promise that ``x``, and every count computed
    from it and other narrow counts, stays below 2**32 (32-bit arithmetic from then on)."""
    return Count(None, count(x).lo)


def _coerce(a, b):
    """Both operands as Counts. A non-Count statically below 2**32 (a 32-bit integer array, a
    constant) takes the width of the Count it meets, so narrow arithmetic stays narrow."""
    if not isinstance(a, Count) and isinstance(b, Count):
        b, a = _coerce(b, a)
        return a, b
    a = count(a)
    if not isinstance(b, Count):
        dtype = getattr(b, "dtype", None)
        b = count(b)
        small = isinstance(b.hi, np.ndarray) and not b.hi.any()  # a constant below 2**32
        small |= dtype is not None and np.dtype(dtype).kind in "iub" and np.dtype(dtype).itemsize <= 4
        if a.hi is None and small:
            b = Count(None, b.lo)
    return a, b


def _hi(x: Count):
    return jnp.zeros_like(x.lo) if x.hi is None else x.hi


def add(a, b) -> Count:
    """``a + b`` (exact below 2**64)."""
    a, b = _coerce(a, b)
    lo = a.lo + b.lo
    if a.hi is None and b.hi is None:
        return Count(None, lo)
    return Count(_hi(a) + _hi(b) + (lo < a.lo).astype(jnp.uint32), lo)  # carry when lo wrapped


def sub(a, b) -> Count:
    """``a - b``, for ``a >= b`` (use :func:`where` and :func:`ge` to clip at 0)."""
    a, b = _coerce(a, b)
    lo = a.lo - b.lo
    if a.hi is None and b.hi is None:
        return Count(None, lo)
    return Count(_hi(a) - _hi(b) - (a.lo < b.lo).astype(jnp.uint32), lo)  # borrow when lo wrapped


def ge(a, b) -> jax.Array:
    """``a >= b``, a bool array."""
    a, b = _coerce(a, b)
    if a.hi is None and b.hi is None:
        return a.lo >= b.lo
    ahi, bhi = _hi(a), _hi(b)
    return (ahi > bhi) | ((ahi == bhi) & (a.lo >= b.lo))


def eq(a, b) -> jax.Array:
    """``a == b``, a bool array."""
    a, b = _coerce(a, b)
    if a.hi is None and b.hi is None:
        return a.lo == b.lo
    return (_hi(a) == _hi(b)) & (a.lo == b.lo)


def where(condition, a, b) -> Count:
    """``a`` where ``condition``, else ``b`` (broadcasting like ``jnp.where``)."""
    a, b = _coerce(a, b)
    lo = jnp.where(condition, a.lo, b.lo)
    if a.hi is None and b.hi is None:
        return Count(None, lo)
    return Count(jnp.where(condition, _hi(a), _hi(b)), lo)


def minimum(a, b) -> Count:
    """Elementwise ``min(a, b)``."""
    return where(ge(a, b), b, a)


def maximum(a, b) -> Count:
    """Elementwise ``max(a, b)``."""
    return where(ge(a, b), a, b)


def cumsum(x, axis: int = 0, reverse: bool = False) -> Count:
    """Inclusive cumulative sum along ``axis`` (from the end with ``reverse``), exact.

    Narrow counts use ``jnp.cumsum``; wide ones an associative scan of :func:`add`.
    """
    x = count(x)
    if x.hi is None:
        flip = (lambda w: jnp.flip(w, axis)) if reverse else (lambda w: w)
        return Count(None, flip(jnp.cumsum(flip(x.lo), axis=axis, dtype=jnp.uint32)))
    return lax.associative_scan(add, x, reverse=reverse, axis=axis)


def take_along_axis(x, indices, axis: int) -> Count:
    """``jnp.take_along_axis`` on both words."""
    return jax.tree.map(lambda w: jnp.take_along_axis(w, indices, axis=axis), count(x))


def sum(x, segment_ids=None, num_segments: int | None = None) -> Count:  # noqa: A001 (numpy's name)
    """Exact sum over the first axis of non-negative ``int32`` values (negative ones count as 0),
    or per segment like ``jax.ops.segment_sum``; at most 2**16 values along that axis.

    The values are split into 16-bit halves, whose sums fit ``uint32`` exactly.
    """
    x = jnp.maximum(jnp.asarray(x, jnp.int32), 0).astype(jnp.uint32)
    if x.ndim == 0 or x.shape[0] > 1 << 16:
        raise ValueError(f"counts.sum adds up to 2**16 int32 values along the first axis; got shape {x.shape}")
    if segment_ids is None:
        total = lambda v: jnp.sum(v, axis=0, dtype=jnp.uint32)
    else:
        total = lambda v: jax.ops.segment_sum(v, segment_ids, num_segments)
    high, low = total(x >> 16), total(x & jnp.uint32(0xFFFF))  # < 2**31 and < 2**32
    return add(Count(high >> 16, high << 16), Count(jnp.zeros_like(low), low))


def stack(values, axis: int = 0) -> Count:
    """``jnp.stack`` of counts (or anything :func:`count` takes); narrow when all are narrow."""
    values = [count(v) for v in values]
    if all(v.hi is None for v in values):
        return Count(None, jnp.stack([v.lo for v in values], axis))
    return Count(jnp.stack([_hi(v) for v in values], axis), jnp.stack([v.lo for v in values], axis))


def to_int32(x) -> jax.Array:
    """``x`` as ``int32``, for counts known to fit (a per-leaf count); larger values saturate at
    ``2**31 - 1`` rather than wrap."""
    x = count(x)
    big = x.lo >= jnp.uint32(1 << 31)
    if x.hi is not None:
        big = big | (x.hi > 0)
    return jnp.where(big, jnp.int32(2**31 - 1), x.lo.astype(jnp.int32))


def to_float32(x) -> jax.Array:
    """``x`` as ``float32`` (rounded to 24 significant bits)."""
    x = count(x)
    return _hi(x).astype(jnp.float32) * np.float32(_WORD) + x.lo.astype(jnp.float32)


def to_numpy(x) -> np.ndarray:
    """A concrete count as a numpy ``uint64`` array, on the host (tests, reports)."""
    x = count(x)
    return (np.asarray(_hi(x)).astype(np.uint64) << np.uint64(32)) | np.asarray(x.lo).astype(np.uint64)

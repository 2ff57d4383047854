"""Exact wide counts (jaxsparse.counts): 64-bit integers as two uint32 words, x64 off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import counts

BIG = 2**40 + 12345
# Values around the int32 and uint32 boundaries, and far beyond them.
EDGES = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1, BIG, 2**63 + 5]


def value(c):
    return [int(v) for v in np.ravel(counts.to_numpy(c))]


def test_x64_stays_off():
    assert not jax.config.jax_enable_x64


def test_python_ints_round_trip():
    assert value(counts.count(EDGES)) == EDGES
    assert value(counts.count(BIG)) == [BIG]
    assert value(counts.count(-5)) == [0]  # negative counts clip at 0
    with pytest.raises(ValueError, match="below 2\\*\\*64"):
        counts.count(2**64)


def test_arrays_and_floats():
    assert value(counts.count(jnp.array([-3, 0, 2**31 - 1], jnp.int32))) == [0, 0, 2**31 - 1]
    assert value(counts.count(jnp.array([True, False]))) == [1, 0]
    assert value(counts.count(jnp.array([2**32 - 1], jnp.uint32))) == [2**32 - 1]
    # Integral float32 values convert exactly, whatever their size.
    floats = [0.0, 2.0**31, 2.0**32 - 256, 2.0**32, 2.0**40 + 2**17, 3.0 * 2**50, -4.0]
    expected = [int(np.float32(f)) if f >= 0 else 0 for f in floats]
    assert value(counts.count(jnp.array(floats, jnp.float32))) == expected
    assert value(counts.count(jnp.array([7.9], jnp.float32))) == [7]  # floored
    assert value(jax.jit(lambda k: counts.count([k, 2**33, counts.count(5)]))(jnp.int32(3))) == [3, 2**33, 5]


@pytest.mark.parametrize("jit", [False, True])
def test_arithmetic_across_word_boundaries(jit):
    a_list = [x for x in EDGES if x < 2**62]
    pairs = [(a, b) for a in a_list for b in a_list]
    a = counts.count([p[0] for p in pairs])
    b = counts.count([p[1] for p in pairs])

    def ops(a, b):
        ordered_a, ordered_b = counts.maximum(a, b), counts.minimum(a, b)
        return (
            counts.add(a, b), counts.sub(ordered_a, ordered_b), counts.ge(a, b), counts.eq(a, b),
            ordered_b, ordered_a, counts.where(counts.ge(a, b), a, 7),
        )

    got = (jax.jit(ops) if jit else ops)(a, b)
    total, diff, ge, eq, lo, hi, sel = got
    assert value(total) == [x + y for x, y in pairs]
    assert value(diff) == [abs(x - y) for x, y in pairs]
    assert list(np.asarray(ge)) == [x >= y for x, y in pairs]
    assert list(np.asarray(eq)) == [x == y for x, y in pairs]
    assert value(lo) == [min(x, y) for x, y in pairs]
    assert value(hi) == [max(x, y) for x, y in pairs]
    assert value(sel) == [x if x >= y else 7 for x, y in pairs]


def test_python_int_operands_keep_their_value():
    n = counts.narrow(jnp.array([5, 2**31], jnp.uint32))
    assert n.hi is None
    assert counts.add(n, 3).hi is None  # a small constant stays narrow
    assert value(counts.add(n, 2**33)) == [2**33 + 5, 2**33 + 2**31]  # a large one widens
    assert list(np.asarray(counts.ge(n, 2**32))) == [False, False]


def test_cumsum_wide_and_narrow():
    xs = [2**31 - 1, 2**31, 5, 2**32 - 1, 0, BIG]
    c = counts.count(xs)
    assert value(counts.cumsum(c)) == list(np.cumsum(np.array(xs, dtype=object)))
    assert value(counts.cumsum(c, reverse=True)) == list(np.cumsum(np.array(xs[::-1], dtype=object))[::-1])
    grid = counts.count([[1, 2**32 - 1, 3], [2**40, 2**40, 2**40]])
    assert value(counts.cumsum(grid, axis=1, reverse=True)) == [2**32 + 3, 2**32 + 2, 3, 3 * 2**40, 2 * 2**40, 2**40]
    narrow = counts.cumsum(counts.narrow(jnp.array([3, 4, 5], jnp.int32)), reverse=True)
    assert narrow.hi is None and value(narrow) == [12, 9, 5]


def test_take_along_axis_and_stack():
    grid = counts.count([[1, BIG, 3], [2**32, 5, 6]])
    got = counts.take_along_axis(grid, jnp.array([[1], [0]]), axis=1)
    assert value(got) == [BIG, 2**32]
    assert value(counts.stack([counts.count(BIG), jnp.int32(4), 2**31])) == [BIG, 4, 2**31]
    assert counts.stack([counts.narrow(jnp.int32(1)), counts.narrow(jnp.int32(2))]).hi is None


def test_exact_sums_of_int32_counts():
    x = jnp.full((4096,), 2**31 - 1, jnp.int32)  # 2**43 - 4096: far beyond int32
    assert value(counts.sum(x)) == [4096 * (2**31 - 1)]
    rows = jnp.array([[2**31 - 1, 1], [2**31 - 1, 2], [7, 3]], jnp.int32)
    by_segment = counts.sum(rows, np.array([0, 0, 1]), 2)
    assert value(by_segment) == [2**32 - 2, 3, 7, 3]
    assert value(counts.sum(jnp.array([-4, 9], jnp.int32))) == [9]
    with pytest.raises(ValueError, match="2\\*\\*16"):
        counts.sum(jnp.ones((2**16 + 1,), jnp.int32))


def test_conversions():
    c = counts.count([0, 2**31 - 1, 2**31, BIG])
    assert list(np.asarray(counts.to_int32(c))) == [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]  # saturates
    np.testing.assert_allclose(np.asarray(counts.to_float32(c)), np.array([0, 2**31 - 1, 2**31, BIG], np.float32))
    assert np.asarray(counts.to_int32(counts.narrow(jnp.uint32(2**32 - 1)))) == 2**31 - 1

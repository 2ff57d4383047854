import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_index import (
    COMPUTE,
    EMPTY,
    FIRST,
    FULL,
    LAST,
    PARTIAL,
    PARTIAL_BIT,
    compress_block_kinds,
    compress_block_mask,
    max_blocks_per_row,
    pairs_by_kind,
    pairs_by_row,
)


def _reference(mask, max_blocks):
    rows = []
    for row in mask:
        cols = list(np.flatnonzero(row))
        count = len(cols)
        pad = cols[-1] if cols else 0
        rows.append((cols + [pad] * (max_blocks - count), count))
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


@pytest.mark.compat
def test_matches_reference_on_random_masks():
    rng = np.random.default_rng(0)
    for shape, density in [((5, 7), 0.3), ((3, 1), 0.5), ((4, 9), 0.0), ((6, 6), 1.0)]:
        mask = rng.random(shape) < density
        mask[0] = False  # an empty row
        idx, cnt = compress_block_mask(mask)
        ref_idx, ref_cnt = _reference(mask, max_blocks_per_row(mask))
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(cnt, ref_cnt)


def test_batched_and_jit_with_static_max():
    rng = np.random.default_rng(1)
    mask = rng.random((2, 3, 4, 5)) < 0.4
    idx, cnt = jax.jit(compress_block_mask, static_argnums=1)(mask, 5)
    for b in range(2):
        for h in range(3):
            ref_idx, ref_cnt = _reference(mask[b, h], 5)
            np.testing.assert_array_equal(idx[b, h], ref_idx)
            np.testing.assert_array_equal(cnt[b, h], ref_cnt)


def test_traced_mask_without_max_gets_every_column():
    mask = jnp.asarray([[True, False, True], [False, False, False]])
    idx, cnt = jax.jit(compress_block_mask)(mask)
    np.testing.assert_array_equal(idx, [[0, 2, 2], [0, 0, 0]])
    np.testing.assert_array_equal(cnt, [2, 0])


def test_errors():
    with pytest.raises(ValueError, match="more than max_blocks"):
        compress_block_mask(np.ones((2, 4), bool), 2)
    with pytest.raises(ValueError, match="at least 2 dims"):
        compress_block_mask(np.ones(3, bool))


def _kinds_example():
    rng = np.random.default_rng(1)
    kinds = rng.integers(0, 3, size=(2, 1, 5, 6)).astype(np.int8)  # [Bm, Hm, rows, cols]
    kinds[0, 0, 1] = EMPTY  # an empty row
    kinds[1, 0, 2] = FULL  # a full row
    return kinds


@pytest.mark.compat
def test_compress_block_kinds_lists_full_then_partial():
    kinds = _kinds_example()
    idx, full, cnt = compress_block_kinds(kinds)
    for b, r in np.ndindex(2, 5):
        row = kinds[b, 0, r]
        want = list(np.flatnonzero(row == FULL)) + list(np.flatnonzero(row == PARTIAL))
        assert full[b, 0, r] == (row == FULL).sum() and cnt[b, 0, r] == len(want)
        assert list(idx[b, 0, r, : len(want)]) == want
        assert all(idx[b, 0, r, len(want):] == (want[-1] if want else 0))  # padding repeats the last


@pytest.mark.parametrize("traced", [False, True])
def test_pair_lists_cover_every_nonzero_pair_once(traced):
    kinds = _kinds_example()
    want = {(b, r, c): kinds[b, 0, r, c] for b, r, c in zip(*np.nonzero(kinds[:, 0]))}

    def lists(kinds):
        rows = compress_block_kinds(kinds)
        return pairs_by_kind(*rows, pad=3), pairs_by_row(*rows)

    (pairs, n_full, n_partial), by_row = jax.jit(lists)(kinds) if traced else lists(kinds)
    n_full, n_partial = int(n_full), int(n_partial)
    got = [(int(b), int(r), int(c)) for b, r, c in zip(pairs.b, pairs.row, pairs.col)][: n_full + n_partial]
    assert sorted(got) == sorted(want) and len(pairs.b) >= n_full + n_partial + 3
    assert all(want[p] == FULL for p in got[:n_full]) and all(want[p] == PARTIAL for p in got[n_full:])

    flags = np.asarray(by_row.flags)
    real = (flags & COMPUTE) != 0
    got_rows = [(int(b), int(r), int(c)) for b, r, c, f in zip(by_row.b, by_row.row, by_row.col, real) if f]
    assert sorted(got_rows) == sorted(want) and [p[:2] for p in got_rows] == sorted(p[:2] for p in got_rows)  # row-major, each once
    assert all(((f & PARTIAL_BIT) != 0) == (want[p] == PARTIAL) for p, f in zip(got_rows, flags[real]))
    # Every row starts and ends exactly once (empty rows by one stand-in entry), in order.
    starts = [(int(b), int(r)) for b, r, f in zip(by_row.b, by_row.row, flags) if f & FIRST]
    ends = [(int(b), int(r)) for b, r, f in zip(by_row.b, by_row.row, flags) if f & LAST]
    assert starts == ends == [(b, r) for b in range(2) for r in range(5)]
    if traced:  # padding entries repeat the last real one and do nothing
        last = int(np.flatnonzero(flags)[-1])
        assert not flags[last + 1:].any() and (np.asarray(by_row.row)[last:] == int(by_row.row[last])).all()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_index import compress_block_mask, max_blocks_per_row


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

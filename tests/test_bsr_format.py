import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSparseMatrix, BlockSparsePattern


def _expand(block_mask, block_shape):
    return np.kron(block_mask, np.ones(block_shape, bool)).astype(bool)


def _stored_blocks(w):
    """{(k, n): block} read through the column lists, and the same read through the row lists."""
    data = np.asarray(w.data)
    flat = data.reshape(-1, *w.block_shape)
    p = jax.tree_util.tree_map(np.asarray, w.pattern)
    by_col = {(int(p.col_rows[n, j]), n): data[n, j] for n in range(p.grid[1]) for j in range(int(p.col_counts[n]))}
    by_row = {
        (k, int(p.row_cols[k, j])): flat[int(p.row_slots[k, j])]
        for k in range(p.grid[0])
        for j in range(int(p.row_counts[k]))
    }
    return by_col, by_row


CASES = [  # (shape, block_shape, density)
    ((12, 20), (3, 4), 0.4),
    ((16, 8), (4, 8), 0.5),  # rectangular blocks, a single block column
    ((9, 9), (3, 3), 0.0),
    ((8, 12), (2, 3), 1.0),
    ((6, 6), (1, 1), 0.3),
]


@pytest.mark.compat
@pytest.mark.parametrize("shape,block_shape,density", CASES)
def test_round_trip_and_both_lists_agree(shape, block_shape, density):
    rng = np.random.default_rng(0)
    grid = (shape[0] // block_shape[0], shape[1] // block_shape[1])
    block_mask = rng.random(grid) < density
    if 0 < density < 1:
        block_mask[0, :] = False  # an empty block row
        block_mask[:, -1] = False  # an empty block column
    w = rng.standard_normal(shape).astype(np.float32) + 3.0  # never zero
    m = BlockSparseMatrix.from_dense(w, block_shape, block_mask)
    expected = np.where(_expand(block_mask, block_shape), w, 0)
    np.testing.assert_array_equal(m.to_dense(), expected)
    np.testing.assert_array_equal(m.pattern.block_mask(), block_mask)
    assert int(m.nnz_blocks()) == block_mask.sum()
    assert m.pattern.max_blocks_per_col == max(1, block_mask.sum(0).max())
    assert m.pattern.max_blocks_per_row == max(1, block_mask.sum(1).max())
    by_col, by_row = _stored_blocks(m)
    assert set(by_col) == set(by_row) == {tuple(map(int, kn)) for kn in np.argwhere(block_mask)}
    bk, bn = block_shape
    for (k, n), block in by_col.items():
        np.testing.assert_array_equal(block, w[k * bk:(k + 1) * bk, n * bn:(n + 1) * bn])
        np.testing.assert_array_equal(by_row[k, n], block)


def test_padding_is_zero_and_repeats_the_last_index():
    block_mask = np.array([[1, 0, 1], [1, 0, 0], [1, 0, 1]], bool)
    m = BlockSparseMatrix.from_dense(np.ones((6, 6), np.float32), (2, 2), block_mask)
    p = m.pattern
    np.testing.assert_array_equal(p.col_counts, [3, 0, 2])
    np.testing.assert_array_equal(p.col_rows, [[0, 1, 2], [0, 0, 0], [0, 2, 2]])
    np.testing.assert_array_equal(p.row_counts, [2, 1, 2])
    np.testing.assert_array_equal(p.row_cols, [[0, 2], [0, 0], [0, 2]])
    np.testing.assert_array_equal(np.asarray(m.data)[1], 0)  # the empty column's slots
    np.testing.assert_array_equal(np.asarray(m.data)[2, 2], 0)  # a padding slot
    rows, slots, counts = p.column_lists()
    np.testing.assert_array_equal(slots, [[0, 1, 2], [3, 3, 3], [6, 7, 7]])


def test_mask_none_keeps_blocks_that_are_not_all_zero_and_element_masks_zero_entries():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    w[0:2, 4:6] = 0  # an all-zero block
    m = BlockSparseMatrix.from_dense(w, (2, 2))
    assert not bool(m.pattern.block_mask()[0, 2]) and int(m.nnz_blocks()) == 11
    np.testing.assert_array_equal(m.to_dense(), w)

    element_mask = rng.random((6, 8)) < 0.2
    m = BlockSparseMatrix.from_dense(w, (2, 2), element_mask)
    np.testing.assert_array_equal(m.to_dense(), np.where(element_mask, w, 0))
    block_mask = element_mask.reshape(3, 2, 4, 2).any(axis=(1, 3))
    np.testing.assert_array_equal(m.pattern.block_mask(), block_mask)


def test_under_jit_with_static_maxima():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    block_mask = rng.random((4, 4)) < 0.5

    @jax.jit
    def build(w, block_mask):
        return BlockSparseMatrix.from_dense(w, (2, 3), block_mask, max_blocks_per_col=4, max_blocks_per_row=4)

    m = build(w, block_mask)
    np.testing.assert_array_equal(m.to_dense(), np.where(_expand(block_mask, (2, 3)), w, 0))
    # Without maxima a traced mask gets room for every block: correct, as large as dense.
    w[:2, :3] = 0  # one all-zero block, which the default mask (nonzero blocks) leaves out
    m = jax.jit(lambda w: BlockSparseMatrix.from_dense(w, (2, 3)))(w)
    assert (m.pattern.max_blocks_per_col, m.pattern.max_blocks_per_row) == (4, 4)
    np.testing.assert_array_equal(m.to_dense(), w)
    assert int(m.nnz_blocks()) == 15


def test_traced_caps_drop_blocks_consistently():
    block_mask = np.ones((3, 3), bool)
    m = jax.jit(
        lambda w: BlockSparseMatrix.from_dense(w, (1, 1), block_mask, max_blocks_per_col=2, max_blocks_per_row=1)
    )(jnp.ones((3, 3)))
    kept = np.asarray(m.pattern.block_mask())
    assert kept.sum(0).max() <= 2 and kept.sum(1).max() <= 1 and kept.sum() == 2
    by_col, by_row = _stored_blocks(m)
    assert set(by_col) == set(by_row)


def test_grad_with_allow_int_has_the_same_structure():
    rng = np.random.default_rng(3)
    m = BlockSparseMatrix.from_dense(rng.standard_normal((4, 6)).astype(np.float32), (2, 3), rng.random((2, 2)) < 0.7)
    g = jax.grad(lambda m: jnp.sum(m.to_dense() ** 2), allow_int=True)(m)
    assert isinstance(g, BlockSparseMatrix) and isinstance(g.pattern, BlockSparsePattern)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(m)
    np.testing.assert_allclose(g.data, 2 * m.data)
    assert g.pattern.col_rows.dtype == jax.dtypes.float0
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(m)[0]]
    assert keys[0] == ".data" and ".pattern.col_rows" in keys


def test_take_blocks_projects_a_dense_matrix():
    rng = np.random.default_rng(4)
    block_mask = rng.random((3, 2)) < 0.5
    m = BlockSparseMatrix.from_dense(np.ones((6, 4), np.float32), (2, 2), block_mask)
    dense = rng.standard_normal((6, 4)).astype(np.float32)
    projected = m.with_data(m.pattern.take_blocks(dense)).to_dense()
    np.testing.assert_array_equal(projected, np.where(_expand(block_mask, (2, 2)), dense, 0))


def test_bad_input():
    w = np.ones((6, 8), np.float32)
    with pytest.raises(ValueError, match=r"block_shape \(4, 2\).*\(6, 8\)"):
        BlockSparseMatrix.from_dense(w, (4, 2))
    with pytest.raises(ValueError, match="floating"):
        BlockSparseMatrix.from_dense(np.ones((6, 8), np.int32), (2, 2))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2\)"):
        BlockSparseMatrix.from_dense(w, (2, 2), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="boolean"):
        BlockSparseMatrix.from_dense(w, (2, 2), np.ones((3, 4)))
    with pytest.raises(ValueError, match="more than max_blocks"):
        BlockSparseMatrix.from_dense(w, (2, 2), max_blocks_per_col=1)
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseMatrix.from_dense(np.ones(8, np.float32), (2, 2))
    m = BlockSparseMatrix.from_dense(w, (2, 2))
    with pytest.raises(ValueError, match="does not match"):
        m.with_data(jnp.ones((1, 1, 2, 2)))

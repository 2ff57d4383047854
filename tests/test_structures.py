"""Structures: exact budgets in whole groups, N:M validity, tie order, NaN lowest, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse import structures


def _scores(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _nm_counts(mask, m, axis=-2):
    x = np.moveaxis(np.asarray(mask), axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m).sum(-1)


@pytest.mark.compat
def test_n_of_m_keeps_the_n_largest_of_every_group():
    s = _scores((8, 6))
    mask = js.n_of_m(2, 4).select(s)
    assert mask.shape == s.shape and mask.dtype == jnp.bool_
    assert (_nm_counts(mask, 4) == 2).all()
    # reference: per group of 4 rows in each column, the 2 largest
    x = np.asarray(s)
    for j in range(6):
        for g in range(2):
            col = x[4 * g:4 * g + 4, j]
            expected = np.zeros(4, bool)
            expected[np.argsort(-col, kind="stable")[:2]] = True
            np.testing.assert_array_equal(np.asarray(mask)[4 * g:4 * g + 4, j], expected)


def test_n_of_m_other_axis_ties_nan_and_where():
    s = jnp.array([[1.0, 1.0, 1.0, 1.0, jnp.nan, 5.0, jnp.nan, 0.0]])
    mask = js.n_of_m(2, 4, axis=-1).select(s)
    np.testing.assert_array_equal(mask, [[True, True, False, False, False, True, False, True]])
    # where: the ineligible never kept; with fewer eligible than n, all eligible are kept
    where = jnp.array([[False, True, True, True, False, False, False, True]])
    mask = js.n_of_m(2, 4, axis=-1).select(s, where=where)
    np.testing.assert_array_equal(mask, [[False, True, True, False, False, False, False, True]])


def test_n_of_m_long_groups_use_the_column_search():
    s = _scores((64, 3, 5), 1)
    nm = js.n_of_m(5, 64, axis=0)
    mask = np.asarray(nm.select(s))
    assert (mask.sum(0) == 5).all()
    ref = np.argsort(-np.asarray(s), axis=0, kind="stable")[:5]
    expected = np.zeros(s.shape, bool)
    np.put_along_axis(expected, ref, True, axis=0)
    np.testing.assert_array_equal(mask, expected)


def test_n_of_m_sparsity_must_match():
    nm = js.n_of_m(2, 4)
    assert nm.select(_scores((4, 4)), 0.5).sum() == 8
    with pytest.raises(ValueError, match=r"n_of_m\(2, 4, axis=-2\).*0\.9"):
        nm.select(_scores((4, 4)), 0.9)


@pytest.mark.compat
def test_blocks_keep_whole_tiles_with_the_exact_tile_budget():
    s = _scores((2, 12, 8))  # leading axis: two kernels sharing one budget
    b = js.blocks(4, 2)
    T = 2 * 3 * 4
    for sparsity in (0.0, 0.5, 0.7, 0.95):
        mask = np.asarray(b.select(s, sparsity))
        tiles = mask.reshape(2, 3, 4, 4, 2).transpose(0, 1, 3, 2, 4).reshape(2, 3, 4, 8)
        assert (tiles.all(-1) | ~tiles.any(-1)).all()  # exact union of tiles
        assert tiles.all(-1).sum() == T - int(np.floor(sparsity * T))
    # the kept tiles are those of largest L2 norm
    norms = np.sqrt((np.asarray(s).reshape(2, 3, 4, 4, 2) ** 2).sum((2, 4)))
    kept = np.asarray(b.select(s, 0.5)).reshape(2, 3, 4, 4, 2)[:, :, 0, :, 0]
    assert norms[kept].min() > norms[~kept].max()


def test_blocks_ties_lowest_index_and_nan_lowest():
    s = jnp.ones((4, 4)).at[0:2, 0:2].set(jnp.nan)
    mask = np.asarray(js.blocks(2, 2).select(s, 0.5))
    np.testing.assert_array_equal(mask[::2, ::2], [[False, True], [True, False]])


def test_channels_and_constant_fan_in():
    s = _scores((6, 5))
    mask = np.asarray(js.channels().select(s, 0.6))
    assert mask.all(0).sum() == 2 and (mask.all(0) | ~mask.any(0)).all()
    norms = np.linalg.norm(np.asarray(s), axis=0)
    assert norms[mask.all(0)].min() > norms[~mask.all(0)].max()
    mask = np.asarray(js.constant_fan_in().select(s, 0.5))
    assert (mask.sum(0) == 3).all()
    assert bool(js.constant_fan_in().complies(mask)) and bool(js.n_of_m(3, 6).complies(mask))
    assert not bool(js.blocks(2, 5).complies(mask))


@pytest.mark.compat
def test_untileable_shapes_raise_naming_leaf_shape_and_structure():
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*\(6, 8\).*blocks\(4, 4\)"):
        js.blocks(4, 4).check("Dense_0/kernel", (6, 8))
    with pytest.raises(ValueError, match=r"'w'.*\(6, 8\).*n_of_m\(2, 4, axis=-2\)"):
        js.n_of_m(2, 4).check("w", (6, 8))
    with pytest.raises(ValueError, match=r"\(8,\)"):
        js.blocks(2, 2).select(jnp.ones(8), 0.5)
    js.n_of_m(2, 4).check("w", (8, 6))
    with pytest.raises(ValueError):
        js.n_of_m(3, 2)
    with pytest.raises(ValueError):
        js.blocks(0, 2)


def test_select_top_k_over_leaves_with_structures():
    a, b, c = _scores((8, 8), 0), _scores((4, 8), 1), _scores((8, 4), 2)
    strs = [js.blocks(2, 2), js.unstructured(), js.n_of_m(1, 4)]
    select = jax.jit(structures.select_top_k, static_argnums=(0, 3))  # one compile, not op by op
    masks = select(tuple(strs), [a, b, c], jnp.array([5, 7, 8]), (0, 1, 2))
    tiles = js.blocks(2, 2)
    assert tiles.unit_mask(masks[0]).sum() == 5 and bool(tiles.complies(masks[0], 5))
    assert (tiles.expand(tiles.unit_mask(masks[0]), (8, 8)) == masks[0]).all()  # whole tiles only
    assert masks[1].sum() == 7
    assert (_nm_counts(masks[2], 4) == 1).all()
    # one-cell leaves share a global budget in units
    masks = select(tuple(strs[:2]), [a, b], jnp.array([9]), (0, 0))
    assert js.blocks(2, 2).unit_mask(masks[0]).sum() + masks[1].sum() == 9


@pytest.mark.compat
def test_report_shows_structure_and_compliance():
    good = js.n_of_m(2, 4).select(_scores((8, 4)))
    params = {"Dense_0": {"kernel": jnp.where(good, 1.0, 0.0), "bias": jnp.ones(4)},
              "Dense_1": {"kernel": jnp.ones((8, 4))}, "Dense_2": {"kernel": jnp.ones((6, 4))}}
    report = js.sparsity_report(params, structure=js.n_of_m(2, 4))
    rows = {r.path: r for r in report.rows}
    assert rows["Dense_0/kernel"].complies is True and rows["Dense_1/kernel"].complies is False
    assert rows["Dense_2/kernel"].complies is None and rows["Dense_0/bias"].structure == ""
    text = str(report)
    assert "n_of_m(2, 4, axis=-2)" in text and "NO" in text and "untileable" in text
    assert report.as_dict()["complies/Dense_1/kernel"] == 0.0
    tiles = {"Dense_0": {"kernel": jnp.zeros((4, 4)).at[:2, 2:].set(1.0)}, "Dense_1": {"kernel": jnp.eye(4)}}
    rows = js.sparsity_report(tiles, structure=js.blocks(2, 2)).rows
    assert [r.complies for r in rows] == [True, False]
    preview = js.preview_sparsity(params, structure=js.n_of_m(2, 4), dense_if_untileable=True)
    assert {r.path: r.keep for r in preview.rows}["Dense_1/kernel"] == 16

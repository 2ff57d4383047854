import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse import counts, selection
from jaxsparse.selection import (
    check_leaf_size, score_keys, select_top_k, top_k_mask, top_k_masks, top_k_masks_nested, top_k_masks_per_leaf,
    top_k_per_column,
)


def reference(scores, k, where=None):
    """Sort-based oracle: eligible entries only, largest scores first, NaN lowest (below -inf),
    ties by (array order, flat index)."""
    flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores])
    eligible = np.ones(flat.size, bool) if where is None else np.concatenate([np.asarray(w).ravel() for w in where])
    nan = np.isnan(flat)
    order = np.lexsort((np.arange(flat.size), -np.where(nan, 0.0, flat), nan))  # last key first
    order = order[eligible[order]]
    keep = np.zeros(flat.size, bool)
    keep[order[: max(k, 0)]] = True
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.size].reshape(s.shape))
        start += s.size
    return out


def random_case(rng, kind, shapes):
    make = {
        "normal": lambda s: rng.normal(size=s),
        "few values": lambda s: rng.integers(0, 3, size=s).astype(float),  # massive ties
        "sparse": lambda s: np.abs(rng.normal(size=s)) * (rng.random(s) < 0.3),  # ties at 0
        "constant": lambda s: np.full(s, 1.5),
        "inf and huge": lambda s: np.where(rng.random(s) < 0.2, -np.inf, rng.normal(size=s) * 1e30),
        "nan and heavy tail": lambda s: np.where(rng.random(s) < 0.1, np.nan, rng.standard_cauchy(size=s)),
        "tiny": lambda s: rng.normal(size=s) * 1e-40,  # subnormals
        "nan and -inf": lambda s: np.select([rng.random(s) < 0.2, rng.random(s) < 0.25], [np.nan, -np.inf], rng.normal(size=s)),
    }[kind]
    return [make(s).astype(np.float32) for s in shapes]


KINDS = ["normal", "few values", "sparse", "constant", "inf and huge", "nan and heavy tail", "tiny", "nan and -inf"]


@pytest.mark.compat
@pytest.mark.parametrize("kind", KINDS)
def test_matches_sort_oracle(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    select = jax.jit(top_k_masks)
    shapes = [tuple(int(d) for d in rng.integers(1, 30, size=rng.integers(1, 3))) for _ in range(rng.integers(1, 4))]
    for _ in range(6):  # one compilation per kind: same shapes, new data and k
        scores = random_case(rng, kind, shapes)
        total = sum(s.size for s in scores)
        for k in {0, 1, int(rng.integers(0, total + 1)), total - 1, total}:
            if k < 0:
                continue
            got = select(scores, k)
            for g, e in zip(got, reference(scores, k)):
                np.testing.assert_array_equal(np.asarray(g), e)


def test_exact_count_on_large_leaf_with_duplicates():
    # 2**20 float32 normals contain duplicated values: ties straddle most thresholds.
    x = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))
    for k in (1, 104857, 524288, 1048575):
        m = jax.jit(top_k_mask)(jnp.abs(x), k)
        assert int(m.sum()) == k
        kept, dropped = jnp.abs(x)[m], jnp.abs(x)[~m]
        assert float(kept.min()) >= float(dropped.max())


def test_clips_k_and_accepts_traced_k():
    x = jnp.arange(10.0)
    assert int(top_k_mask(x, -3).sum()) == 0
    assert int(top_k_mask(x, 99).sum()) == 10
    f = jax.jit(lambda x, k: top_k_mask(x, k))
    np.testing.assert_array_equal(f(x, jnp.int32(3)), x >= 7)


def test_vmap_over_scores():
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 9))
    ms = jax.vmap(lambda s: top_k_mask(s, 20))(xs)
    for x, m in zip(xs, ms):
        np.testing.assert_array_equal(m, reference([x], 20)[0])


def test_empty_inputs():
    assert top_k_masks([], 3) == []
    (m,) = top_k_masks([jnp.zeros((0, 4))], 2)
    assert m.shape == (0, 4)


def test_score_keys_preserve_order():
    x = jnp.array([-jnp.inf, -3.0, -1e-30, -0.0, 0.0, 1e-45, 2.0, jnp.inf, jnp.nan])
    keys = np.asarray(score_keys(x)).astype(np.int64)
    assert keys[-1] == keys.min()  # NaN is the lowest
    assert np.all(np.diff(keys[:-1]) > 0)
    eligible = np.asarray(score_keys(x, x > 0.5)).astype(np.int64)
    assert np.all(eligible[:6] < keys.min()) and np.all(eligible[6:8] == keys[6:8])  # ineligible lowest


def test_per_leaf_matches_separate_selections():
    rng = np.random.default_rng(5)
    scores = [rng.normal(size=s).astype(np.float32) for s in [(13, 7), (50,), (4, 4, 4)]]
    scores[1][:20] = 0.5  # ties in one leaf
    for ks in [(0, 25, 64), (91, 0, 1), (40, 30, 17)]:
        got = jax.jit(top_k_masks_per_leaf)(scores, ks)
        for g, s, k in zip(got, scores, ks):
            np.testing.assert_array_equal(np.asarray(g), reference([s], k)[0])


def test_nested_equals_separate_selections():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(37, 11)).astype(np.float32)
    x[3] = 0.25  # a row of ties
    for ks in [(5, 100, 407), (0, 407), (11, 11, 12), (200,)]:
        got = jax.jit(top_k_masks_nested)(x, ks)
        for g, k in zip(got, ks):
            np.testing.assert_array_equal(np.asarray(g), reference([x], k)[0])



def random_eligibility(rng, scores):
    density = rng.choice([0.0, 0.3, 0.8, 1.0])
    return [rng.random(s.shape) < density for s in scores]


@pytest.mark.parametrize("kind", KINDS)
def test_eligibility_matches_sort_oracle(kind):
    # An ineligible entry is never selected, whatever k and the scores; NaN ranks lowest among
    # the eligible ones, below -inf.
    rng = np.random.default_rng(100 + KINDS.index(kind))
    select = jax.jit(top_k_masks)
    shapes = [tuple(int(d) for d in rng.integers(1, 30, size=rng.integers(1, 3))) for _ in range(rng.integers(1, 4))]
    for _ in range(5):
        scores = random_case(rng, kind, shapes)
        where = random_eligibility(rng, scores)
        total, eligible = sum(s.size for s in scores), int(sum(w.sum() for w in where))
        for k in {0, 1, max(eligible - 1, 0), eligible, eligible + 1, int(rng.integers(0, total + 1)), total}:
            got = select(scores, k, where)
            for g, e in zip(got, reference(scores, k, where)):
                np.testing.assert_array_equal(np.asarray(g), e)


def test_eligibility_per_leaf_nested_and_single():
    rng = np.random.default_rng(11)
    scores = [rng.integers(0, 3, size=s).astype(np.float32) for s in [(13, 7), (50,), (4, 4, 4)]]
    scores[1][:10] = np.nan
    where = [rng.random(s.shape) < 0.6 for s in scores]
    for ks in [(0, 25, 64), (91, 50, 1), (40, 30, 17)]:
        got = jax.jit(top_k_masks_per_leaf)(scores, ks, where)
        for g, s, w, k in zip(got, scores, where, ks):
            np.testing.assert_array_equal(np.asarray(g), reference([s], k, [w])[0])
        nested = jax.jit(top_k_masks_nested)(scores[0], ks, where[0])
        for g, k in zip(nested, ks):
            np.testing.assert_array_equal(np.asarray(g), reference([scores[0]], k, [where[0]])[0])
            np.testing.assert_array_equal(np.asarray(g), np.asarray(top_k_mask(scores[0], k, where[0])))
    with pytest.raises(ValueError, match=r"where of shape \(3,\) does not match scores of shape \(4,\)"):
        top_k_mask(jnp.zeros(4), 2, jnp.ones(3, bool))


@pytest.mark.parametrize("row_size", [1, 40, 100])
def test_groups_spanning_several_histogram_rows(monkeypatch, row_size):
    # A group of more than 2**31 entries spans several int32 histogram rows and counts in exact
    # wide arithmetic; a small row size runs that path (row sums, wide ranks, ties shared out in
    # leaf order) on small arrays.
    monkeypatch.setattr(selection, "_ROW_SIZE", row_size)
    shapes, group_of = [(13, 7), (50,), (4, 4, 4), (30,), (9,)], [0, 1, 0, 0, 1]
    assert selection._Groups([int(np.prod(s)) for s in shapes], group_of).wide
    rng = np.random.default_rng(row_size)
    select = jax.jit(lambda s, ks, w: select_top_k(s, ks, group_of, w))
    members = [[i for i, g in enumerate(group_of) if g == gi] for gi in range(2)]
    for trial in range(8):
        kind = ["few values", "nan and -inf", "normal", "constant"][trial % 4]
        scores = random_case(rng, kind, shapes)
        where = random_eligibility(rng, scores) if trial % 2 else None
        ks = [int(rng.integers(0, 1 + sum(scores[i].size for i in m))) for m in members]
        got = select(scores, jnp.array(ks), where)
        for g, m in enumerate(members):
            expected = reference([scores[i] for i in m], ks[g], None if where is None else [where[i] for i in m])
            for i, e in zip(m, expected):
                np.testing.assert_array_equal(np.asarray(got[i]), e, err_msg=f"{kind}, group {g}, k {ks[g]}")


def test_rows_of_a_large_group():
    # A row holds consecutive leaves of one group, fewer than 2**31 entries in all.
    groups = selection._Groups([2**30, 2**30 - 1, 2**30, 2**30, 2**30, 2**31 - 1, 7], [0, 0, 0, 1, 1, 1, 0])
    assert groups.row_group == [0, 0, 1, 1, 1] and groups.row_of == [0, 0, 1, 2, 3, 4, 1]
    assert groups.offset == [0, 2**30, 0, 0, 0, 0, 2**30] and groups.row_sizes == [2**31 - 1, 2**30 + 7, 2**30, 2**30, 2**31 - 1]
    assert groups.wide and groups.totals == [3 * 2**30 + 6, 2**31 + 2**31 - 1]
    assert not selection._Groups([2**30, 2**30 - 1], [0, 0]).wide


def test_rank_arithmetic_beyond_2_32_entries():
    # One radix step of a group of ~2**41 entries, on synthetic histograms.
    hist = [2**33, 0, 5, 2**40, 7, 2**32 - 1, 1, 3]
    total = sum(hist)
    ranks = [1, 3, 4, 12, 2**32 + 11, 2**40 + 2**32 + 11, 2**40 + 2**32 + 16, total]
    digit, rank, equal = selection._locate(counts.count([hist] * len(ranks)), counts.count(ranks))
    for r, d, within, eq in zip(ranks, np.asarray(digit), counts.to_numpy(rank), counts.to_numpy(equal)):
        at_or_above = [sum(hist[j:]) for j in range(len(hist))]
        expected = max(j for j in range(len(hist)) if at_or_above[j] >= r)
        assert d == expected and int(eq) == hist[d], r
        assert int(within) == r - (at_or_above[d + 1] if d + 1 < len(hist) else 0), r


def test_ties_shared_out_over_more_than_2_32_positions():
    # Four rows of 2**31 - 1 entries in one group, all tied: the first rows take all theirs.
    groups = selection._Groups([2**31 - 1] * 4 + [10], [0, 0, 0, 0, 1])
    keep_equal = counts.count([3 * (2**31 - 1) + 10, 4])
    asked = []

    def tied(r):
        asked.append(r)
        return jnp.int32(2**31 - 1)

    assert list(np.asarray(selection._tie_quotas(keep_equal, groups, tied))) == [2**31 - 1] * 3 + [10, 4]
    assert asked == [0, 1, 2]  # a group's last row takes what is left, uncounted
    quota = selection._tie_quotas(counts.count([2**31 + 5, 0]), groups, tied)
    assert list(np.asarray(quota)) == [2**31 - 1, 6, 0, 0, 0]


def test_leaves_of_2_31_entries_raise():
    check_leaf_size("fits", (2**31 - 1,))
    with pytest.raises(ValueError, match=r"leaf 'big/kernel' of shape \(65536, 32768\) has 2147483648 entries.*2\*\*31 - 1"):
        check_leaf_size("big/kernel", (65536, 32768))
    with pytest.raises(ValueError, match=r"a score array of shape \(2147483648,\)"):
        jax.eval_shape(lambda x: top_k_mask(x, 3), jax.ShapeDtypeStruct((2**31,), jnp.float32))


def test_wide_k_over_leaves():
    # k is a Count or a Python int beyond int32; clipped to the total.
    x = [jnp.arange(6.0), jnp.arange(4.0)]
    for k in (2**40, counts.count(2**33 + 1)):
        assert [int(m.sum()) for m in top_k_masks(x, k)] == [6, 4]


def test_top_k_per_column_matches_sort_oracle():
    from jaxsparse.srigl import neuron_top_k

    assert neuron_top_k is top_k_per_column and js.top_k_per_column is top_k_per_column
    rng = np.random.default_rng(0)
    select = jax.jit(top_k_per_column)
    for trial in range(8):
        scores = random_case(rng, ["few values", "nan and -inf", "normal", "constant"][trial % 4], [(9, 5)])[0]
        where = rng.random((9, 5)) < 0.6
        ks = rng.integers(0, 11, size=5)
        got = np.asarray(select(jnp.asarray(scores), jnp.asarray(ks), jnp.asarray(where)))
        for j in range(5):
            np.testing.assert_array_equal(got[:, j], reference([scores[:, j]], int(ks[j]), [where[:, j]])[0])
    with pytest.raises(ValueError, match=r"\(rows, columns\) array; got shape \(3,\)"):
        top_k_per_column(jnp.zeros(3), jnp.ones(3, jnp.int32))


# 4 leaves of 2**30 weights: 2**32 in all, beyond int32 counts and uint32 positions.
LLM_PARAMS = {f"layer_{i}": {"kernel": jax.ShapeDtypeStruct((32768, 32768), jnp.bfloat16)} for i in range(4)}
LLM_PRESETS = {
    "magnitude_pruning": lambda inner: js.magnitude_pruning(inner, sparsity=0.9, schedule=js.polynomial_schedule(0, 100), update_every=10),
    "global_magnitude_pruning": lambda inner: js.global_magnitude_pruning(inner, sparsity=0.9, schedule=js.polynomial_schedule(0, 100), update_every=10),
    "lamp_pruning": lambda inner: js.lamp_pruning(inner, sparsity=0.9),
    "rigl": lambda inner: js.rigl(inner, sparsity=0.9, update_every=10, end_step=100),
    "snfs": lambda inner: js.snfs(inner, sparsity=0.9, update_every=10, end_step=100),
}


@pytest.mark.parametrize("name", list(LLM_PRESETS))
def test_presets_trace_at_billions_of_weights(name):
    tx = LLM_PRESETS[name](optax.sgd(1e-3))
    state = jax.eval_shape(tx.init, LLM_PARAMS)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, new_state = jax.eval_shape(step, LLM_PARAMS, state, LLM_PARAMS)
    assert jax.tree.structure(params) == jax.tree.structure(LLM_PARAMS)
    assert [m.shape for m in jax.tree.leaves(js.get_masks(new_state))] == [(32768, 32768)] * 4


def test_first_true_in_flat_order():
    rng = np.random.default_rng(3)
    first = jax.jit(selection._first_true)
    for shape in [(4, 4, 4), (13, 7), (50,), (3, 1, 5, 2)]:
        for _ in range(5):
            mask = rng.random(shape) < 0.5
            k = int(rng.integers(0, mask.sum() + 1))
            expected = np.zeros(mask.size, bool)
            expected[np.flatnonzero(mask)[:k]] = True
            np.testing.assert_array_equal(np.asarray(first(jnp.asarray(mask), k)).ravel(), expected)

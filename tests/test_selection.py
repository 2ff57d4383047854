import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.selection import score_keys, top_k_mask, top_k_masks, top_k_masks_nested, top_k_masks_per_leaf


def reference(scores, k):
    """Sort-based oracle: largest scores first, ties by (array order, flat index); NaN lowest."""
    flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores])
    flat = np.where(np.isnan(flat), -np.inf, flat)
    order = np.lexsort((np.arange(flat.size), -flat))
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
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
    }[kind]
    return [make(s).astype(np.float32) for s in shapes]


KINDS = ["normal", "few values", "sparse", "constant", "inf and huge", "nan and heavy tail", "tiny"]


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

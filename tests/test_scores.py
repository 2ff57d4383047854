"""Score functions: what each computes, and the random scores' statistics."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import scores


def _wg():
    w = jax.random.normal(jax.random.key(0), (37, 23))
    g = jax.random.normal(jax.random.key(1), (37, 23))
    return w, g


def test_magnitude_saliency_gradient():
    w, g = _wg()
    key = jax.random.key(2)
    np.testing.assert_array_equal(scores.magnitude(w, g, key), jnp.abs(w))
    np.testing.assert_allclose(scores.saliency(w, g, key), jnp.abs(w * g), rtol=1e-6)
    np.testing.assert_array_equal(scores.gradient_magnitude(w, g, key), jnp.abs(g))


def test_random_scores_are_finite_normal_and_reproducible():
    w, g = _wg()
    a = np.asarray(scores.random(w, g, jax.random.key(3)))
    assert a.dtype == np.float32 and a.shape == w.shape
    assert np.all(np.isfinite(a)) and np.all(a >= np.finfo(np.float32).tiny)  # never subnormal
    np.testing.assert_array_equal(a, scores.random(w, g, jax.random.key(3)))
    assert not np.array_equal(a, scores.random(w, g, jax.random.key(4)))


def test_random_scores_rank_positions_uniformly():
    shape = (256, 512)
    a = np.asarray(scores.random(jnp.zeros(shape), None, jax.random.key(5))).ravel()
    b = np.asarray(scores.random(jnp.zeros(shape), None, jax.random.key(6))).ravel()
    assert len(np.unique(a)) > 0.999 * a.size  # 30 random bits: ties are rare
    # The top 10% is spread evenly over rows and columns (no positional bias) ...
    top = np.zeros(a.size, bool)
    top[np.argsort(a)[-a.size // 10:]] = True
    top = top.reshape(shape)
    for counts, n in ((top.sum(1), shape[1]), (top.sum(0), shape[0])):
        assert abs(counts.mean() - 0.1 * n) < 1 and counts.std() < 2 * np.sqrt(0.1 * 0.9 * n)
    # ... and two keys give (nearly) independent orders.
    rank = lambda x: np.argsort(np.argsort(x))
    assert abs(np.corrcoef(rank(a), rank(b))[0, 1]) < 0.02
    assert abs(np.corrcoef(rank(a)[:-1], rank(a)[1:])[0, 1]) < 0.02


def test_position_hash_is_a_bijection_of_positions():
    h = np.asarray(scores.position_hash(jax.random.key(7), (64, 1024)))
    assert h.dtype == np.uint32 and len(np.unique(h)) == h.size


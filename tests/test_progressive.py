"""Progressive N:M gradient flow (jaxsparse.progressive): MDGF's decay, SDGF's stages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from dst_testing import run


def wide_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (12, 16)), "bias": jnp.zeros((16,))},
        "Dense_1": {"kernel": jax.random.normal(k2, (16, 3)), "bias": jnp.zeros((3,))},
    }


def test_mask_decay_values():
    linear = js.mask_decay("linear", 0.1, begin_step=5)
    exponential = js.mask_decay("exponential", 0.1, begin_step=5)
    for t, lin, exp in [(0, 1.0, 1.0), (5, 1.0, 1.0), (8, 0.7, math.exp(-0.3)), (20, 0.0, math.exp(-1.5))]:
        assert float(linear(t)) == pytest.approx(lin, abs=1e-6)
        assert float(exponential(t)) == pytest.approx(exp, rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        js.mask_decay("cosine")


def test_sdgf_stages():
    assert js.sdgf_stages(1, 8) == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert js.sdgf_stages(1, 8, "geometric") == [(8, 64), (4, 32), (2, 16), (1, 8)]
    assert js.sdgf_stages(2, 4) == [(3, 4), (2, 4)]
    with pytest.raises(ValueError, match="power of two"):
        js.sdgf_stages(3, 8)


@pytest.mark.compat
def test_sdgf_tightens_in_stages_and_params_comply_after_every_step():
    tx = js.sdgf(optax.adam(0.1), n=1, m=4, begin_step=2, end_step=8, exclude="Dense_1")
    records = run(tx, steps=10, params=wide_params())
    stages = js.sdgf_stages(1, 4)  # 3:4, 2:4, 1:4 over [2, 8): two steps each
    for t, record in enumerate(records[1:]):  # record t + 1: masks chosen at step t
        w = record.params["Dense_0/kernel"]
        if t < 2:
            assert np.all(record.masks["Dense_0/kernel"])
            continue
        n, m = stages[min((t - 2) // 2, len(stages) - 1)]
        groups = (w != 0).reshape(3, 4, 16).sum(axis=1)
        assert np.all(groups <= n) and record.masks["Dense_0/kernel"].reshape(3, 4, 16).sum(axis=1).min() == n
        assert np.all(w[~record.masks["Dense_0/kernel"]] == 0)


def test_mdgf_anneals_the_pruned_gradient():
    tx = js.mdgf(optax.sgd(1.0), n=2, m=4, decay="linear", coef=0.5, exclude="Dense_1")
    loss = lambda params, x, y: jnp.sum(params["Dense_0"]["kernel"])  # gradient 1 everywhere
    records = run(tx, steps=3, params=wide_params(), loss=loss)
    for t in range(3):
        before, after = records[t], records[t + 1]
        dense0 = np.asarray(before.state.shadow["Dense_0"]["kernel"])
        dense1 = np.asarray(after.state.shadow["Dense_0"]["kernel"])
        beta = max(0.0, 1 - 0.5 * t)
        np.testing.assert_allclose(dense1 - dense0, -np.where(before.masks["Dense_0/kernel"], 1.0, beta), atol=1e-6)


def test_sdgf_stages_follow_the_reference_code():
    """SdGf-Geometric has 4 stages whatever n:m (the reference's "fine" decay), at the density
    n/m; SdGf-Stepwise halves the kept count (its "sparsify" decay); log2(m/n)+1 geometric stages
    stay an option."""
    assert js.sdgf_stages(2, 4, "geometric") == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert js.sdgf_stages(1, 16) == [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]
    assert js.sdgf_stages(2, 4, "geometric", stages=2) == [(4, 8), (2, 4)]
    assert js.sdgf_stages(3, 8, "geometric") == [(24, 64), (12, 32), (6, 16), (3, 8)]
    with pytest.raises(ValueError, match="stages"):
        js.sdgf_stages(1, 8, "geometric", stages=0)
    # reference defaults: exponential decay with coef 2e-4
    assert float(js.mask_decay()(5000)) == pytest.approx(math.exp(-1.0), rel=1e-6)

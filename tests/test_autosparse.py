"""AutoSparse (jaxsparse.autosparse): the annealing schedule, the gradients through the annealed
soft threshold, learned per-layer thresholds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from conformance import batch, mlp_loss, mlp_params
from dst_testing import make_step


def paper_alpha(alpha0, t, T):
    """alpha(t) = alpha0 * max((1 + cos(pi t / T)) / 2, 1 - sigmoid(-6 + 12 t / T)), 0 from T on."""
    if t >= T:
        return 0.0
    cosine = (1 + math.cos(math.pi * t / T)) / 2
    sigmoid = 1 - 1 / (1 + math.exp(-(-6 + 12 * t / T)))
    return alpha0 * max(cosine, sigmoid)


@pytest.mark.compat
def test_alpha_schedule_at_chosen_steps():
    alpha = js.autosparse_alpha(0.8, end_step=1000)
    expected = {0: 0.8, 250: 0.8 * (1 - 1 / (1 + math.exp(3))), 500: 0.4, 750: 0.8 * (1 + math.cos(0.75 * math.pi)) / 2,
                999: paper_alpha(0.8, 999, 1000), 1000: 0.0, 5000: 0.0}
    for t, value in expected.items():
        assert float(alpha(t)) == pytest.approx(value, rel=1e-5, abs=1e-7), t
        assert float(alpha(t)) == pytest.approx(paper_alpha(0.8, t, 1000), rel=1e-5, abs=1e-7)
    # early the sigmoid term is the larger (alpha stays near alpha_0), late the cosine term
    assert float(alpha(100)) == pytest.approx(0.8 * (1 - 1 / (1 + math.exp(4.8))), rel=1e-5)
    assert float(alpha(950)) == pytest.approx(0.8 * (1 + math.cos(0.95 * math.pi)) / 2, rel=1e-5)
    values = [float(alpha(t)) for t in range(0, 1000, 10)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="alpha must be in"):
        js.autosparse_alpha(1.5, end_step=10)


def test_one_step_against_the_equations():
    """sgd(lr) for weights and thresholds: dense W <- W - lr (g on the mask, alpha g elsewhere);
    s <- s + lr sigmoid'(s) sum(g sign(W) h'), h' = 1 on the mask, alpha elsewhere; params =
    sign(W) max(|W| - sigmoid(s), 0)."""
    lr, alpha0, s0 = 0.1, 0.6, -1.5
    tx = js.autosparse(optax.sgd(lr), end_step=100, alpha=alpha0, threshold_init=s0)
    params = mlp_params()
    state = tx.init(params)
    tau0 = 1 / (1 + math.exp(-s0))
    for k in ("Dense_0", "Dense_1"):
        w = np.asarray(params[k]["kernel"])
        np.testing.assert_array_equal(np.asarray(state.masks[k]["kernel"]), np.abs(w) > tau0)
    params, _ = js.init(tx, params)
    grads = jax.grad(mlp_loss)(params, *batch(0))
    params, state = make_step(tx)(params, state, *batch(0))
    for i, k in enumerate(("Dense_0", "Dense_1")):
        w = np.asarray(mlp_params()[k]["kernel"])
        g = np.asarray(grads[k]["kernel"])
        mask = np.abs(w) > tau0
        dense = w - lr * np.where(mask, g, alpha0 * g)
        np.testing.assert_allclose(np.asarray(state.shadow[k]["kernel"]), dense, rtol=1e-5, atol=1e-6)
        d_tau = -np.sum(g * np.sign(w) * np.where(mask, 1.0, alpha0))
        s1 = s0 - lr * d_tau * tau0 * (1 - tau0)
        assert float(state.aux.thresholds[i]) == pytest.approx(s1, rel=1e-4)
        tau1 = 1 / (1 + math.exp(-s1))
        new_mask = np.abs(dense) > tau1
        np.testing.assert_array_equal(np.asarray(state.masks[k]["kernel"]), new_mask)
        expected = np.where(new_mask, np.sign(dense) * np.maximum(np.abs(dense) - tau1, 0), 0.0)
        np.testing.assert_allclose(np.asarray(params[k]["kernel"]), expected, rtol=1e-4, atol=1e-6)
        assert np.all(np.asarray(params[k]["kernel"])[~new_mask] == 0)


def test_weight_decay_on_the_thresholds_raises_the_sparsity():
    tx = js.autosparse(optax.adamw(0.05, weight_decay=2.0), end_step=20, threshold_init=-3.0)
    params, state = js.init(tx, mlp_params())
    step = make_step(tx)
    for t in range(8):
        params, state = step(params, state, *batch(t))
    thresholds = [float(s) for s in state.aux.thresholds]
    assert all(s > -3.0 for s in thresholds)  # decay pulls s toward 0, tau toward 0.5
    masks = js.get_masks(state)
    assert float(js.mask_sparsity(masks)) > 0.1
    for k in ("Dense_0", "Dense_1"):
        assert np.all(np.asarray(params[k]["kernel"])[~np.asarray(masks[k]["kernel"])] == 0)


def test_fixed_budget_variant():
    tx = js.autosparse(optax.adam(1e-2), end_step=10, sparsity=0.75)
    params, state = js.init(tx, mlp_params())
    step = make_step(tx)
    for t in range(3):
        params, state = step(params, state, *batch(t))
        for k in ("Dense_0", "Dense_1"):
            m = np.asarray(state.masks[k]["kernel"])
            assert m.sum() == m.size - math.floor(0.75 * m.size)
            dense = np.abs(np.asarray(state.shadow[k]["kernel"]))
            assert dense[m].min() >= dense[~m].max()
            assert np.all(np.asarray(params[k]["kernel"])[~m] == 0)


def test_gradient_annealing_on_n_of_m():
    tx = js.autosparse(optax.adam(1e-1), structure=js.n_of_m(2, 4), end_step=10)
    params, state = js.init(tx, mlp_params())
    step = make_step(tx)
    for t in range(3):
        params, state = step(params, state, *batch(t))
        for k in ("Dense_0", "Dense_1"):
            w = np.asarray(params[k]["kernel"])
            assert np.all((w != 0).reshape(-1, 4, w.shape[1]).sum(axis=1) <= 2)
            assert np.all(np.asarray(state.masks[k]["kernel"]).reshape(-1, 4, w.shape[1]).sum(axis=1) == 2)

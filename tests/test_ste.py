"""The straight-through family (jaxsparse.ste): STE, SR-STE, ST-3, against hand-written references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from conformance import assert_params_sparse
from dst_testing import make_step, run

KERNELS = ("Dense_0/kernel", "Dense_1/kernel")


def tiny_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jnp.zeros((4,))},
        "Dense_1": {"kernel": jax.random.normal(k2, (4, 2)), "bias": jnp.zeros((2,))},
    }


def tiny_loss(params, x, y):
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return jnp.mean((h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"] - y) ** 2)


def tiny_batch(t):
    x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), t), (5, 8))
    return x, jnp.stack([jnp.sin(x[:, 0]), jnp.cos(x[:, 1])], axis=1)


def nm_mask(w, n, m):
    """Reference N:M mask along axis 0: per group of m rows in a column, the n largest |w|, ties
    to the lower index."""
    w = np.asarray(w)
    mask = np.zeros(w.shape, bool)
    for c in range(w.shape[1]):
        for g in range(0, w.shape[0], m):
            order = sorted(range(m), key=lambda i: (-abs(float(w[g + i, c])), i))[:n]
            for i in order:
                mask[g + i, c] = True
    return mask


def assert_n_of_m(params, name, n, m):
    w = np.asarray(params[name])
    groups = (w != 0).reshape(w.shape[0] // m, m, *w.shape[1:]).sum(axis=1)
    assert np.all(groups <= n), f"{name}: more than {n} nonzeros in a group of {m}"


@pytest.mark.compat
def test_sr_ste_matches_a_hand_written_reference():
    """SR-STE 2:4 with sgd: the dense weights take the straight-through gradient (the gradient at
    the masked weights, on every entry) plus decay * (1 - mask) * w; params are the dense weights
    on the N:M mask of the current dense weights, exactly 0 elsewhere, after every step."""
    lr, decay = 0.1, 0.05
    tx = js.sr_ste(optax.sgd(lr), n=2, m=4, decay=decay, exclude="Dense_1")
    params, state = js.init(tx, tiny_params())
    dense = np.asarray(tiny_params()["Dense_0"]["kernel"])
    step = make_step(tx, tiny_loss)
    for t in range(4):
        mask = nm_mask(dense, 2, 4)
        kernel = np.asarray(params["Dense_0"]["kernel"])
        assert np.all(kernel[~mask] == 0)
        np.testing.assert_allclose(kernel, np.where(mask, dense, 0.0), rtol=1e-5, atol=1e-6)
        # the loss gradient at the masked weights, applied to every dense weight
        g = np.asarray(jax.grad(tiny_loss)(params, *tiny_batch(t))["Dense_0"]["kernel"])
        dense = dense - lr * (g + decay * (1 - mask) * dense)
        params, state = step(params, state, *tiny_batch(t))
        np.testing.assert_allclose(np.asarray(state.shadow["Dense_0"]["kernel"]), dense, rtol=1e-5, atol=1e-6)
        assert_n_of_m({"k": params["Dense_0"]["kernel"]}, "k", 2, 4)
        assert_params_sparse(params, js.get_masks(state))
    assert js.get_masks(state)["Dense_1"]["kernel"] is None


def test_sr_ste_decay_term_alone():
    """With a zero loss and sgd(1), one step moves the dense weights by -decay * (1 - mask) * w only."""
    tx = js.sr_ste(optax.sgd(1.0), decay=0.25)
    records = run(tx, steps=1, loss=lambda params, x, y: 0.0 * jnp.sum(params["Dense_0"]["kernel"]))
    for name, layer in zip(KERNELS, ("Dense_0", "Dense_1")):
        before = np.asarray(records[0].state.shadow[layer]["kernel"])
        mask = records[0].masks[name]
        after = np.asarray(records[1].state.shadow[layer]["kernel"])
        np.testing.assert_allclose(after, np.where(mask, before, before * (1 - 0.25)), rtol=1e-6)


@pytest.mark.parametrize("make, n, m", [
    (lambda: js.sr_ste(optax.adam(1e-1)), 2, 4),
    (lambda: js.ste(optax.adam(1e-1), structure=js.n_of_m(2, 4)), 2, 4),
    (lambda: js.mdgf(optax.adam(1e-1), n=1, m=4, coef=0.3), 1, 4),
], ids=["sr_ste", "ste_2_4", "mdgf_1_4"])
def test_n_of_m_after_every_step_and_masks_follow_the_dense_weights(make, n, m):
    records = run(make(), steps=5)
    flips = 0
    for before, after in zip(records[1:], records[2:]):
        for i, (name, layer) in enumerate(zip(KERNELS, ("Dense_0", "Dense_1"))):
            assert_n_of_m(after.params, name, n, m)
            mask = after.masks[name]
            assert mask.sum() == mask.size * n // m
            dense = np.asarray(after.state.shadow[layer]["kernel"])
            np.testing.assert_array_equal(mask, nm_mask(dense, n, m))
            np.testing.assert_array_equal(after.params[name], np.where(mask, dense, 0.0))
            flips += int(np.sum(mask != before.masks[name]))
    assert flips > 0  # with a large learning rate the N:M masks do change


def test_unstructured_ste_keeps_the_exact_budget_and_lets_weights_return():
    records = run(js.ste(optax.adam(0.2), sparsity=0.75), steps=6)
    returned = False
    for before, after in zip(records[1:], records[2:]):
        for name, layer in zip(KERNELS, ("Dense_0", "Dense_1")):
            mask = after.masks[name]
            assert mask.sum() == mask.size - math.floor(0.75 * mask.size)
            assert np.all(after.params[name][~mask] == 0)
            dense = np.abs(np.asarray(after.state.shadow[layer]["kernel"]))
            assert dense[mask].min() >= dense[~mask].max()  # the top-k of the dense weights
            returned |= bool(np.any(mask & ~before.masks[name]))
    assert returned


def test_st3_soft_thresholds_rescales_and_ramps_cubically():
    end = 4
    tx = js.st3(optax.sgd(0.05), sparsity=0.75, end_step=end, scope="layer")
    records = run(tx, steps=6)
    for t, record in enumerate(records):
        step = max(t - 1, 0)  # record t holds the masks chosen at step t - 1 (the initial ones at 0)
        fraction = 1 - (1 - min(step, end) / end) ** 3
        for name, layer in zip(KERNELS, ("Dense_0", "Dense_1")):
            mask = record.masks[name]
            assert mask.sum() == mask.size - min(math.floor(fraction * 0.75 * mask.size), math.floor(0.75 * mask.size))
            if t == 0:
                continue
            w = np.asarray(record.state.shadow[layer]["kernel"])
            tau = np.abs(w[~mask]).max() if (~mask).any() else 0.0
            kept = np.where(mask, np.abs(w), 0.0).mean(axis=0) + 1e-6
            scale = 1.01 / (kept / (np.abs(w).mean(axis=0) + 1e-6) + 0.01)
            expected = np.where(mask, (w - np.sign(w) * tau) * scale, 0.0)
            np.testing.assert_allclose(record.params[name], expected, rtol=1e-5, atol=1e-7)


def test_st3_global_scope_pools_the_budget():
    records = run(js.st3(optax.sgd(0.05), sparsity=0.75, end_step=2), steps=3)
    masks = records[-1].masks
    total = sum(m.size for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - math.floor(0.75 * total)
    with pytest.raises(ValueError, match="global ST-3 takes a float"):
        js.st3(optax.sgd(0.1), sparsity=js.erk(0.9), end_step=10)


def test_errors():
    params = {"Dense_0": {"kernel": jnp.ones((12, 16))}}
    with pytest.raises(ValueError, match="implies sparsity"):
        js.ste(optax.sgd(0.1), sparsity=0.9, structure=js.n_of_m(2, 4)).init(params)
    with pytest.raises(ValueError, match="sparsity is required"):
        js.ste(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/kernel' of shape \(12, 16\) cannot take the structure n_of_m\(2, 8"):
        js.sr_ste(optax.sgd(0.1), n=2, m=8).init(params)
    assert js.sr_ste(optax.sgd(0.1), n=2, m=8, dense_if_untileable=True).init(params).masks["Dense_0"]["kernel"] is None
    own_shadow = js.Topology(init=lambda i: (i.masks, ()), update=None, is_update_step=None, finish=lambda i, u: (u, i.aux))
    with pytest.raises(ValueError, match="keeps its own"):
        js.sparsifier(optax.sgd(0.1), sparsity=0.5, topology=own_shadow, gradient_annealing=0.5)

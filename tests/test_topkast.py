"""Top-KAST (jaxsparse.topkast): forward set = top-k of the shadow weights, backward superset."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from conformance import assert_params_sparse, mlp_params, train
from dst_testing import run

KERNELS = ("Dense_0/kernel", "Dense_1/kernel")


def top_k(x, k):
    """Reference top-k mask by magnitude with ties to the lowest flat index."""
    order = sorted(range(x.size), key=lambda i: (-abs(float(x.reshape(-1)[i])), i))[:k]
    mask = np.zeros(x.size, bool)
    mask[order] = True
    return mask.reshape(x.shape)


@pytest.mark.parametrize("sparsity", [0.75, js.erk(0.75)])
def test_default_backward_set_has_twice_the_forward_density(sparsity):
    records = run(js.topkast(optax.adam(1e-2), sparsity=sparsity, update_every=1), steps=2)
    for i, name in enumerate(KERNELS):
        forward = records[-1].masks[name]
        backward = np.asarray(records[-1].state.aux.backward[i])
        target = 1 - forward.sum() / forward.size  # the leaf's forward sparsity, up to rounding
        expected = forward.size - math.floor(max(0.0, 2 * target - 1) * forward.size)
        assert abs(int(backward.sum()) - expected) <= (0 if sparsity == 0.75 else 1)
        assert np.all(backward[forward])


@pytest.mark.compat
def test_forward_and_backward_sets_follow_the_shadow_weights():
    tx = js.topkast(optax.adam(1e-2), sparsity=0.75, backward_sparsity=0.5, update_every=1)
    records = run(tx, steps=5)
    explored = False
    for t in range(1, 6):
        before, after = records[t - 1], records[t]
        for i, name in enumerate(KERNELS):
            size = after.masks[name].size
            forward, backward = after.masks[name], np.asarray(after.state.aux.backward[i])
            shadow = np.asarray(after.state.aux.shadow[i])
            assert forward.sum() == size - math.floor(0.75 * size)
            assert backward.sum() == size - math.floor(0.5 * size)
            assert np.all(backward[forward])
            # params = shadow on the forward set, exactly 0 elsewhere
            assert np.all(after.params[name][~forward] == 0)
            np.testing.assert_allclose(after.params[name][forward], shadow[forward], rtol=1e-6, atol=1e-7)
            if t >= 2:  # step t - 1 recomputed both sets from the shadow weights it was given
                previous = np.asarray(before.state.aux.shadow[i])
                np.testing.assert_array_equal(forward, top_k(previous, forward.sum()))
                np.testing.assert_array_equal(backward, top_k(previous, backward.sum()))
                # weights outside the backward set do not move; weights in B \ A do, unseen by params
                np.testing.assert_array_equal(shadow[~backward], previous[~backward])
                explored |= bool(np.any(shadow[backward & ~forward] != previous[backward & ~forward]))
    assert explored


def test_exploration_penalty_gradient():
    # With a zero loss and sgd(1), one step moves the shadow weights by the penalty gradient only:
    # -penalty * theta on A, -penalty / D * theta on B \ A, nothing outside B.
    tx = js.topkast(optax.sgd(1.0), sparsity=0.75, backward_sparsity=0.5, penalty=0.01, update_every=100)
    records = run(tx, steps=1, loss=lambda params, x, y: 0.0 * jnp.sum(params["Dense_0"]["kernel"]))
    before, after = records[0].state.aux, records[1].state.aux
    forward = records[0].masks["Dense_0/kernel"]
    backward = np.asarray(before.backward[0])
    theta = np.asarray(before.shadow[0])
    density = forward.sum() / forward.size
    expected = np.where(forward, theta * (1 - 0.01), np.where(backward, theta * (1 - 0.01 / density), theta))
    np.testing.assert_allclose(after.shadow[0], expected, rtol=1e-6)


@pytest.mark.parametrize("wrapper", ["multisteps", "inject_hyperparams", "bfloat16"])
def test_conformance_with_a_larger_backward_set(wrapper):
    # The conformance FACTORIES use backward == forward (moments zero off the forward masks);
    # here B is larger, so moments are nonzero on B \ A by design and only params are checked.
    def make(lr):
        return js.topkast(optax.adam(lr), sparsity=0.75, backward_sparsity=0.5, penalty=1e-3, update_every=2)

    if wrapper == "multisteps":
        params, state, _ = train(optax.MultiSteps(make(1e-2), every_k_schedule=2), steps=6)
    elif wrapper == "inject_hyperparams":
        params, state, _ = train(optax.inject_hyperparams(make)(lr=1e-2), steps=5)
    else:
        params, state, _ = train(make(1e-2), steps=5, dtype=jnp.bfloat16)
        assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    assert_params_sparse(params, js.get_masks(state))


def test_bad_arguments():
    with pytest.raises(ValueError, match="backward_sparsity"):
        js.topkast(optax.sgd(0.1), sparsity=0.8, backward_sparsity=0.9)
    with pytest.raises(ValueError, match="penalty"):
        js.topkast(optax.sgd(0.1), sparsity=0.8, backward_sparsity=0.5, penalty=-1.0)
    with pytest.raises(ValueError, match="backward_sparsity"):
        js.topkast(optax.sgd(0.1), sparsity=0.8, backward_sparsity=1.0)


def test_inner_transformation_sees_the_dense_weights_it_trains():
    # Weight decay inside the inner optimizer must act on theta (the shadow weights it updates),
    # also on B \ A where params are 0. With a zero loss and sgd(1), one step multiplies theta on
    # B by (1 - 0.1) and leaves it alone outside B.
    inner = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1.0))
    tx = js.topkast(inner, sparsity=0.75, backward_sparsity=0.5, update_every=100)
    params, state = js.init(tx, mlp_params())  # params are theta on A, 0 elsewhere
    records = run(tx, steps=1, params=params, state=state, loss=lambda params, x, y: 0.0 * jnp.sum(params["Dense_0"]["kernel"]))
    before, after = records[0].state.aux, records[1].state.aux
    backward, theta = np.asarray(before.backward[0]), np.asarray(before.shadow[0])
    forward = records[0].masks["Dense_0/kernel"]
    assert np.any(backward & ~forward)
    np.testing.assert_allclose(after.shadow[0], np.where(backward, 0.9 * theta, theta), rtol=1e-6)


def test_gradient_annealing_trains_weights_outside_the_backward_set():
    """Top-KAST + GA (Kundu et al., 2023): with sgd(1) and a gradient of 1 everywhere, theta moves
    by -1 on the backward set and by -alpha outside it; params stay theta on A, 0 elsewhere."""
    tx = js.topkast(optax.sgd(1.0), sparsity=0.75, backward_sparsity=0.5, update_every=100, gradient_annealing=0.25)
    records = run(tx, steps=2, loss=lambda params, x, y: jnp.sum(params["Dense_0"]["kernel"]))
    for before, after in zip(records, records[1:]):
        back = np.asarray(before.state.aux.backward[0])
        theta0, theta1 = np.asarray(before.state.aux.shadow[0]), np.asarray(after.state.aux.shadow[0])
        np.testing.assert_allclose(theta1 - theta0, np.where(back, -1.0, -0.25), atol=1e-6)
        forward = after.masks["Dense_0/kernel"]
        assert np.all(after.params["Dense_0/kernel"][~forward] == 0)

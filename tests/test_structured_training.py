"""Every preset that takes ``structure=``: N:M validity and whole-tile budgets after every step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js

NM, TILES = js.n_of_m(2, 4), js.blocks(2, 2)
STRUCTURE = {"Dense_0": NM, "Dense_1": TILES}  # one leaf of each in the same run


def _params():
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "Dense_0": {"kernel": jax.random.normal(k0, (8, 6)), "bias": jnp.ones(6)},
        "Dense_1": {"kernel": jax.random.normal(k1, (6, 4)), "bias": jnp.ones(4)},
    }


GRADUAL = js.polynomial_schedule(begin_step=0, end_step=4)
DST = dict(update_every=2, end_step=100)
PRESETS = {
    "magnitude": lambda **kw: js.magnitude_pruning(optax.sgd(0.1), schedule=GRADUAL, update_every=1, **kw),
    "random": lambda **kw: js.random_pruning(optax.sgd(0.1), schedule=GRADUAL, update_every=2, **kw),
    "saliency": lambda **kw: js.saliency_pruning(optax.sgd(0.1), **kw),
    "global": lambda **kw: js.global_magnitude_pruning(optax.sgd(0.1), schedule=GRADUAL, update_every=1, **kw),
    "lamp": lambda **kw: js.lamp_pruning(optax.sgd(0.1), **kw),
    "static": lambda **kw: js.static_sparse(optax.sgd(0.1), **kw),
    "set": lambda **kw: js.set_sparse(optax.sgd(0.1), drop_fraction=0.5, **DST, **kw),
    # RigL with adam: tests/conformance.py ("rigl_structured")
    "rigl_no_regrow": lambda **kw: js.rigl(optax.sgd(0.1), drop_fraction=0.5, regrow_dropped=False, **DST, **kw),
    "snfs": lambda **kw: js.snfs(optax.sgd(0.1, momentum=0.9), drop_fraction=0.5, **DST, **kw),
    "topkast": lambda **kw: js.topkast(optax.sgd(0.1), update_every=1, **kw),
}
DYNAMIC = {"set", "rigl_no_regrow", "snfs", "topkast"}


def _groups(x):  # (8, 6) -> per group of 4 consecutive inputs, per output: (2, 6) counts
    return np.asarray(x).reshape(2, 4, 6).sum(1)


def _tiles(x):  # (6, 4) -> (3, 2, 2, 2, ...) tile view: (3, 2) grid of 2x2 tiles
    return np.asarray(x).reshape(3, 2, 2, 2).transpose(0, 2, 1, 3).reshape(3, 2, 4)


def _jitted_step(tx):
    """One compiled step on random gradients."""

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("name", list(PRESETS))
def test_params_keep_the_structure_after_every_step(name):
    tx = PRESETS[name](sparsity=js.uniform(0.5), structure=STRUCTURE)
    params, state = js.init(tx, _params())

    step = _jitted_step(tx)
    history = []
    for t in range(7):
        params, state = step(params, state, jax.random.PRNGKey(t))
        masks = js.get_masks(state)
        m0, m1 = np.asarray(masks["Dense_0"]["kernel"]), np.asarray(masks["Dense_1"]["kernel"])
        p0, p1 = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_1"]["kernel"])
        assert not (p0[~m0]).any() and not (p1[~m1]).any()  # params exactly 0 off the masks
        # N:M: every group holds the same count, n once the schedule is done (DST: always)
        counts = _groups(m0)
        assert (counts == counts.flat[0]).all()
        assert (_groups(p0 != 0) <= counts.flat[0]).all()
        tiles = _tiles(m1)
        assert (tiles.all(-1) | ~tiles.any(-1)).all()  # an exact union of whole tiles
        if name in DYNAMIC or t >= 4:
            assert counts.flat[0] == 2
            assert tiles.all(-1).sum() == 6 - 3  # T - floor(s T) tiles
            assert bool(NM.complies(p0 != 0))
        history.append((m0, m1))
    if name in DYNAMIC - {"topkast"}:  # the topology really moved, in whole groups
        assert any((a != b).any() for (a, _), (b, _) in zip(history, history[1:]))
        assert any((a != b).any() for (_, a), (_, b) in zip(history, history[1:]))


@pytest.mark.compat
def test_n_of_m_sparsity_may_be_omitted_and_must_match():
    params = _params()
    tx = js.magnitude_pruning(optax.sgd(0.1), structure=NM, exclude="Dense_1")
    new, state = js.init(tx, params)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, new)
    mask = np.asarray(js.get_masks(state)["Dense_0"]["kernel"])
    assert (_groups(mask) == 2).all()
    np.testing.assert_array_equal(mask, NM.select(jnp.abs(params["Dense_0"]["kernel"])))  # the largest |w|
    with pytest.raises(ValueError, match=r"n_of_m\(2, 4, axis=-2\).*0\.9"):  # at construction
        js.rigl(optax.sgd(0.1), sparsity=0.9, end_step=10, structure=NM)
    with pytest.raises(ValueError, match=r"n_of_m\(2, 4, axis=-2\).*erk"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=js.erk(0.5), structure=NM)
    with pytest.raises(ValueError, match=r"n_of_m\(2, 4, axis=-2\).*0\.9.*Dense_0/kernel"):  # per leaf
        js.rigl(optax.sgd(0.1), sparsity=js.uniform(0.5), overrides={"Dense_0": 0.9}, end_step=10,
                structure=NM, exclude="Dense_1").init(params)
    with pytest.raises(ValueError, match=r"sparsity is required with the structure blocks\(2, 2\)"):
        js.rigl(optax.sgd(0.1), end_step=10, structure=TILES)
    with pytest.raises(ValueError, match="'Dense_1/kernel' needs a target sparsity"):  # per leaf at init
        js.rigl(optax.sgd(0.1), end_step=10, structure={"Dense_0": NM}).init(params)


@pytest.mark.compat
def test_untileable_leaf_raises_or_stays_dense_when_asked():
    params = _params()
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*\(8, 6\).*blocks\(4, 4\).*dense_if_untileable"):
        js.set_sparse(optax.sgd(0.1), sparsity=0.5, structure=js.blocks(4, 4)).init(params)
    tx = js.set_sparse(optax.sgd(0.1), sparsity=0.5, structure=js.blocks(2, 4), dense_if_untileable=True)
    masks = js.get_masks(tx.init(params))
    assert masks["Dense_0"]["kernel"] is None  # 6 columns: not a multiple of 4, kept dense
    rows = np.asarray(masks["Dense_1"]["kernel"]).reshape(3, 8)  # (2, 4) tiles of the (6, 4) kernel
    assert (rows.all(-1) | ~rows.any(-1)).all() and rows.all(-1).sum() == 3 - 1


def test_channels_prune_whole_output_units():
    tx = js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, structure=js.channels())
    params, state = js.init(tx, _params())
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)  # one-shot at step 0
    m = np.asarray(js.get_masks(state)["Dense_0"]["kernel"])
    assert m.all(0).sum() == 3 and (m.all(0) | ~m.any(0)).all()


def test_rigl_drops_and_grows_whole_channels_and_keeps_constant_fan_in():
    tx = js.rigl(optax.sgd(0.1), sparsity=js.uniform(0.5), update_every=1, end_step=100, drop_fraction=0.5,
                 structure={"Dense_0": js.channels(), "Dense_1": js.constant_fan_in()})
    params, state = js.init(tx, _params())

    step = _jitted_step(tx)
    seen = set()
    for t in range(4):
        params, state = step(params, state, jax.random.PRNGKey(t))
        masks = js.get_masks(state)
        m0, m1 = np.asarray(masks["Dense_0"]["kernel"]), np.asarray(masks["Dense_1"]["kernel"])
        assert (m0.all(0) | ~m0.any(0)).all() and m0.all(0).sum() == 3  # 3 of 6 whole output units
        assert (m1.sum(0) == 3).all()  # fan-in 3 of 6 for every output unit
        seen.add(m0.tobytes())
    assert len(seen) > 1  # channels moved


_EVERY_STRUCTURED = {
    **PRESETS,
    "rigl": lambda **kw: js.rigl(optax.sgd(0.1), **DST, **kw),
    "ste": lambda **kw: js.ste(optax.sgd(0.1), **kw),
    "autosparse_budget": lambda **kw: js.autosparse(optax.sgd(0.1), end_step=10, **kw),
}


@pytest.mark.parametrize("name", sorted(_EVERY_STRUCTURED))
def test_every_structured_preset_checks_nm_sparsity_and_untileable_leaves(name):
    """Each preset taking ``structure=``: an N:M sparsity other than 1 - n/m and a leaf the
    structure cannot tile raise ValueErrors (naming the value; the leaf, its shape and the
    structure); ``dense_if_untileable=True`` keeps such leaves dense. Init is only traced."""
    make, params = _EVERY_STRUCTURED[name], _params()
    with pytest.raises(ValueError, match=r"n_of_m\(2, 4, axis=-2\).*0\.6"):
        jax.eval_shape(make(sparsity=0.6, structure=NM).init, params)
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*\(8, 6\).*blocks\(4, 4\)"):
        jax.eval_shape(make(sparsity=0.5, structure=js.blocks(4, 4)).init, params)
    masks = js.get_masks(jax.eval_shape(make(sparsity=0.5, structure=js.blocks(2, 4), dense_if_untileable=True).init, params))
    assert masks["Dense_0"]["kernel"] is None and masks["Dense_1"]["kernel"].shape == (6, 4)

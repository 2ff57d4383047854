"""Checkpoints with orbax, as the README shows: save mid-schedule, restore into the abstract state,
continue bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from conformance import batch, mlp_params
from dst_testing import make_step

ocp = pytest.importorskip("orbax.checkpoint")


@pytest.mark.parametrize("make", [
    lambda: js.rigl(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=10, seed=1),
    lambda: js.topkast(optax.adamw(1e-2), sparsity=0.75, update_every=2),
    lambda: js.autosparse(optax.adamw(1e-2), end_step=10, threshold_init=-1.0),
], ids=["rigl", "topkast", "autosparse"])
def test_readme_recipe_resumes_bit_for_bit(make, tmp_path):
    tx = make()
    step = make_step(tx)
    params, opt_state = js.init(tx, mlp_params())
    for t in range(3):
        params, opt_state = step(params, opt_state, *batch(t))
    manager = ocp.CheckpointManager(tmp_path / "run")
    manager.save(3, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()
    for t in range(3, 7):
        params, opt_state = step(params, opt_state, *batch(t))

    target = jax.eval_shape(lambda: {"params": mlp_params(), "opt_state": tx.init(mlp_params())})
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
    p, s = restored["params"], restored["opt_state"]
    assert isinstance(s, js.SparsifierState)
    assert all(m.dtype == bool for m in jax.tree.leaves(js.get_masks(s)))
    for t in range(3, 7):
        p, s = step(p, s, *batch(t))
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((p, s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _saved(tmp_path, tx, steps=3):
    step = make_step(tx)
    params, opt_state = js.init(tx, mlp_params())
    for t in range(steps):
        params, opt_state = step(params, opt_state, *batch(t))
    manager = js.checkpoint_manager(tmp_path / "run")
    js.save_checkpoint(manager, steps, params, opt_state, tx=tx)
    return manager, params, opt_state, step


@pytest.mark.compat
def test_helpers_restore_typed_keys_bool_masks_and_continue(tmp_path):
    # a typed PRNG key in the inner state (add_noise) and the sparsifier's raw key both survive
    tx = js.rigl(optax.chain(optax.add_noise(0.01, 0.55, key=jax.random.key(3)), optax.adam(1e-2)), sparsity=js.uniform(0.75),
                 update_every=2, end_step=10, seed=jax.random.key(1))
    manager, params, opt_state, step = _saved(tmp_path, tx)
    p, s = js.restore_checkpoint(manager, tx, jax.eval_shape(mlp_params))
    noise_key = s.inner_state[0].rng_key
    assert jax.dtypes.issubdtype(noise_key.dtype, jax.dtypes.prng_key)
    assert s.key.dtype == np.uint32 and all(m.dtype == bool for m in jax.tree.leaves(js.get_masks(s)))
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((p, s))):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for t in range(3, 6):
        params, opt_state = step(params, opt_state, *batch(t))
        p, s = step(p, s, *batch(t))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_other_params_or_another_method_names_what_differs(tmp_path):
    tx = js.rigl(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=10)
    manager, *_ = _saved(tmp_path, tx)
    other = {**jax.eval_shape(mlp_params), "Dense_2": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32)}}
    with pytest.raises(ValueError, match=r"(?s)step 3.*params leaves the target has and the checkpoint lacks: \['Dense_2/kernel'\]"):
        js.restore_checkpoint(manager, tx, other)
    wider = jax.eval_shape(lambda: mlp_params(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"params leaf 'Dense_0/bias': checkpoint float32\[16\], target bfloat16\[16\]"):
        js.restore_checkpoint(manager, tx, wider)
    topkast = js.topkast(optax.adam(1e-2), sparsity=0.75, update_every=2)
    with pytest.raises(ValueError, match=r"opt_state leaves the target has and the checkpoint lacks: \['aux/shadow/0'"):
        js.restore_checkpoint(manager, topkast, jax.eval_shape(mlp_params))
    sgd = js.rigl(optax.sgd(1e-2, momentum=0.9), sparsity=js.uniform(0.75), update_every=2, end_step=10)
    with pytest.raises(ValueError, match=r"opt_state leaves the target has and the checkpoint lacks: \['inner_state/0/trace"):
        js.restore_checkpoint(manager, sgd, jax.eval_shape(mlp_params))


@pytest.mark.compat
def test_a_checkpoint_of_another_method_with_the_same_state_tree_is_refused_naming_both(tmp_path):
    # RigL and SET (or RigL at another sparsity or structure) have states of the same tree: only
    # the description saved with tx= tells them apart
    rigl = lambda **kw: js.rigl(optax.adam(1e-2), **{"sparsity": js.uniform(0.75), **kw}, update_every=2, end_step=10)
    manager, *_ = _saved(tmp_path, rigl(), steps=1)
    abstract = jax.eval_shape(mlp_params)
    assert jax.tree.structure(jax.eval_shape(rigl().init, abstract)) == jax.tree.structure(
        jax.eval_shape(js.set_sparse(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=10).init, abstract))
    set_tx = js.set_sparse(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=10)
    with pytest.raises(ValueError, match=r"(?s)step 1.*another method.*topology: checkpoint "
                       r"'drop_and_grow\(drop=magnitude, grow=gradient_magnitude\)', target 'drop_and_grow\(drop=magnitude, grow=random\)'"):
        js.restore_checkpoint(manager, set_tx, abstract)
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/kernel' \[sparsity, structure\]: checkpoint \[0.75, 'unstructured\(\)'\], "
                       r"target \[0.5, 'unstructured\(\)'\]"):
        js.restore_checkpoint(manager, rigl(sparsity=js.uniform(0.5)), abstract)
    with pytest.raises(ValueError, match=r"target \[0.75, 'blocks\(4, 4\)'\]"):
        js.restore_checkpoint(manager, rigl(structure={"Dense_0": js.blocks(4, 4)}), abstract)
    js.restore_checkpoint(manager, rigl(), abstract)  # the same method restores (another seed would too)


def test_a_corrupted_or_truncated_checkpoint_fails_and_nothing_is_overwritten(tmp_path):
    tx = js.rigl(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=10)
    manager, params, opt_state, _ = _saved(tmp_path, tx)
    step_dir = tmp_path / "run" / "3"
    files = {p: p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"step 3 is already saved.*not overwritten"):
        js.save_checkpoint(manager, 3, params, opt_state)
    assert {p: p.read_bytes() for p in files} == files
    for path in (step_dir / "opt_state").rglob("*"):  # truncate the state's data files
        if path.is_file() and "/d/" in str(path):
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"checkpoint step 3 in .* cannot be read"):
        js.restore_checkpoint(manager, tx, jax.eval_shape(mlp_params))
    (step_dir / "jaxsparse" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match=r"checkpoint step 3 in .* cannot be read"):
        js.restore_checkpoint(manager, tx, jax.eval_shape(mlp_params))
    with pytest.raises(ValueError, match=r"no checkpoint at step 7"):
        js.restore_checkpoint(manager, tx, jax.eval_shape(mlp_params), step=7)


def test_helpers_restore_shadow_weights_and_the_plan(tmp_path):
    """A straight-through run (dense shadow weights in the state) restores through the helpers:
    the abstract state holds the shadow weights, and the plan (static) comes back with it."""
    tx = js.sr_ste(optax.adam(1e-2))
    manager, params, opt_state, _ = _saved(tmp_path, tx, steps=2)
    p, s = js.restore_checkpoint(manager, tx, jax.eval_shape(mlp_params))
    for a, b in zip(jax.tree.leaves((params, js.get_shadow(opt_state))), jax.tree.leaves((p, js.get_shadow(s)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert js.get_plan(s) == js.get_plan(opt_state)
    assert all(r.complies for r in js.sparsity_report(p, state=s).rows if r.structure)

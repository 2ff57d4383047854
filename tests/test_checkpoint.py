"""Checkpoints with orbax, as the README shows: save mid-schedule, restore into the abstract state,
continue bit for bit."""

import jax
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

"""Every preset in one configuration each, for the tests that run all of them the same way
(sharding, checkpoints). Add a preset here and those tests cover it.

Each entry builds a transformation for a few steps of the sharded-MLP runs: topology updates
every 2 steps, schedules ending at step 8.
"""

import optax

import jaxsparse as js


def _adam():
    return optax.adam(1e-2)


PRESETS = {
    "magnitude": lambda: js.magnitude_pruning(_adam(), sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2),
    "global_magnitude": lambda: js.global_magnitude_pruning(_adam(), sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2),
    "lamp": lambda: js.lamp_pruning(_adam(), sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2),
    "static": lambda: js.static_sparse(_adam(), sparsity=js.erk(0.75), seed=1),
    "set": lambda: js.set_sparse(_adam(), sparsity=js.uniform(0.75), update_every=2, end_step=8, seed=1),
    "rigl": lambda: js.rigl(_adam(), sparsity=js.erk(0.75), update_every=2, end_step=8, seed=1),
    "snfs": lambda: js.snfs(optax.sgd(1e-2, momentum=0.9), sparsity=js.uniform(0.75), update_every=2, end_step=8, seed=1),
    "srigl": lambda: js.srigl(_adam(), sparsity=js.uniform(0.75), update_every=2, end_step=8, seed=1),
    "topkast": lambda: js.topkast(optax.adamw(1e-2), sparsity=0.75, backward_sparsity=0.5, update_every=2, seed=1),
}

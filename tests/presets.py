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
    # structures (8 x 8 tiles tile every (data, model) shard of the MLP's kernels; 2:4 groups lie
    # within a shard on the input axis) and gradient annealing (dense shadow weights in the state)
    "magnitude_2of4": lambda: js.magnitude_pruning(_adam(), structure=js.n_of_m(2, 4), schedule=js.polynomial_schedule(0, 4), update_every=2),
    "rigl_blocks": lambda: js.rigl(_adam(), sparsity=js.uniform(0.75), structure=js.blocks(8, 8), update_every=2, end_step=8, seed=1),
    "magnitude_channels": lambda: js.magnitude_pruning(_adam(), sparsity=0.5, structure=js.channels(), schedule=js.polynomial_schedule(0, 4), update_every=2),
    "magnitude_annealed": lambda: js.magnitude_pruning(_adam(), sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2, gradient_annealing=0.5),
    # the straight-through family: shadow weights, a mask every step; ST-3 and AutoSparse keep thresholds
    "ste_2of4": lambda: js.ste(_adam(), structure=js.n_of_m(2, 4)),
    "sr_ste": lambda: js.sr_ste(_adam(), decay=2e-2),
    "st3": lambda: js.st3(_adam(), sparsity=0.75, end_step=4),
    "autosparse": lambda: js.autosparse(optax.adamw(1e-2), end_step=8, threshold_init=-1.0),
    "sdgf": lambda: js.sdgf(_adam(), n=1, m=4, begin_step=0, end_step=6),
}

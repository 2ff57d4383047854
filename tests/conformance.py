"""Conformance checks that every jaxsparse transformation passes.

A later preset gets them by adding a factory to ``FACTORIES`` below: each check builds the
transformation from ``factory(inner)`` and trains a small two-layer MLP for a few steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js

# name -> factory(inner) -> transformation. Sparsity 0.75 and frequent updates so a few steps
# exercise topology updates.
FACTORIES = {
    "magnitude_pruning": lambda inner: js.magnitude_pruning(
        inner, sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2
    ),
    "random_pruning": lambda inner: js.random_pruning(inner, sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2),
    "saliency_pruning": lambda inner: js.saliency_pruning(inner, sparsity=0.75, update_every=2),
    "global_magnitude_pruning": lambda inner: js.global_magnitude_pruning(inner, sparsity=0.75, update_every=2),
    "lamp_pruning": lambda inner: js.lamp_pruning(inner, sparsity=0.75),
    "static_sparse": lambda inner: js.static_sparse(inner, sparsity=js.erk(0.75), seed=1),
    # Dynamic sparse training (uniform, so both kernels change topology).
    "set_sparse": lambda inner: js.set_sparse(inner, sparsity=js.uniform(0.75), update_every=2, seed=1),
    "rigl": lambda inner: js.rigl(inner, sparsity=js.uniform(0.75), update_every=2, end_step=6),
    "snfs": lambda inner: js.snfs(inner, sparsity=0.75, update_every=2, end_step=6),
    "srigl": lambda inner: js.srigl(inner, sparsity=js.uniform(0.75), update_every=2, end_step=6, gamma_sal=0.5),
    # The backward set equals the forward set here, so moments stay zero off the forward masks;
    # tests/test_topkast.py runs these checks with a larger backward set.
    "topkast": lambda inner: js.topkast(inner, sparsity=0.75, backward_sparsity=0.75, penalty=1e-3, update_every=2),
    # Gradient annealing and the straight-through family: dense shadow weights in the state
    # (sr_ste: the STE topology; st3: a forward hook; autosparse: learned thresholds, annealing).
    "sr_ste": lambda inner: js.sr_ste(inner, n=2, m=4),
    "st3": lambda inner: js.st3(inner, sparsity=0.75, end_step=4),
    "autosparse": lambda inner: js.autosparse(inner, end_step=6, threshold_init=-1.0),
    # Structures (issue 12): whole 4x4 tiles on one kernel, 2:4 on the other, in one run.
    "rigl_structured": lambda inner: js.rigl(
        inner, sparsity=js.uniform(0.5), update_every=2, end_step=6,
        structure={"Dense_0": js.blocks(4, 4), "Dense_1": js.n_of_m(2, 4)},
    ),
}

# Transformations whose inner optimizer trains dense shadow weights: their moments are dense (a
# pruned weight keeps training), so the moment checks do not apply.
SHADOW_WEIGHTS = {"sr_ste", "st3", "autosparse"}


def mlp_params(dtype=jnp.float32, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (12, 16), dtype), "bias": jnp.zeros((16,), dtype)},
        "Dense_1": {"kernel": jax.random.normal(k2, (16, 3), dtype), "bias": jnp.zeros((3,), dtype)},
    }


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    return jnp.mean((out.astype(jnp.float32) - y) ** 2)


def batch(step, dtype=jnp.float32):
    key = jax.random.fold_in(jax.random.PRNGKey(42), step)
    x = jax.random.normal(key, (8, 12), dtype)
    return x, jnp.sin(x[:, :3].astype(jnp.float32))


def train(tx, steps=6, dtype=jnp.float32, params=None, jit=True):
    """Run the standard optax loop; returns (params, state, list of params after each step)."""
    params = mlp_params(dtype) if params is None else params
    state = tx.init(params)

    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    history = []
    for t in range(steps):
        params, state = step(params, state, *batch(t, dtype))
        history.append(params)
    return params, state, history


def assert_params_sparse(params, masks):
    """Every entry where the mask is False is exactly zero."""
    flat_m = jax.tree_util.tree_flatten_with_path(masks)[0]
    by_path = {js.path_to_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert flat_m, "no sparsified leaf"
    for path, m in flat_m:
        name = js.path_to_str(path)
        p = np.asarray(by_path[name])
        assert np.all(p[~np.asarray(m)] == 0), f"{name}: nonzero params at pruned positions"

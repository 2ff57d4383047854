"""Cost of sparsifiers' steps relative to a plain optax step, measured side by side.

MLP of four 2048x2048 layers (16.8M weights), adam, batch of 128. Times, in one run and
interleaved: a plain optax step and, for each method, a non-update step and a topology-update
step, and prints their ratios to the plain step (targets: <= 1.05x and <= 3x).

- ``magnitude``: gradual magnitude pruning to 90% (the update prunes by magnitude);
- ``global_magnitude``: the same with one global threshold;
- ``rigl``, ``set``, ``snfs``, ``srigl``: dynamic sparse training at 90% (ERK), update at step
  1000 of 100000 (drop fraction ~0.3, ~0.5 for SNFS); non-update steps of SNFS also update its
  gradient moving average, as the method requires; ``rigl_no_regrow``: RigL with
  ``regrow_dropped=False`` (growth only among positions inactive before the update, one nested
  selection instead of two dependent ones);
- ``topkast``: forward 90%, backward 80%; every step updates the dense shadow weights;
- structured (issue 12): ``magnitude_2of4`` and ``rigl_2of4`` with ``structure=js.n_of_m(2, 4)``
  (gradual magnitude pruning from 4 to 2 of every 4 inputs; RigL at 50%, each group regrowing
  what it lost), ``magnitude_blocks`` and ``rigl_blocks`` with ``structure=js.blocks(128, 128)``
  at 90% (whole tiles, scored by the L2 norm of their entries' scores).

    python benchmarks/topology_update_cost.py [--reps 20] [--batch 128] [--method rigl set ...]
    python benchmarks/topology_update_cost.py --method all --device gpu
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js

WIDTH, LAYERS = 2048, 4


def init_mlp(key):
    keys = jax.random.split(key, LAYERS)
    return {
        f"Dense_{i}": {
            "kernel": jax.random.normal(k, (WIDTH, WIDTH), jnp.float32) / np.sqrt(WIDTH),
            "bias": jnp.zeros((WIDTH,), jnp.float32),
        }
        for i, k in enumerate(keys)
    }


def loss_fn(params, x, y):
    h = x
    for i in range(LAYERS):
        layer = params[f"Dense_{i}"]
        h = h @ layer["kernel"] + layer["bias"]
        if i < LAYERS - 1:
            h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)


def make_step(tx):
    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def sparsifiers(update_every):
    """Transformations to time, by name; each has an update step at ``update_every``."""
    gradual = js.polynomial_schedule(begin_step=0, end_step=10 * update_every)
    end = 100 * update_every
    adam = optax.adam(1e-3)
    return {
        "magnitude": js.magnitude_pruning(adam, sparsity=0.9, schedule=gradual, update_every=update_every),
        "global_magnitude": js.global_magnitude_pruning(adam, sparsity=0.9, schedule=gradual, update_every=update_every),
        "rigl": js.rigl(adam, sparsity=0.9, update_every=update_every, end_step=end),
        # growth only among positions inactive before the update (one nested selection per leaf)
        "rigl_no_regrow": js.rigl(adam, sparsity=0.9, update_every=update_every, end_step=end, regrow_dropped=False),
        "set": js.set_sparse(adam, sparsity=js.erk(0.9), update_every=update_every, end_step=end),
        "snfs": js.snfs(adam, sparsity=js.erk(0.9), update_every=update_every, end_step=end),
        "srigl": js.srigl(adam, sparsity=0.9, update_every=update_every, end_step=end),
        "topkast": js.topkast(adam, sparsity=0.9, backward_sparsity=0.8, penalty=1e-4, update_every=update_every),
        "magnitude_2of4": js.magnitude_pruning(adam, structure=js.n_of_m(2, 4), schedule=gradual, update_every=update_every),
        "rigl_2of4": js.rigl(adam, structure=js.n_of_m(2, 4), update_every=update_every, end_step=end),
        "magnitude_blocks": js.magnitude_pruning(
            adam, sparsity=0.9, structure=js.blocks(128, 128), schedule=gradual, update_every=update_every
        ),
        "rigl_blocks": js.rigl(adam, sparsity=0.9, structure=js.blocks(128, 128), update_every=update_every, end_step=end),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    names = list(sparsifiers(1))
    parser.add_argument("--method", nargs="+", default=["magnitude"], choices=names + ["all"])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args()
    methods = names if "all" in args.method else args.method
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu needs a GPU; jax sees {jax.devices()}")

    update_every = 1000  # update steps at 1000, 2000, ... (and 0 for pruning); 1 is a non-update step
    params = init_mlp(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, WIDTH))
    y = jax.random.normal(jax.random.PRNGKey(2), (args.batch, WIDTH))

    def timed(fn, *a):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        return time.perf_counter() - t0

    def with_step(state, step):  # the same state at another step count, to choose the branch
        return state._replace(step=jnp.asarray(step, jnp.int32))

    plain_tx = optax.adam(1e-3)
    plain_step = make_step(plain_tx)
    # Compile and run one step of each: for pruning, step 0 prunes to the first schedule point.
    p_plain, s_plain = jax.block_until_ready(plain_step(params, plain_tx.init(params), x, y))
    runs = {}
    for name in methods:
        tx = sparsifiers(update_every)[name]
        step = make_step(tx)
        p, s = jax.block_until_ready(step(params, tx.init(params), x, y))
        for t in (1, update_every):  # warm both branches (a first call may allocate)
            jax.block_until_ready(step(p, with_step(s, t), x, y))
        runs[name] = (step, p, s)

    # Each sparse step is timed between two plain steps and compared with their mean, so slow
    # drifts of this shared machine's load cancel; the order of methods is shuffled per rep.
    plain_times, skip_ratio, update_ratio = [], {n: [] for n in methods}, {n: [] for n in methods}
    skip_ms, update_ms = {n: [] for n in methods}, {n: [] for n in methods}
    rng = np.random.default_rng(0)
    for _ in range(args.reps):
        before = timed(plain_step, p_plain, s_plain, x, y)
        for name in rng.permutation(methods):
            step, p, s = runs[name]
            for t, ratios, ms in ((1, skip_ratio, skip_ms), (update_every, update_ratio, update_ms)):
                dt = timed(step, p, with_step(s, t), x, y)
                after = timed(plain_step, p_plain, s_plain, x, y)
                ratios[name].append(dt / (0.5 * (before + after)))
                ms[name].append(dt)
                plain_times.append(after)
                before = after

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, MLP {LAYERS}x{WIDTH}x{WIDTH}, adam, "
          f"batch {args.batch}, 90% sparse, {args.reps} reps; plain optax step {np.median(plain_times) * 1e3:.1f} ms (median)")
    print(f"{'method':18s} {'non-update ms':>14s} {'ratio':>7s} {'update ms':>10s} {'ratio':>7s}")
    for name in methods:
        print(f"{name:18s} {np.median(skip_ms[name]) * 1e3:14.1f} {np.median(skip_ratio[name]):6.2f}x "
              f"{np.median(update_ms[name]) * 1e3:10.1f} {np.median(update_ratio[name]):6.2f}x")
    print("targets: non-update <= 1.05x, update <= 3x (ratio: median over reps of the step time / mean of the plain steps timed just before and after it)")
    print(f"compiled steps reused: {all(step._cache_size() == 1 for step, _, _ in runs.values())}")


if __name__ == "__main__":
    main()

"""Cost of a sparsifier's steps relative to a plain optax step, measured side by side.

MLP of four 2048x2048 layers (16.8M weights), adam, batch of 128 on CPU. Times, in one run and
interleaved: a plain optax step, a non-update step of ``magnitude_pruning`` (gradual, 90%) and a
topology-update step, and prints the two ratios to the plain step (targets: <= 1.05x and <= 3x).

    python benchmarks/topology_update_cost.py [--reps 10] [--batch 128] [--method magnitude]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse.dst import rigl

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
    """Transformations to time: name -> (tx, steps to run before timing a non-update step)."""
    gradual = js.polynomial_schedule(begin_step=0, end_step=10 * update_every)
    return {
        "magnitude": js.magnitude_pruning(optax.adam(1e-3), sparsity=0.9, schedule=gradual, update_every=update_every),
        "global_magnitude": js.global_magnitude_pruning(
            optax.adam(1e-3), sparsity=0.9, schedule=gradual, update_every=update_every
        ),
        "rigl": rigl(optax.adam(1e-3), sparsity=0.9, update_every=update_every, end_step=100 * update_every),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--method", default="magnitude", choices=["magnitude", "global_magnitude", "rigl"])
    args = parser.parse_args()

    update_every = 1000  # update steps at 0, 1000, ...: steps 1..999 are non-update steps
    params = init_mlp(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, WIDTH))
    y = jax.random.normal(jax.random.PRNGKey(2), (args.batch, WIDTH))

    plain_tx = optax.adam(1e-3)
    sparse_tx = sparsifiers(update_every)[args.method]
    plain_step, sparse_step = make_step(plain_tx), make_step(sparse_tx)
    plain_state = plain_tx.init(params)
    sparse_state = sparse_tx.init(params)

    # Compile and run step 0 (an update step: prunes to the first schedule point).
    p_plain, s_plain = jax.block_until_ready(plain_step(params, plain_state, x, y))
    p_sparse, s_sparse = jax.block_until_ready(sparse_step(params, sparse_state, x, y))

    def timed(fn, *a):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*a))
        return time.perf_counter() - t0, out

    def with_step(state, step):  # the same state at another step count, to choose the branch
        return state._replace(step=jnp.asarray(step, jnp.int32))

    t_plain, t_skip, t_update = [], [], []
    for _ in range(args.reps):  # interleaved, so machine noise hits all three alike
        dt, _ = timed(plain_step, p_plain, s_plain, x, y)
        t_plain.append(dt)
        dt, _ = timed(sparse_step, p_sparse, with_step(s_sparse, 1), x, y)
        t_skip.append(dt)
        dt, _ = timed(sparse_step, p_sparse, with_step(s_sparse, update_every), x, y)
        t_update.append(dt)

    plain = float(np.median(t_plain))
    ratio = lambda t: float(np.median(np.array(t) / np.array(t_plain)))  # per-rep ratios: robust to drift
    best = lambda t: min(t) / min(t_plain)  # best case of each: what the machine can do unloaded
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, MLP {LAYERS}x{WIDTH}x{WIDTH}, adam, batch {args.batch}, "
          f"{args.method}_pruning to 90%, {args.reps} interleaved reps")
    print(f"{'':22s} {'median ms':>10s} {'ratio (median)':>15s} {'ratio (min)':>12s}")
    print(f"{'plain optax step':22s} {plain * 1e3:10.1f} {1.0:14.2f}x {1.0:11.2f}x")
    print(f"{'non-update step':22s} {np.median(t_skip) * 1e3:10.1f} {ratio(t_skip):14.2f}x {best(t_skip):11.2f}x  (target <= 1.05x)")
    print(f"{'topology-update step':22s} {np.median(t_update) * 1e3:10.1f} {ratio(t_update):14.2f}x {best(t_update):11.2f}x  (target <= 3x)")
    print(f"compiled step reused: {sparse_step._cache_size() == 1}")


if __name__ == "__main__":
    main()

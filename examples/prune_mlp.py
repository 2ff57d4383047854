"""Main demo: train an MLP on MNIST-1D dense and with gradual magnitude pruning to 90%.

MNIST-1D (Greydanus & Kobak, 2024) is generated offline by the ``mnist1d`` package: 4000 training
and 1000 test sequences of 40 values, 10 classes. Both runs use the same data, initialisation,
optimizer and number of steps; the pruned run wraps adam in ``jaxsparse.magnitude_pruning`` with
Zhu & Gupta's cubic schedule and otherwise uses the identical jit-compiled training step.

    python examples/prune_mlp.py [--steps 6000] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxsparse as js


def load_mnist1d(seed: int = 0):
    """MNIST-1D train/test arrays, generated locally (no download), standardised."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    x, x_test = data["x"].astype(np.float32), data["x_test"].astype(np.float32)
    mean, std = x.mean(), x.std()
    return (x - mean) / std, data["y"].astype(np.int32), (x_test - mean) / std, data["y_test"].astype(np.int32)


def init_mlp(key, sizes):
    """A plain-dict MLP: ``{"Dense_i": {"kernel", "bias"}}`` with LeCun-normal kernels."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"Dense_{i}": {
            "kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
            "bias": jnp.zeros((b,)),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def mlp(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(mlp(params, x), -1) == y))


def train(tx, params, data, steps, batch_size=128, seed=0, desc="train", steps_per_call=100):
    """Standard optax loop, ``steps_per_call`` steps per jit call (a ``lax.scan``) for speed."""
    x, y = data
    params, state = js.init(tx, params)  # masked params (unchanged here: pruning starts dense)

    def step(carry, idx):
        params, state = carry
        grads = jax.grad(loss_fn)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    @jax.jit
    def many_steps(params, state, key):
        idx = jax.random.randint(key, (steps_per_call, batch_size), 0, x.shape[0])
        (params, state), _ = jax.lax.scan(step, (params, state), idx)
        return params, state

    key = jax.random.PRNGKey(seed)
    for _ in tqdm(range(steps // steps_per_call), desc=desc, unit=f"x{steps_per_call} steps"):
        key, sub = jax.random.split(key)
        params, state = many_steps(params, state, sub)
    return params, state


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()

    x, y, x_test, y_test = load_mnist1d()
    data = (jnp.asarray(x), jnp.asarray(y))
    params = init_mlp(jax.random.PRNGKey(0), [x.shape[1], args.hidden, args.hidden, 10])
    print(f"MNIST-1D: {x.shape[0]} train / {x_test.shape[0]} test, MLP {x.shape[1]}-{args.hidden}-{args.hidden}-10, "
          f"{sum(p.size for p in jax.tree.leaves(params)):,} params, {args.steps} adam steps")

    t0 = time.perf_counter()
    dense, _ = train(optax.adam(1e-3), params, data, args.steps, desc="dense")
    t_dense = time.perf_counter() - t0

    # Prune from 10% to 60% of training, every 50 steps, then fine-tune at the final sparsity.
    schedule = js.polynomial_schedule(begin_step=args.steps // 10, end_step=6 * args.steps // 10)
    tx = js.magnitude_pruning(optax.adam(1e-3), sparsity=args.sparsity, schedule=schedule, update_every=50)
    t0 = time.perf_counter()
    sparse, state = train(tx, params, data, args.steps, desc=f"pruned to {args.sparsity:.0%}")
    t_sparse = time.perf_counter() - t0

    print()
    print(js.sparsity_report(sparse))
    # Params are the sparse model: applying the masks changes nothing.
    same = jax.tree.map(jnp.array_equal, js.apply_masks(sparse, js.get_masks(state)), sparse)
    assert all(jax.tree.leaves(same)), "params must be exactly zero where pruned"
    print()
    print(f"{'model':28s} {'test accuracy':>14s} {'train time':>11s}")
    print(f"{'dense':28s} {accuracy(dense, x_test, y_test):14.2%} {t_dense:10.1f}s")
    label = f"magnitude-pruned {js.sparsity_report(sparse).total.sparsity:.1%}"
    print(f"{label:28s} {accuracy(sparse, x_test, y_test):14.2%} {t_sparse:10.1f}s")


if __name__ == "__main__":
    main()

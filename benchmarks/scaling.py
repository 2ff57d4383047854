"""How a topology update's cost grows with model size, against a plain optax step at each size.

An MLP of four square float32 layers holding 1M, 10M and 100M weights in all (widths 500, 1581,
5000; single device), random normal weights, batch of 128, adam. At each size, each method
interleaved with the plain step (A B A B ..., two at a time to stay under 5 GiB at 100M), the
minimum over repetitions of a whole jitted training step (gradient,
``tx.update``, ``apply_updates``, buffers donated):

- ``adam``: the plain optax step;
- ``global_magnitude``: ``js.global_magnitude_pruning`` at 90%, a topology update every step
  (one global threshold over all four layers, gradual schedule to step 10,000);
- ``rigl``: ``js.rigl`` at 90% (ERK), a topology update every step (drop by magnitude, grow by
  gradient magnitude, drop fraction ~0.3).

Prints each time, its ratio to the plain step, and the topology update's extra time per million
weights (constant across sizes: the update's cost is linear in size).

    python benchmarks/scaling.py [--sizes 1 10 100] [--reps 5] [--batch 128]
    python benchmarks/scaling.py --lamp   # LAMP's selection by histograms against a sort per leaf
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import optax

import jaxsparse as js

LAYERS = 4


def make_params(millions: int, key):
    width = round(math.sqrt(millions * 1_000_000 / LAYERS))
    keys = jax.random.split(key, LAYERS)
    return {f"Dense_{i}": {"kernel": jax.random.normal(k, (width, width), jnp.float32) / math.sqrt(width)}
            for i, k in enumerate(keys)}


def loss_fn(params, x):
    h = x
    for i in range(LAYERS):
        h = h @ params[f"Dense_{i}"]["kernel"]
        h = jax.nn.relu(h) if i < LAYERS - 1 else h
    return jnp.mean((h - x) ** 2)


def make_step(tx):
    def step(params, state, x):
        updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def variants():
    adam = optax.adam(1e-3)
    return {
        "adam": adam,
        "global_magnitude": js.global_magnitude_pruning(adam, sparsity=0.9, schedule=js.polynomial_schedule(0, 10_000), update_every=1),
        "rigl": js.rigl(adam, sparsity=js.erk(0.9), update_every=1, end_step=10_000, seed=0),
    }


def measure(millions: int, reps: int, batch: int, names):
    """Best step times of the variants ``names``, interleaved, each with its own donated buffers."""
    runs, x = {}, None
    for name in names:
        tx = variants()[name]
        params = make_params(millions, jax.random.PRNGKey(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, params["Dense_0"]["kernel"].shape[0]))
        step = make_step(tx)
        carry = step(params, jax.jit(tx.init)(params), x)  # compile; the state is now past step 0
        runs[name] = [step, jax.block_until_ready(carry)]
    best = {name: math.inf for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run[1] = jax.block_until_ready(run[0](*run[1], x))
            best[name] = min(best[name], time.perf_counter() - start)
    n = sum(p.size for p in jax.tree.leaves(runs[names[0]][1][0]))
    return n, best


def lamp_selection(reps: int):
    """LAMP's global selection at 30% kept on four 2048x2048 leaves: by layer counts from
    histograms (``lamp_budgets``, what ``lamp_pruning`` runs) against selecting on the scores of
    ``js.scores.lamp`` (a sort per leaf), and global magnitude selection for scale."""
    from jaxsparse.pruning import lamp_budgets
    from jaxsparse.selection import select_top_k, top_k_masks

    ws = [jax.random.normal(jax.random.PRNGKey(i), (2048, 2048)) * (0.5 + i) for i in range(4)]
    ms = [jnp.ones(w.shape, bool) for w in ws]
    k = int(0.3 * sum(w.size for w in ws))
    runs = {
        "lamp, histograms": jax.jit(lambda ws, ms: select_top_k([jnp.abs(w) for w in ws], lamp_budgets(ws, ms, k), [0, 1, 2, 3], where=ms)),
        "lamp, sorted scores": jax.jit(lambda ws, ms: select_top_k([js.scores.lamp(w, None, None) for w in ws], jnp.array([k]), [0] * 4, where=ms)),
        "global magnitude": jax.jit(lambda ws, ms: top_k_masks([jnp.abs(w) for w in ws], k, where=ms)),
    }
    masks = {name: jax.block_until_ready(fn(ws, ms)) for name, fn in runs.items()}
    differ = sum(int((a != b).sum()) for a, b in zip(masks["lamp, histograms"], masks["lamp, sorted scores"]))
    best = {name: math.inf for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(ws, ms))
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"LAMP selection, 4 x 2048x2048, keep 30% (masks differing between the two LAMP rows: {differ})")
    for name, seconds in best.items():
        print(f"{name:>20} {seconds * 1e3:>9.0f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="millions of weights")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lamp", action="store_true", help="time LAMP's selection instead")
    args = parser.parse_args()
    if args.lamp:
        return lamp_selection(args.reps)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, MLP of {LAYERS} square layers, batch {args.batch}, "
          f"adam, 90% sparsity, min of {args.reps} reps")
    print(f"{'weights':>12} {'variant':>17} {'step ms':>9} {'x plain':>8} {'update ms / M weights':>22}")
    for millions in args.sizes:
        for method in ("global_magnitude", "rigl"):  # two at a time: at 100M three runs' buffers exceed 5 GiB
            n, best = measure(millions, args.reps, args.batch, ("adam", method))
            for name, seconds in best.items():
                extra = (seconds - best["adam"]) * 1e3 / (n / 1e6)
                print(f"{n:>12,} {name:>17} {seconds * 1e3:>9.1f} {seconds / best['adam']:>8.2f} "
                      f"{'' if name == 'adam' else f'{extra:.2f}':>22}", flush=True)


if __name__ == "__main__":
    main()

"""Accuracy of structured and straight-through sparse training: N:M, blocks, STE, ST-3, AutoSparse.

The setup of ``benchmarks/dst_accuracy.py`` (reused from it: MNIST-1D generated offline by the
``mnist1d`` package, 8000 train / 2000 test, or scikit-learn's digits with ``--dataset digits``;
an MLP ``in-256-256-10``, adam with a cosine-decayed learning rate from 1e-3, batch 128,
``--steps`` steps, ``--seeds`` seeds trained together with ``jax.vmap``). Every kernel is
sparsified, biases stay dense. Methods:

- dense: plain adam;
- 2:4 (N:M along the input axis, ``js.n_of_m(2, 4)``, every kernel):
  SR-STE (``js.sr_ste``, decay 2e-4), STE (``js.ste(structure=n_of_m(2, 4))``), and magnitude 2:4
  one-shot then fine-tuned (dense training for the first half, ``js.magnitude_pruning`` with
  the 2:4 structure once at mid-training, then the second half sparse);
- 90% unstructured (ERK over the kernels unless said): STE (``js.ste``), ST-3 (``js.st3``,
  global threshold, cubic ramp from 10% to 60% of training), AutoSparse's gradient annealing on
  a fixed top-k budget (``js.autosparse(sparsity=...)``, alpha_0 0.5 decaying to 0 at 75% of
  training), RigL (unstructured, for reference);
- block RigL at 90%: ``js.rigl(structure=js.blocks(8, 8))`` on the two hidden kernels and
  ``blocks(8, 2)`` on the 256x10 output kernel (whole tiles dropped and grown; ERK over tiles).

It prints the test accuracy (mean +- std over seeds) and the actual kernel sparsity of each, and
saves a bar plot.

    python benchmarks/structured_accuracy.py [--steps 6000] [--seeds 3] [--dataset mnist1d|digits]
        [--methods ...] [--out benchmarks/structured_accuracy.png]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import jaxsparse as js
from dst_accuracy import load, train_seeds

METHODS = {
    # name: (label, sparsity shown in the table)
    "dense": ("dense", "0%"),
    "SR-STE 2:4": ("SR-STE 2:4", "50% (2:4)"),
    "STE 2:4": ("STE 2:4", "50% (2:4)"),
    "magnitude 2:4": ("magnitude 2:4, one-shot at 50% of training, fine-tuned", "50% (2:4)"),
    "STE 90%": ("STE, ERK", "90%"),
    "ST-3 90%": ("ST-3, global threshold, cubic ramp", "90%"),
    "AutoSparse 90%": ("AutoSparse gradient annealing on a top-k budget, ERK", "90%"),
    "AutoSparse learned": ("AutoSparse, learned per-layer thresholds (threshold weight decay 1.5)", "learned"),
    "RigL 90%": ("RigL, unstructured, ERK (reference)", "90%"),
    "block RigL 90%": ("RigL on 8x8 tiles (8x2 on the output kernel), ERK over tiles", "90%"),
}


def make_tx(method: str, sparsity: float, steps: int, lr, seed):
    adam = optax.adam(lr)
    nm = js.n_of_m(2, 4)
    dist = js.erk(0.9)
    if method == "dense":
        return adam
    if method == "SR-STE 2:4":
        return js.sr_ste(adam, n=2, m=4)
    if method == "STE 2:4":
        return js.ste(adam, structure=nm)
    if method == "magnitude 2:4":
        return js.magnitude_pruning(adam, sparsity=None, structure=nm, schedule=js.one_shot_schedule(steps // 2))
    if method == "STE 90%":
        return js.ste(adam, sparsity=dist)
    if method == "ST-3 90%":
        return js.st3(adam, sparsity=0.9, begin_step=int(0.1 * steps), end_step=int(0.6 * steps))
    if method == "AutoSparse 90%":
        return js.autosparse(adam, sparsity=dist, alpha=0.5, end_step=int(0.75 * steps))
    if method == "AutoSparse learned":  # the thresholds' weight decay sets the final sparsity
        thresholds = optax.adamw(lr, weight_decay=1.5)
        return js.autosparse(adam, alpha=0.5, end_step=int(0.75 * steps), threshold_init=-3.0, threshold_optimizer=thresholds)
    if method == "RigL 90%":
        return js.rigl(adam, sparsity=dist, update_every=100, end_step=int(0.75 * steps), seed=seed)
    if method == "block RigL 90%":
        tiles = {"Dense_[01]/kernel": js.blocks(8, 8), "Dense_2/kernel": js.blocks(8, 2)}
        return js.rigl(adam, sparsity=dist, structure=tiles, update_every=100, end_step=int(0.75 * steps), seed=seed)
    raise ValueError(f"unknown method {method!r}")


def plot(results, dataset, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [100 * results[n][0].mean() for n in names]
    stds = [100 * results[n][0].std() for n in names]
    colors = ["black" if n == "dense" else "tab:blue" if "2:4" in n else "tab:orange" for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(min(means) - 10, max(means) + 5)
    ax.set_title(f"MLP on {dataset}: structured (blue: 2:4) and 90% (orange) sparse training, mean +- std over seeds")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="benchmarks/structured_accuracy.png")
    args = parser.parse_args()

    data = load(args.dataset)
    print(f"{args.dataset}: {data[0].shape[0]} train, {data[2].shape[0]} test; MLP {data[0].shape[1]}-256-256-10, "
          f"{args.steps} steps, {args.seeds} seeds, jax {jax.__version__}, {jax.devices()[0].platform}")
    t0 = time.perf_counter()
    results = {}
    for method in args.methods:
        start = time.perf_counter()
        results[method] = train_seeds(method, 0.0, args.seeds, args.steps, data, make=make_tx)
        acc, zeros = results[method]
        print(f"  {method:15s} {100 * acc.mean():5.1f} +- {100 * acc.std():.1f}  (kernel zeros {100 * zeros:.1f}%, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)

    print(f"\n| method | sparsity | test accuracy % (mean +- std, {args.seeds} seeds) | kernel zeros |")
    print("|---|---|---|---|")
    for method, (acc, zeros) in results.items():
        label, target = METHODS[method]
        print(f"| {label} | {target} | {100 * acc.mean():.1f} +- {100 * acc.std():.1f} | {100 * zeros:.1f}% |")
    plot(results, {"mnist1d": "MNIST-1D", "digits": "digits"}[args.dataset], args.out)
    print(f"plot written to {args.out}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Accuracy of dynamic sparse training against dense, static sparse and gradual pruning.

MNIST-1D (Greydanus, 2020; generated offline by the ``mnist1d`` package, 10000 samples: 8000
train, 2000 test) or scikit-learn's digits (``--dataset digits``), an MLP ``in-256-256-10``
trained with adam (cosine-decayed learning rate, batch 128) for ``--steps`` steps. At each
sparsity (90% and 98% by default, every method with the ERK distribution over the three
kernels; biases dense) it trains

- dense: plain adam;
- static: a random ERK mask fixed at init (``jaxsparse.static_sparse``);
- SET, RigL, SNFS, SRigL: dynamic sparse training, topology updates every 100 steps until 75%
  of training (cosine drop fraction);
- gradual: gradual magnitude pruning (Zhu & Gupta, 2018) from dense, cubic schedule from 10% to
  60% of training, every 100 steps;
- Top-KAST (forward sparsity s, backward ``s - (1 - s)``: twice the forward density);

each with 3 seeds trained together (``jax.vmap`` over seeds of one compiled ``lax.scan`` loop),
and prints the test accuracy (mean +- std over seeds), checks the published ordering at high
sparsity (gradual >= RigL >= SET >= static, Evci et al., 2020) and writes a plot of accuracy
against sparsity, one line per method.

    python benchmarks/dst_accuracy.py [--steps 6000] [--seeds 3] [--sparsity 0.9 0.98]
        [--dataset mnist1d|digits] [--out benchmarks/dst_accuracy.png] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js

HIDDEN = 256
BATCH = 128
METHODS = ("static", "SET", "RigL", "SNFS", "SRigL", "gradual", "Top-KAST")
ORDERING = ("gradual", "RigL", "SET", "static")  # published ordering at high sparsity (Evci et al., 2020)


def ordering_verdict(accuracies) -> str:
    """Whether per-seed accuracies (in ``ORDERING``'s order) are ordered by decreasing mean; a
    pair out of order by less than the sum of their standard deviations is called noise."""
    means = [a.mean() for a in accuracies]
    stds = [a.std() for a in accuracies]
    chain, swaps = f"{ORDERING[0]} {100 * means[0]:.1f}", []
    for i in range(1, len(means)):
        gap = means[i - 1] - means[i]
        noise = stds[i - 1] + stds[i]
        chain += f" {'>=' if gap >= 0 else '~' if -gap <= noise else '<'} {ORDERING[i]} {100 * means[i]:.1f}"
        if gap < 0:
            swaps.append((ORDERING[i - 1], ORDERING[i], -gap, noise))
    if not swaps:
        return f"holds: {chain}"
    within = all(g <= n for *_, g, n in swaps)
    why = "; ".join(f"{a} < {b} by {100 * g:.1f} (stds sum {100 * n:.1f})" for a, b, g, n in swaps)
    return f"{'holds within noise' if within else 'does NOT hold'}: {chain} ({why})"


def load(name: str):
    """``(x_train, y_train, x_test, y_test)`` as float32 / int32 arrays, features standardised."""
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = 10000
        data = make_dataset(args)  # generated locally from the templates, no download
        x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        x_all, y_all = digits.data[order], digits.target[order]
        split = int(0.8 * len(y_all))
        x, y, xt, yt = x_all[:split], y_all[:split], x_all[split:], y_all[split:]
    mean, std = x.mean(0), x.std(0) + 1e-6
    f = lambda a: jnp.asarray((a - mean) / std, jnp.float32)
    return f(x), jnp.asarray(y, jnp.int32), f(xt), jnp.asarray(yt, jnp.int32)


def init_mlp(key, n_in, n_out):
    sizes = [n_in, HIDDEN, HIDDEN, n_out]
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"Dense_{i}": {
            "kernel": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a),
            "bias": jnp.zeros((b,), jnp.float32),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def logits(params, x):
    for i in range(3):
        layer = params[f"Dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < 2:
            x = jax.nn.relu(x)
    return x


def make_tx(method: str, sparsity: float, steps: int, lr, seed):
    """The transformation of ``method`` at ``sparsity`` for a run of ``steps`` steps."""
    adam = optax.adam(lr)
    if method == "dense":
        return adam
    dist = js.erk(sparsity)
    end = int(0.75 * steps)
    if method == "static":
        return js.static_sparse(adam, sparsity=dist, seed=seed)
    if method == "SET":
        return js.set_sparse(adam, sparsity=dist, update_every=100, end_step=end, drop_fraction_anneal="cosine", seed=seed)
    if method == "RigL":
        return js.rigl(adam, sparsity=dist, update_every=100, end_step=end, seed=seed)
    if method == "SNFS":
        return js.snfs(adam, sparsity=dist, update_every=100, end_step=end, seed=seed)
    if method == "SRigL":
        return js.srigl(adam, sparsity=dist, update_every=100, end_step=end, seed=seed)
    if method == "gradual":
        schedule = js.polynomial_schedule(int(0.1 * steps), int(0.6 * steps))
        return js.magnitude_pruning(adam, sparsity=dist, schedule=schedule, update_every=100)
    if method == "Top-KAST":
        return js.topkast(adam, sparsity=dist, backward_sparsity=js.erk(2 * sparsity - 1), update_every=100)
    raise ValueError(f"unknown method {method!r}")


def train_seeds(method, sparsity, seeds, steps, data, make=None):
    """Test accuracy of ``method`` for each seed (vmapped), and the final mask sparsity.
    ``make``: the transformation factory ``(method, sparsity, steps, lr, seed) -> tx`` (default:
    :func:`make_tx`; benchmarks/structured_accuracy.py passes its own)."""
    make = make_tx if make is None else make
    x, y, xt, yt = data
    lr = optax.cosine_decay_schedule(1e-3, steps)

    def one_run(seed):
        key = jax.random.PRNGKey(seed)
        init_key, data_key, mask_key = jax.random.split(key, 3)
        params = init_mlp(init_key, x.shape[1], 10)
        tx = make(method, sparsity, steps, lr, mask_key)
        params, state = js.init(tx, params)

        def loss(params, xb, yb):
            return optax.softmax_cross_entropy_with_integer_labels(logits(params, xb), yb).mean()

        def step(carry, t):
            params, state = carry
            idx = jax.random.randint(jax.random.fold_in(data_key, t), (BATCH,), 0, x.shape[0])
            grads = jax.grad(loss)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, state), jnp.arange(steps))
        accuracy = jnp.mean(jnp.argmax(logits(params, xt), -1) == yt)
        kernels = [params[f"Dense_{i}"]["kernel"] for i in range(3)]
        zeros = sum(jnp.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
        return accuracy, zeros

    accuracy, zeros = jax.jit(jax.vmap(one_run))(jnp.arange(seeds))
    return np.asarray(accuracy), float(np.mean(zeros))


def plot(results, sparsities, dense, dataset, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = np.arange(len(sparsities) + 1)  # 0: dense, where every line starts
    ax.axhline(100 * dense.mean(), color="black", linestyle="--", linewidth=0.8, label=f"dense ({100 * dense.mean():.1f}%)")
    for method in METHODS:
        accs = [dense] + [results[(method, s)][0] for s in sparsities]
        ax.errorbar(xs, [100 * a.mean() for a in accs], yerr=[100 * a.std() for a in accs], marker="o", capsize=3, label=method)
    ax.set_xticks(xs, ["0% (dense)"] + [f"{100 * s:g}%" for s in sparsities])
    ax.set_xlabel("sparsity of the kernels (ERK)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MLP on {dataset}: mean and std over seeds")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.98])
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    parser.add_argument("--out", default="benchmarks/dst_accuracy.png")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args()
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu needs a GPU; jax sees {jax.devices()}")

    data = load(args.dataset)
    print(f"{args.dataset}: {data[0].shape[0]} train, {data[2].shape[0]} test, {data[0].shape[1]} features; "
          f"MLP {data[0].shape[1]}-{HIDDEN}-{HIDDEN}-10, {args.steps} steps, {args.seeds} seeds, jax {jax.__version__}")
    t0 = time.perf_counter()
    dense, _ = train_seeds("dense", 0.0, args.seeds, args.steps, data)
    results = {}
    for s in args.sparsity:
        for method in METHODS:
            results[(method, s)] = train_seeds(method, s, args.seeds, args.steps, data)
            acc, zeros = results[(method, s)]
            print(f"  {method:9s} {100 * s:4g}%  {100 * acc.mean():5.1f} +- {100 * acc.std():.1f}  "
                  f"(kernel zeros {100 * zeros:.1f}%, {time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\ntest accuracy % (mean +- std over {args.seeds} seeds); dense: {100 * dense.mean():.1f} +- {100 * dense.std():.1f}")
    print(f"{'method':10s}" + "".join(f"{f'{100 * s:g}%':>16s}" for s in args.sparsity))
    for method in METHODS:
        row = "".join(f"{100 * results[(method, s)][0].mean():10.1f} +- {100 * results[(method, s)][0].std():3.1f}" for s in args.sparsity)
        # SRigL rounds each layer's fan-in down to an integer: its kernels can be sparser.
        actual = [f"{100 * results[(method, s)][1]:.1f}%" for s in args.sparsity if abs(results[(method, s)][1] - s) > 1e-3]
        print(f"{method:10s}{row}" + (f"   (actual kernel sparsity {', '.join(actual)})" if actual else ""))
    for s in args.sparsity:
        print(f"{100 * s:g}%: published ordering {ordering_verdict([results[(m, s)][0] for m in ORDERING])}")
    plot(results, args.sparsity, dense, {"mnist1d": "MNIST-1D", "digits": "digits"}[args.dataset], args.out)
    print(f"plot written to {args.out}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

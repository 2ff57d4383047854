"""Time to prune one layer in one shot, per method and layer size, and SparseGPT's Cholesky share.

For square ``(n, n)`` layers (default n = 1024, 2048, 4096, 8192) and 2048 calibration tokens
(correlated Student-t inputs), times, interleaved and the minimum over ``--reps``:

- ``hessian``: accumulating ``X^T X`` (:func:`jaxsparse.hessian_update`), SparseGPT's input;
- ``magnitude``: the baseline (``|W|`` top-k over the layer) at 50%;
- ``wanda``: :func:`jaxsparse.wanda` at 50% and 2:4 from the inputs (norms included);
- ``sparsegpt``: :func:`jaxsparse.sparsegpt` at 50% and 2:4 from the accumulated Hessian;
- ``cholesky``: the damped inverse Hessian's Cholesky factor alone (factor, inverse, factor),
  printed as its share of SparseGPT at 50%.

Each function is compiled before timing, except for layers larger than ``--max-reps-size``
(default 8192; the 8192^2 row takes about 3 minutes with 3 reps on a 2-core CPU): those run once,
compilation included.

    python benchmarks/oneshot.py [--sizes 1024 2048 4096 8192] [--reps 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as js
from jaxsparse.oneshot.layer import _inverse_hessian_factor, magnitude_layer


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-reps-size", type=int, default=8192, help="larger layers are timed once")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.tokens} calibration tokens; seconds (min over reps)")
    print(f"| layer | hessian X^T X | magnitude 50% | wanda 50% | wanda 2:4 | sparsegpt 50% | sparsegpt 2:4 | cholesky/inverse | share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(n), 3)
        mix = jnp.eye(n) + 0.3 * jax.random.normal(k1, (n, n)) / np.sqrt(n)
        x = jax.random.t(k2, 3.0, (args.tokens, n)) @ mix
        w = jax.random.normal(k3, (n, n)) / np.sqrt(n)
        state = js.hessian_update(js.hessian_init(n), x)
        factor, accumulate = jax.jit(_inverse_hessian_factor), jax.jit(js.hessian_update)
        runs = {
            "hessian": lambda: accumulate(js.hessian_init(n), x),
            "magnitude": lambda: magnitude_layer(w, sparsity=0.5),
            "wanda": lambda: js.wanda(w, x, sparsity=0.5),
            "wanda_nm": lambda: js.wanda(w, x, n=2, m=4),
            "sparsegpt": lambda: js.sparsegpt(w, state, sparsity=0.5),
            "sparsegpt_nm": lambda: js.sparsegpt(w, state, n=2, m=4),
            "cholesky": lambda: factor(state.hessian, state.count, 0.01),
        }
        reps = args.reps if n <= args.max_reps_size else 1
        if reps > 1:
            for fn in runs.values():  # compile first; a single run (the largest layers) includes it
                jax.block_until_ready(fn())
        best = {name: float("inf") for name in runs}
        for _ in range(reps):  # interleaved
            for name, fn in runs.items():
                best[name] = min(best[name], timed(fn))
        b = best
        print(
            f"| {n}x{n} | {b['hessian']:.3f} | {b['magnitude']:.3f} | {b['wanda']:.3f} | {b['wanda_nm']:.3f} | "
            f"{b['sparsegpt']:.3f} | {b['sparsegpt_nm']:.3f} | {b['cholesky']:.3f} | {b['cholesky'] / b['sparsegpt']:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

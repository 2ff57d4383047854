"""Block-sparse matmul against dense ``x @ w``, side by side in one run.

CPU mode (default): the XLA path, f32, x and w 2048x2048, blocks of 128, 64 and 32, densities
0.5, 0.25, 0.1, 0.05. Target: >= 6x over dense at density 0.1 with blocks of 128 (the ideal is
10x). It also times ``bsr_matmul`` with the default path (``backend=None``: dense above
``dense_threshold``, the block loop below), which must never be slower than dense.

    JAX_PLATFORMS=cpu python benchmarks/bsr_matmul.py

GPU mode: the Pallas Triton kernel against dense ``jnp.dot`` in bf16 at 8192^3 and 4096^3, blocks
of 128 and 64, densities 0.5 to 0.01. It first checks every configuration against the dense
product, picks the fastest kernel tile configuration per (size, block) at density 0.1 from a small
sweep, then prints effective TFLOP/s on the nonzero blocks, the dense TFLOP/s, the speedup and the
per-nonzero efficiency (sparse TFLOP/s / dense TFLOP/s). Targets on an H200: efficiency >= 85% at
blocks of 128 (speedup >= 8.5x at density 0.1) and >= 50% at blocks of 64.

    python benchmarks/bsr_matmul.py --device gpu

Masks are uniformly random: exactly ``round(density * Kb * Nb)`` blocks, so block columns have
uneven counts, as after block pruning. Times are the minimum over interleaved repetitions (the
dense and sparse calls alternate, so both see the same machine load).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pallas_kernels import BlockSparseMatrix, bsr_matmul, default_bsr_backend  # noqa: E402
from pallas_kernels import bsr_matmul_gpu  # noqa: E402


def random_block_sparse(rng, k, n, block, density, dtype):
    """A (k, n) block-sparse matrix with exactly round(density * blocks) random nonzero blocks."""
    grid = (k // block, n // block)
    size = grid[0] * grid[1]
    mask = np.zeros(size, bool)
    mask[rng.permutation(size)[: max(1, round(density * size))]] = True
    w = jax.random.normal(jax.random.key(int(rng.integers(2**31))), (k, n), dtype)
    return BlockSparseMatrix.from_dense(w, (block, block), mask.reshape(grid))


def time_side_by_side(fns, reps, calls=1):
    """Minimum time per call of each zero-argument function, interleaved; the first call warms up.

    Each repetition issues ``calls`` calls before waiting, so on a GPU the launch overhead of
    short kernels overlaps with execution, as in a real program.
    """
    for f in fns.values():
        jax.block_until_ready(f())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, f in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = f()
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def check(y, ref, tol):
    """Relative max error of y against ref; exits with an error message above tol."""
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))
    if not err <= tol:
        raise SystemExit(f"wrong result: relative error {err:.2e} > {tol}")
    return err


def run_cpu(reps):
    size = 2048
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((size, size)), jnp.float32)
    print(f"CPU, XLA path vs dense x @ w, f32, {size}^3, {jax.devices()[0].device_kind}, "
          f"{len(os.sched_getaffinity(0))} cores available, load average {os.getloadavg()[0]:.1f}")
    print(f"{'block':>5} {'density':>7} {'blocks':>7} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} "
          f"{'ideal':>6} {'efficiency':>10} {'default path':>13} {'default speedup':>15}")
    dense_matmul = jax.jit(jnp.dot)
    sparse_matmul = jax.jit(lambda x, w: bsr_matmul(x, w, backend="xla"))
    default_matmul = jax.jit(bsr_matmul)  # backend=None: the CPU rule (dense_threshold), decided at run time
    for block, density in itertools.product([128, 64, 32], [0.5, 0.25, 0.1, 0.05]):
        w = random_block_sparse(rng, size, size, block, density, jnp.float32)
        dense = w.to_dense()
        check(sparse_matmul(x, w), dense_matmul(x, dense), 1e-5)
        t = time_side_by_side({"dense": lambda: dense_matmul(x, dense), "sparse": lambda: sparse_matmul(x, w),
                               "default": lambda: default_matmul(x, w)}, reps)
        actual = int(w.nnz_blocks()) / (size // block) ** 2
        speedup = t["dense"] / t["sparse"]
        print(f"{block:>5} {density:>7} {int(w.nnz_blocks()):>7} {t['dense'] * 1e3:>9.1f} {t['sparse'] * 1e3:>9.1f} "
              f"{speedup:>7.2f}x {1 / actual:>5.1f}x {speedup * actual:>9.0%} {default_bsr_backend(w):>13} "
              f"{t['dense'] / t['default']:>14.2f}x", flush=True)
    w = random_block_sparse(rng, size, size, 128, 0.1, jnp.float32)
    t_dense, t_sparse = forward_backward(x, w, "xla", False, reps, 1, 1e-5)
    print(f"forward+backward (input and weight gradients), block 128, density 0.1: dense {t_dense * 1e3:.1f} ms, "
          f"block-sparse {t_sparse * 1e3:.1f} ms ({t_dense / t_sparse:.2f}x)")
    print_block_matmul_bound(x, w, reps)


def print_block_matmul_bound(x, w, reps):
    """The speedup that XLA's own block matmuls allow, measured in this run.

    Any path built from one XLA matmul per block costs at least ``nnz`` products
    ``(M, bk) @ (bk, bn)``. Timed here as a loop of exactly those products on one ``x`` panel,
    summed into a single tile (no slicing, no scattered writes), against dense ``x @ w``.
    """
    bk, bn = w.block_shape
    nnz = int(w.nnz_blocks())
    blocks = w.data.reshape(-1, bk, bn)[:nnz]

    @jax.jit
    def block_matmuls_only(panel, blocks):
        step = lambda t, acc: acc + jnp.dot(panel, blocks[t], preferred_element_type=jnp.float32)
        return jax.lax.fori_loop(0, blocks.shape[0], step, jnp.zeros((panel.shape[0], bn), jnp.float32))

    dense_matmul, dense, panel = jax.jit(jnp.dot), w.to_dense(), x[:, :bk]
    t = time_side_by_side({"dense": lambda: dense_matmul(x, dense), "blocks": lambda: block_matmuls_only(panel, blocks)},
                          reps)
    print(f"bound from XLA's block matmuls: {nnz} products {panel.shape} x {(bk, bn)} alone take "
          f"{t['blocks'] * 1e3:.1f} ms, {t['dense'] / t['blocks']:.2f}x faster than dense")


GPU_CONFIGS = [  # (block_m, num_warps, num_stages) tried per (size, block); None: the kernel's default
    (None, None, None), (64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3),
]


def _gpu_kernel(block_m, num_warps, num_stages, interpret=False):
    kwargs = {k: v for k, v in dict(block_m=block_m, num_warps=num_warps, num_stages=num_stages).items() if v}
    kwargs["interpret"] = interpret

    @jax.jit
    def run(x, w):
        return bsr_matmul_gpu.dsd_matmul(x, w.data.reshape(-1, *w.block_shape), *w.pattern.column_lists(), **kwargs)

    return run


def forward_backward(x, w, backend, interpret, reps, calls, tol):
    """bsr_matmul and its gradients against dense autodiff; returns (dense, sparse) forward+backward times."""
    dense_matmul = jax.jit(jnp.dot)
    dense = w.to_dense()

    def loss(x, w_like):
        if isinstance(w_like, BlockSparseMatrix):
            y = bsr_matmul(x, w_like, backend=backend, interpret=interpret)
        else:
            y = x @ w_like
        return jnp.sum(y.astype(jnp.float32) ** 2) / y.size

    sparse_grad = jax.jit(jax.grad(loss, (0, 1), allow_int=True))
    dense_grad = jax.jit(jax.grad(loss, (0, 1)))
    (dx, dw), (ref_dx, ref_dw) = sparse_grad(x, w), dense_grad(x, dense)
    check(bsr_matmul(x, w, backend=backend, interpret=interpret), dense_matmul(x, dense).astype(jnp.float32), tol)
    check(dx, ref_dx.astype(jnp.float32), tol)
    check(dw.data, w.pattern.take_blocks(ref_dw).astype(jnp.float32), tol)
    t = time_side_by_side({"dense": lambda: dense_grad(x, dense), "sparse": lambda: sparse_grad(x, w)}, reps, calls)
    return t["dense"], t["sparse"]


def run_gpu(reps, sizes, interpret):
    rng = np.random.default_rng(0)
    dense_matmul = jax.jit(jnp.dot)
    calls = 1 if interpret else 10
    print(f"GPU, Pallas Triton kernel vs dense jnp.dot, bf16, {jax.devices()[0].device_kind}"
          + (" (interpret mode: a dry run of this script's logic, times mean nothing)" if interpret else ""))
    rows = []
    for size, block in itertools.product(sizes, [128, 64]):
        x, dense_w = jax.random.normal(jax.random.key(size + block), (2, size, size), jnp.bfloat16)
        # Check the public API with gradients, and pick the tile configuration, at density 0.1.
        w = random_block_sparse(rng, size, size, block, 0.1, jnp.bfloat16)
        t_dense, t_sparse = forward_backward(x, w, "gpu", interpret, reps, calls, 3e-2)
        print(f"  {size}^3 block {block} density 0.1: bsr_matmul forward and gradients match dense; forward+backward "
              f"dense {t_dense * 1e3:.3f}ms, block-sparse {t_sparse * 1e3:.3f}ms ({t_dense / t_sparse:.2f}x)", flush=True)
        ref = dense_matmul(x, w.to_dense()).astype(jnp.float32)
        timings = {}
        for config in GPU_CONFIGS:
            kernel = _gpu_kernel(*config, interpret=interpret)
            try:
                check(kernel(x, w), ref, 2e-2)
            except Exception as e:  # a configuration that does not compile (e.g. shared memory) is skipped
                print(f"  config {config} skipped: {type(e).__name__}: {str(e)[:120]}")
                continue
            timings[config] = time_side_by_side({"k": lambda: kernel(x, w)}, reps, calls)["k"]
        best = min(timings, key=timings.get)
        print(f"  {size}^3 block {block}: best config (block_m, num_warps, num_stages) = {best}; "
              + ", ".join(f"{c}: {t * 1e3:.3f}ms" for c, t in timings.items()), flush=True)
        kernel = _gpu_kernel(*best, interpret=interpret)
        for density in [0.5, 0.25, 0.1, 0.05, 0.02, 0.01]:
            w = random_block_sparse(rng, size, size, block, density, jnp.bfloat16)
            check(kernel(x, w), dense_matmul(x, w.to_dense()).astype(jnp.float32), 2e-2)
            t = time_side_by_side({"sparse": lambda: kernel(x, w), "dense": lambda: dense_matmul(x, dense_w)}, reps, calls)
            nnz = int(w.nnz_blocks())
            sparse_tflops = 2 * size * nnz * block * block / t["sparse"] / 1e12
            dense_tflops = 2 * size**3 / t["dense"] / 1e12
            rows.append((size, block, density, t["dense"], t["sparse"], dense_tflops, sparse_tflops))
            print(f"  {size:>5} {block:>4} {density:>5} blocks {nnz:>6}  dense {t['dense'] * 1e3:7.3f}ms "
                  f"{dense_tflops:6.1f} TFLOP/s  sparse {t['sparse'] * 1e3:7.3f}ms {sparse_tflops:6.1f} TFLOP/s  "
                  f"speedup {t['dense'] / t['sparse']:6.2f}x  efficiency {sparse_tflops / dense_tflops:5.0%}", flush=True)
    print("\n| size | block | density | dense TFLOP/s | sparse TFLOP/s (nonzero blocks) | speedup | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for size, block, density, td, ts, dt, st in rows:
        print(f"| {size} | {block} | {density} | {dt:.0f} | {st:.0f} | {td / ts:.2f}x | {st / dt:.0%} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 10 on CPU, 20 on GPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 4096], help="GPU mode: matrix sizes")
    parser.add_argument("--interpret", action="store_true",
                        help="GPU mode without a GPU: run the kernel interpreter (use small --sizes) to check the script")
    args = parser.parse_args(argv)
    if args.device == "gpu":
        if jax.default_backend() != "gpu" and not args.interpret:
            raise SystemExit(f"--device gpu needs a GPU; jax sees {jax.devices()}")
        run_gpu(args.reps or 20, args.sizes, args.interpret)
    else:
        run_cpu(args.reps or 10)


if __name__ == "__main__":
    main()

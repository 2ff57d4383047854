"""Block-sparse attention against dense attention, timed side by side in one run.

CPU (default): the XLA path of ``pallas_kernels.block_sparse_attention`` against
``jax.nn.dot_product_attention`` (XLA) at seq 4096, head_dim 64, f32, forward and
forward+backward, for a few block densities (target: >= 4x forward at density 0.1)::

    python benchmarks/attention.py

GPU (``--device gpu``, for an H200): the Pallas Triton kernels in bf16 at seq 8k and 32k against
``jax.nn.dot_product_attention`` with ``implementation="xla"`` and ``"cudnn"``, forward and
forward+backward, per block density (target: >= 6x forward at density 0.1). It first checks the
kernels' output and gradients against a dense f32 reference, then times everything; it is sized to
finish in about two minutes::

    python benchmarks/attention.py --device gpu

Masks are random, with the diagonal block and as even a number of key blocks per query block as
the density allows; "density" is the fraction of (query block, key block) pairs computed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pallas_kernels.attention import block_sparse_attention  # noqa: E402


def random_block_mask(nq: int, nk: int, density: float, seed: int = 0) -> np.ndarray:
    """``[1, nq, nk]`` with ``round(density * nq * nk)`` random blocks (at least one per row, the
    diagonal always among them), spread as evenly over the rows as the count allows."""
    rng = np.random.default_rng(seed)
    total = min(max(nq, round(density * nq * nk)), nq * nk)
    per_row = np.full(nq, total // nq)
    per_row[rng.choice(nq, total % nq, replace=False)] += 1
    mask = np.zeros((1, nq, nk), bool)
    for i in range(nq):
        diag = i * nk // nq
        others = rng.choice(np.delete(np.arange(nk), diag), per_row[i] - 1, replace=False)
        mask[0, i, [diag, *others]] = True
    return mask


def time_ms(fns: dict, args, repeats: int) -> dict:
    """Median wall time in ms of each ``fn(*args)``, after one warm-up (compile) call each.

    The functions are timed in turn within each round, so a change in machine load (a shared
    machine) hits all of them alike and their ratios stay fair. A function that fails (say, dense
    attention out of memory) gets NaN.
    """
    live = {}
    for name, fn in fns.items():
        try:
            jax.block_until_ready(fn(*args))
            live[name] = fn
        except Exception as e:
            print(f"  {' '.join(map(str, name))}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
    times = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in live.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times[name]) if name in live else float("nan") for name in fns}


def sparse_fns(mask, block: int, backend: str):
    """Jitted forward and forward+backward of block-sparse attention with a fixed (concrete) mask."""
    attend = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=block, block_k=block, backend=backend)
    return _fwd_and_grad(attend)


def dense_fns(implementation: str):
    """Jitted forward and forward+backward of ``jax.nn.dot_product_attention`` on [B, H, S, d] inputs."""
    to_bthd = lambda x: x.transpose(0, 2, 1, 3)

    def attend(q, k, v):
        out = jax.nn.dot_product_attention(to_bthd(q), to_bthd(k), to_bthd(v), implementation=implementation)
        return to_bthd(out)

    return _fwd_and_grad(attend)


def _fwd_and_grad(attend):
    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
    return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def masked_reference(q, k, v, mask, block: int):
    """Dense f32 attention with the block mask expanded to tokens (every row here has a key)."""
    tokens = jnp.repeat(jnp.repeat(jnp.asarray(mask[0]), block, 0), block, 1)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision="highest") / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(tokens, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, precision="highest")


def check(backend: str, shape, block: int, dtype, density: float, tol: float) -> bool:
    """Sparse output and gradients against the dense f32 reference; prints and returns pass/fail."""
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, cot = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    mask = random_block_mask(shape[2] // block, shape[2] // block, density, seed=1)
    attend = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=block, block_k=block, backend=backend)
    low = [x.astype(dtype) for x in (q, k, v)]
    out, vjp = jax.vjp(attend, *low)
    grads = vjp(cot.astype(dtype))
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: masked_reference(q, k, v, mask, block), q, k, v)
    # Error relative to the largest reference entry: tolerances then read as fractions of scale.
    errors = [float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max()) for a, b in zip((out, *grads), (ref_out, *ref_vjp(cot)))]
    ok = all(e < tol for e in errors)
    names = ("out", "dq", "dk", "dv")
    print(f"check {backend} {jnp.dtype(dtype).name} {shape}: relative max |err| " + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors))
          + f" -> {'PASS' if ok else 'FAIL'} (tol {tol})", flush=True)
    return ok


def run(*, backend, seqs, densities, batch, heads, dim, block, dtype, baselines, repeats):
    """Per sequence length: dense baselines and block-sparse attention per density, timed together."""
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {batch}, heads {heads}, "
          f"head_dim {dim}, block {block}, {jnp.dtype(dtype).name}, path {backend!r}", flush=True)
    print(f"{'seq':>6} {'density':>8} {'mode':>8} {'sparse ms':>10} " + " ".join(f"{'vs ' + b:>12}" for b in baselines))
    for seq in seqs:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (batch, heads, seq, dim), dtype) for key in keys)
        masks = {d: random_block_mask(seq // block, seq // block, d) for d in densities}
        for which, label in ((0, "fwd"), (1, "fwd+bwd")):
            fns = {("dense", b): dense_fns(b)[which] for b in baselines}
            fns.update({("sparse", d): sparse_fns(masks[d], block, backend)[which] for d in densities})
            ms = time_ms(fns, (q, k, v), repeats)
            print(f"{seq:>6} {'1':>8} {label:>8} " + " ".join(f"dense {b} {ms['dense', b]:.2f} ms" for b in baselines))
            for d in densities:
                ratios = " ".join(f"{ms['dense', b] / ms['sparse', d]:>11.2f}x" for b in baselines)
                print(f"{seq:>6} {masks[d].mean():>8.3f} {label:>8} {ms['sparse', d]:>10.2f} {ratios}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        check("xla", (1, 2, 512, 64), 64, jnp.float32, 0.25, tol=1e-5)
        run(backend="xla", seqs=[4096], densities=[0.05, 0.1, 0.25], batch=1, heads=8, dim=64, block=128,
            dtype=jnp.float32, baselines=["xla"], repeats=3)
    else:
        if jax.default_backend() != "gpu":
            raise SystemExit(f"--device gpu needs a GPU; jax sees {jax.devices()}")
        ok = check("gpu", (1, 4, 2048, 128), 128, jnp.bfloat16, 0.25, tol=3e-2)
        ok &= check("gpu", (1, 4, 2048, 128), 128, jnp.float32, 0.25, tol=1e-2)  # Triton dots run in TF32
        run(backend="gpu", seqs=[8192, 32768], densities=[0.05, 0.1, 0.2, 0.5], batch=1, heads=16, dim=128,
            block=128, dtype=jnp.bfloat16, baselines=["xla", "cudnn"], repeats=10)
        if not ok:
            raise SystemExit("correctness check FAILED")


if __name__ == "__main__":
    main()

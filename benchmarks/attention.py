"""Block-sparse attention against dense attention on the masks users have, timed side by side.

CPU (default): the XLA path of ``pallas_kernels.block_sparse_attention`` against
``jax.nn.dot_product_attention`` (XLA) at seq 4096 and 8192, batch 1, 8 heads, head_dim 64,
blocks of 128, f32, forward and forward+backward, for five masks:

- ``random 0.1`` / ``random 0.05``: random block masks with uneven rows (per-row counts drawn from
  an exponential distribution, the diagonal always kept), as a pruned or learned mask has;
- ``causal``: token-exact causal (``causal=True``: partial diagonal blocks, full blocks below);
- ``window+global``: token-exact sliding window of 512 keys on each side plus 64 global tokens,
  not causal (``or_fn(sliding_window_fn(512, 512), global_tokens_fn(64))``);
- ``documents``: packed documents of random lengths, causal within each document
  (``and_fn(document_fn(segment_ids), causal_fn())``).

For each it prints the density of computed token pairs (token pairs inside the visited blocks,
over ``seq^2``; the rule's own density in brackets), the target ``0.5 / density`` and the
measured speedups::

    python benchmarks/attention.py                  # add --seqs 4096 for a shorter run

The dense baseline runs one head at a time (``lax.map``; the forward+backward as the per-head
gradient), so its memory stays at one ``seq x seq`` score matrix (256 MiB at 8192) on a shared
machine; each head's products are large, so this costs dense attention nothing measurable.

GPU (``--device gpu``): the Pallas Triton kernels in bf16 at seq 8k and 32k, 16 heads, head_dim
128, against ``jax.nn.dot_product_attention`` with ``implementation="xla"`` and ``"cudnn"``
(whole batch, no head loop), the same five masks. It first checks the kernels' output and
gradients against a dense f32 reference on a token-rule mask, then times everything::

    python benchmarks/attention.py --device gpu

``--device gpu --interpret`` runs the GPU mode's logic on a CPU with the kernels in interpret mode
(a dry run before a GPU session: small shapes, e.g. ``--seqs 512 --repeats 1``; times mean
nothing, and the cuDNN baseline reports that it needs a GPU).

Times are medians over interleaved repetitions (each round calls every variant once, so load
changes on a shared machine hit all of them alike).
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

from pallas_kernels import attention_masks as am  # noqa: E402
from pallas_kernels.attention import block_sparse_attention  # noqa: E402


def uneven_block_mask(nq: int, nk: int, density: float, seed: int = 0) -> np.ndarray:
    """``[1, nq, nk]`` with about ``density * nq * nk`` random blocks, the diagonal always among
    them, and per-row counts drawn from an exponential distribution (clipped to ``[1, nk]``): a
    few long rows and many short ones, as real masks have."""
    rng = np.random.default_rng(seed)
    draws = rng.exponential(1.0, nq)
    counts = np.clip(np.round(draws * density * nk * nq / draws.sum()), 1, nk).astype(int)
    for _ in range(4 * nq * nk):  # the clipping moved the total: trim or grow random rows back to it
        excess = counts.sum() - round(density * nq * nk)
        if excess == 0:
            break
        i = rng.integers(nq)
        counts[i] = np.clip(counts[i] - np.sign(excess), 1, nk)
    mask = np.zeros((1, nq, nk), bool)
    for i in range(nq):
        diag = i * nk // nq
        others = rng.choice(np.delete(np.arange(nk), diag), counts[i] - 1, replace=False)
        mask[0, i, [diag, *others]] = True
    return mask


def document_ids(seq: int, seed: int = 0, mean_length: int = 512) -> np.ndarray:
    """Segment ids of packed documents with exponentially distributed lengths (at least 16)."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < seq:
        lengths.append(max(16, int(rng.exponential(mean_length))))
    return np.repeat(np.arange(len(lengths)), lengths)[:seq].astype(np.int32)


def masks(seq: int, block: int):
    """name -> (block_mask, mask_fn, causal) for the benchmark's five masks."""
    nb = seq // block
    return {
        "random 0.1": (uneven_block_mask(nb, nb, 0.1, seed=1), None, False),
        "random 0.05": (uneven_block_mask(nb, nb, 0.05, seed=2), None, False),
        "causal": (None, None, True),
        "window+global": (None, am.or_fn(am.sliding_window_fn(512, 512), am.global_tokens_fn(64)), False),
        "documents": (None, am.and_fn(am.document_fn(document_ids(seq)), am.causal_fn()), False),
    }


def densities(block_mask, mask_fn, causal, seq: int, block: int):
    """(computed, exact): token pairs inside the visited blocks, and allowed by the rule, over seq^2."""
    rule = am.and_fn(am.causal_fn(), mask_fn) if causal and mask_fn else (am.causal_fn() if causal else mask_fn)
    blocks = dict(block_q=block, block_k=block)
    visited = np.ones((1, seq // block, seq // block), bool) if block_mask is None else np.asarray(block_mask)
    if rule is None:
        return visited.mean(), visited.mean()
    kinds = am.block_kinds(rule, seq, seq, **blocks)
    visited = visited & (kinds[0] > 0)
    exact = 0.0
    for start in range(0, seq, block):  # one block row of tokens at a time
        q = np.arange(start, start + block)[:, None]
        allowed = np.asarray(rule(0, 0, q, np.arange(seq)[None, :])) & np.repeat(visited[0, start // block], block)[None, :]
        exact += allowed.sum()
    return visited.mean(), exact / seq**2


def time_ms(fns: dict, args, repeats: int) -> dict:
    """Median wall time in ms of each ``fn(*args)`` over interleaved rounds, after one warm-up call
    each. A function that fails (say, dense attention out of memory) gets NaN."""
    live = {}
    for name, fn in fns.items():
        try:
            jax.block_until_ready(fn(*args))
            live[name] = fn
        except Exception as e:
            print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
    times = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in live.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times[name]) if name in live else float("nan") for name in fns}


def sparse_fns(block_mask, mask_fn, causal, block: int, backend: str, interpret: bool = False):
    """Jitted forward and forward+backward of block-sparse attention with a fixed mask and rule."""
    attend = lambda q, k, v: block_sparse_attention(
        q, k, v, block_mask, mask_fn=mask_fn, causal=causal, block_q=block, block_k=block, backend=backend,
        interpret=interpret,
    )
    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
    return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def dense_fns(implementation: str, per_head: bool):
    """Jitted forward and forward+backward of ``jax.nn.dot_product_attention`` on [B, H, S, d]
    inputs; ``per_head`` runs the heads one after the other (memory of one score matrix)."""
    to_bthd = lambda x: x.transpose(0, 2, 1, 3)

    def attend(q, k, v):
        return to_bthd(jax.nn.dot_product_attention(to_bthd(q), to_bthd(k), to_bthd(v), implementation=implementation))

    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
    grad = jax.grad(loss, argnums=(0, 1, 2))
    if not per_head:
        return jax.jit(attend), jax.jit(grad)
    heads_first = lambda x: x.transpose(1, 0, 2, 3)[:, :, None]  # [H, B, 1, S, d]
    back = lambda x: x[:, :, 0].transpose(1, 0, 2, 3)

    def fwd(q, k, v):
        return back(jax.lax.map(lambda a: attend(*a), tuple(map(heads_first, (q, k, v)))))

    def fwd_bwd(q, k, v):
        return tuple(map(back, jax.lax.map(lambda a: grad(*a), tuple(map(heads_first, (q, k, v))))))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def token_reference(q, k, v, allowed):
    """Dense f32 attention with a token mask ``[S, S]``; rows with no key give zeros."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision="highest") / math.sqrt(q.shape[-1])
    p = jnp.where(allowed, jnp.exp(s - jnp.where(allowed, s, -jnp.inf).max(-1, keepdims=True)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, precision="highest")


def check(backend: str, shape, block: int, dtype, tol: float, interpret: bool = False) -> bool:
    """Sparse output and gradients against a dense f32 token-masked reference, on a document +
    causal + uneven block mask; prints and returns pass/fail."""
    seq = shape[2]
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, cot = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    block_mask = uneven_block_mask(seq // block, seq // block, 0.5, seed=3)
    rule = am.and_fn(am.document_fn(document_ids(seq, mean_length=seq // 4)), am.causal_fn())
    allowed = np.repeat(np.repeat(block_mask[0], block, 0), block, 1) & np.asarray(rule(0, 0, np.arange(seq)[:, None], np.arange(seq)[None]))
    attend = lambda q, k, v: block_sparse_attention(q, k, v, block_mask, mask_fn=rule, block_q=block, block_k=block, backend=backend,
                                                    interpret=interpret)
    out, vjp = jax.vjp(attend, *(x.astype(dtype) for x in (q, k, v)))
    grads = vjp(cot.astype(dtype))
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: token_reference(q, k, v, allowed), q, k, v)
    errors = [float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max()) for a, b in zip((out, *grads), (ref_out, *ref_vjp(cot)))]
    ok = all(e < tol for e in errors)
    names = ("out", "dq", "dk", "dv")
    print(f"check {backend} {jnp.dtype(dtype).name} {shape}: relative max |err| " + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors))
          + f" -> {'PASS' if ok else 'FAIL'} (tol {tol})", flush=True)
    return ok


def run(*, backend, seqs, batch, heads, dim, block, dtype, baselines, per_head, repeats, only=None, interpret=False):
    """Per sequence length and mode: the dense baselines and every mask, timed together."""
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {batch}, heads {heads}, "
          f"head_dim {dim}, block {block}, {jnp.dtype(dtype).name}, path {backend!r}", flush=True)
    print("| seq | mask | density (rule) | target | " + " | ".join(f"fwd vs {b}" for b in baselines) + " | "
          + " | ".join(f"fwd+bwd vs {b}" for b in baselines) + " | sparse fwd ms | sparse fwd+bwd ms |")
    print("|---" * (5 + 2 * len(baselines) + 1) + "|")
    for seq in seqs:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (batch, heads, seq, dim), dtype) for key in keys)
        cases = {n: c for n, c in masks(seq, block).items() if only is None or n in only}
        ms = {}
        for which, label in ((0, "fwd"), (1, "fwd+bwd")):
            fns = {("dense", b): dense_fns(b, per_head)[which] for b in baselines}
            fns.update({("sparse", n): sparse_fns(*c, block, backend, interpret)[which] for n, c in cases.items()})
            ms[label] = time_ms(fns, (q, k, v), repeats)
        dense = " | ".join(f"{ms['fwd']['dense', b]:.0f} ms" for b in baselines) + " | " + " | ".join(
            f"{ms['fwd+bwd']['dense', b]:.0f} ms" for b in baselines)
        print(f"| {seq} | dense | 1 | | {dense} | | |")
        for n, c in cases.items():
            computed, exact = densities(*c, seq, block)
            ratios = [ms[label]["dense", b] / ms[label]["sparse", n] for label in ("fwd", "fwd+bwd") for b in baselines]
            print(f"| {seq} | {n} | {computed:.3f} ({exact:.3f}) | {0.5 / computed:.1f}x | "
                  + " | ".join(f"{r:.1f}x" for r in ratios)
                  + f" | {ms['fwd']['sparse', n]:.0f} | {ms['fwd+bwd']['sparse', n]:.0f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default: 4096 8192 on CPU, 8192 32768 on GPU)")
    parser.add_argument("--repeats", type=int, help="timed rounds per variant (default 3 on CPU, 5 on GPU)")
    parser.add_argument("--masks", nargs="+", help="only these masks (names as printed)")
    parser.add_argument("--interpret", action="store_true", help="GPU mode on a CPU, kernels interpreted: a dry run")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        check("xla", (1, 2, 512, 64), 64, jnp.float32, tol=1e-5)
        run(backend="xla", seqs=args.seqs or [4096, 8192], batch=1, heads=8, dim=64, block=128, dtype=jnp.float32,
            baselines=["xla"], per_head=True, repeats=args.repeats or 3, only=args.masks)
    else:
        if jax.default_backend() != "gpu" and not args.interpret:
            raise SystemExit(f"--device gpu needs a GPU (or --interpret for a dry run); jax sees {jax.devices()}")
        shape = (1, 2, 512, 128) if args.interpret else (1, 4, 2048, 128)
        ok = check("gpu", shape, 128, jnp.bfloat16, tol=3e-2, interpret=args.interpret)
        ok &= check("gpu", shape, 128, jnp.float32, tol=1e-2, interpret=args.interpret)  # Triton dots run in TF32
        run(backend="gpu", seqs=args.seqs or [8192, 32768], batch=1, heads=2 if args.interpret else 16, dim=128, block=128,
            dtype=jnp.bfloat16, baselines=["xla", "cudnn"], per_head=False, repeats=args.repeats or 5, only=args.masks,
            interpret=args.interpret)
        if not ok:
            raise SystemExit("correctness check FAILED")


if __name__ == "__main__":
    main()

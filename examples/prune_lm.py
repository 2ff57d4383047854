"""One-shot pruning of a trained language model: magnitude, Wanda, SparseGPT and OWL, then a
short 2:4 sparse fine-tune.

Trains a small byte-level causal transformer on the Python standard library's own source files
(they ship with every Python, nothing is downloaded; one file in ten is held out for
validation), then prunes every attention and MLP dense layer (not the embedding or the output
head, as in the papers) from 2048 calibration tokens with

- magnitude: the largest ``|W|`` of each layer;
- Wanda (Sun et al., 2023, arXiv:2306.11695): ``|W| * ||X||`` per output unit;
- SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): OBS with weight reconstruction;
- OWL (Yin et al., 2024, arXiv:2310.05175): per-block sparsities from outlier ratios, with Wanda
  and with SparseGPT (unstructured targets only),

at 50%, 2:4 and 70%, and prints the validation perplexity of each against dense. Finally the 2:4
SparseGPT model is fine-tuned for a few steps with ``js.static_sparse(..., masks=masks)`` (the
masks stay fixed, the params exactly 2:4) and evaluated again.

    python examples/prune_lm.py                 # a few minutes on 2 shared CPU cores
    python examples/prune_lm.py --steps 3000    # a better-trained model (longer)
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import flax.linen as nn  # noqa: E402

import jaxsparse as js  # noqa: E402


def load_corpus(max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of the standard library's top-level ``.py`` files: every tenth file for validation."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, val = [], []
    for i, f in enumerate(files):
        (val if i % 10 == 5 else train).append(Path(f).read_bytes())
    train, val = b"".join(train)[:max_bytes], b"".join(val)[: max_bytes // 8]
    return np.frombuffer(train, np.uint8).astype(np.int32), np.frombuffer(val, np.uint8).astype(np.int32)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (separate q, k, v, o dense layers) and MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        t, d, h = x.shape[-2], self.width, self.heads
        y = nn.LayerNorm()(x)
        split = lambda z: z.reshape(*z.shape[:-1], h, d // h)
        q, k, v = (split(nn.Dense(d, name=n)(y)) for n in ("query", "key", "value"))
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(d // h)
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
        attn = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + nn.Dense(d, name="out")(attn.reshape(*attn.shape[:-2], d))
        y = nn.LayerNorm()(x)
        return x + nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(4 * d, name="fc1")(y)))


class LM(nn.Module):
    width: int = 96
    depth: int = 3
    heads: int = 4
    context: int = 64

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(256, self.width)(tokens)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (self.context, self.width))[: tokens.shape[-1]]
        for i in range(self.depth):
            x = Block(self.width, self.heads, name=f"block_{i}")(x)
        return nn.Dense(256, name="head")(nn.LayerNorm()(x))


def batches_of(data: np.ndarray, context: int, batch: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - context - 1, batch)
        window = np.stack([data[s : s + context + 1] for s in starts])
        yield jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="dense training steps")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences (x 64 tokens)")
    parser.add_argument("--max-bytes", type=int, default=3_000_000)
    args = parser.parse_args()

    train, val = load_corpus(args.max_bytes)
    model = LM(args.width, args.depth)
    rng = np.random.default_rng(0)
    stream = batches_of(train, model.context, args.batch, rng)
    params = model.init(jax.random.PRNGKey(0), next(stream)[0])["params"]
    print(f"corpus: {len(train):,} training bytes, {len(val):,} validation bytes (Python {sys.version.split()[0]} stdlib)")
    print(f"model: {sum(x.size for x in jax.tree.leaves(params)):,} params, {args.depth} blocks of width {args.width}")

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_loop(p, tx, steps, desc):
        state = tx.init(p)

        @jax.jit
        def step(p, s, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        bar = tqdm(range(steps), desc=desc)
        for _ in bar:
            p, state, loss = step(p, state, *next(stream))
            bar.set_postfix(loss=f"{float(loss):.3f}")
        return p, state

    # Validation: fixed, non-overlapping windows of the held-out files.
    n_val = min(len(val) // (model.context + 1), 256)
    windows = val[: n_val * (model.context + 1)].reshape(n_val, model.context + 1)
    val_x, val_y = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])
    eval_loss = jax.jit(loss_fn)

    def perplexity(p):
        losses = [eval_loss(p, val_x[i : i + 64], val_y[i : i + 64]) for i in range(0, n_val, 64)]
        return float(np.exp(np.mean(losses)))

    start = time.perf_counter()
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(50, args.steps // 2), args.steps, 3e-4)
    params, _ = train_loop(params, optax.adamw(schedule, weight_decay=0.01), args.steps, "dense training")
    dense_ppl = perplexity(params)
    print(f"dense validation perplexity {dense_ppl:.3f} (trained in {time.perf_counter() - start:.0f} s)")

    calib_rng = np.random.default_rng(1)
    calib = batches_of(train, model.context, 16, calib_rng)
    calibration = [next(calib)[0] for _ in range(max(1, args.calibration // 16))]
    prune = dict(exclude="head")  # embeddings and positional tables are not dense layers; the head stays dense
    owl = lambda s: js.owl(s, layer_of=r"block_\d+")  # the paper's layers: transformer blocks
    rows = {
        "magnitude": ("magnitude", lambda s: s),
        "wanda": ("wanda", lambda s: s),
        "sparsegpt": ("sparsegpt", lambda s: s),
        "owl + wanda": ("wanda", owl),
        "owl + sparsegpt": ("sparsegpt", owl),
    }
    targets = {"50%": dict(sparsity=0.5), "2:4": dict(n=2, m=4), "70%": dict(sparsity=0.7)}
    table, kept = {}, {}
    start = time.perf_counter()
    for row, (method, sparsity_of) in rows.items():
        for col, target in targets.items():
            if "sparsity" in target:
                target = dict(sparsity=sparsity_of(target["sparsity"]))
            elif row.startswith("owl"):
                table[row, col] = None  # OWL sets unstructured per-layer sparsities
                continue
            pruned, masks = js.prune_oneshot(model, params, calibration, method=method, progress=False, **prune, **target)
            table[row, col] = perplexity(pruned)
            kept[row, col] = (pruned, masks)
            print(f"  {row:>16} {col:>4}: perplexity {table[row, col]:.3f}")
    print(f"pruning: {time.perf_counter() - start:.0f} s for {sum(v is not None for v in table.values())} prunings")

    header = f"| method | " + " | ".join(targets) + " |"
    print(f"\nValidation perplexity (dense {dense_ppl:.3f}), {args.calibration * model.context} calibration tokens\n")
    print(header)
    print("|" + "---|" * (len(targets) + 1))
    print(f"| dense | " + " | ".join(f"{dense_ppl:.3f}" for _ in targets) + " |")
    for row in rows:
        cells = [("-" if table[row, c] is None else f"{table[row, c]:.3f}") for c in targets]
        print(f"| {row} | " + " | ".join(cells) + " |")

    _, owl_masks = kept["owl + sparsegpt", "70%"]
    per_block: dict[str, list] = {}
    for name, keep in zip(js.leaf_paths(owl_masks), jax.tree.leaves(owl_masks)):
        per_block.setdefault(name.split("/")[0], []).append(np.asarray(keep))
    print("\nOWL's per-block sparsities at 70% (from the outlier ratios of the dense model): " + ", ".join(
        f"{b} {1 - sum(k.sum() for k in ks) / sum(k.size for k in ks):.3f}" for b, ks in per_block.items()
    ))

    pruned, masks = kept["sparsegpt", "2:4"]
    tx = js.static_sparse(optax.adamw(3e-4, weight_decay=0.0), masks=masks)
    tuned, state = train_loop(pruned, tx, args.finetune_steps, "2:4 sparse fine-tune")
    for name, keep in zip(js.leaf_paths(masks), jax.tree.leaves(masks)):
        w = dict(zip(js.leaf_paths(tuned), jax.tree.leaves(tuned)))[name]
        assert np.all(np.asarray(w)[~np.asarray(keep)] == 0), name
    print(
        f"\nSparseGPT 2:4: perplexity {table['sparsegpt', '2:4']:.3f} after pruning, {perplexity(tuned):.3f} after "
        f"{args.finetune_steps} steps of static_sparse fine-tuning (dense {dense_ppl:.3f}); still exactly 2:4"
    )


if __name__ == "__main__":
    main()

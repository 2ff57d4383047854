"""A small causal transformer language model with sliding-window + global block-sparse attention.

Trains the same model twice on CPU, from the same initialisation and on the same batches: once
with dense causal attention (every block allowed) and once with a Longformer/BigBird-style
pattern (Beltagy et al. 2020; Zaheer et al. 2020): a sliding window of ``--window`` tokens plus the
first ``--num-global`` tokens as global tokens, computed by ``pallas_kernels.block_sparse_attention``
over the allowed blocks only. It prints both losses at the same steps, then held-out losses.

The corpus is generated here (nothing is downloaded): character-level "documents" that open with
a random key in angle brackets and then mix words from a small Markov chain with repetitions of
the key. Predicting the words needs only local context; predicting a repeated key needs the
document's start, which the window alone cannot see and the global tokens can.

    python examples/sparse_attention_lm.py            # ~2 minutes on 2 CPU cores
    python examples/sparse_attention_lm.py --steps 50 # a quick look
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import flax.linen as nn  # noqa: E402

from jaxsparse.nn.attention import BlockSparseSelfAttention, local_global_mask  # noqa: E402
from pallas_kernels import attention_masks  # noqa: E402

ALPHABET = string.ascii_lowercase + " .<>"
KEY_LEN = 6


class Corpus:
    """Synthetic documents: ``<key> words words key words ...``, encoded as character ids."""

    def __init__(self, seed: int = 0, num_words: int = 24):
        rng = np.random.default_rng(seed)
        self.words = ["".join(rng.choice(list(string.ascii_lowercase), rng.integers(2, 7))) for _ in range(num_words)]
        # A sparse random Markov chain over words: each word is followed by one of 4 others.
        self.next_words = rng.integers(0, num_words, size=(num_words, 4))
        self.char_id = {c: i for i, c in enumerate(ALPHABET)}

    def document(self, rng, length: int) -> np.ndarray:
        key = "".join(rng.choice(list(string.ascii_lowercase), KEY_LEN))
        text, word = f"<{key}> ", rng.integers(len(self.words))
        while len(text) < length + 1:
            if rng.random() < 0.12:
                text += key + ". "
            else:
                text += self.words[word] + " "
                word = self.next_words[word, rng.integers(4)]
        return np.array([self.char_id[c] for c in text[: length + 1]], np.int32)

    def batch(self, rng, batch_size: int, length: int) -> np.ndarray:
        """``[batch, length + 1]`` token ids (inputs are ``[:, :-1]``, targets ``[:, 1:]``)."""
        return np.stack([self.document(rng, length) for _ in range(batch_size)])


class TransformerLM(nn.Module):
    """Pre-norm causal transformer; ``mask_fn=None`` gives dense causal attention."""

    vocab: int
    width: int = 64
    depth: int = 2
    heads: int = 4
    block: int = 32
    mask_fn: object = None

    @nn.compact
    def __call__(self, tokens):
        seq = tokens.shape[1]
        x = nn.Embed(self.vocab, self.width)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (seq, self.width))
        for _ in range(self.depth):
            x = x + BlockSparseSelfAttention(
                num_heads=self.heads, block_q=self.block, block_k=self.block, causal=True, mask_builder=self.mask_fn
            )(nn.LayerNorm()(x))
            h = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
            x = x + nn.Dense(self.width)(h)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def make_step(model, tx):
    def loss_fn(params, batch):
        logits = model.apply(params, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, jax.jit(loss_fn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--num-global", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    corpus = Corpus(args.seed)
    mask_fn = local_global_mask(args.window, args.num_global)
    sparse_mask = mask_fn(args.seq, args.block, args.block)
    causal = attention_masks.causal_mask(args.seq, args.seq, block_q=args.block, block_k=args.block)
    print(f"seq {args.seq}, block {args.block}: dense causal visits {causal.sum()} block pairs, "
          f"window {args.window} + {args.num_global} global tokens visits {sparse_mask.sum()} "
          f"(block density {attention_masks.block_density(sparse_mask):.3f} vs {attention_masks.block_density(causal):.3f})")

    models = {"dense": TransformerLM(len(ALPHABET), block=args.block),
              "sparse": TransformerLM(len(ALPHABET), block=args.block, mask_fn=mask_fn)}
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, args.steps), weight_decay=0.01)
    init_tokens = jnp.zeros((1, args.seq), jnp.int32)
    params = jax.jit(models["dense"].init)(jax.random.key(args.seed), init_tokens)  # same init for both
    state = {name: (params, tx.init(params)) for name in models}
    fns = {name: make_step(model, tx) for name, model in models.items()}

    data_rng = np.random.default_rng(args.seed + 1)
    seconds = {name: 0.0 for name in models}
    running = {name: [] for name in models}
    print(f"{'step':>6} {'dense loss':>11} {'sparse loss':>12}")
    for step in range(1, args.steps + 1):
        batch = jnp.asarray(corpus.batch(data_rng, args.batch, args.seq))
        for name in models:
            start = time.perf_counter()
            p, o, loss = fns[name][0](*state[name], batch)
            state[name] = (p, o)
            running[name].append(float(loss))  # float() waits for the step: honest timing
            seconds[name] += time.perf_counter() - start
        if step % 25 == 0 or step == 1:
            mean = {name: np.mean(running[name]) for name in models}
            running = {name: [] for name in models}
            print(f"{step:>6} {mean['dense']:>11.4f} {mean['sparse']:>12.4f}", flush=True)

    held_out = jnp.asarray(corpus.batch(np.random.default_rng(args.seed + 2), 32, args.seq))
    print("held-out loss (nats/char): " + ", ".join(
        f"{name} {float(fns[name][1](state[name][0], held_out)):.4f}" for name in models))
    print("train time (incl. compile): " + ", ".join(f"{name} {seconds[name]:.1f} s" for name in models))


if __name__ == "__main__":
    main()

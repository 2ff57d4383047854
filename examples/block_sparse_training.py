"""Block-sparse training served by block-sparse kernels: RigL on 128x128 tiles, then BlockSparseDense.

An MLP ``in -> 2048 -> 2048 -> 2048 -> 10`` on MNIST-1D (generated offline by the ``mnist1d``
package; or scikit-learn's digits with ``--dataset digits``). Its two big ``2048 x 2048`` kernels
are trained with RigL at 90% sparsity in whole ``128 x 128`` tiles; the one jaxsparse line is
the optimizer::

    tx = js.rigl(optax.adam(lr), sparsity=0.9, structure=js.blocks(128, 128),
                 include="Dense_[12]/kernel", update_every=100, end_step=0.75 * steps)

Each big kernel keeps exactly ``256 - floor(0.9 * 256) = 26`` of its 256 tiles; every 100 steps
RigL drops the tiles of smallest L2 norm and grows the tiles of largest dense-gradient norm (the
tile count stays constant). The masks from ``js.get_masks`` are made of whole tiles, so they
convert to ``jaxsparse.nn.linen.BlockSparseDense`` layers with no hand conversion
(``js.nn.linen.variables_from_dense(params, masks)``), which store only the kept tiles and
multiply with ``pallas_kernels.bsr_matmul``.

It prints the test accuracy of the same MLP trained dense and of the block-sparse one served by
``BlockSparseDense``, the inference time of the hidden layers at batch 2048 (dense vs
block-sparse, measured side by side in this run, with the ratio), and saves a plot of the learned
tile masks to ``block_sparse_training.png``.

    python examples/block_sparse_training.py [--steps 800] [--dataset mnist1d|digits] [--block 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jaxsparse as js  # noqa: E402
import jaxsparse.nn as jsn  # noqa: E402
from rigl_nnx import load  # noqa: E402  (MNIST-1D / digits, standardised; this script's folder)

WIDTH, CLASSES = 2048, 10


class MLP(nn.Module):
    """The dense model: ``Dense_0`` (in -> 2048), ``Dense_1`` and ``Dense_2`` (2048 -> 2048), ``Dense_3``."""

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.relu(nn.Dense(WIDTH)(x))
        return nn.Dense(CLASSES)(x)


class ServedMLP(nn.Module):
    """The same model with the big layers as ``BlockSparseDense`` (same names, so the converted
    variables fit). ``hidden_only``: just the two big layers (for timing them)."""

    block_shapes: tuple
    hidden_only: bool = False

    @nn.compact
    def __call__(self, x):
        if not self.hidden_only:
            x = nn.relu(nn.Dense(WIDTH, name="Dense_0")(x))
        for i, shape in zip((1, 2), self.block_shapes):
            x = nn.relu(jsn.linen.BlockSparseDense(WIDTH, shape, name=f"Dense_{i}")(x))
        return x if self.hidden_only else nn.Dense(CLASSES, name="Dense_3")(x)


def train(tx, params, data, steps: int, batch: int, desc: str):
    x, y = data

    @jax.jit
    def step(params, state, key):
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])

        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(MLP().apply({"params": p}, x[idx]), y[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state = js.init(tx, params)  # masked params: step 0 already trains the sparse model
    key = jax.random.PRNGKey(1)
    for _ in (bar := tqdm(range(steps), desc=desc)):
        key, sub = jax.random.split(key)
        params, state, loss = step(params, state, sub)
        if _ % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return params, state


def best_time(fns, args, reps: int = 5):
    """Minimum wall time of each function over ``reps`` interleaved rounds (A B A B ...)."""
    times = [[] for _ in fns]
    for fn in fns:
        jax.block_until_ready(fn(*args))  # compile
    for _ in range(reps):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    parser.add_argument("--plot", default="block_sparse_training.png")
    args = parser.parse_args()

    x, y, xt, yt = load(args.dataset)
    params = MLP().init(jax.random.PRNGKey(0), x[:1])["params"]
    print(f"{args.dataset}: {x.shape[0]} train / {xt.shape[0]} test, MLP {x.shape[1]}-{WIDTH}-{WIDTH}-{WIDTH}-{CLASSES}, "
          f"{sum(p.size for p in jax.tree.leaves(params)):,} params, {args.steps} adam steps of batch {args.batch}")

    dense, _ = train(optax.adam(1e-3), params, (x, y), args.steps, args.batch, "dense")
    tx = js.rigl(
        optax.adam(1e-3), sparsity=args.sparsity, structure=js.blocks(args.block, args.block),
        include="Dense_[12]/kernel", update_every=100, end_step=3 * args.steps // 4,
    )
    sparse, state = train(tx, params, (x, y), args.steps, args.batch, f"block RigL {args.sparsity:.0%}")

    masks = js.get_masks(state)  # element masks of whole tiles; None for the dense leaves
    print()
    print(js.sparsity_report(sparse, state=state))  # structure and tile budget read from the state

    # Serve: the masks convert directly (the tile shape is read off each mask).
    variables = jsn.linen.variables_from_dense(sparse, masks)
    shapes = tuple(variables["block_pattern"][f"Dense_{i}"]["kernel"].block_shape for i in (1, 2))
    served = ServedMLP(shapes)
    logits = jax.jit(served.apply)(variables, xt)
    reference = MLP().apply({"params": sparse}, xt)
    assert np.allclose(logits, reference, rtol=1e-4, atol=1e-4), "the served model must compute the trained one"

    acc = lambda logits: float(jnp.mean(jnp.argmax(logits, -1) == yt))
    print()
    print(f"{'model':40s} {'test accuracy':>14s}")
    print(f"{'dense':40s} {acc(MLP().apply({'params': dense}, xt)):14.2%}")
    print(f"{'block RigL, served by BlockSparseDense':40s} {acc(logits):14.2%}")

    # Inference time of the two hidden 2048 x 2048 layers at batch 2048, dense vs block-sparse.
    h = jax.random.normal(jax.random.PRNGKey(2), (2048, WIDTH))

    def dense_hidden(p, h):
        for i in (1, 2):
            h = jax.nn.relu(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
        return h

    dense_fn = jax.jit(dense_hidden)
    hidden_vars = {c: {f"Dense_{i}": tree[f"Dense_{i}"] for i in (1, 2)} for c, tree in variables.items()}
    sparse_fn = jax.jit(ServedMLP(shapes, hidden_only=True).apply)
    t_dense, t_sparse = best_time([lambda h: dense_fn(dense, h), lambda h: sparse_fn(hidden_vars, h)], (h,))
    kept = np.mean([np.asarray(masks[f"Dense_{i}"]["kernel"]).mean() for i in (1, 2)])
    print()
    print(f"hidden layers (2 x {WIDTH}x{WIDTH}) at batch 2048 on {jax.devices()[0].device_kind}, "
          f"min of 5 interleaved runs; {kept:.1%} of the tiles kept:")
    print(f"  dense {t_dense * 1e3:8.1f} ms   block-sparse {t_sparse * 1e3:8.1f} ms   speed-up {t_dense / t_sparse:.2f}x")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, i in zip(axes, (1, 2)):
        m = np.asarray(masks[f"Dense_{i}"]["kernel"])
        grid = m.reshape(WIDTH // args.block, args.block, WIDTH // args.block, args.block).all(axis=(1, 3))
        ax.imshow(grid, cmap="Greys", interpolation="nearest")
        ax.set_title(f"Dense_{i}: {int(grid.sum())}/{grid.size} tiles of {args.block}x{args.block}")
        ax.set_xlabel("output tile")
        ax.set_ylabel("input tile")
    fig.suptitle(f"Block masks learned by RigL at {args.sparsity:.0%} ({args.dataset})")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()

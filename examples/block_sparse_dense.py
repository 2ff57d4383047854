"""Block-sparse layers from a dense-trained model, end to end on CPU in a few seconds.

1. Train a small dense MLP (flax linen) on a synthetic classification task.
2. Keep the 25% of (16, 16) weight blocks of its big kernel with the largest norms: one boolean
   per block, as a block-structured sparsifier produces.
3. Convert the params and masks to ``jaxsparse.nn.linen.BlockSparseDense`` layers, which store only
   the kept blocks and multiply with ``pallas_kernels.bsr_matmul``; fine-tune them with optax.
4. Do the same conversion for a flax nnx model, and time a bigger layer dense vs block-sparse.

Run: ``python examples/block_sparse_dense.py``
"""

import functools
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jaxsparse.nn as jsn  # noqa: E402
from pallas_kernels import BlockSparseMatrix, bsr_matmul  # noqa: E402

IN, HIDDEN, CLASSES, BLOCK, KEEP = 32, 256, 10, (16, 16), 0.25


class DenseMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(HIDDEN, name="hidden")(x))
        h = nn.relu(nn.Dense(HIDDEN, name="mixer")(h))  # the big kernel we make block-sparse
        return nn.Dense(CLASSES, name="out")(h)


class SparseMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(HIDDEN, name="hidden")(x))
        h = nn.relu(jsn.linen.BlockSparseDense(HIDDEN, BLOCK, name="mixer")(h))
        return nn.Dense(CLASSES, name="out")(h)


@functools.partial(jax.jit, static_argnums=1)
def make_data(key, n):
    """Labels from a fixed random teacher: the largest of CLASSES random projections of x."""
    teacher = jax.random.normal(jax.random.key(0), (IN, CLASSES))
    x = jax.random.normal(key, (n, IN))
    return x, jnp.argmax(x @ teacher, axis=-1)


def train(apply, params, data, steps, lr):
    x, y = map(np.asarray, data)  # batches sliced in numpy: no per-offset compilation
    tx = optax.adam(lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
        lo = (i * 256) % (len(x) - 256)
        params, state, loss = step(params, state, x[lo:lo + 256], y[lo:lo + 256])
    return params


def accuracy(apply, params, data):
    x, y = data
    return float(jax.jit(lambda p: jnp.mean(jnp.argmax(apply(p, x), -1) == y))(params))


def block_norm_mask(kernel, block, keep):
    """One boolean per block: the `keep` fraction of blocks with the largest Frobenius norms."""
    k, n = kernel.shape
    norms = jnp.linalg.norm(kernel.reshape(k // block[0], block[0], n // block[1], block[1]), axis=(1, 3))
    threshold = jnp.sort(norms.ravel())[-round(keep * norms.size)]
    return np.asarray(norms >= threshold)


def main():
    train_data, test_data = make_data(jax.random.key(1), 8192), make_data(jax.random.key(2), 2048)
    dense_apply = lambda p, x: DenseMLP().apply({"params": p}, x)
    t0 = time.perf_counter()
    params = jax.jit(DenseMLP().init)(jax.random.key(3), train_data[0][:1])["params"]
    params = train(dense_apply, params, train_data, 200, 3e-3)
    print(f"dense MLP trained in {time.perf_counter() - t0:.1f}s: test accuracy {accuracy(dense_apply, params, test_data):.3f}")

    # One boolean per (16, 16) block of the mixer kernel; None: leave the other leaves dense.
    masks = jax.tree_util.tree_map(lambda _: None, params)
    masks["mixer"]["kernel"] = block_norm_mask(params["mixer"]["kernel"], BLOCK, KEEP)
    variables = jsn.linen.variables_from_dense(params, masks)
    patterns = variables["block_pattern"]
    sparse_apply = lambda p, x: SparseMLP().apply({"params": p, "block_pattern": patterns}, x)
    stored = variables["params"]["mixer"]["kernel"]
    print(f"mixer kernel: {HIDDEN}x{HIDDEN} dense -> {int(masks['mixer']['kernel'].sum())} of "
          f"{masks['mixer']['kernel'].size} blocks of {BLOCK} kept, stored as {tuple(stored.shape)} "
          "(block columns x slots of the fullest column x block)")
    print(f"block-sparse, before fine-tuning: test accuracy {accuracy(sparse_apply, variables['params'], test_data):.3f}")
    tuned = train(sparse_apply, variables["params"], train_data, 100, 1e-3)
    print(f"block-sparse, after fine-tuning:  test accuracy {accuracy(sparse_apply, tuned, test_data):.3f}")
    w = BlockSparseMatrix(tuned["mixer"]["kernel"], patterns["mixer"]["kernel"])
    outside = np.asarray(w.to_dense())[~np.kron(masks["mixer"]["kernel"], np.ones(BLOCK, bool))]
    print(f"pruned blocks still exactly zero after fine-tuning: {bool((outside == 0).all())}")

    # The same conversion for flax nnx: swap a trained nnx.Linear for a BlockSparseDense.
    linear = nnx.Linear(HIDDEN, HIDDEN, rngs=nnx.Rngs(0))
    layer = jsn.nnx.BlockSparseDense.from_linear(linear, block_norm_mask(linear.kernel[...], BLOCK, KEEP))
    h = jax.random.normal(jax.random.key(4), (8, HIDDEN))
    print(f"nnx BlockSparseDense from nnx.Linear: output {layer(h).shape}, weight {layer.weight}")

    # A bigger layer: dense vs block-sparse forward on this machine (XLA path on CPU).
    size, block, density = 2048, 128, 0.1
    grid = size // block
    mask = np.zeros(grid * grid, bool)
    mask[np.random.default_rng(0).permutation(grid * grid)[: round(density * grid * grid)]] = True
    big = BlockSparseMatrix.from_dense(jax.random.normal(jax.random.key(5), (size, size)), (block, block),
                                       mask.reshape(grid, grid))
    x = jax.random.normal(jax.random.key(6), (size, size))
    dense_w = big.to_dense()
    dense_fn, sparse_fn = jax.jit(jnp.dot), jax.jit(bsr_matmul)
    for f, a in ((dense_fn, dense_w), (sparse_fn, big)):
        jax.block_until_ready(f(x, a))
    times = {}
    for name, f, a in (("dense", dense_fn, dense_w), ("block-sparse", sparse_fn, big)) * 3:
        t = time.perf_counter()
        jax.block_until_ready(f(x, a))
        times[name] = min(times.get(name, 1e9), time.perf_counter() - t)
    print(f"{size}x{size} @ {size}x{size}, {density:.0%} of {block}x{block} blocks: dense {times['dense'] * 1e3:.0f} ms, "
          f"block-sparse {times['block-sparse'] * 1e3:.0f} ms ({times['dense'] / times['block-sparse']:.1f}x)")


if __name__ == "__main__":
    main()

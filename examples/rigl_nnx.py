"""Train a flax nnx model with RigL through ``nnx.Optimizer``, the ordinary nnx training loop.

A small 1-D CNN + MLP classifier on MNIST-1D (generated offline by the ``mnist1d`` package; or
scikit-learn's digits with ``--dataset digits``). The only jaxsparse line is the optimizer:

    tx = js.rigl(optax.adam(lr), sparsity=0.9, update_every=100, end_step=0.75 * steps)
    optimizer = js.nnx_optimizer(model, tx)   # nnx.Optimizer(model, tx, wrt=nnx.Param), model masked

``jaxsparse.rigl`` spreads a float sparsity with ERK (Evci et al., 2020) over the kernels (the
convolution and dense kernels; biases stay dense), starts from a random mask, and every 100 steps
drops low-magnitude weights and grows the positions with the largest gradient. The model's
params are exactly sparse after every ``optimizer.update``; ``js.get_masks(optimizer)`` finds the
masks inside the nnx optimizer. The script prints a progress bar, the topology changes over
training, the sparsity report and the test accuracy against the same model trained dense.

    python examples/rigl_nnx.py [--steps 4000] [--sparsity 0.9] [--dataset mnist1d|digits]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jaxsparse as js


def load(name: str):
    """Standardised ``(x_train, y_train, x_test, y_test)``; x has shape ``(n, length)``."""
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())  # built locally from templates, no download
        x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        split = int(0.8 * len(digits.target))
        x, y, xt, yt = digits.data[:split], digits.target[:split], digits.data[split:], digits.target[split:]
    mean, std = x.mean(), x.std()
    f = lambda a: jnp.asarray((a - mean) / std, jnp.float32)
    return f(x), jnp.asarray(y, jnp.int32), f(xt), jnp.asarray(yt, jnp.int32)


class Classifier(nnx.Module):
    """Conv1d(1->32, k=5) -> relu -> Conv1d(32->32, k=5, stride 2) -> relu -> Dense 256 -> Dense 10."""

    def __init__(self, length: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(5,), rngs=rngs)
        self.conv2 = nnx.Conv(32, 32, kernel_size=(5,), strides=(2,), rngs=rngs)
        self.hidden = nnx.Linear(32 * ((length + 1) // 2), 256, rngs=rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv1(x[..., None]))
        h = jax.nn.relu(self.conv2(h))
        h = jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))
        return self.out(h)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def train(tx, data, steps, seed, desc, on_update=None):
    x, y, _, _ = data
    model = Classifier(x.shape[1], nnx.Rngs(seed))
    optimizer = js.nnx_optimizer(model, tx)  # the model starts masked (dense tx: unchanged)
    key = jax.random.PRNGKey(seed)
    for t in (bar := tqdm(range(steps), desc=desc, mininterval=1.0)):
        idx = jax.random.randint(jax.random.fold_in(key, t), (128,), 0, x.shape[0])
        loss = train_step(model, optimizer, x[idx], y[idx])
        if t % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if on_update is not None:
            on_update(t, model, optimizer)
    return model, optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    args = parser.parse_args()

    data = load(args.dataset)
    lr = optax.cosine_decay_schedule(2e-3, args.steps)
    update_every, end_step = 100, int(0.75 * args.steps)
    tx = js.rigl(optax.adam(lr), sparsity=args.sparsity, update_every=update_every, end_step=end_step, seed=0)

    changes = []  # positions changed by each topology update, to show RigL's cosine schedule
    previous = {}

    def record_topology(t, model, optimizer):
        if t % update_every:
            return
        masks = js.get_masks(optimizer)  # found inside nnx.Optimizer's state
        flat = {js.path_to_str(p): np.asarray(m) for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
        if previous:
            changes.append((t, sum(int((flat[n] ^ previous[n]).sum()) for n in flat)))
        previous.update(flat)

    sparse, optimizer = train(tx, data, args.steps, seed=0, desc=f"RigL {args.sparsity:.0%}", on_update=record_topology)
    dense, _ = train(optax.adam(lr), data, args.steps, seed=0, desc="dense")

    params = nnx.state(sparse, nnx.Param)
    masks = js.get_masks(optimizer)
    # Params are the sparse model: applying the masks changes nothing.
    assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, js.apply_masks(params, masks), params)))
    print("\nPositions changed per topology update (drop + grow, all kernels):")
    print("  " + ", ".join(f"step {t}: {n}" for t, n in changes if n) + f"; none from step {end_step} on")
    print()
    print(js.sparsity_report(params))
    _, _, xt, yt = data
    print(f"\ntest accuracy: dense {float(accuracy(dense, xt, yt)):.1%}, "
          f"RigL at {js.sparsity_report(masks).total.sparsity:.0%} of the kernels: {float(accuracy(sparse, xt, yt)):.1%}")


if __name__ == "__main__":
    main()

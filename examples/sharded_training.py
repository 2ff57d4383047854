"""Sparse training on a device mesh with data and model parallelism, checkpoints and resume.

Runs on 8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set
here before jax starts; on a machine with 8 accelerators the same code runs as it is). A 2 x 4
mesh ``("data", "model")``: the batch is split over ``data``; each kernel is sharded FSDP-style
over ``data`` and tensor-parallel over ``model``. Only the params get partition specs; the
optimizer state (masks, adam's moments, the sparsifier's counters and key) takes its shardings
from them:

    state_shardings = js.state_shardings(tx, params)         # no spec written for the state
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

RigL (Evci et al., 2020) trains an MLP classifier on scikit-learn's digits at 90% sparsity (ERK).
Every ``--checkpoint-every`` steps the params and the whole optimizer state are saved with orbax
(``js.save_checkpoint``); ``--resume`` restores the latest checkpoint into the sharded abstract
targets (``js.restore_checkpoint``) and continues, giving exactly the params of an uninterrupted
run. The script ends with the test accuracy and the sparsity report (bytes dense against the
compressed bitmask format).

    python examples/sharded_training.py [--steps 600] [--checkpoint-every 100] [--dir /tmp/sharded_run]
    python examples/sharded_training.py --stop-after 250  # as if killed after step 250 (last checkpoint: 200)
    python examples/sharded_training.py --resume          # continue from the latest checkpoint
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxsparse as js  # noqa: E402

N_IN, HIDDEN, N_OUT = 64, 256, 10  # 8x8 digit images, 10 classes
SPECS = {  # FSDP over "data", tensor parallel over "model"
    "Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
    "Dense_1": {"kernel": P("model", "data"), "bias": P()},
    "Dense_2": {"kernel": P("data", None), "bias": P()},
}


def load_digits():
    from sklearn.datasets import load_digits as digits

    x, y = digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype(np.int32)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def init_params(key):
    sizes = [(N_IN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, N_OUT)]
    keys = jax.random.split(key, len(sizes))
    return {
        f"Dense_{i}": {"kernel": jax.random.normal(k, s) * np.sqrt(2.0 / s[0]), "bias": jnp.zeros(s[1])}
        for i, (k, s) in enumerate(zip(keys, sizes))
    }


def logits(params, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    h = jax.nn.relu(h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"])
    return h @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--dir", default="/tmp/jaxsparse_sharded_run")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --dir")
    parser.add_argument("--stop-after", type=int, default=None, help="stop at this step, as if the job were killed")
    args = parser.parse_args()

    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"))
    x_train, y_train, x_test, y_test = load_digits()
    tx = js.rigl(optax.adam(3e-3), sparsity=args.sparsity, update_every=50, end_step=int(0.75 * args.steps), seed=0)

    param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS)
    abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    state_shardings = js.state_shardings(tx, abstract, param_shardings)
    manager = js.checkpoint_manager(args.dir)

    if args.resume:
        params, opt_state = js.restore_checkpoint(manager, tx, abstract, shardings=param_shardings)
        start = int(opt_state.step)
        print(f"resumed from step {start} in {args.dir}")
    else:
        if manager.latest_step() is not None:
            raise SystemExit(f"{args.dir} already holds checkpoints: pass --resume, or another --dir")
        params = jax.jit(init_params, out_shardings=param_shardings)(jax.random.PRNGKey(0))
        opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
        params = jax.jit(js.apply_masks, out_shardings=param_shardings)(params, js.get_masks(opt_state))
        start = 0

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch_sharding = NamedSharding(mesh, P("data"))
    progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="rigl on 2x4 mesh")
    for step in progress:
        # batches are a function of the step, so a resumed run sees the batches it would have seen
        idx = np.random.default_rng(step).choice(len(x_train), args.batch, replace=False)
        x, y = jax.device_put((x_train[idx], y_train[idx]), batch_sharding)
        params, opt_state, loss = train_step(params, opt_state, x, y)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            if step + 1 not in manager.all_steps():
                js.save_checkpoint(manager, step + 1, params, opt_state, tx=tx)
            progress.set_postfix(loss=f"{float(loss):.3f}", saved=step + 1)
        if args.stop_after is not None and step + 1 == args.stop_after:
            progress.close()
            print(f"stopped after step {step + 1}; continue with --resume")
            return

    kernel = params["Dense_0"]["kernel"]
    print(f"Dense_0/kernel sharding: {kernel.sharding.spec}; its mask: {js.get_masks(opt_state)['Dense_0']['kernel'].sharding.spec}")
    accuracy = float(jnp.mean(jnp.argmax(logits(params, x_test), -1) == y_test))
    print(f"test accuracy after {args.steps} steps: {accuracy:.3f}")
    print(js.sparsity_report(params))


if __name__ == "__main__":
    main()

"""Runs for tests/test_sharding.py and tests/test_checkpoint.py on 8 simulated CPU devices, in
fresh processes (XLA's device count is fixed when jax starts; a resume must not share anything
with the run it resumes).

``python tests/sharded_runs.py train DIR PRESET ...``: for each preset, the same steps on one
device and on a 2 x 4 ``("data", "model")`` mesh, the MLP's kernels sharded FSDP-style over
``data`` and tensor-parallel over ``model``; checks the state's shardings after init and after each
step, the compiled step's HLO (no all-gather of a whole param; for N:M in groups that lie on one
device, no collective beyond a plain optax step's), and a data-parallel run under ``shard_map``; saves a checkpoint
mid-schedule (after step 4) and the uninterrupted run's final arrays under ``DIR/<preset>``.
Prints ``ok <preset> flips=<n> shard_map_flips=<n>``.

``python tests/sharded_runs.py resume DIR PRESET ...``: restores each checkpoint onto the same
mesh, continues, and checks bit for bit against the uninterrupted run; restores it onto a 4 x 2
mesh too. Prints ``resumed <preset>``.
"""

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxsparse as js
from presets import PRESETS

STEPS = 8
SAVE_AFTER = 4  # mid-schedule: the presets' schedules run to step 8
# N:M whose groups lie on one device (the devices' slices of the input axis are multiples of m)
# selects with no communication at all: these steps have exactly a plain optax step's collectives.
LOCAL_SELECTION = {"ste_2of4", "sr_ste"}
SPECS = {
    "Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
    "Dense_1": {"kernel": P("model", "data"), "bias": P()},
}


def make_mesh(shape, names):
    """A mesh whose axes jit partitions automatically (newer jax defaults ``make_mesh`` to explicit axes)."""
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)


def mlp_params():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (32, 64)), "bias": jax.random.normal(k3, (64,)) * 0.1},
        "Dense_1": {"kernel": jax.random.normal(k2, (64, 16)) * 0.3, "bias": jnp.zeros(16)},
    }


def loss(p, x, y):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)


def batch(t):
    x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), t), (16, 32))
    return x, jnp.sin(x[:, :16])


def full_gathers(hlo: str, shapes) -> list[str]:
    """HLO lines that all-gather an array of a whole param's shape (or its flattened size)."""
    whole = {tuple(s) for s in shapes} | {(int(np.prod(s)),) for s in shapes}
    found = []
    for line in hlo.splitlines():
        if "all-gather" not in line or "=" not in line:
            continue
        result = line.split("=", 1)[1].split("all-gather", 1)[0]
        for dims in re.findall(r"\[([\d,]*)\]", result):
            if dims and tuple(int(d) for d in dims.split(",")) in whole:
                found.append(line.strip())
    return found


def collectives(hlo: str) -> dict:
    """How many of each collective the compiled HLO holds."""
    found = re.findall(r"= [^=]*? (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(", hlo)
    return {kind: found.count(kind) for kind in sorted(set(found))}


@functools.cache
def plain_collectives(mesh):
    """The collectives of a plain optax step on the sharded MLP (no sparsifier)."""
    tx = optax.adam(1e-2)
    params = jax.device_put(mlp_params(), jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS))
    state = jax.jit(tx.init, out_shardings=js.state_shardings(tx, params))(params)
    lowered = make_step(tx).lower(params, state, *jax.device_put(batch(0), NamedSharding(mesh, P("data"))))
    return collectives(lowered.compile().as_text())


def check_shardings(state, expected, where):
    # the same tree (zip alone would stop at a leaf the expected tree lacks, such as shadow weights)
    assert jax.tree.structure(state) == jax.tree.structure(expected), f"{where}: {jax.tree.structure(expected)}"
    for (path, x), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(expected)):
        assert x.sharding.is_equivalent_to(want, x.ndim), f"{where}: state leaf {js.path_to_str(path)} is {x.sharding}, want {want}"


def make_step(tx):
    def step(p, s, x, y):
        updates, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    return jax.jit(step)


def train(name, mesh, directory):
    tx = PRESETS[name]()
    step_fn = make_step(tx)

    # one device
    s1 = jax.jit(tx.init)(mlp_params())
    p1 = js.apply_masks(mlp_params(), js.get_masks(s1))
    for t in range(STEPS):
        p1, s1 = step_fn(p1, s1, *batch(t))

    # 2-D mesh: params sharded, nothing written for the state
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS)
    params = jax.device_put(mlp_params(), shardings)
    expected = js.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=expected)(params)
    check_shardings(state, expected, f"{name} after init")
    masks = js.get_masks(state)
    for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:  # independently of the helper
        layer = js.path_to_str(path).split("/")[0]
        assert m.sharding.is_equivalent_to(shardings[layer]["kernel"], 2), (name, layer, m.sharding)
    if state.shadow is not None:  # dense shadow weights, independently too
        for path, w in jax.tree_util.tree_flatten_with_path(js.get_shadow(state))[0]:
            layer = js.path_to_str(path).split("/")[0]
            assert w.sharding.is_equivalent_to(shardings[layer]["kernel"], 2), (name, "shadow", layer, w.sharding)
    params = js.apply_masks(params, masks)
    data = NamedSharding(mesh, P("data"))
    # One compiled step for the run (no out_shardings: the state keeps its shardings by itself),
    # and its HLO: no all-gather of a whole parameter, for the FSDP matmuls neither for selection
    # (histogram scatter-adds and reductions partition into partial results and an all-reduce).
    compiled = step_fn.lower(params, state, *jax.device_put(batch(0), data)).compile()
    gathered = full_gathers(compiled.as_text(), [x.shape for x in jax.tree.leaves(params)])
    assert not gathered, f"{name}: the step all-gathers whole params:\n" + "\n".join(gathered[:4])
    if name in LOCAL_SELECTION:
        found, plain = collectives(compiled.as_text()), plain_collectives(mesh)
        assert found == plain, f"{name}: the step's collectives {found}, a plain optax step's {plain}"
    for t in range(STEPS):
        x, y = jax.device_put(batch(t), data)
        params, state = compiled(params, state, x, y)
        check_shardings(state, expected, f"{name} after step {t}")
        check_shardings(params, shardings, f"{name} params after step {t}")
        if t + 1 == SAVE_AFTER:
            manager = js.checkpoint_manager(f"{directory}/{name}")
            js.save_checkpoint(manager, t + 1, params, state, tx=tx)
    np.savez(f"{directory}/{name}/final.npz", *[np.asarray(x) for x in jax.tree.leaves((params, state))])

    # the same result, up to selection flips at ties
    flips = 0
    m1, m2 = js.get_masks(s1), js.get_masks(state)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
        flips += int(np.sum(np.asarray(a) != np.asarray(b)))
    assert flips <= 8, f"{name}: {flips} mask entries differ between one device and the mesh"
    if flips == 0:
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=name)

    # every preset also runs under shard_map: data parallel over all 8 devices, params replicated,
    # gradients averaged
    flat = make_mesh((8,), ("batch",))

    def dp_step(p, s, x, y):
        g = jax.lax.pmean(jax.grad(loss)(p, x, y), "batch")
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    dp = jax.jit(jax.shard_map(dp_step, mesh=flat, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P())))
    s3 = jax.jit(tx.init)(mlp_params())
    p3 = js.apply_masks(mlp_params(), js.get_masks(s3))
    for t in range(STEPS):
        p3, s3 = dp(p3, s3, *batch(t))
    # Per-device gradients averaged by pmean differ from the one-device gradient in the last bits,
    # so selections drift apart over the run: check the invariants, and count the difference.
    m3 = js.get_masks(s3)
    dp_flips = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m3)))
    assert sum(int(m.sum()) for m in jax.tree.leaves(m3)) == sum(int(m.sum()) for m in jax.tree.leaves(m1)), name
    for m, w in zip(jax.tree.leaves(m3), [p3["Dense_0"]["kernel"], p3["Dense_1"]["kernel"]]):
        assert not np.any(np.asarray(w)[~np.asarray(m)]), f"{name} under shard_map: nonzeros off the mask"
    assert dp_flips <= 0.05 * sum(m.size for m in jax.tree.leaves(m1)), f"{name} under shard_map: {dp_flips} flips"
    print(f"ok {name} flips={flips} shard_map_flips={dp_flips}", flush=True)


def resume(name, directory):
    tx = PRESETS[name]()
    manager = js.checkpoint_manager(f"{directory}/{name}")
    abstract = jax.eval_shape(mlp_params)
    mesh = make_mesh((2, 4), ("data", "model"))
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS)
    params, state = js.restore_checkpoint(manager, tx, abstract, shardings=shardings)
    assert int(state.step) == SAVE_AFTER and manager.latest_step() == SAVE_AFTER, name
    for m in jax.tree.leaves(js.get_masks(state)):
        assert m.dtype == bool, (name, m.dtype)
    check_shardings(state, js.state_shardings(tx, abstract, shardings), f"{name} restored")
    step = make_step(tx)
    data = NamedSharding(mesh, P("data"))
    for t in range(SAVE_AFTER, STEPS):
        params, state = step(params, state, *jax.device_put(batch(t), data))
    final = np.load(f"{directory}/{name}/final.npz")
    leaves = jax.tree_util.tree_flatten_with_path((params, state))[0]
    for i, (path, x) in enumerate(leaves):
        assert np.array_equal(np.asarray(x), final[f"arr_{i}"]), f"{name}: {js.path_to_str(path)} differs after resuming"

    # onto another mesh shape: the same values, the new mesh's shardings
    other = make_mesh((4, 2), ("data", "model"))
    other_shardings = jax.tree.map(lambda spec: NamedSharding(other, spec), SPECS)
    p2, s2 = js.restore_checkpoint(manager, tx, abstract, shardings=other_shardings)
    p1, s1 = js.restore_checkpoint(manager, tx, abstract, shardings=shardings)
    check_shardings(s2, js.state_shardings(tx, abstract, other_shardings), f"{name} restored on 4 x 2")
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        assert np.array_equal(np.asarray(a), np.asarray(b)), name
    print(f"resumed {name}", flush=True)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    mode, directory, *presets = sys.argv[1:]
    for preset in presets:
        if mode == "train":
            train(preset, make_mesh((2, 4), ("data", "model")), directory)
        else:
            resume(preset, directory)

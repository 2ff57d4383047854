"""Sharding follows params (DESIGN.md invariant 7), checked on 4 simulated CPU devices.

XLA's device count is fixed when jax starts, so the check runs in a subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxsparse as js

    mesh = Mesh(np.array(jax.devices()).reshape(4), ("model",))
    params = {
        "a": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (64, 32)), "bias": jnp.zeros(32)},
        "b": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (32, 16)), "bias": jnp.zeros(16)},
    }
    specs = {"a": {"kernel": P("model", None), "bias": P()}, "b": {"kernel": P(None, "model"), "bias": P()}}
    params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"])

    for name, tx in {
        "magnitude": js.magnitude_pruning(optax.adam(1e-2), sparsity=0.75, schedule=js.polynomial_schedule(0, 4), update_every=2),
        "global": js.global_magnitude_pruning(optax.adam(1e-2), sparsity=0.75),
        "static": js.static_sparse(optax.adam(1e-2), sparsity=0.75),
        "set": js.set_sparse(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2),
        "rigl": js.rigl(optax.adam(1e-2), sparsity=js.uniform(0.75), update_every=2, end_step=100),
    }.items():
        state = jax.jit(tx.init)(params)

        @jax.jit
        def step(p, s, x):
            updates, s = tx.update(jax.grad(loss)(p, x), s, p)
            return optax.apply_updates(p, updates), s

        p = params
        for t in range(5):
            p, state = step(p, state, jnp.ones((8, 64)))
        masks = js.get_masks(state)
        mu = state.inner_state[0].mu
        for layer in ("a", "b"):
            want = NamedSharding(mesh, specs[layer]["kernel"])
            for what, x in (("mask", masks[layer]["kernel"]), ("adam mu", mu[layer]["kernel"]), ("param", p[layer]["kernel"])):
                assert x.sharding.is_equivalent_to(want, 2), (name, layer, what, x.sharding)
            m, w = np.asarray(masks[layer]["kernel"]), np.asarray(p[layer]["kernel"])
            assert np.all(w[~m] == 0), (name, layer)
            assert name == "global" or m.sum() == m.size // 4, (name, layer)
        assert sum(int(m.sum()) for m in jax.tree.leaves(masks)) == (64 * 32 + 32 * 16) // 4, name
        hlo = step.lower(p, state, jnp.ones((8, 64))).compile().as_text()
        assert "all-gather" not in hlo, f"{name}: the step gathers a sharded array"
    print("ok")
    """
)


@pytest.mark.compat
def test_state_shards_like_params_and_selection_never_gathers():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr

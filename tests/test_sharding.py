"""Sharding follows params (DESIGN.md invariant 7) and checkpoints resume exactly, for every
preset in tests/presets.py, on 8 simulated CPU devices.

XLA's device count is fixed when jax starts, so the runs are separate processes
(tests/sharded_runs.py); the resume runs in a fresh process that shares nothing with the run it
resumes but a persistent compilation cache (so the same step is not compiled twice).
"""

import os
import subprocess
import sys

import pytest

from presets import PRESETS

HERE = os.path.dirname(os.path.abspath(__file__))


def run_devices(*args, cache):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_runs.py"), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every preset trained on the mesh (checked as it goes) with a checkpoint after step 4."""
    directory = tmp_path_factory.mktemp("sharded")
    out = run_devices("train", directory / "runs", *PRESETS, cache=directory / "cache")
    return directory, out


@pytest.mark.slow
def test_every_preset_shards_like_params_and_matches_one_device(trained):
    # per preset: the state's shardings after init and every step, the same params as one device
    # (mask flips at ties counted, at most 8), no all-gather of a whole param in the compiled step
    _, out = trained
    lines = [l for l in out.splitlines() if l.startswith("ok ")]
    assert [l.split()[1] for l in lines] == list(PRESETS), out
    print(out)


@pytest.mark.slow
def test_checkpoint_restores_in_a_fresh_process_and_continues_bit_for_bit(trained):
    directory, _ = trained
    out = run_devices("resume", directory / "runs", *PRESETS, cache=directory / "cache")
    assert [l.split()[1] for l in out.splitlines() if l.startswith("resumed ")] == list(PRESETS), out


@pytest.mark.compat
def test_state_shardings_cover_every_state_leaf_of_every_preset():
    # in process, on one device: the helper's tree is the state's, shadow weights and thresholds
    # included (jit's out_shardings would take a None where a subtree was dropped as "unspecified")
    import jax
    import jaxsparse as js
    from sharded_runs import mlp_params

    params = jax.eval_shape(mlp_params)
    for name, make in PRESETS.items():
        tx = make()
        state, shardings = jax.eval_shape(tx.init, params), js.state_shardings(tx, params)
        assert jax.tree.structure(shardings) == jax.tree.structure(state), name
        if state.shadow is not None:
            assert jax.tree.structure(js.abstract_state(tx, params).shadow) == jax.tree.structure(state.shadow), name

"""Compressed formats: exact round trips, the published layouts, files, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse import export

pytest.importorskip("safetensors")


def sparse_params(dtype=jnp.float32):
    """Random weights at ~75% sparsity on an uneven mask, a 3-D kernel, a dense bias, and 2:4 rows."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    w = jax.random.normal(k1, (64, 48))
    conv = jax.random.normal(k2, (3, 8, 16))
    nm_w = jax.random.normal(k3, (32, 24))
    groups = jnp.abs(nm_w).reshape(8, 4, 24)
    nm_mask = (groups >= jnp.sort(groups, axis=1)[:, 2:3]).reshape(32, 24)  # 2 of every 4 along axis 0
    nm_mask = nm_mask.at[4:8, 0].set(False)  # a group with fewer than 2 kept: padded
    params = {
        "Dense_0": {"kernel": jnp.where(jnp.abs(w) > 1.15, w, 0).astype(dtype), "bias": jax.random.normal(k4, (48,))},
        "Conv_0": {"kernel": jnp.where(jnp.abs(conv) > 1.0, conv, 0).astype(dtype)},
        "NM_0": {"kernel": jnp.where(nm_mask, nm_w, 0).astype(dtype)},
    }
    masks = js.masks_from_params(params)
    # a kept weight that is exactly 0.0 (trained to zero) stays kept with masks given
    masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].at[0, :3].set(True)
    return params, masks


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bitmask_round_trip_and_layout(dtype):
    params, masks = sparse_params(dtype)
    c = js.compress(params, masks, format="bitmask")
    assert_same(js.decompress(c), params)
    record = c["Dense_0"]["kernel"]
    assert isinstance(record, js.BitmaskTensor) and not isinstance(c["Dense_0"]["bias"], js.BitmaskTensor)
    # compressed-tensors' sparse-bitmask: row-major values, bits packed little-endian per row, row offsets
    mask = np.asarray(masks["Dense_0"]["kernel"])
    w = np.asarray(params["Dense_0"]["kernel"])
    byte = np.asarray(record.bitmask)[5, 2]
    assert [bool(byte >> b & 1) for b in range(8)] == list(mask[5, 16:24])
    assert record.bitmask.shape == (64, 6) and record.row_offsets.dtype == np.int64
    offsets = np.asarray(record.row_offsets)
    np.testing.assert_array_equal(np.asarray(record.compressed)[offsets[5]:offsets[6]], w[5][mask[5]])
    assert record.compressed.size == mask.sum()  # the kept zeros at [0, :3] are stored
    assert c["Conv_0"]["kernel"].bitmask.shape == (24, 2)  # rank 3 viewed as (3 * 8, 16)


def test_nm_round_trip_and_metadata_layout():
    params, masks = sparse_params()
    nm_only = {"kernel": params["NM_0"]["kernel"]}
    c = js.compress(nm_only, format="nm", n=2, m=4)
    record = c["kernel"]
    assert isinstance(record, js.NMTensor) and record.axis == 0
    assert record.values.shape == (24, 16) and record.indices.shape == (24, 4)  # 16 2-bit indices per row
    assert_same(js.decompress(c), nm_only)
    # column 0 of the kernel, group 1 (rows 4..7) keeps nothing: padded with positions 0 and 1
    idx = np.asarray(record.indices)[0, 0]
    assert [(idx >> 4) & 3, (idx >> 6) & 3] == [0, 1]
    np.testing.assert_array_equal(np.asarray(record.values)[0, 2:4], [0, 0])
    # 1:8 has 3-bit indices; axis -1 groups along the last axis
    w = np.zeros((4, 16), np.float32)
    w[np.arange(4), [1, 9, 6, 15]] = [1, 2, 3, 4]
    c = js.compress({"kernel": jnp.asarray(w)}, format="nm", n=1, m=8, axis=-1)
    assert c["kernel"].indices.shape == (4, 1)
    assert_same(js.decompress(c), {"kernel": jnp.asarray(w)})


def test_bcsr_is_the_kernels_format():
    from pallas_kernels.bsr_format import BlockSparseMatrix

    params, masks = sparse_params()
    masks["Conv_0"]["kernel"] = None  # bcsr takes 2-D kernels; leave the conv dense
    c = js.compress(params, masks, format="bcsr", block_shape=(8, 8))
    assert isinstance(c["Dense_0"]["kernel"], BlockSparseMatrix)
    assert_same(js.decompress(c), params)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 64))
    np.testing.assert_allclose(x @ c["Dense_0"]["kernel"], x @ params["Dense_0"]["kernel"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Conv_0/kernel.*2-D"):
        js.compress(params, format="bcsr", block_shape=(8, 8))


@pytest.mark.parametrize("backend", ["safetensors", "orbax"])
@pytest.mark.parametrize("fmt", ["bitmask", "nm", "bcsr"])
def test_files_round_trip(fmt, backend, tmp_path):
    params, masks = sparse_params(jnp.bfloat16 if fmt == "bitmask" else jnp.float32)
    if fmt != "bitmask":
        params = {"NM_0": params["NM_0"], "Dense_0": params["Dense_0"] if fmt == "bcsr" else {}}
        masks = js.masks_from_params(params)
    c = js.compress(params, masks, format=fmt, block_shape=(8, 8))
    path = tmp_path / ("model.safetensors" if backend == "safetensors" else "model")
    js.save_compressed(path, c, backend=backend)
    assert_same(js.decompress(js.load_compressed(path, like=params)), params)
    assert_same(js.decompress(js.load_compressed(path, like=c)), params)
    loaded = js.load_compressed(path)  # nested dicts by leaf path without a target
    np.testing.assert_array_equal(js.decompress(loaded)["NM_0"]["kernel"], params["NM_0"]["kernel"])
    if backend == "safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            header = json.loads(f.metadata()["jaxsparse"])
        assert header["formats"] == [fmt] and header["leaves"]["NM_0/kernel"]["kind"] == fmt and header["leaves"]["NM_0/kernel"]["shape"] == [32, 24]


def test_report_counts_bytes_dense_and_compressed():
    params, masks = sparse_params()
    report = js.sparsity_report(params)
    row = {r.path: r for r in report.rows}
    assert row["Dense_0/bias"].compressed_bytes == row["Dense_0/bias"].dense_bytes == 48 * 4
    c = js.compress({"k": params["Dense_0"]["kernel"]})
    assert row["Dense_0/kernel"].compressed_bytes == export.compressed_nbytes(c) < row["Dense_0/kernel"].dense_bytes
    assert report.total.compressed_bytes == sum(r.compressed_bytes for r in report.rows)
    assert "bytes dense -> bitmask" in str(report)


@pytest.mark.compat
def test_bad_input_names_the_leaf_and_overwrites_nothing(tmp_path):
    params, masks = sparse_params()
    with pytest.raises(ValueError, match=r"'Conv_0/kernel' of shape \(3, 8, 16\) is not 2:4 along axis 1.*first: \[0, 0:4, 5\] keeps 3"):
        js.compress(params, format="nm")
    with pytest.raises(ValueError, match=r"'NM_0/kernel'.*not a multiple of m=5"):
        js.compress({"NM_0": params["NM_0"]}, format="nm", n=2, m=5, axis=-1)
    off = jax.tree.map(lambda m: m, masks, is_leaf=lambda x: x is None)
    off["Dense_0"]["kernel"] = jnp.zeros((64, 48), bool)
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*nonzero entries outside its mask"):
        js.compress(params, off)
    with pytest.raises(ValueError, match="format must be one of"):
        js.compress(params, format="csr")

    path = tmp_path / "model.safetensors"
    c = js.compress(params, masks)
    js.save_compressed(path, c)
    before = path.read_bytes()
    with pytest.raises(Exception):
        js.save_compressed(path, {"bad": object()})  # fails while writing
    assert path.read_bytes() == before

    # a file with a tensor missing: the error names the leaf and the tensor
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors["Conv_0/kernel.bitmask"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken, metadata=metadata)
    with pytest.raises(ValueError, match=r"leaf 'Conv_0/kernel' \(bitmask\) is missing its tensor 'Conv_0/kernel.bitmask'"):
        js.load_compressed(broken)
    other = {**params, "Extra": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"missing \['Extra/kernel'\]"):
        js.load_compressed(path, like=other)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        js.load_compressed(truncated)

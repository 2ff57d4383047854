import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import BlockSparseMatrix, bsr_matmul, default_bsr_backend
from pallas_kernels import bsr_matmul_gpu, bsr_matmul_tpu, bsr_matmul_xla
from pallas_kernels.bsr_matmul import dense_threshold

# Each path with shapes its tiling takes as they are (TPU: lane dims of 128, Triton: powers of two
# >= 16) and blocks they zero-pad to their tiles (PADDED; (24, 40) on the GPU too).
PADDED = (30, 42, (5, 7), (2, 3))
PATHS = {
    "xla": dict(backend="xla"),
    "tpu": dict(backend="tpu", interpret=True),
    "gpu": dict(backend="gpu", interpret=True),
}
SHAPES = {  # (K, N, block_shape, batch shape of x)
    "xla": [(30, 42, (5, 7), (2, 3)), (24, 32, (24, 8), (9,))],
    "tpu": [(256, 384, (128, 128), (2, 5)), (512, 256, (256, 128), (7,)), PADDED],
    "gpu": [(64, 96, (32, 16), (2, 5)), (64, 64, (16, 32), (3,)), PADDED, (72, 40, (24, 40), (5,))],
}
DENSITIES = [0.0, 0.1, 0.5, 1.0]


def random_bsm(rng, k, n, block_shape, density, dtype=np.float32):
    """Random nonzero values on a random block mask with one empty block row and column."""
    grid = (k // block_shape[0], n // block_shape[1])
    size = grid[0] * grid[1]
    chosen = rng.permutation(size)[: int(np.ceil(density * size))]
    block_mask = np.zeros(size, bool)
    block_mask[chosen] = True
    block_mask = block_mask.reshape(grid)
    if 0 < density < 1 and min(grid) > 1:
        block_mask[rng.integers(grid[0]), :] = False
        block_mask[:, rng.integers(grid[1])] = False
    w = rng.uniform(0.5, 1.5, (k, n)) * rng.choice([-1, 1], (k, n))  # never zero
    return BlockSparseMatrix.from_dense(jnp.asarray(w, dtype), block_shape, block_mask)


def cases():
    for path, shapes in SHAPES.items():
        for shape in shapes:
            for density in DENSITIES:
                yield pytest.param(path, shape, density, id=f"{path}-{shape[0]}x{shape[1]}-{shape[2]}-d{density}")


@pytest.mark.parametrize("path,shape,density", list(cases()))
def test_forward_equals_dense(path, shape, density):
    rng = np.random.default_rng(0)
    k, n, block_shape, batch = shape
    w = random_bsm(rng, k, n, block_shape, density)
    x = jnp.asarray(rng.standard_normal((*batch, k)), jnp.float32)
    y = bsr_matmul(x, w, **PATHS[path])
    assert y.shape == (*batch, n) and y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(y, x @ w.to_dense(), rtol=1e-5, atol=1e-4)


def test_xla_many_rows_and_no_rows():
    rng = np.random.default_rng(10)
    w = random_bsm(rng, 30, 42, (5, 7), 0.5)
    x = jnp.asarray(rng.standard_normal((1100, 30)), jnp.float32)
    np.testing.assert_allclose(bsr_matmul(x, w, backend="xla"), x @ w.to_dense(), rtol=1e-5, atol=1e-4)
    dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.sin(bsr_matmul(x, w))), (0, 1), allow_int=True)(x, w)
    ref_dx, ref_dw = jax.grad(lambda x, d: jnp.sum(jnp.sin(x @ d)), (0, 1))(x, w.to_dense())
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.data, w.pattern.take_blocks(ref_dw), rtol=1e-4, atol=1e-3)
    assert bsr_matmul(jnp.ones((0, 30)), w).shape == (0, 42)


@pytest.mark.compat
def test_xla_path_main_api():
    rng = np.random.default_rng(1)
    w = random_bsm(rng, 30, 42, (5, 7), 0.04)
    x = jnp.asarray(rng.standard_normal((4, 30)), jnp.float32)
    assert default_bsr_backend(w) == "xla"  # tests run on CPU; small blocks, very sparse
    np.testing.assert_allclose(x @ w, x @ w.to_dense(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.jit(bsr_matmul)(x, w), x @ w.to_dense(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(bsr_matmul(x[0], w), x[0] @ w.to_dense(), rtol=1e-5, atol=1e-4)  # a vector
    g = jax.grad(lambda w: jnp.sum(jnp.sin(bsr_matmul(x, w))), allow_int=True)(w)
    dense_g = jax.grad(lambda d: jnp.sum(jnp.sin(x @ d)))(w.to_dense())
    assert isinstance(g, BlockSparseMatrix)
    np.testing.assert_allclose(g.data, w.pattern.take_blocks(dense_g), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_in_bfloat16_out(path):
    rng = np.random.default_rng(2)
    k, n, block_shape, _ = SHAPES[path][0]
    w = random_bsm(rng, k, n, block_shape, 0.5, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((16, k)), jnp.bfloat16)
    y = bsr_matmul(x, w, **PATHS[path])
    assert y.dtype == jnp.bfloat16
    ref = x.astype(jnp.float32) @ w.to_dense().astype(jnp.float32)
    np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2 * float(jnp.abs(ref).max()))


def gradient_cases(index):
    """SHAPES[path][index] on every path, plus PADDED on the two kernels."""
    cases = [(path, shapes[index]) for path, shapes in SHAPES.items()]
    cases += [(path, PADDED) for path in ("tpu", "gpu")]
    return [pytest.param(path, shape, id=f"{path}-{shape[2]}") for path, shape in cases]


@pytest.mark.parametrize("path,shape", gradient_cases(1))
def test_gradients_equal_dense_gradients_on_the_pattern(path, shape):
    rng = np.random.default_rng(3)
    k, n, block_shape, batch = shape
    w = random_bsm(rng, k, n, block_shape, 0.5)
    x = jnp.asarray(rng.standard_normal((*batch, k)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((*batch, n)), jnp.float32)

    def loss(x, data):
        return jnp.sum((bsr_matmul(x, w.with_data(data), **PATHS[path]) - t) ** 2)

    dx, ddata = jax.jit(jax.grad(loss, (0, 1)))(x, w.data)
    ref_dx, ref_dw = jax.grad(lambda x, d: jnp.sum((x @ d - t) ** 2), (0, 1))(x, w.to_dense())
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ddata, w.pattern.take_blocks(ref_dw), rtol=1e-4, atol=1e-3)
    padding = ~np.asarray(w.pattern.valid_slots())
    assert (np.asarray(ddata)[padding] == 0).all()


@pytest.mark.parametrize("path,shape", gradient_cases(0))
def test_check_grads(path, shape):
    rng = np.random.default_rng(4)
    k, n, block_shape, _ = shape
    with jax.enable_x64(True):
        w = random_bsm(rng, k, n, block_shape, 0.5, np.float64)
        x = jnp.asarray(rng.standard_normal((3, k)))
        f = lambda x, data: bsr_matmul(x, w.with_data(data), **PATHS[path])
        check_grads(f, (x, w.data), order=2, modes=["rev"])  # second order: the rules differentiate too


@pytest.mark.parametrize("path", PATHS)
def test_padding_is_never_read(path):
    """Padding slots poisoned with NaN change nothing: every path stops at the counts."""
    rng = np.random.default_rng(5)
    k, n, block_shape, batch = SHAPES[path][0]
    w = random_bsm(rng, k, n, block_shape, 0.5)
    valid = np.asarray(w.pattern.valid_slots())[:, :, None, None]
    assert not valid.all()
    poisoned = w.with_data(jnp.where(valid, w.data, jnp.nan))
    x = jnp.asarray(rng.standard_normal((*batch, k)), jnp.float32)
    y, vjp = jax.vjp(lambda x, data: bsr_matmul(x, w.with_data(data), **PATHS[path]), x, poisoned.data)
    np.testing.assert_allclose(y, x @ w.to_dense(), rtol=1e-5, atol=1e-4)
    dx, ddata = vjp(jnp.ones_like(y))
    assert np.isfinite(np.asarray(dx)).all() and np.isfinite(np.asarray(ddata)).all()


@pytest.mark.parametrize("path", PATHS)
def test_vmap_over_inputs_and_jit(path):
    rng = np.random.default_rng(6)
    k, n, block_shape, _ = SHAPES[path][1]
    w = random_bsm(rng, k, n, block_shape, 0.5)
    xs = jnp.asarray(rng.standard_normal((3, 4, k)), jnp.float32)
    f = jax.jit(jax.vmap(functools.partial(bsr_matmul, **PATHS[path]), in_axes=(0, None)))
    np.testing.assert_allclose(f(xs, w), xs @ w.to_dense(), rtol=1e-5, atol=1e-4)


def test_tpu_kernel_under_the_tpu_interpreter():
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(11)
    w = random_bsm(rng, 256, 384, (128, 128), 0.5)
    x = jnp.asarray(rng.standard_normal((9, 256)), jnp.float32)
    y = bsr_matmul(x, w, backend="tpu", interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(y, x @ w.to_dense(), rtol=1e-5, atol=1e-4)


def test_vmap_over_weights_with_different_patterns():
    rng = np.random.default_rng(7)
    ws = [random_bsm(rng, 30, 42, (5, 7), d) for d in (0.2, 0.6)]
    caps = dict(max_blocks_per_col=6, max_blocks_per_row=6)
    ws = [BlockSparseMatrix.from_dense(w.to_dense(), (5, 7), **caps) for w in ws]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ws)
    x = jnp.asarray(rng.standard_normal((4, 30)), jnp.float32)
    ys = jax.vmap(bsr_matmul, in_axes=(None, 0))(x, stacked)
    for y, w in zip(ys, ws):
        np.testing.assert_allclose(y, x @ w.to_dense(), rtol=1e-5, atol=1e-4)


@pytest.mark.compat
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_their_device(platform):
    """The Pallas kernels lower to Triton / Mosaic without the device (catches unsupported ops)."""
    rng = np.random.default_rng(8)
    w = random_bsm(rng, 256, 384, (128, 128), 0.5, jnp.bfloat16)
    x = jnp.ones((40, 256), jnp.bfloat16)
    backend = "gpu" if platform == "cuda" else "tpu"

    def fwd_and_grads(x, data):
        y, vjp = jax.vjp(lambda x, d: bsr_matmul(x, w.with_data(d), backend=backend), x, data)
        return y, vjp(y)

    # Newer jax needs a target device to lower kernels without one: describe an abstract one.
    kind, cores = ("NVIDIA H100 80GB HBM3", 132) if platform == "cuda" else ("TPU v5 lite", 1)
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=cores, platform=platform)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        text = jax.jit(fwd_and_grads).trace(x, w.data).lower(lowering_platforms=(platform,)).as_text()
    marker = "triton" if platform == "cuda" else "tpu_custom_call"
    assert text.count(marker) >= 3  # forward, input gradient, weight gradient


def test_bad_input():
    rng = np.random.default_rng(9)
    w = random_bsm(rng, 30, 42, (5, 7), 0.5)
    with pytest.raises(ValueError, match=r"x has shape \(4, 31\), w has shape \(30, 42\)"):
        bsr_matmul(jnp.ones((4, 31)), w)
    with pytest.raises(ValueError, match="floating"):
        bsr_matmul(jnp.ones((4, 30), jnp.int32), w)
    with pytest.raises(ValueError, match="backend"):
        bsr_matmul(jnp.ones((4, 30)), w, backend="cuda")
    with pytest.raises(TypeError, match="BlockSparseMatrix"):
        bsr_matmul(jnp.ones((4, 30)), w.to_dense())


def test_kernel_block_shapes():
    assert bsr_matmul_tpu.kernel_block_shape((256, 64), (128, 64)) == (128, 64)  # a whole dimension is allowed
    assert bsr_matmul_tpu.kernel_block_shape((300, 640), (100, 320)) == (128, 384)
    assert bsr_matmul_gpu.kernel_block_shape((64, 64), (16, 64)) == (16, 64)
    assert bsr_matmul_gpu.kernel_block_shape((30, 42), (5, 21)) == (16, 32)
    for module in (bsr_matmul_tpu, bsr_matmul_gpu):  # PADDED really is padded on both kernels
        assert module.kernel_block_shape(PADDED[:2], PADDED[2]) != PADDED[2]


@pytest.mark.compat
def test_cpu_default_is_dense_above_the_measured_density():
    """On CPU the default path multiplies by the densified matrix from ``dense_threshold`` on
    (never slower than dense), the block loop below; same values and gradients either way, and a
    traced pattern (``w`` a jit argument) decides at run time."""
    rng = np.random.default_rng(7)
    assert dense_threshold((128, 128)) == 0.4 and dense_threshold((64, 64)) == 0.3 and dense_threshold((5, 7)) == 0.05
    x = jnp.asarray(rng.standard_normal((6, 256)), jnp.float32)
    for density, want in ((0.9, "dense"), (0.1, "xla")):
        w = random_bsm(rng, 256, 256, (64, 64), density)
        assert default_bsr_backend(w) == want
        loss = lambda x, w: jnp.sum(jnp.sin(bsr_matmul(x, w)))
        for run in (lambda f: f, jax.jit):
            dx, dw = run(jax.grad(loss, (0, 1), allow_int=True))(x, w)
            np.testing.assert_allclose(run(bsr_matmul)(x, w), x @ w.to_dense(), rtol=1e-5, atol=1e-4)
            ref_dx, ref_dw = jax.grad(lambda x, d: jnp.sum(jnp.sin(x @ d)), (0, 1))(x, w.to_dense())
            np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(dw.data, w.pattern.take_blocks(ref_dw), rtol=1e-4, atol=1e-4)
            assert (np.asarray(dw.data)[~np.asarray(w.pattern.valid_slots())] == 0).all()
    np.testing.assert_allclose(bsr_matmul(x, w, backend="dense"), x @ w.to_dense(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", ["tpu", "gpu"])
def test_kernels_with_several_row_and_column_tiles(path):
    """Each kernel loop run with 3 row tiles (a ragged last one) and several block rows and
    columns: forward (dsd), input gradient (dsd on transposed blocks) and weight gradient (SDDMM),
    against the XLA products and dense math."""
    rng = np.random.default_rng(8)
    module = bsr_matmul_tpu if path == "tpu" else bsr_matmul_gpu
    k, n, block_shape = (384, 256, (128, 128)) if path == "tpu" else (96, 64, (32, 16))
    w = random_bsm(rng, k, n, block_shape, 0.5)
    x = jnp.asarray(rng.standard_normal((40, k)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((40, n)), jnp.float32)
    blocks = w.data.reshape(-1, *block_shape)
    tiles = dict(block_m=16, interpret=True)
    cols, rows = w.pattern.column_lists(), w.pattern.row_lists()
    col_lists = (w.pattern.col_rows, w.pattern.col_counts, block_shape)
    dense = w.to_dense()
    checks = [
        (module.dsd_matmul(x, blocks, *cols, **tiles), bsr_matmul_xla.dsd_matmul(x, blocks, *cols), x @ dense),
        (module.dsd_matmul(dy, blocks, *rows, transpose_blocks=True, **tiles),
         bsr_matmul_xla.dsd_matmul(dy, blocks, *rows, transpose_blocks=True), dy @ dense.T),
        (module.sddmm(x, dy, *col_lists, **tiles), bsr_matmul_xla.sddmm(x, dy, *col_lists), w.pattern.take_blocks(x.T @ dy)),
    ]
    for name, (got, xla, ref) in zip(["forward", "input gradient", "weight gradient"], checks):
        np.testing.assert_allclose(got, xla, rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3, err_msg=name)

"""``bsr_matmul(x, w)``: ``x @ w`` for a block-sparse ``w``, on one of three paths, differentiable.

The three paths (``bsr_matmul_xla``, ``bsr_matmul_tpu``, ``bsr_matmul_gpu``) implement the same two
kernels, and this module wires them into three ``jax.custom_vjp`` products whose gradients are
made of each other, so reverse-mode derivatives of any order stay block-sparse (forward mode is not
available: ``custom_vjp``):

* forward ``y = x @ W``: dense x sparse over the per-block-column lists;
* input gradient ``dx = dy @ W.T``: the same product over the transposed pattern (per-block-row
  lists, stored blocks used transposed), so ``W.T`` is never materialised;
* weight gradient: ``x.T @ dy`` computed only at the stored blocks (a sampled dense-dense product,
  SDDMM) and returned as block values with the layout of ``w.data``; padding slots get zero, so
  gradient steps keep the padding exactly zero.

See T. Gale, M. Zaharia, C. Young, E. Elsen, "Sparse GPU Kernels for Deep Learning" (SC 2020) for
the SpMM/SDDMM decomposition of sparse training.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import bsr_matmul_gpu, bsr_matmul_tpu, bsr_matmul_xla
from pallas_kernels.bsr_format import BlockSparseMatrix

__all__ = ["bsr_matmul", "default_bsr_backend", "dense_threshold"]

BACKENDS = ("xla", "tpu", "gpu", "dense")

# CPU: above these block densities (stored blocks / all blocks) a dense matmul of the densified
# matrix beats the XLA path's block loop (see dense_threshold). (least block area, density)
_DENSE_FROM = ((128 * 128, 0.4), (64 * 64, 0.3), (32 * 32, 0.15), (0, 0.05))


class _Path(NamedTuple):
    dsd_matmul: callable
    sddmm: callable


def _path(config) -> _Path:
    """The two products of one path; ``config`` is the hashable ``(backend, interpret)``."""
    backend, interpret = config
    if backend == "xla":
        return _Path(bsr_matmul_xla.dsd_matmul, bsr_matmul_xla.sddmm)
    module = bsr_matmul_tpu if backend == "tpu" else bsr_matmul_gpu
    return _Path(
        functools.partial(module.dsd_matmul, interpret=interpret),
        functools.partial(module.sddmm, interpret=interpret),
    )


_KERNEL_BLOCK_SHAPE = {"tpu": bsr_matmul_tpu.kernel_block_shape, "gpu": bsr_matmul_gpu.kernel_block_shape}


def dense_threshold(block_shape) -> float:
    """The block density from which ``bsr_matmul`` on CPU multiplies by the densified matrix
    instead of looping over blocks: 0.4 for blocks of at least 128x128 elements, 0.3 from 64x64,
    0.15 from 32x32, 0.05 below. Measured (``benchmarks/RESULTS.md``): the block loop's speed per
    nonzero block is ~45% of a dense matmul's at 128x128 and ~30% at 64x64 on an idle 2-core CPU
    (break-even densities ~0.45 and ~0.3), and at 32x32 about half of 64x64's in side-by-side runs;
    the thresholds sit at or below break-even, so the loop runs only where it is faster. The
    dense path costs a dense matmul plus densifying ``w`` (a few percent at 2048x2048)."""
    area = block_shape[0] * block_shape[1]
    return next(threshold for least, threshold in _DENSE_FROM if area >= least)


def _block_density(w: BlockSparseMatrix):
    kb, nb = w.pattern.grid
    return w.nnz_blocks() / (kb * nb)


def default_bsr_backend(w: BlockSparseMatrix) -> str:
    """The path ``bsr_matmul(x, w)`` takes by default: the Pallas kernel of the default device
    (``"tpu"`` or ``"gpu"``; blocks its tiling cannot take are zero-padded). On CPU ``"dense"``
    (``x @ w.to_dense()``) when ``w``'s block density is at least ``dense_threshold(block_shape)``,
    else ``"xla"``; for a traced pattern (``w`` a ``jit`` argument) ``"xla"`` here, and
    ``bsr_matmul`` picks between the two at run time (``lax.cond`` on the stored block count).

    On an accelerator the kernels beat the XLA path's loop of small products even with padding
    (a loop step costs a few kernel launches).
    """
    platform = jax.default_backend()
    if platform in _KERNEL_BLOCK_SHAPE:
        return platform
    density = _block_density(w)
    if isinstance(density, jax.core.Tracer):
        return "xla"
    return "dense" if float(density) >= dense_threshold(w.block_shape) else "xla"


def _dense_product(x, w: BlockSparseMatrix, dtype):
    """``x @ w.to_dense()``: differentiable by autodiff (the weight gradient is gathered at the
    stored blocks by ``to_dense``'s transpose; padding slots get zero)."""
    return jnp.dot(x, w.to_dense().astype(dtype), preferred_element_type=jnp.promote_types(dtype, jnp.float32)).astype(dtype)


def _pad_blocks(x, data, pattern, block_shape):
    """Zero-pad ``x``'s K-blocks and every stored block to ``block_shape``: the same product on a
    grid of larger blocks, whose extra output columns are zero."""
    (bk, bn), (tk, tn) = pattern.block_shape, block_shape
    kb = pattern.grid[0]
    x = jnp.pad(x.reshape(-1, kb, bk), ((0, 0), (0, 0), (0, tk - bk))).reshape(-1, kb * tk)
    data = jnp.pad(data, [(0, 0)] * (data.ndim - 2) + [(0, tk - bk), (0, tn - bn)])
    return x, data, pattern.with_block_shape(block_shape)


# The three products of sparse training. Each one's gradient is made of the others (all three
# are linear in each argument), so every order of reverse-mode derivative stays on the pattern:
#   y = x @ W         (_times_w):        x_bar = y_bar @ W.T,  W_bar = x.T @ y_bar at the blocks
#   z = d @ W.T       (_times_w_t):      d_bar = z_bar @ W,    W_bar = z_bar.T @ d at the blocks
#   B = x.T @ d at the blocks (_sampled): x_bar = d @ B_bar.T,  d_bar = x @ B_bar
# Cotangents of padding slots are ignored: those outputs are constant zeros.


def _times_w_impl(config, x, data, pattern):
    bk, bn = pattern.block_shape
    return _path(config).dsd_matmul(x, data.reshape(-1, bk, bn), *pattern.column_lists())


def _times_w_t_impl(config, d, data, pattern):
    bk, bn = pattern.block_shape
    return _path(config).dsd_matmul(d, data.reshape(-1, bk, bn), *pattern.row_lists(), transpose_blocks=True)


def _sampled_impl(config, x, d, pattern):
    return _path(config).sddmm(x, d, pattern.col_rows, pattern.col_counts, pattern.block_shape)


_times_w = jax.custom_vjp(_times_w_impl, nondiff_argnums=(0,))
_times_w_t = jax.custom_vjp(_times_w_t_impl, nondiff_argnums=(0,))
_sampled = jax.custom_vjp(_sampled_impl, nondiff_argnums=(0,))


def _keep_operands(product):
    # The forward rule calls the custom_vjp product itself, so differentiating the rule (for a
    # higher-order derivative) goes through the custom rules and never into a kernel loop.
    return lambda config, a, b, pattern: (product(config, a, b, pattern), (a, b, pattern))


def _times_w_bwd(config, residuals, y_bar):
    x, data, pattern = residuals
    return _times_w_t(config, y_bar, data, pattern), _sampled(config, x, y_bar, pattern), None


def _times_w_t_bwd(config, residuals, z_bar):
    d, data, pattern = residuals
    return _times_w(config, z_bar, data, pattern), _sampled(config, z_bar, d, pattern), None


def _sampled_bwd(config, residuals, b_bar):
    x, d, pattern = residuals
    return _times_w_t(config, d, b_bar, pattern), _times_w(config, x, b_bar, pattern), None


_times_w.defvjp(_keep_operands(_times_w), _times_w_bwd)
_times_w_t.defvjp(_keep_operands(_times_w_t), _times_w_t_bwd)
_sampled.defvjp(_keep_operands(_sampled), _sampled_bwd)
# One dispatch per call when used eagerly; ``config`` is the hashable (backend, interpret).
_matmul = jax.jit(_times_w, static_argnums=0)


def bsr_matmul(x, w: BlockSparseMatrix, *, backend: str | None = None, interpret=False):
    """``x @ w.to_dense()`` without densifying ``w``; differentiable in ``x`` and ``w.data``.

    Args:
      x: floating array ``(..., K)``.
      w: a ``BlockSparseMatrix`` of shape ``(K, N)``.
      backend: ``"xla"`` (pure XLA block loop, runs everywhere; the reference),
        ``"dense"`` (``x @ w.to_dense()``: faster on CPU above a block density, see below),
        ``"tpu"`` (Pallas TPU kernel, scalar-prefetched block lists; runs block dimensions that
        are multiples of 128), ``"gpu"`` (Pallas Triton kernel; runs power-of-two block
        dimensions >= 16), or ``None`` for ``default_bsr_backend(w)``: the device's kernel on
        TPU/GPU; on CPU never slower than a dense matmul of the same matrix: ``"dense"`` when the
        block density (stored blocks / all blocks) is at least ``dense_threshold(block_shape)``
        (0.4 at blocks of 128x128, 0.3 at 64x64, 0.15 at 32x32, 0.05 below; measured in
        ``benchmarks/bsr_matmul.py``), else ``"xla"``, decided at run time for a traced pattern.
        A kernel given other
        blocks zero-pads them to its ``kernel_block_shape``: the result is the same, the padding
        costs its share of the work.
      interpret: run a Pallas kernel in interpret mode (on CPU, for tests). For ``"tpu"`` it may
        also be a ``pltpu.InterpretParams``. Ignored by ``"xla"``.

    Returns:
      ``(..., N)`` in the common dtype of ``x`` and ``w`` (float32 accumulation). Gradients with
      respect to ``w`` (``jax.grad(..., allow_int=True)``) are a ``BlockSparseMatrix`` of block
      values in ``w``'s layout, computed only at the stored blocks.
    """
    if not isinstance(w, BlockSparseMatrix):
        raise TypeError(f"w must be a BlockSparseMatrix (see BlockSparseMatrix.from_dense); got {type(w).__name__}")
    x = jnp.asarray(x)
    k, n = w.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"inner dimensions do not match: x has shape {x.shape}, w has shape {w.shape}")
    for name, dtype in (("x", x.dtype), ("w", w.dtype)):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype; got {dtype} (x shape {x.shape}, w shape {w.shape})")
    choose_at_run_time = backend is None and jax.default_backend() not in _KERNEL_BLOCK_SHAPE
    choose_at_run_time &= isinstance(_block_density(w), jax.core.Tracer)
    if backend is None:
        backend = default_bsr_backend(w)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    dtype = jnp.result_type(x.dtype, w.dtype)
    if x.size == 0:  # no rows: nothing for a kernel grid to cover
        return jnp.zeros((*x.shape[:-1], n), dtype)
    if backend == "dense":
        return _dense_product(x, w, dtype)
    if choose_at_run_time:
        return jax.lax.cond(
            _block_density(w) >= dense_threshold(w.block_shape),
            lambda x, w: _dense_product(x, w, dtype),
            lambda x, w: bsr_matmul(x, w, backend="xla"),
            x, w,
        )
    operands = x.reshape(-1, k).astype(dtype), w.data.astype(dtype), w.pattern
    block_shape = _KERNEL_BLOCK_SHAPE[backend](w.shape, w.block_shape) if backend in _KERNEL_BLOCK_SHAPE else w.block_shape
    if block_shape != w.block_shape:
        operands = _pad_blocks(*operands, block_shape)
    y = _matmul((backend, interpret), *operands)
    if block_shape != w.block_shape:
        y = y.reshape(-1, w.pattern.grid[1], block_shape[1])[:, :, : w.block_shape[1]]
    return y.reshape(*x.shape[:-1], n)

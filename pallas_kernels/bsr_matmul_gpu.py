"""Pallas GPU kernels (Triton backend) for the block-sparse products of ``bsr_matmul_xla``.

Unlike TPU, a Triton program can load from any address at any time, so the block lists are
ordinary inputs read *inside* the kernel and each program runs a ``fori_loop`` over exactly its
list's real entries (dynamic trip count): nothing is spent on padding.

* ``dsd_matmul``: one program per (output block column, row tile of ``lhs``). It loops over the
  column's list, loading the ``(block_m, bl)`` tile of ``lhs`` at the listed block and the stored
  block, and accumulates their product in float32 registers. Program id 0 (the fastest-varying
  on the launch grid) is the output block column, so programs running at the same time share one
  row tile of ``lhs`` in L2 and each tile is read from HBM about once.
* ``sddmm``: one program per stored-block slot (list position fastest, so concurrent programs
  share the same ``dy`` block column); it accumulates ``x_tile^T @ dy_tile`` over the row tiles
  and writes zeros for padding slots.

Triton needs power-of-two tile dimensions of at least 16, so ``bsr_matmul`` zero-pads other block
shapes up to ``kernel_block_shape`` (correct, but the padding is computed too).

Block-sparse design after S. Gray, A. Radford, D. P. Kingma, "GPU Kernels for Block-Sparse
Weights" (2017), and T. Gale et al., "Sparse GPU Kernels for Deep Learning" (SC 2020) for the
SpMM/SDDMM pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["dsd_matmul", "sddmm", "kernel_block_shape"]

_MIN_TILE = 16  # smallest matmul tile dimension Triton accepts
_SMEM_BUDGET = 192 * 1024  # bytes of shared memory for pipelined operand tiles (H100/H200 have 227 KiB)


def _is_tile(size) -> bool:
    return size >= _MIN_TILE and size & (size - 1) == 0


def kernel_block_shape(shape, block_shape):
    """The block shape the Triton kernels run ``(bk, bn)`` blocks at: each dimension rounded up to
    a power of two >= 16 (``bsr_matmul`` zero-pads). ``shape`` is unused; it keeps the signature
    of the TPU version."""
    del shape
    return tuple(max(_MIN_TILE, pl.next_power_of_2(int(b))) for b in block_shape)


def _tile_m(m, block_m, dtype):
    """Row tile: ``block_m`` (a power of two >= 16; default 128 for 16-bit inputs, 64 for wider),
    shrunk for small ``m``."""
    if block_m is None:
        block_m = 128 if jnp.dtype(dtype).itemsize <= 2 else 64
    if not _is_tile(block_m):
        raise ValueError(f"block_m must be a power of two >= {_MIN_TILE}; got {block_m}")
    return min(block_m, max(_MIN_TILE, pl.next_power_of_2(m)))


def _launch_params(num_warps, num_stages, tile_bytes, out_tile):
    """Triton parameters: as many pipeline stages (<= 4) as fit the shared-memory budget, 8 warps
    for outputs of 128x128 and more."""
    if num_stages is None:
        num_stages = int(min(4, max(1, _SMEM_BUDGET // tile_bytes)))
    if num_warps is None:
        num_warps = 8 if out_tile >= 128 * 128 else 4
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(
    jax.jit, static_argnames=("transpose_blocks", "block_m", "num_warps", "num_stages", "out_dtype", "interpret")
)
def dsd_matmul(lhs, blocks, idx, slots, counts, *, transpose_blocks=False, block_m=None, num_warps=None,
               num_stages=None, out_dtype=None, interpret=False):
    """Dense ``lhs`` times a block-sparse matrix; contract of ``bsr_matmul_xla.dsd_matmul``.

    ``block_m`` is the row tile; ``num_warps`` and ``num_stages`` are Triton's launch and
    software-pipelining parameters (``None``: chosen from the tile sizes, see ``_launch_params``).
    """
    m, width = lhs.shape
    num_cols, list_len = idx.shape
    bk, bn = blocks.shape[1:]
    bl, bo = (bn, bk) if transpose_blocks else (bk, bn)
    out_dtype = out_dtype or lhs.dtype
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    bm = _tile_m(m, block_m, lhs.dtype)
    mp = pl.cdiv(m, bm) * bm
    contract = (((1,), (1,)), ((), ())) if transpose_blocks else (((1,), (0,)), ((), ()))
    params = _launch_params(num_warps, num_stages, (bm * bl + bk * bn) * lhs.dtype.itemsize, bm * bo)

    def kernel(idx_ref, slots_ref, counts_ref, lhs_ref, blk_ref, out_ref):
        c = pl.program_id(0)

        def step(j, acc):
            start = pl.multiple_of(idx_ref[j] * bl, bl)
            part = lhs_ref[:, pl.ds(start, bl)]
            return acc + lax.dot_general(part, blk_ref[slots_ref[j]], contract, preferred_element_type=acc_dtype)

        acc = lax.fori_loop(0, counts_ref[c], step, jnp.zeros((bm, bo), acc_dtype))
        out_ref[...] = acc.astype(out_ref.dtype)

    out = pl.pallas_call(
        kernel,
        grid=(num_cols, mp // bm),
        in_specs=[
            pl.BlockSpec((pl.squeezed, list_len), lambda c, i: (c, 0)),
            pl.BlockSpec((pl.squeezed, list_len), lambda c, i: (c, 0)),
            pl.BlockSpec((num_cols,), lambda c, i: (0,)),
            pl.BlockSpec((bm, width), lambda c, i: (i, 0)),
            pl.BlockSpec(blocks.shape, lambda c, i: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bo), lambda c, i: (i, c)),
        out_shape=jax.ShapeDtypeStruct((mp, num_cols * bo), out_dtype),
        compiler_params=params,
        interpret=interpret,
        name="bsr_dsd_matmul",
    )(idx, slots, counts, jnp.pad(lhs, ((0, mp - m), (0, 0))), blocks)
    return out[:m]


@functools.partial(
    jax.jit, static_argnames=("block_shape", "block_m", "num_warps", "num_stages", "out_dtype", "interpret")
)
def sddmm(x, dy, col_rows, col_counts, block_shape, *, block_m=None, num_warps=None, num_stages=None,
          out_dtype=None, interpret=False):
    """``x^T @ dy`` at the stored blocks; contract of ``bsr_matmul_xla.sddmm``."""
    bk, bn = block_shape
    m = x.shape[0]
    num_cols, max_k = col_rows.shape
    out_dtype = out_dtype or x.dtype
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    bm = _tile_m(m, block_m, x.dtype)
    mp = pl.cdiv(m, bm) * bm
    params = _launch_params(num_warps, num_stages, bm * (bk + bn) * x.dtype.itemsize, bk * bn)

    def kernel(rows_ref, counts_ref, x_ref, dy_ref, out_ref):
        j, n = pl.program_id(0), pl.program_id(1)
        start = pl.multiple_of(rows_ref[j] * bk, bk)
        # A padding slot (j >= count) runs zero steps and stores zeros.
        steps = jnp.where(j < counts_ref[n], mp // bm, 0)

        def step(i, acc):
            rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
            xk = x_ref[rows, pl.ds(start, bk)]
            return acc + lax.dot_general(xk, dy_ref[rows, :], (((0,), (0,)), ((), ())),
                                         preferred_element_type=acc_dtype)

        acc = lax.fori_loop(0, steps, step, jnp.zeros((bk, bn), acc_dtype))
        out_ref[...] = acc.astype(out_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid=(max_k, num_cols),
        in_specs=[
            pl.BlockSpec((pl.squeezed, max_k), lambda j, n: (n, 0)),
            pl.BlockSpec((num_cols,), lambda j, n: (0,)),
            pl.BlockSpec((mp, x.shape[1]), lambda j, n: (0, 0)),
            pl.BlockSpec((mp, bn), lambda j, n: (0, n)),
        ],
        out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, bk, bn), lambda j, n: (n, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_cols, max_k, bk, bn), out_dtype),
        compiler_params=params,
        interpret=interpret,
        name="bsr_sddmm",
    )(col_rows, col_counts, jnp.pad(x, ((0, mp - m), (0, 0))), jnp.pad(dy, ((0, mp - m), (0, 0))))

"""Pallas TPU kernels for the block-sparse products (same contracts as ``bsr_matmul_xla``).

The block lists are *scalar-prefetched* (``pltpu.PrefetchScalarGridSpec``): they land in SMEM
before the grid runs, and the ``BlockSpec`` index maps read them to pick which block of the
dense operand and which stored block to DMA into VMEM at each grid step. The pipeline then
overlaps those copies with the MXU matmuls.

* ``dsd_matmul``: grid ``(M tiles, output block columns C, list length J)``; the last axis is the
  reduction over one column's list. Steps past the column's count are skipped with ``pl.when``,
  and because padding entries repeat the last real index, their index maps return the block
  already in VMEM, so the pipeline issues no copy for them.
* ``sddmm``: grid ``(Nb, max_k, M tiles)``; each stored block accumulates ``x_tile^T @ dy_tile``
  over the M tiles. Padding slots map every step to the block already held and write zeros.

TPU tiling: the last two dimensions of every VMEM block must be multiples of (8, 128) (16 rows for
bf16) or span the whole array. Both block dimensions are a lane dimension somewhere, so
``bsr_matmul`` zero-pads other block shapes up to ``kernel_block_shape`` (correct, but the padding
is computed too).

Block-sparse kernel design after S. Gray, A. Radford, D. P. Kingma, "GPU Kernels for Block-Sparse
Weights" (2017); scalar prefetch as in JAX's Pallas TPU block-sparse examples (Pallas docs,
"Scalar Prefetch and Block-Sparse Computation").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["dsd_matmul", "sddmm", "kernel_block_shape"]

_LANES = 128


def _sublanes(dtype) -> int:
    """Row granularity of a VMEM tile: 8 rows of 32-bit values, packed deeper for narrower types."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def kernel_block_shape(shape, block_shape):
    """The block shape the TPU kernels run ``(bk, bn)`` blocks of a ``(K, N)`` matrix at.

    Both block dimensions are the lane (last) dimension of some VMEM tile (``x`` and ``dW`` tiles
    use ``bk``, ``y`` and ``dy`` tiles ``bn``), so each must be a multiple of 128 or the whole
    dimension; others are rounded up to the next multiple of 128 (``bsr_matmul`` zero-pads).
    """
    return tuple(b if b % _LANES == 0 or b == full else pl.cdiv(b, _LANES) * _LANES
                 for b, full in zip(map(int, block_shape), shape))


def _tile_m(m, dtype, block_m):
    sub = _sublanes(dtype)
    bm = min(block_m, pl.cdiv(m, sub) * sub)
    return max(sub, bm // sub * sub)


def _reduce(acc_ref, out_ref, product, *, first, active, last):
    """One step of a reduction over the innermost grid axis: zero the accumulator at the first
    step, add ``product()`` on active steps (skipped ones cost no MXU work), store at the last."""

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _():
        acc_ref[...] += product()

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


@functools.partial(jax.jit, static_argnames=("transpose_blocks", "block_m", "out_dtype", "interpret"))
def dsd_matmul(lhs, blocks, idx, slots, counts, *, transpose_blocks=False, block_m=256, out_dtype=None,
               interpret=False):
    """Dense ``lhs`` times a block-sparse matrix; contract of ``bsr_matmul_xla.dsd_matmul``.

    ``block_m`` is the row tile of ``lhs`` (rounded to the dtype's sublane multiple).
    """
    m = lhs.shape[0]
    num_cols, list_len = idx.shape
    bk, bn = blocks.shape[1:]
    bl, bo = (bn, bk) if transpose_blocks else (bk, bn)
    out_dtype = out_dtype or lhs.dtype
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    bm = _tile_m(m, lhs.dtype, block_m)
    mp = pl.cdiv(m, bm) * bm
    contract = (((1,), (1,)), ((), ())) if transpose_blocks else (((1,), (0,)), ((), ()))

    def kernel(idx_ref, slots_ref, counts_ref, lhs_ref, blk_ref, out_ref, acc_ref):
        c, j = pl.program_id(1), pl.program_id(2)
        product = lambda: lax.dot_general(lhs_ref[...], blk_ref[...], contract, preferred_element_type=acc_dtype)
        _reduce(acc_ref, out_ref, product, first=j == 0, active=j < counts_ref[c], last=j == list_len - 1)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(mp // bm, num_cols, list_len),
        in_specs=[
            pl.BlockSpec((bm, bl), lambda i, c, j, idx, slots, counts: (i, idx[c * list_len + j])),
            pl.BlockSpec((pl.squeezed, bk, bn), lambda i, c, j, idx, slots, counts: (slots[c * list_len + j], 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bo), lambda i, c, j, idx, slots, counts: (i, c)),
        scratch_shapes=[pltpu.VMEM((bm, bo), acc_dtype)],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((mp, num_cols * bo), out_dtype),
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="bsr_dsd_matmul",
    )(idx.reshape(-1), slots.reshape(-1), counts, jnp.pad(lhs, ((0, mp - m), (0, 0))), blocks)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("block_shape", "block_m", "out_dtype", "interpret"))
def sddmm(x, dy, col_rows, col_counts, block_shape, *, block_m=256, out_dtype=None, interpret=False):
    """``x^T @ dy`` at the stored blocks; contract of ``bsr_matmul_xla.sddmm``."""
    bk, bn = block_shape
    m = x.shape[0]
    num_cols, max_k = col_rows.shape
    out_dtype = out_dtype or x.dtype
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    bm = _tile_m(m, x.dtype, block_m)
    mp = pl.cdiv(m, bm) * bm
    m_tiles = mp // bm

    def m_tile(n, j, i, counts):
        # Padding slots stay on the last tile fetched, so the pipeline copies nothing for them.
        return jnp.where(j < counts[n], i, m_tiles - 1)

    def kernel(rows_ref, counts_ref, x_ref, dy_ref, out_ref, acc_ref):
        n, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        product = lambda: lax.dot_general(x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())),
                                          preferred_element_type=acc_dtype)
        _reduce(acc_ref, out_ref, product, first=i == 0, active=j < counts_ref[n], last=i == m_tiles - 1)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_cols, max_k, m_tiles),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda n, j, i, rows, counts: (m_tile(n, j, i, counts), rows[n * max_k + j])),
            pl.BlockSpec((bm, bn), lambda n, j, i, rows, counts: (m_tile(n, j, i, counts), n)),
        ],
        out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, bk, bn), lambda n, j, i, rows, counts: (n, j, 0, 0)),
        scratch_shapes=[pltpu.VMEM((bk, bn), acc_dtype)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_cols, max_k, bk, bn), out_dtype),
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="bsr_sddmm",
    )(col_rows.reshape(-1), col_counts, jnp.pad(x, ((0, mp - m), (0, 0))), jnp.pad(dy, ((0, mp - m), (0, 0))))

"""Block-sparse attention: one function over three paths (XLA, Pallas TPU, Pallas GPU).

``block_sparse_attention`` validates shapes, compresses the block mask into per-row lists of key
blocks (and, for the kernels' ``dk``/``dv`` pass, per-column lists of query blocks), picks a path
and wraps it in a ``custom_vjp`` whose backward visits only the nonzero block pairs, recomputing
probabilities from the forward's log-sum-exp as FlashAttention does (Dao et al. 2022,
arXiv:2205.14135). Mask patterns live in ``attention_masks``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import attention_gpu, attention_tpu, attention_xla
from pallas_kernels.block_index import compress_block_mask

__all__ = ["block_sparse_attention", "BACKENDS"]

BACKENDS = ("xla", "tpu", "gpu")
_IMPLS = {"xla": attention_xla, "tpu": attention_tpu, "gpu": attention_gpu}


class _Config(NamedTuple):
    """Static settings of one call (hashable: a ``nondiff_argnums`` argument of the custom_vjp)."""

    backend: str
    block_q: int
    block_k: int
    causal: bool
    scale: float
    interpret: object


def _default_backend() -> str:
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "xla"


def _validate(q, k, v, block_mask, block_q: int, block_k: int):
    """Raise a ValueError naming the shapes for anything the paths cannot compute."""
    shapes = f"q {q.shape}, k {k.shape}, v {v.shape}, block_mask {jnp.shape(block_mask)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {shapes}")
    (batch, heads, seq_q, dim), (kv_batch, kv_heads, seq_k, kv_dim) = q.shape, k.shape
    if batch != kv_batch or dim != kv_dim:
        raise ValueError(f"q and k/v must share batch and head_dim; got {shapes}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads}); got {shapes}")
    if block_q < 1 or block_k < 1 or seq_q % block_q or seq_k % block_k:
        raise ValueError(
            f"seq_q ({seq_q}) must be divisible by block_q ({block_q}) and seq_k ({seq_k}) by "
            f"block_k ({block_k}); got {shapes}"
        )
    nq, nk = seq_q // block_q, seq_k // block_k
    mask_shape = tuple(jnp.shape(block_mask))
    ok = (
        len(mask_shape) in (3, 4)
        and mask_shape[-2:] == (nq, nk)
        and mask_shape[-3] in (1, heads)
        and (len(mask_shape) == 3 or mask_shape[0] in (1, batch))
    )
    if not ok:
        raise ValueError(
            f"block_mask must be [heads or 1, seq_q/block_q, seq_k/block_k] = [{heads} or 1, {nq}, {nk}] "
            f"(optionally with a leading batch or 1 dim); got {shapes} with block_q={block_q}, block_k={block_k}"
        )


def _validate_triton_shapes(head_dim: int, block_q: int, block_k: int):
    """Triton tensors have power-of-two sizes, and its matmuls need every dim >= 16."""
    sizes = dict(head_dim=head_dim, block_q=block_q, block_k=block_k)
    bad = {name: n for name, n in sizes.items() if n < 16 or n & (n - 1)}
    if bad:
        raise ValueError(f"the gpu (Triton) path needs powers of two >= 16 for head_dim, block_q, block_k; got {sizes}")


def _block_lists(block_mask, max_blocks: int | None, with_columns: bool):
    """Row lists (key blocks per query block) and, for the kernels' ``dk``/``dv`` pass, column
    lists (query blocks per key block; ``()`` when not ``with_columns``).

    A concrete mask is compressed at trace time (``ensure_compile_time_eval``), so under ``jit``
    the lists are constants sized by the mask's longest row and column. A traced mask takes
    ``max_blocks`` for the rows (all key blocks when not given) and every query block for the
    columns.
    """
    if isinstance(block_mask, jax.core.Tracer):
        mask = block_mask.astype(bool)
        mask = mask[None] if mask.ndim == 3 else mask
        rows = compress_block_mask(mask, mask.shape[-1] if max_blocks is None else max_blocks)
        return rows, compress_block_mask(mask.swapaxes(-1, -2), mask.shape[-2]) if with_columns else ()
    mask = np.asarray(block_mask).astype(bool)
    mask = mask[None] if mask.ndim == 3 else mask
    with jax.ensure_compile_time_eval():
        rows = compress_block_mask(mask, max_blocks)
        return rows, compress_block_mask(mask.swapaxes(-1, -2)) if with_columns else ()


def block_sparse_attention(
    q,
    k,
    v,
    block_mask,
    *,
    block_q: int = 128,
    block_k: int = 128,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    interpret=False,
    max_blocks: int | None = None,
):
    """Softmax attention restricted to the allowed blocks of a block mask.

    ``out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, g(h), j]) v[b, g(h), j]`` over the keys
    ``j`` whose block is allowed for ``i``'s block (and ``j <= i`` when ``causal``), where
    ``g(h) = h // (heads // kv_heads)`` (grouped-query attention, as ``jax.nn.dot_product_attention``).
    A query row with no allowed key returns zeros, with zero gradients. Differentiable in
    ``q, k, v``; the forward (online softmax) and backward visit only nonzero block pairs.

    Args:
      q: ``[batch, heads, seq_q, head_dim]``.
      k, v: ``[batch, kv_heads, seq_k, head_dim]``, ``kv_heads`` dividing ``heads``.
      block_mask: boolean ``[heads or 1, seq_q // block_q, seq_k // block_k]``, or with a leading
        ``batch or 1`` dim for per-example masks (see ``attention_masks``).
      block_q, block_k: block sizes of the mask.
      causal: also cut keys after the query inside the allowed blocks.
      scale: score scale, default ``1 / sqrt(head_dim)``.
      backend: ``"xla"``, ``"tpu"`` or ``"gpu"``; default the current platform's kernel, XLA on CPU.
        The gpu (Triton) path needs head_dim, block_q and block_k to be powers of two >= 16.
      interpret: run a Pallas kernel in interpret mode (CPU testing); ``True`` or a Pallas
        ``InterpretParams``.
      max_blocks: static length of the per-row key block lists. Taken from the mask when it is
        concrete; give it when the mask is traced (e.g. ``top_k`` of ``attention_masks.topk_mask``),
        otherwise every key block is visited (correct, but as slow as dense).

    Returns:
      ``[batch, heads, seq_q, head_dim]`` in ``q``'s dtype.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _validate(q, k, v, block_mask, block_q, block_k)
    backend = _default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "gpu":
        _validate_triton_shapes(q.shape[-1], block_q, block_k)
    rows, cols = _block_lists(block_mask, max_blocks, with_columns=backend != "xla")
    if isinstance(interpret, bool) or interpret is None:
        interpret = bool(interpret)
    config = _Config(backend, int(block_q), int(block_k), bool(causal), scale, interpret)
    return _attention(config, q, k, v, rows, cols)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, rows, cols):
    return _attention_fwd(config, q, k, v, rows, cols)[0]


def _kernel_kwargs(config: _Config):
    kwargs = dict(block_q=config.block_q, block_k=config.block_k, causal=config.causal, scale=config.scale)
    if config.backend != "xla":
        kwargs["interpret"] = config.interpret
    return kwargs


def _attention_fwd(config, q, k, v, rows, cols):
    out, lse = _IMPLS[config.backend].forward(q, k, v, *rows, **_kernel_kwargs(config))
    return out, (q, k, v, out, lse, rows, cols)


def _attention_bwd(config, residuals, do):
    q, k, v, out, lse, rows, cols = residuals
    impl = _IMPLS[config.backend]
    dq, dk, dv = impl.backward(q, k, v, out, lse, do, *rows, *cols, **_kernel_kwargs(config))
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)

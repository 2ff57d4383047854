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

from pallas_kernels import attention_gpu, attention_masks, attention_tpu, attention_xla
from pallas_kernels.attention_xla import closure_rule
from pallas_kernels.block_index import EMPTY, FULL, PARTIAL, compress_block_kinds, pairs_by_kind, pairs_by_row

__all__ = ["block_sparse_attention", "BACKENDS"]

BACKENDS = ("xla", "tpu", "gpu")
_IMPLS = {"xla": attention_xla, "tpu": attention_tpu, "gpu": attention_gpu}


class _Config(NamedTuple):
    """Static settings of one call (hashable: a ``nondiff_argnums`` argument of the custom_vjp)."""

    backend: str
    block_q: int
    block_k: int
    scale: float
    interpret: object
    rule: object  # attention_xla.Rule for the partial blocks, or None
    mask_dims: tuple  # (Bm, Hm): the mask's batch and head dims, 1 where shared
    chunk: int  # XLA path: pairs per loop step
    counts: tuple | None  # XLA path: (n_full, n_partial) when the mask is concrete


# XLA path: a loop step covers about this many (block pair, batch, head) products; fewer pairs
# per step for masks shared by many heads. Measured on CPU (benchmarks/attention.py): steps of
# 16-64 block products cost the same; 4 is ~10% slower (per-step gathers and scatters).
_XLA_STEP_BLOCKS = 32


def _default_backend() -> str:
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "xla"


def _validate(q, k, v, block_mask, block_q: int, block_k: int):
    """Raise a ValueError naming the shapes for anything the paths cannot compute."""
    mask_shape = None if block_mask is None else jnp.shape(block_mask)
    shapes = f"q {q.shape}, k {k.shape}, v {v.shape}, block_mask {mask_shape}"
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
    if block_mask is None:
        return
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


def _block_kinds(block_mask, rule, static: bool, q_shape, seq_k: int, block_q: int, block_k: int):
    """``[Bm, Hm, nq, nk]`` kinds (``block_index.EMPTY/PARTIAL/FULL``) of every block pair: visited
    where ``block_mask`` allows and the rule allows some token pair, full where the rule allows
    all (no rule: every visited block is full). A rule over traced arrays cannot be classified
    ahead of time: then every visited block is partial. Concrete (numpy) unless the mask is traced."""
    batch, heads, seq_q = q_shape[:3]
    nq, nk = seq_q // block_q, seq_k // block_k
    if block_mask is None:
        visited = np.ones((1, 1, nq, nk), bool)
    else:
        visited = block_mask if isinstance(block_mask, jax.core.Tracer) else np.asarray(block_mask)
        visited = visited.astype(bool)
        visited = visited[None] if visited.ndim == 3 else visited
    if rule is None:
        rule_kinds = FULL
    elif static:
        rule_kinds = attention_masks.block_kinds(rule, seq_q, seq_k, block_q=block_q, block_k=block_k, heads=heads, batch=batch)
    else:  # every visited block partial, with the batch / head dims the rule depends on
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
        dims = jax.eval_shape(rule, i32(batch, 1, 1, 1), i32(1, heads, 1, 1), i32(1, 1, 1, 1), i32(1, 1, 1, 1)).shape
        dims = (1,) * (4 - len(dims)) + tuple(dims)
        rule_kinds = np.full((dims[0], dims[1], 1, 1), PARTIAL, np.int8)
    if isinstance(visited, jax.core.Tracer):
        return jnp.where(visited, rule_kinds, EMPTY).astype(jnp.int8)
    return np.where(visited, rule_kinds, EMPTY).astype(np.int8)


def _plan(backend: str, kinds, max_blocks: int | None, chunk: int):
    """The index arrays of one path (concrete and exactly sized when ``kinds`` is concrete): XLA
    ``{"pairs", "n_full", "n_partial"}`` (counts ints when concrete), TPU the pairs row by row and
    column by column, GPU the padded row and column lists; for the kernels also ``slots`` per
    entry, the index of its partial block's token mask (``_partial_masks``)."""
    concrete = not isinstance(kinds, jax.core.Tracer)
    with jax.ensure_compile_time_eval():
        rows = compress_block_kinds(kinds, max_blocks)
        if backend == "xla":
            pairs, n_full, n_partial = pairs_by_kind(*rows, pad=chunk)
            return dict(pairs=pairs, n_full=n_full, n_partial=n_partial)
        cols = compress_block_kinds(kinds.swapaxes(-1, -2), None if concrete else kinds.shape[-2])
        partial = (kinds == PARTIAL).reshape(-1)
        slot_ids = jnp.maximum(jnp.cumsum(partial, dtype=jnp.int32) - 1, 0).reshape(kinds.shape)
        if backend == "tpu":
            by_row, by_col = pairs_by_row(*rows), pairs_by_row(*cols)
            return dict(rows=by_row, cols=by_col, row_slots=slot_ids[by_row.b, by_row.h, by_row.row, by_row.col],
                        col_slots=slot_ids[by_col.b, by_col.h, by_col.col, by_col.row])
        return dict(rows=rows, cols=cols, row_slots=jnp.take_along_axis(slot_ids, rows[0], -1),
                    col_slots=jnp.take_along_axis(slot_ids.swapaxes(-1, -2), cols[0], -1))


def _partial_masks(kinds, rule, consts, max_blocks: int | None, block_q: int, block_k: int):
    """Token masks ``[n, block_q, block_k]`` (int8) of the partial block pairs, in flat order of
    ``kinds`` (the order of ``_plan``'s slots), evaluated by XLA so that a kernel only loads them
    (splash attention's partial mask blocks): any rule runs on any path, gathers included. A
    traced mask gets one per possible visited pair."""
    with jax.ensure_compile_time_eval():
        partial = (kinds == PARTIAL).reshape(-1)
        if isinstance(kinds, jax.core.Tracer):
            n = int(np.prod(kinds.shape[:-1])) * (kinds.shape[-1] if max_blocks is None else min(max_blocks, kinds.shape[-1]))
        else:
            n = int(partial.sum())
        if rule is None or n == 0:
            return jnp.zeros((1, block_q, block_k), jnp.int8)
        flat = jnp.argsort(~partial, stable=True)[:n].astype(jnp.int32)
        _, mask_heads, nq, nk = kinds.shape
        b, h, i, j = flat // (mask_heads * nq * nk), flat // (nq * nk) % mask_heads, flat // nk % nq, flat % nk
    return attention_xla.rule_keep(rule, consts, b, h, i, j).astype(jnp.int8)


def block_sparse_attention(
    q,
    k,
    v,
    block_mask=None,
    *,
    mask_fn=None,
    block_q: int = 128,
    block_k: int = 128,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    interpret=False,
    max_blocks: int | None = None,
):
    """Softmax attention restricted to the allowed blocks of a block mask and a token-level rule.

    ``out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, g(h), j]) v[b, g(h), j]`` over the keys
    ``j`` whose block is allowed for ``i``'s block and, when given, with ``mask_fn(b, h, i, j)``
    True (and ``j <= i`` when ``causal``), where ``g(h) = h // (heads // kv_heads)`` (grouped-query
    attention, as ``jax.nn.dot_product_attention``). A query row with no allowed key returns
    zeros, with zero gradients. Differentiable in ``q, k, v``.

    Only block pairs that the block mask allows and the rule does not rule out entirely are
    computed, forward (online softmax) and backward; blocks the rule fills completely are "full"
    and pay no per-token mask cost, the others are "partial" (the rule is evaluated on their
    tokens), as the partial blocks of splash attention and FlexAttention's block mask
    (He et al. 2024, arXiv:2412.05496). The classification is evaluated once per call, block row
    by block row (``attention_masks.block_kinds``); a rule that closes over traced arrays (e.g.
    segment ids passed to a jitted function) cannot be classified ahead of time, so every visited
    block is then partial; give a ``block_mask`` (``attention_masks.block_mask_from_fn`` under the
    same ``jit``, with ``max_blocks``) to skip blocks for such a rule.

    Args:
      q: ``[batch, heads, seq_q, head_dim]``.
      k, v: ``[batch, kv_heads, seq_k, head_dim]``, ``kv_heads`` dividing ``heads``.
      block_mask: boolean ``[heads or 1, seq_q // block_q, seq_k // block_k]``, or with a leading
        ``batch or 1`` dim for per-example masks (see ``attention_masks``); ``None``: every block
        (then ``mask_fn`` alone decides, at block granularity first).
      mask_fn: token-level rule ``mask_fn(batch, head, q_index, k_index) -> bool`` written with jnp
        ops on broadcasting int32 index arrays; it may close over arrays (segment ids). Builders:
        ``attention_masks.causal_fn``, ``sliding_window_fn``, ``global_tokens_fn``,
        ``document_fn``, ``prefix_lm_fn``, ``and_fn``, ``or_fn``.
      block_q, block_k: block sizes of the mask.
      causal: shorthand for ``mask_fn=and_fn(causal_fn(), mask_fn)``: keys after the query are cut.
      scale: score scale, default ``1 / sqrt(head_dim)``.
      backend: ``"xla"``, ``"tpu"`` or ``"gpu"``; default the current platform's kernel, XLA on CPU.
        The gpu (Triton) path needs head_dim, block_q and block_k to be powers of two >= 16.
        The kernels do not evaluate the rule: XLA evaluates the token masks of the partial blocks
        before the call (``n_partial * block_q * block_k`` bytes; for a rule over traced arrays one
        per visited pair) and the kernels load them, so any rule runs on any path.
      interpret: run a Pallas kernel in interpret mode (CPU testing); ``True`` or a Pallas
        ``InterpretParams``.
      max_blocks: static length of the per-row key block lists when the mask is traced (e.g.
        ``attention_masks.topk_mask`` under ``jit``; default every key block). The XLA path loops
        over the pairs the traced mask really holds, so its cost follows the mask, not
        ``max_blocks``; the kernels' grids are sized by it. Ignored for a concrete mask.

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
    if causal:
        mask_fn = attention_masks.causal_fn() if mask_fn is None else attention_masks.and_fn(attention_masks.causal_fn(), mask_fn)
    rule, consts, static = (None, (), True) if mask_fn is None else closure_rule(mask_fn, block_q, block_k)
    kinds = _block_kinds(block_mask, mask_fn, static, q.shape, k.shape[2], block_q, block_k)
    if isinstance(kinds, jax.core.Tracer) and max_blocks is not None:
        # The lists keep each row's first max_blocks visited columns; so do the partial masks.
        kinds = jnp.where(jnp.cumsum(kinds != EMPTY, axis=-1) <= max_blocks, kinds, EMPTY).astype(jnp.int8)
    mask_dims = tuple(int(n) for n in kinds.shape[:2])
    shared = (q.shape[0] if mask_dims[0] == 1 else 1) * (q.shape[1] if mask_dims[1] == 1 else 1)
    chunk = max(1, _XLA_STEP_BLOCKS // shared)
    plan = _plan(backend, kinds, max_blocks, chunk)
    counts = None
    if backend == "xla" and isinstance(plan["n_full"], int):
        counts = (plan.pop("n_full"), plan.pop("n_partial"))  # static: part of the config
    elif backend != "xla":
        plan["masks"] = _partial_masks(kinds, rule, consts, max_blocks, block_q, block_k)
        rule, consts = None, ()  # the kernels load the partial masks instead of evaluating the rule
    if isinstance(interpret, bool) or interpret is None:
        interpret = bool(interpret)
    config = _Config(backend, int(block_q), int(block_k), scale, interpret, rule, mask_dims, chunk, counts)
    return _attention(config, q, k, v, plan, consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, plan, consts):
    return _attention_fwd(config, q, k, v, plan, consts)[0]


def _kernel_kwargs(config: _Config):
    kwargs = dict(block_q=config.block_q, block_k=config.block_k, scale=config.scale, mask_dims=config.mask_dims)
    if config.backend == "xla":
        kwargs.update(chunk=config.chunk, rule=config.rule)
    else:
        kwargs["interpret"] = config.interpret
    return kwargs


def _full_plan(config: _Config, plan):
    if config.counts is None:
        return plan
    return dict(plan, n_full=config.counts[0], n_partial=config.counts[1])


def _attention_fwd(config, q, k, v, plan, consts):
    impl = _IMPLS[config.backend]
    out, lse = impl.forward(q, k, v, _full_plan(config, plan), consts, **_kernel_kwargs(config))
    return out, (q, k, v, out, lse, plan, consts)


def _attention_bwd(config, residuals, do):
    q, k, v, out, lse, plan, consts = residuals
    impl = _IMPLS[config.backend]
    dq, dk, dv = impl.backward(q, k, v, out, lse, do, _full_plan(config, plan), consts, **_kernel_kwargs(config))
    none = lambda tree: jax.tree_util.tree_map(lambda _: None, tree)
    return dq, dk, dv, none(plan), none(consts)


_attention.defvjp(_attention_fwd, _attention_bwd)

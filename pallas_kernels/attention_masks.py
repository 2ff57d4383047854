"""Masks for block-sparse attention: block patterns, token-level rules, and a dynamic top-k selection.

A block mask is a boolean array ``[heads or 1, seq_q // block_q, seq_k // block_k]`` (optionally
with a leading batch dimension, ``[batch or 1, heads or 1, ...]``): entry ``(h, i, j)`` says that
query block ``i`` of head ``h`` may attend to key block ``j``. ``block_sparse_attention`` computes
only those block pairs.

The static builders describe a token-level pattern and keep every block that contains at least one
allowed (query, key) pair, so the block mask covers the pattern; attention then uses whole blocks
(plus, with ``causal=True``, the exact ``key <= query`` cut inside the diagonal blocks). They
return concrete numpy arrays, so the attention can size its block lists from them:

- ``causal_mask``: keys at or before the query (autoregressive decoding).
- ``sliding_window_mask``: keys within ``window`` tokens of the query, the local attention of
  Longformer (Beltagy et al. 2020, arXiv:2004.05150) and the window part of BigBird
  (Zaheer et al. 2020, arXiv:2007.14062).
- ``global_tokens_mask``: a few tokens that attend to, and are attended by, every token
  (Longformer's global attention, BigBird's global blocks).
- ``dilated_mask``: key blocks at a fixed block stride from the query's block, the strided
  pattern of the Sparse Transformer (Child et al. 2019, arXiv:1904.10509) and Longformer's
  dilated windows, at block granularity.
- ``union`` / ``intersection`` combine patterns (BigBird = window | global | random);
  ``stack_heads`` gives each head its own pattern (the Sparse Transformer's split of the strided
  pattern across heads).

Token-level rules (``mask_fn(batch, head, q_index, k_index) -> bool``, FlexAttention's
``mask_mod``, He et al. 2024, arXiv:2412.05496) make the pattern token-exact inside the visited
blocks: ``causal_fn``, ``sliding_window_fn`` (Mistral / Longformer windows), ``global_tokens_fn``,
``document_fn`` (packed sequences from segment ids), ``prefix_lm_fn``, combined by ``and_fn`` /
``or_fn``. ``block_kinds`` classifies every block of a rule as empty, partial or full (evaluated
block row by block row, never as a ``seq_q x seq_k`` array) and ``block_mask_from_fn`` returns its
boolean block mask; ``block_sparse_attention(..., mask_fn=rule)`` does this itself.

``topk_mask`` chooses the mask from the data: each query block keeps the ``top_k`` key blocks with
the largest score between mean-pooled query and key blocks. This is the block selection of
SeerAttention (Gao et al. 2024, arXiv:2410.13276), there with a learned gate on pooled blocks, and
of SpargeAttn (Zhang et al. 2025, arXiv:2502.18137), which predicts the attention map from
mean-pooled ("compressed") blocks; here the plain pooled dot product serves as the predictor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.block_index import EMPTY, FULL, PARTIAL

__all__ = [
    "full_mask",
    "causal_mask",
    "sliding_window_mask",
    "global_tokens_mask",
    "dilated_mask",
    "union",
    "intersection",
    "stack_heads",
    "topk_mask",
    "block_density",
    "causal_fn",
    "sliding_window_fn",
    "global_tokens_fn",
    "document_fn",
    "prefix_lm_fn",
    "and_fn",
    "or_fn",
    "block_kinds",
    "block_mask_from_fn",
    "EMPTY",
    "PARTIAL",
    "FULL",
]


def _num_blocks(seq_q: int, seq_k: int, block_q: int, block_k: int) -> tuple[int, int]:
    for name, value in (("seq_q", seq_q), ("seq_k", seq_k), ("block_q", block_q), ("block_k", block_k)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if seq_q % block_q or seq_k % block_k:
        raise ValueError(
            f"sequence lengths must be divisible by the block sizes; got seq_q={seq_q}, "
            f"block_q={block_q}, seq_k={seq_k}, block_k={block_k}"
        )
    return seq_q // block_q, seq_k // block_k


def _from_key_ranges(lo, hi, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
    """Block mask ``[1, nq, nk]`` from an inclusive key range ``[lo[q], hi[q]]`` per query token.

    A key block is kept for a query block when it overlaps the range of any of its queries
    (an empty range, ``lo > hi``, keeps nothing).
    """
    nk = seq_k // block_k
    starts = np.arange(nk) * block_k
    ends = starts + block_k - 1
    lo, hi = np.asarray(lo)[:, None], np.asarray(hi)[:, None]
    per_token = (starts[None] <= hi) & (ends[None] >= lo) & (lo <= hi)  # [seq_q, nk]
    return per_token.reshape(-1, block_q, nk).any(axis=1)[None]


def full_mask(seq_q: int, seq_k: int, *, block_q: int = 128, block_k: int = 128) -> np.ndarray:
    """All blocks allowed: dense attention, ``[1, seq_q // block_q, seq_k // block_k]``."""
    nq, nk = _num_blocks(seq_q, seq_k, block_q, block_k)
    return np.ones((1, nq, nk), bool)


def causal_mask(seq_q: int, seq_k: int, *, block_q: int = 128, block_k: int = 128) -> np.ndarray:
    """Blocks holding some key at or before some query (query ``i`` sees keys ``0..i``).

    Use with ``causal=True`` in ``block_sparse_attention`` for the exact token-level cut on the
    diagonal blocks. Returns ``[1, seq_q // block_q, seq_k // block_k]``.
    """
    _num_blocks(seq_q, seq_k, block_q, block_k)
    queries = np.arange(seq_q)
    return _from_key_ranges(np.zeros_like(queries), queries, seq_k, block_q, block_k)


def sliding_window_mask(
    seq_q: int, seq_k: int, window: int, *, block_q: int = 128, block_k: int = 128, causal: bool = False
) -> np.ndarray:
    """Local attention: query ``i`` sees keys ``i - window .. i + window`` (``.. i`` when causal).

    Longformer's sliding window (Beltagy et al. 2020) and BigBird's window blocks
    (Zaheer et al. 2020), covered by whole blocks. Returns ``[1, nq, nk]``.
    """
    _num_blocks(seq_q, seq_k, block_q, block_k)
    if window < 0:
        raise ValueError(f"window must be >= 0; got {window}")
    queries = np.arange(seq_q)
    hi = queries if causal else queries + window
    return _from_key_ranges(queries - window, hi, seq_k, block_q, block_k)


def global_tokens_mask(
    seq_q: int, seq_k: int, num_global: int, *, block_q: int = 128, block_k: int = 128
) -> np.ndarray:
    """The first ``num_global`` tokens attend to all keys and every query attends to them.

    Longformer's global attention and BigBird's global tokens (Zaheer et al. 2020), e.g. a CLS
    token or a prompt prefix. Returns ``[1, nq, nk]``; union it with a local pattern.
    """
    _num_blocks(seq_q, seq_k, block_q, block_k)
    if not 0 <= num_global <= min(seq_q, seq_k):
        raise ValueError(f"num_global must be in [0, min(seq_q, seq_k)={min(seq_q, seq_k)}]; got {num_global}")
    queries = np.arange(seq_q)
    is_global = queries < num_global
    # Global queries see everything; the others see the global keys 0 .. num_global - 1.
    hi = np.where(is_global, seq_k - 1, num_global - 1)
    return _from_key_ranges(np.zeros_like(queries), hi, seq_k, block_q, block_k)


def dilated_mask(
    seq_q: int,
    seq_k: int,
    dilation: int,
    *,
    num_blocks: int | None = None,
    block_q: int = 128,
    block_k: int = 128,
    causal: bool = False,
) -> np.ndarray:
    """Key blocks at a multiple of ``dilation`` blocks from the query's own key block.

    A query at position ``t`` lies in key block ``c = t // block_k``; it keeps key blocks ``j`` with
    ``(c - j) % dilation == 0``, only the ``num_blocks`` nearest such blocks on each side when
    ``num_blocks`` is given, and only ``j <= c`` when causal. ``dilation=1`` with ``num_blocks``
    is a block sliding window; a large ``num_blocks`` gives the Sparse Transformer's strided
    pattern (Child et al. 2019) at block granularity, and Longformer's dilated window
    (Beltagy et al. 2020). Returns ``[1, nq, nk]``.
    """
    nq, nk = _num_blocks(seq_q, seq_k, block_q, block_k)
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1; got {dilation}")
    if num_blocks is not None and num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0 or None; got {num_blocks}")
    own = np.arange(seq_q)[:, None] // block_k  # [seq_q, 1] key block of each query position
    dist = own - np.arange(nk)[None]  # [seq_q, nk] block distance, positive = key block before
    keep = dist % dilation == 0
    if num_blocks is not None:
        keep &= np.abs(dist) <= num_blocks * dilation
    if causal:
        keep &= dist >= 0
    return keep.reshape(nq, block_q, nk).any(axis=1)[None]


def _broadcast_masks(masks, what: str):
    if not masks:
        raise ValueError(f"{what} needs at least one mask")
    arrays = [np.asarray(m).astype(bool) for m in masks]
    try:
        return np.broadcast_arrays(*arrays)
    except ValueError:
        raise ValueError(f"{what}: mask shapes do not broadcast: {[a.shape for a in arrays]}") from None


def union(*masks) -> np.ndarray:
    """Blocks allowed by any of the masks (shapes broadcast), e.g. window | global as in BigBird."""
    return functools.reduce(np.logical_or, _broadcast_masks(masks, "union"))


def intersection(*masks) -> np.ndarray:
    """Blocks allowed by all the masks (shapes broadcast), e.g. a pattern restricted to causal."""
    return functools.reduce(np.logical_and, _broadcast_masks(masks, "intersection"))


def stack_heads(*masks) -> np.ndarray:
    """A per-head mask ``[heads, nq, nk]``: head ``h`` uses ``masks[h]`` (each ``[1, nq, nk]`` or ``[nq, nk]``)."""
    arrays = [np.asarray(m).astype(bool) for m in masks]
    arrays = [a[0] if a.ndim == 3 and a.shape[0] == 1 else a for a in arrays]
    if not arrays or any(a.ndim != 2 for a in arrays) or len({a.shape for a in arrays}) != 1:
        raise ValueError(f"stack_heads needs masks of one shape [nq, nk] or [1, nq, nk]; got {[a.shape for a in arrays]}")
    return np.stack(arrays)


def block_density(block_mask) -> float:
    """Fraction of allowed blocks in a (concrete) block mask."""
    return float(np.asarray(block_mask).astype(bool).mean())


def topk_mask(q, k, top_k, *, block_q: int = 128, block_k: int = 128, causal: bool = False):
    """Per query block, the ``top_k`` key blocks with the largest mean-pooled query-key score.

    Query and key blocks are mean-pooled to one vector each and scored by their dot product, the
    cheap attention estimate of SeerAttention (Gao et al. 2024, arXiv:2410.13276) and SpargeAttn
    (Zhang et al. 2025, arXiv:2502.18137). ``top_k`` may be traced (a jit argument, a schedule):
    the selection ranks every key block (ties to the lower index) and keeps ranks ``< top_k``, so
    every row keeps exactly ``min(top_k, allowed)`` blocks. ``block_sparse_attention`` on a traced
    mask loops over the pairs the mask really holds (XLA path), so its cost follows ``top_k``;
    ``max_blocks`` (a static bound on ``top_k``) only sizes its index lists::

        @jax.jit
        def attend(q, k, v, top_k):               # top_k: a traced int32
            mask = topk_mask(q, k, top_k, block_q=128, block_k=128, causal=True)
            return block_sparse_attention(q, k, v, mask, block_q=128, block_k=128, causal=True,
                                          max_blocks=16)   # top_k <= 16

    Args:
      q: ``[..., heads, seq_q, head_dim]``.
      k: ``[..., kv_heads, seq_k, head_dim]`` with the same leading dims; grouped-query heads share
        their key head's pooled blocks.
      top_k: key blocks kept per query block, ``1 <= top_k <= seq_k // block_k`` (checked when
        concrete; a traced value is clipped to that range).
      causal: only blocks with some key at or before some query compete, and each query block
        always keeps its diagonal block (the last one it may see), so no causal row is empty.

    Returns:
      boolean block mask ``[..., heads, seq_q // block_q, seq_k // block_k]``: with a batch
      dimension, one mask per example, which ``block_sparse_attention`` accepts as
      ``[batch, heads, nq, nk]``.
    """
    q, k = jnp.asarray(q), jnp.asarray(k)
    if q.ndim < 3 or k.ndim != q.ndim or q.shape[:-3] != k.shape[:-3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q must be [..., heads, seq_q, head_dim] and k [..., kv_heads, seq_k, head_dim] with the "
            f"same leading dims and head_dim; got q {q.shape}, k {k.shape}"
        )
    heads, seq_q, _ = q.shape[-3:]
    kv_heads, seq_k = k.shape[-3:-1]
    _, nk = _num_blocks(seq_q, seq_k, block_q, block_k)
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}, q {q.shape}) must be divisible by kv_heads ({kv_heads}, k {k.shape})")
    if not isinstance(top_k, jax.core.Tracer) and not 1 <= int(top_k) <= nk:
        raise ValueError(f"top_k must be in [1, {nk}] (the number of key blocks); got {top_k}")
    return _topk_mask(q, k, jnp.clip(jnp.asarray(top_k, jnp.int32), 1, nk), block_q=block_q, block_k=block_k, causal=causal)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "causal"))
def _topk_mask(q, k, top_k, *, block_q: int, block_k: int, causal: bool):
    heads, seq_q, dim = q.shape[-3:]
    kv_heads, seq_k = k.shape[-3:-1]
    nq, nk = seq_q // block_q, seq_k // block_k
    lead = q.shape[:-3]
    pooled_q = q.astype(jnp.float32).reshape(*lead, heads, nq, block_q, dim).mean(-2)
    pooled_k = k.astype(jnp.float32).reshape(*lead, kv_heads, nk, block_k, dim).mean(-2)
    pooled_k = jnp.repeat(pooled_k, heads // kv_heads, axis=-3)  # query head h -> kv head h // group
    scores = jnp.einsum("...id,...jd->...ij", pooled_q, pooled_k)
    allowed = jnp.ones((nq, nk), bool)
    if causal:
        allowed = jnp.asarray(causal_mask(seq_q, seq_k, block_q=block_q, block_k=block_k)[0])
        diagonal = jnp.arange(nk) == (jnp.arange(nq) * block_q + block_q - 1)[:, None] // block_k
        diagonal &= allowed
        scores = jnp.where(diagonal, jnp.inf, jnp.where(allowed, scores, -jnp.inf))
    # Rank of every key block in its row (descending score, ties to the lower index): a traced
    # top_k selects by comparison, where lax.top_k would need it static.
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return (rank < top_k) & allowed


# Token-level rules. A rule is ``mask_fn(batch, head, q_index, k_index) -> bool`` written with jnp
# ops on int32 index arrays that broadcast against each other (FlexAttention's ``mask_mod``,
# He et al. 2024, "FlexAttention", arXiv:2412.05496; splash attention's masks): True where query
# ``q_index`` of example ``batch``, head ``head`` may attend to key ``k_index``. A rule may close
# over arrays (segment ids, per-example prefix lengths), concrete or traced.


def causal_fn(offset: int = 0):
    """Rule: key ``j`` at or before query ``i`` (``j <= i + offset``). ``offset = seq_k - seq_q``
    aligns the last query with the last key (decoding with a cache); the default aligns the first
    ones, as ``causal=True`` does."""
    offset = int(offset)
    return lambda b, h, q, k: k <= q + offset


def sliding_window_fn(window: int, right: int = 0):
    """Rule: keys ``i - window <= j <= i + right`` (``right=0``: the causal window of Mistral,
    Jiang et al. 2023, arXiv:2310.06825; ``right=window``: Longformer's symmetric window, Beltagy
    et al. 2020, arXiv:2004.05150)."""
    if int(window) < 0 or int(right) < 0:
        raise ValueError(f"window and right must be >= 0; got window={window}, right={right}")
    window, right = int(window), int(right)
    return lambda b, h, q, k: (k >= q - window) & (k <= q + right)


def global_tokens_fn(num_global: int):
    """Rule: the first ``num_global`` tokens attend to every key and every query attends to them
    (Longformer's global attention; BigBird's global tokens, Zaheer et al. 2020, arXiv:2007.14062).
    Combine with a window by ``or_fn``."""
    if int(num_global) < 0:
        raise ValueError(f"num_global must be >= 0; got {num_global}")
    num_global = int(num_global)
    return lambda b, h, q, k: (q < num_global) | (k < num_global)


def document_fn(segment_ids, kv_segment_ids=None):
    """Rule: a query attends only to keys of its own document (packed sequences; the document mask
    of FlexAttention and splash attention's segment ids).

    Args:
      segment_ids: int ``[seq_q]`` (one packing for the whole batch) or ``[batch, seq_q]``: the
        document of each query token. May be traced (then every visited block is partial).
      kv_segment_ids: the same for the keys; default ``segment_ids`` (self-attention).
    """
    seg_q = jnp.asarray(segment_ids)
    seg_k = seg_q if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
    if seg_q.ndim not in (1, 2) or seg_k.ndim != seg_q.ndim:
        raise ValueError(
            f"segment_ids must be [seq] or [batch, seq] (and kv_segment_ids alike); got shapes {seg_q.shape}, {seg_k.shape}"
        )
    if seg_q.ndim == 1:
        return lambda b, h, q, k: seg_q[q] == seg_k[k]
    return lambda b, h, q, k: seg_q[b, q] == seg_k[b, k]


def prefix_lm_fn(prefix_len):
    """Rule: keys of the prefix (``j < prefix_len``) are seen by every query, the rest causally:
    the prefix-LM of T5 / UniLM (Raffel et al. 2020, arXiv:1910.10683). ``prefix_len`` is an int
    or an int array ``[batch]`` (one prefix per example)."""
    if isinstance(prefix_len, (int, np.integer)):
        return lambda b, h, q, k: (k < prefix_len) | (k <= q)
    prefix = jnp.asarray(prefix_len)
    if prefix.ndim != 1:
        raise ValueError(f"prefix_len must be an int or a [batch] array; got shape {prefix.shape}")
    return lambda b, h, q, k: (k < prefix[b]) | (k <= q)


def and_fn(*fns):
    """Rule: allowed where every rule allows (e.g. ``and_fn(document_fn(ids), causal_fn())``)."""
    if not fns:
        raise ValueError("and_fn needs at least one rule")
    return lambda b, h, q, k: functools.reduce(jnp.logical_and, [f(b, h, q, k) for f in fns])


def or_fn(*fns):
    """Rule: allowed where any rule allows (e.g. ``or_fn(sliding_window_fn(512, 512), global_tokens_fn(64))``)."""
    if not fns:
        raise ValueError("or_fn needs at least one rule")
    return lambda b, h, q, k: functools.reduce(jnp.logical_or, [f(b, h, q, k) for f in fns])


def block_kinds(mask_fn, seq_q: int, seq_k: int, *, block_q: int = 128, block_k: int = 128, heads: int = 1, batch: int = 1):
    """Classify every block of a token-level rule: ``EMPTY`` (0, no allowed pair), ``PARTIAL`` (1)
    or ``FULL`` (2, every pair allowed; attention skips the per-token rule there).

    The rule is evaluated one block row at a time (``lax.map``), so memory holds one
    ``block_q x seq_k`` slab per (batch, head) the rule depends on, never ``seq_q x seq_k``.

    Returns:
      int8 ``[batch or 1, heads or 1, nq, nk]``: a dim is 1 where the rule does not depend on its
      index (broadcastable). Concrete (numpy) for a rule over concrete values; a traced array when
      the rule closes over traced arrays.
    """
    nq, nk = _num_blocks(seq_q, seq_k, block_q, block_k)
    with jax.ensure_compile_time_eval():  # index arrays and the rule's values stay concrete under jit
        kinds = jnp.moveaxis(_block_kinds_by_rows(mask_fn, seq_q, seq_k, block_q, block_k, heads, batch, nq, nk), 0, 2)
    return kinds if isinstance(kinds, jax.core.Tracer) else np.asarray(kinds)


def _block_kinds_by_rows(mask_fn, seq_q, seq_k, block_q, block_k, heads, batch, nq, nk):
    i32 = functools.partial(jnp.arange, dtype=jnp.int32)
    ks = i32(seq_k)[None, None, None, :]

    def rule_on_rows(first, b, h):
        allowed = mask_fn(b, h, (first + i32(block_q))[None, None, :, None], ks)
        return jnp.asarray(allowed, bool)

    probe = jax.eval_shape(rule_on_rows, 0, i32(batch)[:, None, None, None], i32(heads)[None, :, None, None]).shape
    if len(probe) > 4 or jnp.broadcast_shapes(probe, (batch, heads, block_q, seq_k)) != (batch, heads, block_q, seq_k):
        raise ValueError(
            f"mask_fn(batch, head, q_index, k_index) must broadcast to [batch, heads, q, k] = "
            f"[{batch}, {heads}, {block_q}, {seq_k}] for one block row; got shape {probe}"
        )
    probe = (1,) * (4 - len(probe)) + tuple(probe)
    rb, rh = probe[0], probe[1]  # 1 where the rule ignores the batch / head index

    def row(i):
        b, h = i32(rb)[:, None, None, None], i32(rh)[:, None, None]
        allowed = jnp.broadcast_to(rule_on_rows(i * block_q, b, h), (rb, rh, block_q, seq_k))
        allowed = allowed.reshape(rb, rh, block_q, nk, block_k)
        return jnp.where(allowed.all((2, 4)), FULL, jnp.where(allowed.any((2, 4)), PARTIAL, EMPTY)).astype(jnp.int8)

    return lax.map(row, i32(nq))  # [nq, rb, rh, nk]


def block_mask_from_fn(mask_fn, seq_q: int, seq_k: int, *, block_q: int = 128, block_k: int = 128, heads: int = 1, batch=None):
    """The boolean block mask of a token-level rule: a block is True where any of its token pairs
    is allowed. Evaluated block row by block row (``block_kinds``), never as a ``seq_q x seq_k``
    array.

    Args:
      mask_fn: ``(batch, head, q_index, k_index) -> bool`` (see ``causal_fn``, ``document_fn``, ...).
      heads: heads of the result (the rule sees ``head`` in ``range(heads)``).
      batch: ``None`` for ``[heads, nq, nk]`` (the rule sees ``batch = 0``), or a batch size for
        per-example masks ``[batch, heads, nq, nk]``.

    Returns:
      bool ``[heads, nq, nk]`` or ``[batch, heads, nq, nk]``: numpy for a rule over concrete
      values, traced when it closes over traced arrays (then pass ``max_blocks`` to the attention).
    """
    kinds = block_kinds(mask_fn, seq_q, seq_k, block_q=block_q, block_k=block_k, heads=heads, batch=batch or 1)
    shape = (batch or 1, heads) + kinds.shape[2:]
    if isinstance(kinds, jax.core.Tracer):
        mask = jnp.broadcast_to(kinds != EMPTY, shape)
    else:
        mask = np.broadcast_to(kinds != EMPTY, shape).copy()
    return mask if batch is not None else mask[0]

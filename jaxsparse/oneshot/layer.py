"""Layer-level one-shot pruning: Wanda and SparseGPT on one weight from its calibration inputs.

Weights are flax-oriented, ``(in, out)`` (``y = x @ W``), and inputs are ``(tokens, in)``; the
papers write ``W`` as ``(out, in)``, so their "columns" (input features) are our rows and their
"rows" (output units) our columns. Inputs may also be given as a :class:`HessianState`
accumulated over calibration chunks (:func:`jaxsparse.hessian_update`).

- :func:`wanda` (Sun, Liu, Bair & Kolter, 2023, "A Simple and Effective Pruning Approach for Large
  Language Models", arXiv:2306.11695): score ``|W_ij| * ||X_i||_2``, compared per output unit;
  no weight update.
- :func:`sparsegpt` (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot", arXiv:2301.00774, Algorithm 1): optimal-brain-surgeon pruning
  input feature by input feature with the Cholesky factor of the damped inverse Hessian, the mask
  chosen per block of ``block_size`` input features (per group of ``m`` for N:M), each pruned
  weight's error compensated by the not-yet-visited weights, lazily per block.

Budgets are exact: a weight of ``N = in * out`` entries at sparsity ``s`` keeps exactly
``N - floor(s * N)`` (DESIGN.md invariant 5). Where the papers prune ``floor(s * size)`` of each
unit (Wanda: each output; SparseGPT: each block), the units here prune the differences of the
cumulative budgets ``floor(s * (units before and with this one))``, which is the papers' count
when ``s * size`` is an integer and differs by at most one otherwise, so the layer's total is
exact. N:M keeps exactly ``n`` of every ``m`` consecutive input features of each output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse.distributions import check_sparsity
from jaxsparse.oneshot.hessian import HessianState, hessian_init, hessian_update
from jaxsparse.selection import top_k_mask, top_k_per_column
from jaxsparse.structures import n_of_m

__all__ = ["wanda", "sparsegpt", "magnitude_layer", "wanda_scores", "check_layer", "unit_prune_counts"]


def check_layer(name: str, weight, n_inputs: int | None = None, *, sparsity=None, n=None, m=None) -> float | None:
    """Validate a layer's weight, its inputs' feature count and its target; return the sparsity
    (None for N:M). Every message names the layer and the shapes."""
    shape = tuple(getattr(weight, "shape", ()))
    dtype = getattr(weight, "dtype", None)
    if len(shape) != 2:
        raise ValueError(f"layer {name!r}: one-shot pruning takes a 2-D (in, out) weight; got shape {shape}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"layer {name!r}: weight of shape {shape} has dtype {dtype}; one-shot pruning needs a floating weight")
    if n_inputs is not None and n_inputs != shape[0]:
        raise ValueError(
            f"layer {name!r}: inputs have {n_inputs} features but the (in, out) weight has shape {shape}; "
            f"inputs must be (tokens, {shape[0]})"
        )
    if (n is None) != (m is None):
        raise ValueError(f"layer {name!r}: give both n and m for N:M sparsity; got n={n!r}, m={m!r}")
    if n is not None:
        if sparsity is not None:
            raise ValueError(f"layer {name!r}: give either sparsity or n and m, not both")
        if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 0 < n <= m):
            raise ValueError(f"layer {name!r}: N:M needs integers 0 < n <= m; got n={n!r}, m={m!r}")
        if shape[0] % m:
            raise ValueError(
                f"layer {name!r}: N:M with m={m} needs the input axis to be a multiple of {m}; "
                f"the (in, out) weight has shape {shape}"
            )
        return None
    if sparsity is None:
        raise ValueError(f"layer {name!r}: give a sparsity in [0, 1), or n and m for N:M")
    return check_sparsity(sparsity, f"sparsity of layer {name!r}")


def unit_prune_counts(units: int, unit_size: int, sparsity: float) -> np.ndarray:
    """Entries pruned in each of ``units`` consecutive units of ``unit_size`` entries so that
    the total is exactly ``floor(s * units * unit_size)``: differences of cumulative floors."""
    edges = np.array([math.floor(sparsity * unit_size * u) for u in range(units + 1)], np.int64)
    return np.diff(edges).astype(np.int32)


def _as_state(name, inputs, shape, *, diagonal: bool) -> HessianState:
    n_in = shape[0]
    if isinstance(inputs, HessianState):
        if inputs.hessian.shape[0] != n_in:
            raise ValueError(
                f"layer {name!r}: the HessianState is for {inputs.hessian.shape[0]} input features, "
                f"the (in, out) weight has shape {tuple(shape)}"
            )
        if not diagonal and inputs.hessian.ndim != 2:
            raise ValueError(f"layer {name!r}: SparseGPT needs the full Hessian; this state keeps only its diagonal")
        return inputs
    if getattr(inputs, "ndim", 0) < 2 or inputs.shape[-1] != n_in:
        raise ValueError(
            f"layer {name!r}: inputs of shape {tuple(getattr(inputs, 'shape', ()))} do not match the (in, out) "
            f"weight of shape {tuple(shape)}; inputs must be (tokens, {n_in})"
        )
    return hessian_update(hessian_init(n_in, diagonal=diagonal), inputs)


def _check_tokens(name, state: HessianState, shape, damp: float | None = None) -> None:
    count = state.count
    if isinstance(count, jax.core.Tracer):
        return
    count = int(count)
    if count == 0:
        raise ValueError(f"layer {name!r} of shape {tuple(shape)}: no calibration tokens were seen")
    # Fewer tokens than inputs: H has rank <= tokens and only the damping makes it invertible,
    # with a condition number up to 1 + in / damp (the damping is damp * mean(diag H) and
    # trace H = in * mean(diag H)); beyond ~1e6 a float32 Cholesky factor is unreliable.
    if damp is not None and count < shape[0] and (damp == 0 or shape[0] / damp > 1e6):
        raise ValueError(
            f"layer {name!r} of shape {tuple(shape)}: {count} calibration tokens give a singular Hessian of "
            f"rank <= {count} < {shape[0]} input features, and damp={damp} is too small to condition it in "
            f"float32; use at least {shape[0]} tokens or a larger damp"
        )


def _prune_with(weight, keep):
    return jnp.where(keep, weight, jnp.zeros((), weight.dtype))


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _select(scores, keep_per_output, n=None, m=None):
    if n is not None:
        return n_of_m(n, m, axis=0).select(scores)
    return top_k_per_column(scores, keep_per_output)


_top_k_mask = jax.jit(top_k_mask)


def _select_per_output(scores, sparsity, n, m):
    if n is not None:
        return _select(scores, None, n=n, m=m)
    keep = scores.shape[0] - unit_prune_counts(scores.shape[1], scores.shape[0], sparsity)
    return _select(scores, jnp.asarray(keep))


def magnitude_layer(weight, *, sparsity=None, n=None, m=None, return_mask: bool = False, name: str = "weight"):
    """Magnitude pruning of one ``(in, out)`` weight (the baseline of the one-shot methods):
    keep the largest ``|W|`` over the whole weight (exact budget), or ``n`` of every ``m`` input
    features per output. Returns the pruned weight (and its keep mask with ``return_mask``)."""
    sparsity = check_layer(name, weight, sparsity=sparsity, n=n, m=m)
    scores = jnp.abs(weight).astype(jnp.float32)
    if n is not None:
        keep = _select(scores, None, n=n, m=m)
    else:
        keep = _top_k_mask(scores, weight.size - math.floor(sparsity * weight.size))
    pruned = _prune_with(weight, keep)
    return (pruned, keep) if return_mask else pruned


def wanda_scores(weight, state: HessianState) -> jax.Array:
    """Wanda's score ``|W_ij| * ||X_i||_2`` (float32, the weight's shape)."""
    return jnp.abs(weight).astype(jnp.float32) * jnp.sqrt(state.diagonal)[:, None]


def wanda(weight, inputs, *, sparsity=None, n=None, m=None, return_mask: bool = False, name: str = "weight"):
    """Wanda: prune by ``|W| * ||X||`` per output unit (Sun et al., 2023, arXiv:2306.11695).

    Args:
      weight: ``(in, out)`` floating weight (flax orientation).
      inputs: the layer's calibration inputs ``(tokens, in)`` (any leading token axes), or a
        :class:`HessianState` accumulated over chunks (``diagonal=True`` is enough).
      sparsity: fraction pruned in [0, 1); each output unit (column) prunes ``s * in`` of its
        inputs, the layer exactly ``floor(s * in * out)`` (module docstring).
      n, m: N:M sparsity instead: keep ``n`` of every ``m`` consecutive input features of each
        output (``in`` must be a multiple of ``m``), e.g. ``n=2, m=4``.
      return_mask: also return the bool keep mask.
      name: the layer's name in error messages.

    Returns:
      The pruned weight (same dtype; no weight update), or ``(pruned, keep_mask)``.
    """
    sparsity = check_layer(name, weight, sparsity=sparsity, n=n, m=m)
    state = _as_state(name, inputs, weight.shape, diagonal=True)
    _check_tokens(name, state, weight.shape)
    keep = _select_per_output(wanda_scores(weight, state), sparsity, n, m)
    pruned = _prune_with(weight, keep)
    return (pruned, keep) if return_mask else pruned


def _inverse_hessian_factor(hessian_sum, count, damp):
    """The upper Cholesky factor ``U`` of the damped inverse Hessian (``U^T U = H^-1``), with the
    reference's fix of dead inputs (zero diagonal: set to 1). Returns ``(U, dead)``.

    The reference factors ``H``, inverts it and factors the inverse. The same ``U`` costs one
    factorisation and one triangular inverse: with ``J`` the order reversal and
    ``J H J = L L^T``, ``H = R R^T`` for the upper triangular ``R = J L J``, so
    ``H^-1 = R^-T R^-1`` and ``U = R^-1 = J L^-1 J`` (positive diagonal, hence the factor).
    """
    h = 2.0 * hessian_sum / count.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0) + damp * jnp.mean(jnp.where(dead, 1.0, diag)))
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    inverse = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    return inverse[::-1, ::-1], dead


def _prune_block(w, mask, u, start, size: int, pruned_count, n, m):
    """SparseGPT on input features ``start .. start+size``: choose the block's mask, prune
    feature by feature compensating within the block, then update the later features lazily."""
    out = w.shape[1]
    w1 = lax.dynamic_slice(w, (start, 0), (size, out))
    u1 = lax.dynamic_slice(u, (start, start), (size, size))
    d1 = jnp.diagonal(u1)

    def feature(i, carry, pruned_row):
        # Left-looking: feature i's weights after the compensation for the block's earlier
        # features (err1's later rows are still 0), one row at a time instead of rewriting
        # the whole block after every feature (half the memory traffic, the same arithmetic).
        q1, err1 = carry
        row = w1[i] - jnp.matmul(u1[:, i], err1, precision=lax.Precision.HIGHEST)
        q = jnp.where(pruned_row, 0.0, row)
        return q1.at[i].set(q), err1.at[i].set((row - q) / d1[i])

    carry = (w1, jnp.zeros_like(w1))
    if n is None:
        scores = w1**2 / (d1**2)[:, None]
        pruned = ~top_k_mask(scores, size * out - pruned_count)
        carry = lax.fori_loop(0, size, lambda i, c: feature(i, c, pruned[i]), carry)
    else:
        def group(g, state):
            carry, pruned = state
            u_cols = lax.dynamic_slice(u1, (0, g * m), (size, m))
            rows = lax.dynamic_slice(w1, (g * m, 0), (m, out)) - jnp.matmul(u_cols.T, carry[1], precision=lax.Precision.HIGHEST)
            d = lax.dynamic_slice(d1, (g * m,), (m,))
            group_pruned = ~n_of_m(n, m, axis=0).select(rows**2 / (d**2)[:, None])
            carry = lax.fori_loop(0, m, lambda j, c: feature(g * m + j, c, group_pruned[j]), carry)
            return carry, lax.dynamic_update_slice(pruned, group_pruned, (g * m, 0))

        carry, pruned = lax.fori_loop(0, size // m, group, (carry, jnp.zeros((size, out), bool)))
    w1, err1 = carry
    # Lazy batch update of the later features: u's rows start..start+size are zero left of
    # their diagonal, so the product changes no earlier feature; the block itself is then
    # overwritten with its pruned values.
    later = lax.dynamic_slice(u, (start, 0), (size, u.shape[1]))
    w = w - jnp.matmul(later.T, err1, precision=lax.Precision.HIGHEST)
    w = lax.dynamic_update_slice(w, w1, (start, 0))
    return w, lax.dynamic_update_slice(mask, ~pruned, (start, 0))


_SEGMENTS = 4  # static sub-problems per layer (see _sparsegpt)


@functools.partial(jax.jit, static_argnames=("block_size", "n", "m"))
def _sparsegpt(weight, hessian_sum, count, pruned_per_block, damp, *, block_size: int, n, m):
    n_in = weight.shape[0]
    u, dead = _inverse_hessian_factor(hessian_sum, count, damp)
    compute = jnp.promote_types(weight.dtype, jnp.float32)
    w = jnp.where(dead[:, None], 0.0, weight.astype(compute))
    mask = jnp.ones(weight.shape, bool)
    blocks = -(-n_in // block_size)
    # With static shapes a block's lazy update covers every row of the (sub)problem, not only
    # the later ones: twice the paper's flops. Splitting the features into a few static
    # segments, each pruned as the tail problem ``w[s:], u[s:, s:]`` (the trailing block of an
    # upper Cholesky factor is the factor of the trailing problem), cuts the excess to ~1/4.
    per_segment = -(-blocks // _SEGMENTS)
    for first in range(0, blocks, per_segment):
        s0 = first * block_size
        last = min(first + per_segment, blocks)
        tail_w, tail_mask, tail_u = w[s0:], mask[s0:], u[s0:, s0:]
        full = min(last * block_size, n_in) - s0
        full, rest = divmod(full, block_size)

        def block(b, carry, tail_u=tail_u, first=first):
            return _prune_block(*carry, tail_u, b * block_size, block_size, pruned_per_block[first + b], n, m)

        carry = (tail_w, tail_mask)
        if full:
            carry = lax.fori_loop(0, full, block, carry)
        if rest:
            carry = _prune_block(*carry, tail_u, full * block_size, rest, pruned_per_block[first + full], n, m)
        w, mask = w.at[s0:].set(carry[0]), mask.at[s0:].set(carry[1])
    return w.astype(weight.dtype), mask, jnp.all(jnp.isfinite(u))


def sparsegpt(
    weight,
    inputs,
    *,
    sparsity=None,
    n=None,
    m=None,
    block_size: int = 128,
    damp: float = 0.01,
    return_mask: bool = False,
    name: str = "weight",
):
    """SparseGPT: one-shot OBS pruning with weight reconstruction (Frantar & Alistarh, 2023,
    arXiv:2301.00774, Algorithm 1; the reference ``SparseGPT.fasterprune``).

    With ``H = 2 X^T X / tokens`` (dead inputs, whose diagonal is 0, get ``H_jj = 1`` and their
    weights zeroed) damped by ``damp * mean(diag H)``, ``U`` the upper Cholesky factor of
    ``H^-1``: input features are visited in order in blocks of ``block_size``. At the start of a
    block (unstructured) or of each group of ``m`` features (N:M), the mask is chosen from
    ``w^2 / U_jj^2`` (the OBS saliency) over that block or, per output, within the group; each
    feature's weights are then set (pruned entries to 0), and the error ``(w - q) / U_jj`` is
    compensated on the block's later features at once and on later blocks lazily, with one
    matrix product per block. Everything runs in one jit-compiled function with static shapes,
    in float32 (or the weight's dtype if wider) whatever the weight's dtype.

    Args:
      weight: ``(in, out)`` floating weight (flax orientation; the paper's ``W`` transposed).
      inputs: calibration inputs ``(tokens, in)``, or a full :class:`HessianState`
        accumulated over chunks (and shards) with :func:`jaxsparse.hessian_update`.
      sparsity: fraction pruned in [0, 1): each block prunes its share of the layer's exact
        budget ``floor(s * in * out)`` (module docstring).
      n, m: N:M sparsity instead (keep ``n`` of every ``m`` input features per output);
        ``block_size`` must then be a multiple of ``m``.
      block_size: features per lazy-update block (and per mask selection, as in the paper).
      damp: damping as a fraction of the Hessian's mean diagonal.
      return_mask: also return the bool keep mask.
      name: the layer's name in error messages.

    Returns:
      The pruned and updated weight (its dtype), or ``(weight, keep_mask)``.

    Raises:
      ValueError: bad shapes or target, no calibration tokens, fewer tokens than inputs (a
        singular Hessian) with a damping too small to condition it in float32 (``damp=0``, or
        ``in / damp > 1e6``), or a damped Hessian whose Cholesky factorisation fails.
    """
    sparsity = check_layer(name, weight, sparsity=sparsity, n=n, m=m)
    block_size = int(block_size)
    if block_size < 1 or (n is not None and block_size % m):
        raise ValueError(f"layer {name!r}: block_size must be a positive multiple of m={m}; got {block_size}")
    damp = float(damp)
    if not damp >= 0:
        raise ValueError(f"layer {name!r}: damp must be >= 0; got {damp}")
    state = _as_state(name, inputs, weight.shape, diagonal=False)
    _check_tokens(name, state, weight.shape, damp)
    n_in, n_out = weight.shape
    blocks = -(-n_in // block_size)
    if n is None:
        # Block b holds features b*B .. min((b+1)*B, in): prune its share of the exact budget.
        edges = [min(b * block_size, n_in) * n_out for b in range(blocks + 1)]
        pruned = np.diff([math.floor(sparsity * e) for e in edges]).astype(np.int32)
    else:
        pruned = np.zeros(blocks, np.int32)
    pruned_weight, keep, finite = _sparsegpt(
        weight, state.hessian, state.count, jnp.asarray(pruned), damp, block_size=block_size, n=n, m=m
    )
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        raise ValueError(
            f"layer {name!r} of shape {tuple(weight.shape)}: the damped Hessian of {int(state.count)} calibration "
            f"tokens is not positive definite in float32 (Cholesky failed); use more calibration tokens or a "
            f"larger damp (now {damp})"
        )
    return (pruned_weight, keep) if return_mask else pruned_weight

"""The straight-through family: STE, SR-STE and ST-3, on dense shadow weights.

Every method here is :func:`jaxsparse.core` with gradient annealing at ``alpha = 1`` (the
straight-through estimator, Bengio, Léonard & Courville 2013, arXiv 1308.3432) and a topology
that recomputes the mask from the dense weights on every step. The params hold the forward
weights (exactly 0 where pruned), the dense "shadow" weights live in the sparsifier state
(``state.shadow``), and the training loop is the standard one: the gradient of the loss with
respect to the params *is* the straight-through gradient, which the core hands to the inner
optimizer for the dense weights. After each step the mask is recomputed from the updated dense
weights, so the next forward pass uses the mask of the current weights, as in the papers.

- :func:`ste`: the magnitude mask of the dense weights, unstructured at a sparsity or with any
  structure (``js.n_of_m(2, 4)``), the "STE" baseline of Zhou et al. (2021).
- :func:`sr_ste`: SR-STE (Zhou et al., 2021, "Learning N:M Fine-grained Structured Sparse Neural
  Networks From Scratch", ICLR, arXiv 2102.04010), N:M with the sparse-refined regulariser, their
  Eq. (4): ``W_{t+1} = W_t - gamma_t (g(W~_t) + lambda_W (E-bar ⊙ W_t))``, i.e. the term
  ``decay * (1 - mask) * w`` added to the gradient of the dense weights (the reference code,
  github.com/aojunzz/NM-sparsity, adds ``decay * (1 - mask) * weight`` to ``grad_output`` in the
  backward pass, with the dense weight and the mask of that forward pass; default ``2e-4``). It
  pulls pruned weights toward 0, so the mask flips less often.
- :func:`st3`: ST-3 (Vanderschueren & De Vleeschouwer, 2023, "Are Straight-Through gradients and
  Soft-Thresholding all you need for Sparse Training?", WACV, arXiv 2212.01076): soft
  thresholding of the dense weights with a per-output-channel rescaling, at a sparsity ramped
  with the cubic schedule of Zhu & Gupta.

On a device mesh (:mod:`jaxsparse.sharding`) the dense shadow weights shard like their params,
and every method's mask is a selection that partitions: STE and SR-STE select per leaf with the
leaf's structure (:func:`jaxsparse.structures.select_top_k`: N:M by compares within each group,
local when groups do not span devices; tiles and channels by norms that reduce, then a radix
select over histograms); SR-STE's term is elementwise. ST-3 selects over all pooled leaves at
once (their histograms summed into one small histogram and all-reduced), takes each threshold as
a max reduction, and its channel rescaling is a mean over each channel's inputs (partial sums
and an all-reduce); the thresholds are replicated scalars. Nothing gathers a param.

Progressive N:M gradient flow (MDGF, SDGF) is in :mod:`jaxsparse.progressive`; AutoSparse in
:mod:`jaxsparse.autosparse`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxsparse import counts
from jaxsparse.distributions import Distribution
from jaxsparse.core import Topology, TopologyInputs, every_step, sparsifier
from jaxsparse.pruning import keep_table
from jaxsparse.schedules import polynomial_schedule
from jaxsparse.selection import select_top_k
from jaxsparse.structures import n_of_m
from jaxsparse.structures import select_top_k as structured_top_k

__all__ = ["magnitude_masks", "ste_topology", "ste", "sr_ste", "st3"]


def magnitude_masks(plan, weights) -> list:
    """Per leaf of ``plan``, the exact budget (in whole units of the leaf's structure) of the
    largest ``|w|``, ties to the lowest index, all leaves in the same selection passes."""
    scores = [jnp.abs(w).astype(jnp.float32) for w in weights]
    ks = [leaf.layout.keep_units(leaf.shape, leaf.sparsity, leaf.name) for leaf in plan]
    return structured_top_k([leaf.layout for leaf in plan], scores, ks, list(range(len(plan))))


def ste_topology(decay: float = 0.0) -> Topology:
    """The STE topology: on every step, the mask of the largest dense weights under each leaf's
    structure; with ``decay > 0`` the SR-STE term ``decay * (1 - mask) * w`` joins the dense
    gradient."""

    def masks(inputs: TopologyInputs):
        return magnitude_masks(inputs.plan, inputs.params)

    def observe(inputs: TopologyInputs):
        # SR-STE's sparse-refined term, with the mask and the dense weights of this step's forward pass
        grads = [
            (g.astype(jnp.float32) + decay * jnp.where(m, 0.0, w.astype(jnp.float32))).astype(g.dtype)
            for g, m, w in zip(inputs.grads, inputs.masks, inputs.params)
        ]
        return grads, inputs.aux

    return Topology(
        init=lambda inputs: (masks(inputs), ()),
        update=lambda inputs: (masks(inputs), inputs.aux),
        is_update_step=every_step,
        observe=observe if decay > 0 else None,
        name="sr_ste" if decay > 0 else "ste",
    )


def ste(
    inner: optax.GradientTransformation,
    *,
    sparsity=None,
    structure=None,
    decay: float = 0.0,
    gradient_annealing=1.0,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
    dense_if_untileable: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Straight-through sparse training: on every step, the mask keeps the largest dense weights.

    The dense weights are trained with the straight-through gradient (the gradient with respect
    to the masked params, for every weight); params hold them on the mask and exactly 0
    elsewhere (see the module docstring). Bengio et al. (2013) for the estimator; Zhou et al.
    (2021, arXiv 2102.04010) for its use in sparse training ("STE" in their tables).

    Example (2:4 on every kernel, and 90% unstructured)::

        tx = js.ste(optax.adam(1e-3), structure=js.n_of_m(2, 4))
        tx = js.ste(optax.adam(1e-3), sparsity=0.9)
        params, opt_state = js.init(tx, params)

    Args:
      inner: the optax transformation that trains the dense weights.
      sparsity: a float or a distribution; with an N:M structure None (it is ``1 - n/m``) or
        exactly that value.
      structure, dense_if_untileable: how scores become a mask (:mod:`jaxsparse.structures`;
        None: unstructured; see :func:`jaxsparse.sparsifier`). A leaf the structure cannot tile
        raises a ValueError at init unless ``dense_if_untileable``.
      decay: the SR-STE coefficient (0: plain STE); see :func:`sr_ste`.
      gradient_annealing: the factor of the gradient reaching pruned weights: 1 (the
        straight-through estimator, default), a smaller float, or a ``step -> alpha`` function.
      include, exclude, overrides, seed: see :func:`jaxsparse.core`.
    """
    if not float(decay) >= 0:
        raise ValueError(f"decay must be >= 0; got {decay!r}")
    if gradient_annealing is None:
        raise ValueError("the STE family trains dense shadow weights: gradient_annealing must be a float or a function")
    return sparsifier(
        inner, sparsity=sparsity, topology=ste_topology(float(decay)), include=include, exclude=exclude,
        overrides=overrides, seed=seed, structure=structure, dense_if_untileable=dense_if_untileable,
        gradient_annealing=gradient_annealing,
    )


def sr_ste(
    inner: optax.GradientTransformation,
    *,
    n: int = 2,
    m: int = 4,
    decay: float = 2e-4,
    axis: int = -2,
    gradient_annealing=1.0,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
    dense_if_untileable: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SR-STE: N:M sparse training from scratch with the sparse-refined straight-through
    estimator (Zhou et al., 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks
    From Scratch", ICLR, arXiv 2102.04010).

    Every step the N:M mask is recomputed from the dense weights (the ``n`` largest ``|w|`` in
    each group of ``m`` consecutive entries along ``axis``, -2 the input axis of flax kernels),
    and the dense weights get the straight-through gradient plus the sparse-refined term of the
    paper's Eq. (4), ``decay * (1 - mask) * w``: positive ``decay`` shrinks the pruned weights
    (the reference code's sign; default ``lambda_W = 2e-4`` as there). Params hold the N:M
    weights, exactly 0 elsewhere.

    Example::

        tx = js.sr_ste(optax.sgd(0.1, momentum=0.9), n=2, m=4)
        params, opt_state = js.init(tx, params)   # params already 2:4

    Args:
      inner: the optax transformation that trains the dense weights.
      n, m, axis: the N:M pattern (:func:`jaxsparse.n_of_m`).
      decay: ``lambda_W``; 0 gives plain STE.
      gradient_annealing: 1 (the paper's straight-through gradient). Another factor ``alpha``
        scales the whole gradient reaching pruned weights, the sparse-refined term included
        (``alpha (g + lambda_W w)``; the paper has no such factor).
      include, exclude, overrides, seed, dense_if_untileable: see :func:`ste`.
    """
    return ste(
        inner, structure=n_of_m(n, m, axis), decay=decay, gradient_annealing=gradient_annealing,
        include=include, exclude=exclude, overrides=overrides, seed=seed, dense_if_untileable=dense_if_untileable,
    )


def _channel_scale(w, mask):
    """ST-3's rescaling of each output channel (the last axis of flax kernels), as in the
    reference code (github.com/vanderschuea/stthree, ``PrunedLayer.get_scale``):
    ``1.01 / (r + 0.01)`` with ``r = (mean |w| m + 1e-6) / (mean |w| + 1e-6)`` over the
    channel's other axes, so a channel that lost a fraction of its magnitude is scaled up by about
    its inverse (exactly 1 while nothing is pruned)."""
    if w.ndim < 2:
        return jnp.ones((), jnp.float32)
    axes = tuple(range(w.ndim - 1))
    a = jnp.abs(w.astype(jnp.float32))
    kept = jnp.mean(jnp.where(mask, a, 0.0), axis=axes, keepdims=True)
    ratio = (kept + 1e-6) / (jnp.mean(a, axis=axes, keepdims=True) + 1e-6)
    return 1.01 / (ratio + 0.01)


def _st3_topology(schedule, scope: str, rescale: bool) -> Topology:
    steps = schedule.update_steps(1)
    fractions = schedule.fractions(steps)

    def masks_at(inputs: TopologyInputs, weights):
        row = jnp.clip(inputs.step - int(steps[0]), 0, len(steps) - 1)
        plan = inputs.plan
        pooled = [i for i, leaf in enumerate(plan) if scope == "global" and not leaf.overridden]
        group_of, budgets = [], []
        if pooled:
            total = sum(plan[i].size for i in pooled)
            table = counts.count(keep_table(total, plan[pooled[0]].sparsity, fractions))
            budgets.append(jax.tree.map(lambda words: jnp.asarray(words)[row], table))
        for i, leaf in enumerate(plan):
            if i in pooled:
                group_of.append(0)
            else:
                group_of.append(len(budgets))
                budgets.append(jnp.asarray(keep_table(leaf.size, leaf.sparsity, fractions), jnp.int32)[row])
        scores = [jnp.abs(w).astype(jnp.float32) for w in weights]
        return select_top_k(scores, counts.stack(budgets), group_of), group_of

    def thresholds(masks, weights, group_of):
        """Per leaf, its group's soft threshold: the largest magnitude pruned (0 when none)."""
        largest_pruned = [jnp.max(jnp.where(m, 0.0, jnp.abs(w).astype(jnp.float32))) for m, w in zip(masks, weights)]
        per_group = {}
        for g, t in zip(group_of, largest_pruned):
            per_group[g] = t if g not in per_group else jnp.maximum(per_group[g], t)
        return [per_group[g] for g in group_of]

    def init(inputs: TopologyInputs):
        masks, group_of = masks_at(inputs, inputs.params)
        return masks, thresholds(masks, inputs.params, group_of)

    def update(inputs: TopologyInputs):
        masks, group_of = masks_at(inputs, inputs.params)
        return masks, thresholds(masks, inputs.params, group_of)

    def forward(inputs: TopologyInputs):
        out = []
        for w, m, tau in zip(inputs.params, inputs.masks, inputs.aux):
            x = w.astype(jnp.float32)
            soft = jnp.where(m, x - jnp.sign(x) * tau, 0.0)
            if rescale:
                soft = soft * _channel_scale(x, m)
            out.append(jnp.where(m, soft, 0.0).astype(w.dtype))
        return out

    return Topology(init=init, update=update, is_update_step=every_step, forward=forward)


def st3(
    inner: optax.GradientTransformation,
    *,
    sparsity,
    end_step: int,
    begin_step: int = 0,
    power: float = 3.0,
    scope: str = "global",
    rescale: bool = True,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
) -> optax.GradientTransformationExtraArgs:
    """ST-3: straight-through gradients and soft thresholding (Vanderschueren & De Vleeschouwer,
    2023, "Are Straight-Through gradients and Soft-Thresholding all you need for Sparse
    Training?", WACV, arXiv 2212.01076).

    On every step, with ``s_t = sparsity * (1 - (1 - p)^power)``, ``p = (t - begin) / (end -
    begin)`` clipped to [0, 1] (the cubic ramp of Zhu & Gupta, 2018):

    1. the mask keeps the largest dense weights at sparsity ``s_t`` (exact budgets): over all
       sparsified leaves together (``scope="global"``, the paper's single magnitude threshold,
       ``l1`` in the reference code) or per leaf (``"layer"``);
    2. ``tau`` is the largest pruned magnitude of the group, and the forward weights are soft
       thresholded, ``w_q = sign(w) (|w| - tau)`` on the mask, 0 elsewhere, so a weight crosses
       zero smoothly instead of jumping (the reference code, github.com/vanderschuea/stthree,
       takes ``tau`` as the linearly interpolated ``s_t``-quantile of ``|w|`` and keeps ``|w| >
       tau``: a value between the largest pruned and the smallest kept magnitude, and a count
       that may differ from the exact budget by one; here the budget is exact, DESIGN.md
       invariant 5, and ``tau`` its largest pruned magnitude);
    3. with ``rescale``, each output channel (last axis) is multiplied by ``1.01 / (r + 0.01)``,
       ``r`` the fraction of the channel's ``|w|`` mass that is kept (the reference code's
       ``get_scale``);
    4. the dense weights receive the straight-through gradient, unscaled, on every entry.

    Params are the forward weights ``w_q`` (exactly 0 where pruned); the dense weights are in
    ``state.shadow``.

    Example (90% at the end of a 10k-step ramp)::

        tx = js.st3(optax.sgd(0.1, momentum=0.9), sparsity=0.9, begin_step=500, end_step=10_000)
        params, opt_state = js.init(tx, params)

    Args:
      inner: the optax transformation that trains the dense weights.
      sparsity: final sparsity, a float (or, with ``scope="layer"``, a distribution).
      begin_step, end_step, power: the ramp's window and exponent.
      scope: ``"global"`` (default, as in the paper) or ``"layer"``.
      rescale: the per-channel rescaling (the paper's default configuration uses it).
      include, exclude, overrides, seed: see :func:`jaxsparse.core`.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer'; got {scope!r}")
    if scope == "global" and isinstance(sparsity, Distribution):
        raise ValueError(f"global ST-3 takes a float sparsity, not the distribution {sparsity!r}")
    schedule = polynomial_schedule(begin_step, end_step, power)
    return sparsifier(
        inner, sparsity=sparsity, topology=_st3_topology(schedule, scope, bool(rescale)),
        include=include, exclude=exclude, overrides=overrides, seed=seed, gradient_annealing=1.0,
    )

"""SNFS, sparse momentum: prune by magnitude, regrow by momentum, redistributed across layers.

Dettmers & Zettlemoyer (2019), "Sparse Networks from Scratch: Faster Training without Losing
Performance". Every ``update_every`` steps until ``end_step``, with the cosine-decayed prune rate
``f(t)``:

1. every sparsified leaf with ``n_l`` active weights drops its ``d_l = floor(f(t) * n_l)``
   smallest-magnitude ones;
2. the total ``D = sum_l d_l`` is shared out as regrowth across the leaves in proportion to the
   mean momentum magnitude of each leaf's active weights, capped by each leaf's free positions
   (the excess goes to the other leaves in the same proportions, the rounding remainder leaf by
   leaf), exactly ``D`` in all;
3. each leaf grows its share at the free positions with the largest momentum magnitude.

As in the reference code (``sparselearning/core.py``), a leaf's free positions are all those not
kept after the prune, so a weight pruned in this update can be regrown at once (it keeps its
value and moments), and a dense leaf may drop more weights than it has zeros. With
``regrow_dropped=False`` the free positions are those inactive before the update and each leaf
drops at most that many.

The momentum is an exponential moving average of the dense gradients, kept in the sparsifier's
own state (``aux``), so it works with any inner optimizer. Per-leaf counts move with the
redistribution (that is the method); the total number of nonzeros stays exactly constant.
Grown weights that were inactive start at exactly 0 with zero moments. The reference code rounds
prune counts up and regrowth down and corrects the total over later updates; here both are
floors and the total is exact at every update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import counts
from jaxsparse.distributions import uniform
from jaxsparse.dst import drop_and_grow, drop_count, at_update, dst_update_steps, update_fractions, paper_distribution
from jaxsparse.masks import random_masks
from jaxsparse.core import Topology, TopologyInputs, sparsifier

__all__ = ["snfs", "allocate"]


def allocate(total, weights, caps):
    """Split the integer ``total`` into integer shares proportional to ``weights``, share ``i``
    at most ``caps[i]``; exactly ``total`` is handed out when ``total <= sum(caps)``.

    Proportional rounds (floored) give each share at most its cap; a capped share drops out and
    the rest is re-split among the others, as in the sparse momentum reference code. What the
    flooring leaves (fewer than one per share) goes to the open shares in order. All arithmetic
    is traced, with static shapes. ``total`` (an int, an int32 scalar or a
    :class:`~jaxsparse.counts.Count`) may exceed int32, the drops of a whole large model; each
    share is below 2**31 (``caps`` are int32).
    """
    weights = jnp.maximum(jnp.asarray(weights, jnp.float32), 0.0)
    caps = jnp.asarray(caps, jnp.int32)
    alloc = jnp.zeros_like(caps)
    remaining = counts.count(total)

    def clip_in_order(add, remaining):
        # Never hand out more than what remains, even if float rounding overshoots: a share gets
        # at most what the shares before it leave.
        before = counts.sub(counts.cumsum(counts.count(add)), add)
        left = counts.where(counts.ge(remaining, before), counts.sub(remaining, before), 0)
        return counts.to_int32(counts.minimum(left, add))

    for _ in range(len(caps)):  # a share capped in one round drops out of the next
        room = caps - alloc
        w = jnp.where(alloc < caps, weights, 0.0)
        total_w = jnp.sum(w)
        share = jnp.where(total_w > 0, jnp.floor(counts.to_float32(remaining) * w / jnp.where(total_w > 0, total_w, 1.0)), 0.0)
        # Compare in float before converting: a share of a wide total may not fit int32 (one
        # below the room in float is below it as an integer, so it fits).
        add = clip_in_order(jnp.where(share < room.astype(jnp.float32), share.astype(jnp.int32), room), remaining)
        alloc, remaining = alloc + add, counts.sub(remaining, counts.sum(add))
    add = clip_in_order(caps - alloc, remaining)
    return alloc + add


def _snfs_topology(drop_fraction, anneal, end_step, update_every, momentum, regrow_dropped) -> Topology:
    fractions = update_fractions(drop_fraction, update_every, end_step, anneal).astype(np.float32)

    def init(inputs: TopologyInputs):
        return random_masks(inputs.plan, inputs.key), [jnp.zeros(leaf.shape, jnp.float32) for leaf in inputs.plan]

    def observe(inputs: TopologyInputs):
        ema = [momentum * m + (1.0 - momentum) * g.astype(jnp.float32) for m, g in zip(inputs.aux, inputs.grads)]
        return inputs.grads, ema

    def update(inputs: TopologyInputs):
        fraction = at_update(fractions, inputs.step, update_every)
        speed = [jnp.abs(m) for m in inputs.aux]
        # Counts are in units: whole tiles or channels under a structure, entries otherwise.
        active = [jnp.sum(leaf.layout.unit_mask(m), dtype=jnp.int32) for leaf, m in zip(inputs.plan, inputs.masks)]
        drops = [drop_count(n, leaf.units, fraction, regrow_dropped=regrow_dropped) for n, leaf in zip(active, inputs.plan)]
        # A per-cell structure (N:M) fixes every leaf's count: such leaves regrow their own drops
        # in place and take no part in the redistribution.
        shared = [leaf.layout.cells(leaf.shape) == 1 for leaf in inputs.plan]
        # Growth fills the positions not kept: also the just-dropped ones in the paper's rule.
        caps = jnp.stack([
            leaf.units - n + (d if regrow_dropped else 0) if ok else 0
            for n, d, leaf, ok in zip(active, drops, inputs.plan, shared)
        ])
        mean_speed = jnp.stack(
            [jnp.sum(jnp.where(m, s, 0.0)) / jnp.maximum(jnp.sum(m, dtype=jnp.int32), 1) for m, s in zip(inputs.masks, speed)]
        )
        total = counts.sum(jnp.stack([d if ok else jnp.zeros_like(d) for d, ok in zip(drops, shared)]))
        grows = allocate(total, mean_speed, caps)  # exact: may exceed int32
        magnitudes = [jnp.abs(p) for p in inputs.params]
        new, _, _ = drop_and_grow(
            inputs.masks, magnitudes, speed, drops, [grows[i] for i in range(len(active))],
            regrow_dropped=regrow_dropped, structures=[leaf.structure for leaf in inputs.plan],
        )
        return new, inputs.aux

    return Topology(
        init=init, update=update, is_update_step=dst_update_steps(update_every, end_step), observe=observe
    )


def snfs(
    inner: optax.GradientTransformation,
    *,
    sparsity=None,
    update_every: int = 100,
    end_step: int,
    drop_fraction=0.5,
    drop_fraction_anneal: str = "cosine",
    momentum: float = 0.9,
    regrow_dropped: bool = True,
    seed=0,
    include=None,
    exclude=None,
    overrides=None,
    structure=None,
    dense_if_untileable: bool = False,
    gradient_annealing=None,
) -> optax.GradientTransformationExtraArgs:
    """SNFS / sparse momentum (Dettmers & Zettlemoyer, 2019, "Sparse Networks from Scratch:
    Faster Training without Losing Performance").

    Starts from a random mask; every ``update_every`` steps until ``end_step`` prunes the fraction
    ``f(t)`` (``drop_fraction`` decayed by RigL's cosine, the paper's prune-rate annealing) of
    each leaf's active weights by magnitude and regrows the same total, redistributed across
    leaves by the mean momentum magnitude of their active weights and placed at the inactive
    positions with the largest momentum (see the module docstring). The total number of nonzeros
    is exactly constant; per-leaf counts follow the redistribution.

    On a device mesh (:mod:`jaxsparse.sharding`): the prune and grow selections are per-leaf radix selects
    through partitioned histograms; the redistribution needs only each leaf's mean momentum
    magnitude over its active weights, a reduction (per-device partial sums and an all-reduce)
    into one number per leaf, and the allocation runs on those few replicated numbers.

    Example::

        tx = js.snfs(optax.sgd(0.1, momentum=0.9), sparsity=0.9, update_every=1000, end_step=100_000)
        params, opt_state = js.init(tx, params)   # params masked: step 0 trains the sparse model

    Args:
      inner: the optax transformation to wrap.
      sparsity: initial sparsity: a float (the same in every leaf, as in the paper) or a
        distribution (``jaxsparse.erk(0.9)``).
      update_every: steps between topology updates (the first at step ``update_every``).
      end_step: no topology change from this step on.
      drop_fraction: prune rate at step 0 (the paper's default 0.5), or any ``step -> fraction``
        schedule evaluated on the host at every update step.
      drop_fraction_anneal: for a float ``drop_fraction``, ``"cosine"`` (the paper's prune-rate
        annealing, to 0 at ``end_step``) or ``"constant"``.
      momentum: decay of the gradient moving average used as the momentum (0.9 in the paper).
      regrow_dropped: as in the reference code, regrowth may pick a weight pruned in the same
        update (True), which then keeps its value, and a leaf's prune count is not capped; False:
        regrowth only at positions inactive before the update, and each leaf drops at most its
        number of inactive positions.
      seed, include, exclude, overrides: see :func:`jaxsparse.core`.
      gradient_annealing: None (default), or a float or ``step -> alpha`` function: dropped
        weights keep training as dense shadow weights with gradients scaled by ``alpha(t)``, and
        drop scores read the dense weights (see :func:`jaxsparse.core`).
      structure, dense_if_untileable: see :func:`jaxsparse.sparsifier`. Under ``js.blocks`` or
        ``js.channels`` whole groups are pruned and regrown (group scores: the L2 norm of the
        entries' magnitudes and momenta) and redistributed in whole groups; under ``js.n_of_m``
        each group regrows what it lost, so every leaf keeps its count (no redistribution).
    """
    if end_step is None:
        raise ValueError("snfs needs end_step, the step at which its cosine prune rate reaches 0")
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
    topology = _snfs_topology(drop_fraction, drop_fraction_anneal, end_step, update_every, float(momentum), bool(regrow_dropped))
    return sparsifier(
        inner, sparsity=paper_distribution(sparsity, uniform, structure), topology=topology,
        include=include, exclude=exclude, overrides=overrides, seed=seed, structure=structure,
        dense_if_untileable=dense_if_untileable, gradient_annealing=gradient_annealing,
    )

"""Progressive N:M gradient flow: MDGF (decaying mask) and SDGF (staged N:M).

Bambhaniya, Yazdanbakhsh, Subramanian, Kao, Agrawal, Evci & Krishna (2024), "Progressive Gradient
Flow for Robust N:M Sparsity Training in Transformers", arXiv 2402.04744 (code:
github.com/abhibambhaniya/progressive_gradient_flow_nm_sparsity). Both recipes are
straight-through N:M training (:mod:`jaxsparse.ste`) that restricts the gradient flow to pruned
weights progressively, which the paper finds reduces the gradient noise that hurts high N:M
sparsity:

- **MDGF** (mask-decay gradient flow, :func:`mdgf`): the pruned positions' factor decays from 1
  to 0, linearly ``max(0, 1 - c (t - t0))`` or exponentially ``exp(-c (t - t0))``
  (:func:`jaxsparse.schedules.mask_decay`). In the reference code the factor multiplies the
  pruned weights in the forward pass (``w * (mask + (1 - mask) beta)``) and the backward pass is
  straight through. Here the params stay exactly N:M (DESIGN.md invariant 1), so the factor acts
  on the gradient flow instead: it is the core's gradient annealing ``alpha(t) = beta(t)``, the
  gradient reaching a pruned weight is ``beta(t)`` times its straight-through gradient. The
  paper's argument (the flow to pruned weights fades out) holds for both; the forward passes
  differ while ``beta > 0``. The reference's forward decay is not offered as an option: its params
  hold ``beta w`` at pruned positions, so they are not N:M until ``beta`` reaches 0, which every
  jaxsparse method guarantees after every step.
- **SDGF** (structure-decay gradient flow, :func:`sdgf`): the N:M pattern itself tightens in
  stages over ``[begin_step, end_step)`` after a dense start: ``"stepwise"`` (SdGf-Stepwise,
  e.g. for 1:8: dense, 7:8, 4:8, 2:8, 1:8; ``log2(m / n) + 1`` stages) or ``"geometric"``
  (SdGf-Geometric, the same density with ever smaller groups: 8:64, 4:32, 2:16, 1:8 for 1:8 and
  16:32, 8:16, 4:8, 2:4 for 2:4; 4 stages), as in the reference code (its ``"sparsify"`` and
  ``"fine"`` structure decays). The stages have equal length; from ``end_step`` on the pattern is
  the final ``n:m``.

On a device mesh (:mod:`jaxsparse.sharding`): as STE, the shadow weights shard like the params and
each mask is N:M by compares within each group of ``m`` (no communication when the devices'
slices of the group axis are multiples of ``m``; SDGF's stages switch between such selections,
``lax.switch`` on the replicated step). Geometric SDGF's early stages have long groups (8:64),
which span devices sooner; see :mod:`jaxsparse.structures`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax
from jax import lax

from jaxsparse.core import Topology, TopologyInputs, every_step, sparsifier
from jaxsparse.schedules import mask_decay
from jaxsparse.ste import magnitude_masks, ste
from jaxsparse.structures import n_of_m

__all__ = ["mdgf", "sdgf", "sdgf_stages"]


def mdgf(
    inner: optax.GradientTransformation,
    *,
    n: int = 2,
    m: int = 4,
    axis: int = -2,
    decay: str = "exponential",
    coef: float = 2e-4,
    begin_step: int = 0,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
) -> optax.GradientTransformationExtraArgs:
    """MDGF: straight-through N:M training whose gradient flow to pruned weights decays
    (Bambhaniya et al., 2024, arXiv 2402.04744; see the module docstring for how it differs from
    the reference code's decaying forward mask).

    Example::

        tx = js.mdgf(optax.adam(1e-3), n=1, m=8, decay="exponential", coef=2e-4)
        params, opt_state = js.init(tx, params)

    Args:
      inner: the optax transformation that trains the dense weights.
      n, m, axis: the N:M pattern (:func:`jaxsparse.n_of_m`).
      decay, coef, begin_step: the decay of :func:`jaxsparse.schedules.mask_decay` (``coef``
        ``2e-4``, the reference code's default).
      include, exclude, overrides, seed: see :func:`jaxsparse.core`.
    """
    return ste(
        inner, structure=n_of_m(n, m, axis), gradient_annealing=mask_decay(decay, coef, begin_step),
        include=include, exclude=exclude, overrides=overrides, seed=seed,
    )


def sdgf_stages(n: int, m: int, kind: str = "stepwise", stages: int = 4) -> list[tuple[int, int]]:
    """The N:M patterns of SDGF's stages, densest first, as the reference code builds them
    (Bambhaniya et al., 2024, arXiv 2402.04744; its ``get_decay_config``):

    - ``"stepwise"`` (SdGf-Stepwise, the code's ``"sparsify"``): ``m`` fixed, kept counts ``m - 1``,
      ``m / 2``, ``m / 4``, ..., ``n``: ``log2(m / n) + 1`` stages; ``m / n`` must be a power of two.
    - ``"geometric"`` (SdGf-Geometric, the code's ``"fine"``): the density ``n / m`` fixed, groups
      halving, ``n 2^k : m 2^k`` for ``k = stages - 1, ..., 0``, with ``stages = 4`` as in the
      reference code (1:8: 8:64, 4:32, 2:16, 1:8; 2:4: 16:32, 8:16, 4:8, 2:4). Option: any positive
      ``stages`` (``round(log2(m / n)) + 1`` gives as many stages as stepwise).

    ``stages`` applies to ``"geometric"`` only.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"sdgf needs integers 1 <= n <= m; got {n}:{m}")
    if kind == "stepwise":
        ratio = m / n
        if ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(f"stepwise sdgf needs m / n a power of two; got {n}:{m}")
        frames = round(math.log2(ratio)) + 1
        return [(m - 1 if i == 0 else m // 2**i, m) for i in range(frames)] if frames > 1 else [(n, m)]
    if kind == "geometric":
        if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
            raise ValueError(f"stages must be a positive int; got {stages!r}")
        return [(n * 2**k, m * 2**k) for k in reversed(range(stages))]
    raise ValueError(f"kind must be 'stepwise' or 'geometric'; got {kind!r}")


def _sdgf_topology(stages, axis, begin_step: int, end_step: int) -> Topology:
    structures = [n_of_m(a, b, axis) for a, b in stages]
    frame = (end_step - begin_step) / len(stages)

    def masks_at(inputs: TopologyInputs):
        plan = inputs.plan
        dense = lambda: [jnp.ones(leaf.shape, bool) for leaf in plan]
        branches = [dense] + [
            (lambda s=s: magnitude_masks([leaf._replace(sparsity=s.implied_sparsity, structure=s) for leaf in plan], inputs.params))
            for s in structures
        ]
        t = inputs.step.astype(jnp.float32)
        stage = jnp.where(t < begin_step, 0, 1 + jnp.clip(jnp.floor((t - begin_step) / frame), 0, len(stages) - 1))
        return lax.switch(stage.astype(jnp.int32), branches)

    def init(inputs: TopologyInputs):
        for s in structures:
            for leaf in inputs.plan:
                s.check(leaf.name, leaf.shape)
        return masks_at(inputs), ()

    return Topology(init=init, update=lambda inputs: (masks_at(inputs), inputs.aux), is_update_step=every_step)


def sdgf(
    inner: optax.GradientTransformation,
    *,
    n: int = 1,
    m: int = 8,
    axis: int = -2,
    kind: str = "stepwise",
    stages: int = 4,
    begin_step: int = 0,
    end_step: int,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
) -> optax.GradientTransformationExtraArgs:
    """SDGF: straight-through N:M training through N:M patterns that tighten in stages
    (Bambhaniya et al., 2024, arXiv 2402.04744; stages in :func:`sdgf_stages`).

    Dense before ``begin_step``; then the stages of :func:`sdgf_stages`, of equal length, up to
    ``end_step``, each an N:M mask of the dense weights recomputed every step; params comply with
    the current stage's pattern after every step and with ``n:m`` from the last stage on.

    Example (SdGf-Stepwise to 1:8: dense, 7:8, 4:8, 2:8, 1:8)::

        tx = js.sdgf(optax.adam(1e-3), n=1, m=8, begin_step=1_000, end_step=20_000)
        params, opt_state = js.init(tx, params)

    Args:
      inner: the optax transformation that trains the dense weights.
      n, m, axis: the final N:M pattern.
      kind: ``"stepwise"`` or ``"geometric"``.
      stages: the number of geometric stages (4, as in the reference code; see :func:`sdgf_stages`).
      begin_step, end_step: the window of the stages (the last starts before ``end_step``).
      include, exclude, overrides, seed: see :func:`jaxsparse.core`.
    """
    stages = sdgf_stages(n, m, kind, stages)
    if not 0 <= begin_step < end_step:
        raise ValueError(f"sdgf needs 0 <= begin_step < end_step; got {begin_step}, {end_step}")
    return sparsifier(
        inner, sparsity=None, topology=_sdgf_topology(stages, axis, begin_step, end_step), include=include,
        exclude=exclude, overrides=overrides, seed=seed, structure=n_of_m(n, m, axis), gradient_annealing=1.0,
    )

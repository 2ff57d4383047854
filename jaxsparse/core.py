"""The core sparsifier: one optax transformation that every algorithm configures.

``sparsifier(inner, sparsity=..., topology=...)`` wraps an inner optax transformation and keeps
params exactly sparse through the standard step::

    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

On every step it (DESIGN.md invariants 1, 3, 4, 6):

1. runs the topology rule under ``lax.cond`` when ``topology.is_update_step(step)``, so a
   non-update step pays nothing for it; after a topology change, every params-shaped leaf of
   the inner optimizer state (adam's moments, momentum, ...) is zeroed where a weight was pruned
   or grown, found generically with ``optax.tree_utils.tree_map_params``;
2. masks the gradients of pruned weights before the inner transformation sees them;
3. returns updates that are the inner updates on kept entries and ``-param`` on pruned ones, so
   ``apply_updates`` leaves exactly 0.0 there whatever params held before.

A *topology* is a small record of pure functions over the list of sparsified leaves (see
:class:`Topology`); pruning, dynamic sparse training and static sparsity are topologies.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxsparse.distributions import Distribution, as_distribution, check_sparsity, keep_count
from jaxsparse.leaves import match_overrides, path_to_str, select_leaves
from jaxsparse.masks import check_structure, is_none, map_masked

__all__ = [
    "SparsifierState",
    "LeafPlan",
    "TopologyInputs",
    "Topology",
    "sparsifier",
    "get_masks",
    "periodic_updates",
    "reset_inner_state",
]


class SparsifierState(NamedTuple):
    """State of :func:`sparsifier`.

    Attributes:
      masks: params-shaped tree, a bool array per sparsified leaf (True = kept), None elsewhere.
      step: number of ``update`` calls so far (int32).
      key: PRNG key; step ``t`` uses ``fold_in(key, t)``, so runs are reproducible from the seed.
      inner_state: the wrapped transformation's state.
      aux: the topology's own state (e.g. a gradient moving average), a pytree or ``()``.
    """

    masks: Any
    step: jax.Array
    key: jax.Array
    inner_state: Any
    aux: Any = ()


class LeafPlan(NamedTuple):
    """A sparsified leaf: its name, shape, target sparsity, exact budget ``N - floor(s N)``, and
    whether its target came from an override rather than the distribution."""

    name: str
    shape: tuple
    sparsity: float
    keep: int
    overridden: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class TopologyInputs(NamedTuple):
    """What a topology rule sees, as lists aligned with ``plan`` (one entry per sparsified leaf).

    ``grads`` are the raw (dense) gradients of this step, ``None`` at init.
    """

    plan: tuple[LeafPlan, ...]
    masks: list
    params: list
    grads: list | None
    step: jax.Array
    key: jax.Array
    aux: Any


class Topology(NamedTuple):
    """A topology rule: pure functions of :class:`TopologyInputs` returning ``(masks, aux)``.

    Attributes:
      init: initial masks and aux state (``inputs.masks`` are all-True).
      update: new masks and aux state on an update step.
      is_update_step: ``step -> bool`` (traced), or ``None`` for a topology that never changes.
      mask_gradients: zero the gradients of untrained weights before the inner transformation.

    Optional per-step hooks (``None``: the default behaviour), for methods that keep statistics
    or dense shadow weights in ``aux``; lists are aligned with ``inputs.plan``:

      observe: ``inputs -> (grads, aux)`` on every step before the update decision, with this
        step's raw gradients; the returned gradients replace them for the update and the inner
        transformation (a gradient moving average for SNFS, a regulariser for Top-KAST).
      trained: ``(masks, aux) -> masks`` of the entries the inner transformation trains
        (default: ``masks``). Gradients are zeroed outside them and the inner state is reset
        where they change (Top-KAST trains a superset of the forward masks).
      finish: ``(inputs, inner_updates) -> (updates, aux)`` turning the inner updates into
        param updates (default: the inner update where kept, ``-param`` where pruned). It must
        leave params exactly 0 where ``inputs.masks`` is False.
    """

    init: Callable[[TopologyInputs], tuple]
    update: Callable[[TopologyInputs], tuple] | None
    is_update_step: Callable[[jax.Array], jax.Array] | None
    mask_gradients: bool = True
    observe: Callable[[TopologyInputs], tuple] | None = None
    trained: Callable[[list, Any], list] | None = None
    finish: Callable[[TopologyInputs, list], tuple] | None = None


def check_positive_int(value, what: str, *, none_ok: bool = False):
    """``value`` if it is a positive int (not a bool), or None where ``none_ok``; else a
    ValueError naming ``what``."""
    if none_ok and value is None:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive int{' or None' if none_ok else ''}; got {value!r}")
    return value


def periodic_updates(update_every: int, begin_step: int = 0, end_step: int | None = None):
    """``step -> bool``: True at ``begin_step + j * update_every`` within ``[begin_step, end_step]``,
    and at ``end_step`` itself so a schedule always reaches its final value."""
    check_positive_int(update_every, "update_every")
    if end_step is not None and end_step < begin_step:
        raise ValueError(f"end_step ({end_step}) precedes begin_step ({begin_step})")

    def is_update_step(step):
        on_period = (step >= begin_step) & ((step - begin_step) % update_every == 0)
        if end_step is None:
            return on_period
        return (on_period & (step <= end_step)) | (step == end_step)

    return is_update_step


def _make_plan(params, distribution: Distribution, include, exclude, overrides) -> tuple[LeafPlan, ...]:
    chosen = select_leaves(params, include, exclude)
    names = [n for n, ok in chosen.items() if ok]
    fixed = match_overrides(names, overrides)
    for name, value in fixed.items():
        if value is not None:
            fixed[name] = check_sparsity(value, f"override for leaf {name!r}")
    shapes = {path_to_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    solved = distribution.solve({n: shapes[n] for n in names if n not in fixed})
    plan = []
    for name in names:
        s = fixed[name] if name in fixed else solved[name]
        if s is None:
            continue
        size = 1
        for d in shapes[name]:
            size *= int(d)
        plan.append(LeafPlan(name, shapes[name], float(s), keep_count(size, s), name in fixed))
    return tuple(plan)


def _to_list(tree, plan):
    """Leaves of a params-structured tree for the plan's leaves, in plan order."""
    by_name = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return [by_name[leaf.name] for leaf in plan]


def _masks_tree(params, plan, masks_list):
    by_name = {leaf.name: m for leaf, m in zip(plan, masks_list)}
    return jax.tree_util.tree_map_with_path(lambda p, _: by_name.get(path_to_str(p)), params)


def _with_leaves(tree, plan, values):
    """``tree`` with the plan's leaves replaced by ``values`` (a list in plan order)."""
    by_name = {leaf.name: v for leaf, v in zip(plan, values)}
    return jax.tree_util.tree_map_with_path(lambda p, x: by_name.get(path_to_str(p), x), tree)


def _keep_tree(masks):
    """Masks with ``None`` replaced by True, for tree maps that need params' structure."""
    return jax.tree.map(lambda m: True if m is None else m, masks, is_leaf=is_none)


def reset_inner_state(inner: optax.GradientTransformation, inner_state, keep):
    """Zero every params-shaped leaf of ``inner_state`` where ``keep`` (a mask tree) is False.

    Params-shaped subtrees (adam's ``mu``/``nu``, momentum traces, ``inject_hyperparams``' inner
    state, ...) are found with ``optax.tree_utils.tree_map_params``, so any optax optimizer works
    without an isinstance list; leaves whose shape differs from the mask (factored second moments
    of adafactor) are left alone. If the inner ``init`` cannot run on optax's placeholder, any
    subtree with the params tree's structure is treated as params-shaped.
    """
    keep_tree = _keep_tree(keep)

    def zero_dropped(x, m):
        if m is True or not hasattr(x, "shape") or tuple(x.shape) != tuple(m.shape):
            return x
        return jnp.where(m, x, jnp.zeros((), x.dtype))

    try:
        return optax.tree_utils.tree_map_params(
            inner, zero_dropped, inner_state, keep_tree, transform_non_params=lambda x: x, is_leaf=is_none
        )
    except Exception:  # an init that inspects its params: match subtrees by structure instead
        params_def = jax.tree.structure(keep, is_leaf=is_none)

        def is_params_like(x):
            return jax.tree.structure(x, is_leaf=is_none) == params_def

        return jax.tree.map(
            lambda sub: jax.tree.map(zero_dropped, sub, keep_tree, is_leaf=is_none) if is_params_like(sub) else sub,
            inner_state,
            is_leaf=is_params_like,
        )


def _as_key(seed):
    if isinstance(seed, int):
        return jax.random.PRNGKey(seed)
    seed = jnp.asarray(seed)
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    return seed


def sparsifier(
    inner: optax.GradientTransformation,
    *,
    sparsity,
    topology: Topology,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
) -> optax.GradientTransformationExtraArgs:
    """The core sparsifier transformation that every jaxsparse algorithm configures.

    Args:
      inner: the optax transformation to wrap (adam, sgd, a chain, ``inject_hyperparams``...).
      sparsity: a float (uniform) or a :class:`~jaxsparse.distributions.Distribution` giving
        each sparsified leaf's target sparsity.
      topology: the rule that initialises and updates masks (see :class:`Topology`).
      include, exclude: regexes on leaf paths choosing the sparsified leaves (default: floating
        leaves with ``ndim >= 2``).
      overrides: ``{regex: sparsity or None}``; a matched leaf gets that sparsity instead of the
        distribution's (``None`` keeps it dense); the distribution is solved over the rest.
      seed: int or PRNG key for the topology's randomness.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SparsifierState`.
      ``update`` requires ``params``. Put it last in an ``optax.chain`` (wrap the rest as
      ``inner``): a transformation after it would rescale the ``-param`` updates that zero
      pruned entries.
    """
    distribution = as_distribution(sparsity)
    inner = optax.with_extra_args_support(inner)
    plans: dict = {}

    def plan_for(params):
        # The plan depends only on the params' tree structure and shapes (static under jit);
        # it is cached so update does not redo the distribution's solve at every trace.
        flat, treedef = jax.tree_util.tree_flatten(params)
        signature = (treedef, tuple(tuple(getattr(x, "shape", ())) for x in flat))
        if signature not in plans:
            plans[signature] = _make_plan(params, distribution, include, exclude, overrides)
        return plans[signature]

    def init_fn(params):
        plan = plan_for(params)
        key = _as_key(seed)

        @jax.jit  # initial masks come from top-k selections: compile them rather than run op by op
        def initial_topology(params_list, key):
            inputs = TopologyInputs(
                plan=plan,
                masks=[jnp.ones(leaf.shape, bool) for leaf in plan],
                params=params_list,
                grads=None,
                step=jnp.zeros([], jnp.int32),
                key=key,
                aux=(),
            )
            return topology.init(inputs)

        masks, aux = initial_topology(_to_list(params, plan), key)
        return SparsifierState(
            masks=_masks_tree(params, plan, masks),
            step=jnp.zeros([], jnp.int32),
            key=key,
            inner_state=inner.init(params),
            aux=aux,
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("jaxsparse sparsifiers need params: call tx.update(grads, state, params)")
        check_structure(state.masks, params, "params")
        check_structure(state.masks, updates, "updates")
        plan = plan_for(params)
        masks, inner_state, aux = state.masks, state.inner_state, state.aux

        def inputs_at(masks, aux, grads_list):
            key = jax.random.fold_in(state.key, state.step)
            return TopologyInputs(plan, _to_list(masks, plan), _to_list(params, plan), grads_list, state.step, key, aux)

        def trained_tree(masks, aux):
            if topology.trained is None:
                return masks
            return _masks_tree(params, plan, topology.trained(_to_list(masks, plan), aux))

        if topology.observe is not None:
            grads_list, aux = topology.observe(inputs_at(masks, aux, _to_list(updates, plan)))
            updates = _with_leaves(updates, plan, grads_list)
        trained = trained_tree(masks, aux)

        if topology.is_update_step is not None:

            def change_topology(operands):
                old_masks, aux = operands
                new_list, aux = topology.update(inputs_at(old_masks, aux, _to_list(updates, plan)))
                return _masks_tree(params, plan, new_list), aux

            # Only masks and aux go through the cond: an untaken branch that passed the inner
            # state through would make XLA copy every moment buffer on every step.
            masks, aux = lax.cond(
                topology.is_update_step(state.step), change_topology, lambda operands: operands, (masks, aux)
            )
            # Train only entries trained both before and after a topology change: moments are
            # zeroed where a weight was pruned or grown (on other steps this select is a no-op that
            # XLA fuses into the inner update), and a weight grown now gets no gradient in this
            # step, so it is still exactly 0 with zero moments after it (as in RigL's reference
            # implementation, which updates the weights before changing the topology).
            trained = map_masked(jnp.logical_and, trained, trained_tree(masks, aux))
            inner_state = reset_inner_state(inner, inner_state, trained)

        grads = updates
        if topology.mask_gradients:
            grads = map_masked(lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype)), trained, updates)
        new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
        if topology.finish is not None:
            inputs = inputs_at(masks, aux, _to_list(grads, plan))
            finished, aux = topology.finish(inputs, _to_list(new_updates, plan))
            new_updates = _with_leaves(new_updates, plan, finished)
        else:  # pruned entries get -param: apply_updates then stores exactly 0.0 there
            new_updates = map_masked(lambda m, u, p: jnp.where(m, u, -p.astype(u.dtype)), masks, new_updates, params)
        new_state = SparsifierState(masks, state.step + 1, state.key, inner_state, aux)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unwrap_variables(tree):
    """Replace flax nnx Variables (``nnx.Optimizer`` wraps state arrays in them) by their values."""
    is_variable = lambda x: hasattr(x, "get_value") and not isinstance(x, jax.Array)
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def _find_states(tree) -> list[SparsifierState]:
    if hasattr(tree, "opt_state") and not isinstance(tree, tuple):  # nnx.Optimizer and friends
        tree = tree.opt_state
    found = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, SparsifierState))
    return [x for x in found if isinstance(x, SparsifierState)]


def get_masks(state):
    """The current masks of the jaxsparse sparsifier inside an optimizer state, however nested.

    Works on the state of ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
    ``optax.multi_transform`` and on a flax ``nnx.Optimizer`` (or its ``opt_state``). Returns a
    params-shaped tree with a bool array per sparsified leaf and ``None`` elsewhere. With several
    sparsifiers (e.g. one per parameter group), their masks are merged leaf by leaf.

    Raises:
      ValueError: if the state holds no jaxsparse sparsifier.
    """
    states = _find_states(state)
    if not states:
        raise ValueError(f"no jaxsparse sparsifier state found in {type(state).__name__}")
    merged = _unwrap_variables(states[0].masks)
    for other in states[1:]:
        merged = jax.tree.map(lambda a, b: a if b is None else b, merged, _unwrap_variables(other.masks), is_leaf=is_none)
    return merged

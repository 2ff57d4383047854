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

The sparsifier must see its updates reach params unchanged, so every other transformation
belongs inside it, as ``inner`` (``js.rigl(optax.chain(optax.clip_by_global_norm(1.0),
optax.adamw(lr)), ...)``): clipping then sees only the trained weights' gradients. A
transformation after it in ``optax.chain`` would rescale the ``-param`` updates; the sparsifier
warns when it is traced in such a chain, naming the fix.

``tx.init(params)`` cannot change params; :func:`init` returns them masked with the state, so the
first step already trains the sparse model.

**Gradient annealing** (``gradient_annealing=alpha``, a float or a ``step -> alpha`` function; the
third operation of DESIGN.md beside prune and regrow) switches the step to dense *shadow* weights
kept in the state (``state.shadow``, a params-shaped tree, None on leaves not sparsified):

1. the gradient of the loss with respect to params (the masked weights) is the straight-through
   gradient (Bengio et al., 2013); it reaches kept weights whole and pruned ones scaled by
   ``alpha(t)`` (Kundu et al., 2023, "AutoSparse", arXiv 2304.06941);
2. the inner transformation updates the shadow weights (it receives them as its ``params``, so
   weight decay decays them) and keeps dense moments: with ``alpha > 0`` a pruned weight is still
   trained, so its moments are not reset;
3. the topology rule then runs on the updated shadow weights (``inputs.params`` are the dense
   weights), so a pruned weight that its annealed gradient pushed up can come back;
4. params become the forward weights: the shadow weights on the mask, exactly 0 elsewhere (or the
   topology's ``forward``: soft thresholding for ST-3 and AutoSparse).

STE is ``alpha = 1`` with a mask recomputed every step (:mod:`jaxsparse.ste`). Where ``alpha(t)``
is 0 a pruned weight gets no update at all (its shadow value is frozen, its moments are reset
where the mask changes), and pruning topologies then choose only among kept weights, so nothing
pruned returns: ``alpha = 0`` behaves like the default ``None``, which keeps no shadow weights and
costs nothing.

A *topology* is a small record of pure functions over the list of sparsified leaves (see
:class:`Topology`); pruning, dynamic sparse training and static sparsity are topologies.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import sys
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsparse.distributions import Distribution, as_distribution, check_sparsity
from jaxsparse.leaves import match_overrides, path_to_str, select_leaves
from jaxsparse.masks import apply_masks, check_structure, is_none, map_masked
from jaxsparse.selection import check_leaf_size
from jaxsparse.structures import Structure, as_structure, structures_by_leaf

__all__ = [
    "SparsifierState",
    "LeafPlan",
    "plan_leaves",
    "TopologyInputs",
    "Topology",
    "sparsifier",
    "get_masks",
    "get_shadow",
    "get_plan",
    "StatePlan",
    "sparsifier_states",
    "init",
    "as_key",
    "periodic_updates",
    "reset_inner_state",
    "every_step",
    "as_annealing",
    "describe",
    "function_name",
]


class SparsifierState(NamedTuple):
    """State of :func:`sparsifier`.

    Attributes:
      masks: params-shaped tree, a bool array per sparsified leaf (True = kept), None elsewhere.
      step: number of ``update`` calls so far (int32).
      key: PRNG key; step ``t`` uses ``fold_in(key, t)``, so runs are reproducible from the seed.
      inner_state: the wrapped transformation's state.
      aux: the topology's own state (e.g. a gradient moving average), a pytree or ``()``.
      shadow: with gradient annealing, the dense weights the inner transformation trains (a
        params-shaped tree, None on leaves not sparsified); None otherwise.
      plan: the sparsified leaves with their targets, budgets and structures (a
        :class:`StatePlan`: static configuration with no array leaves, so it costs nothing under
        jit and is not written to checkpoints); :func:`get_plan` reads it, and
        :func:`jaxsparse.sparsity_report` takes structures and budgets from it.
    """

    masks: Any
    step: jax.Array
    key: jax.Array
    inner_state: Any
    aux: Any = ()
    shadow: Any = None
    plan: Any = None


class LeafPlan(NamedTuple):
    """A sparsified leaf: its name, shape, target sparsity, exact budget of kept entries (``N -
    floor(s N)`` unstructured; whole groups under a structure), whether its target came from an
    override rather than the distribution, and its structure (None: unstructured).

    Topologies count in *units* (:mod:`jaxsparse.structures`): ``units`` and ``keep_units`` are
    the leaf's groups (tiles, channels; entries when unstructured or N:M) and how many it keeps.
    """

    name: str
    shape: tuple
    sparsity: float
    keep: int
    overridden: bool = False
    structure: Structure | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> Structure:
        """The leaf's structure (``unstructured()`` for None)."""
        return as_structure(self.structure)

    @property
    def units(self) -> int:
        return self.layout.units(self.shape)

    @property
    def keep_units(self) -> int:
        return self.keep // self.layout.group_size(self.shape)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StatePlan:
    """The :class:`LeafPlan` of every sparsified leaf, held in :class:`SparsifierState` as static
    pytree data (no array leaves: jit, vmap and checkpoints see nothing of it), so what a state
    was trained with (structures, targets, exact budgets) can be read back from the state alone."""

    leaves: tuple

    def __hash__(self):  # cached: jit hashes the state's tree structure on every call
        try:
            return self._hash
        except AttributeError:
            object.__setattr__(self, "_hash", hash(self.leaves))
            return self._hash

    def __repr__(self):  # short: it appears in printed tree structures
        return f"StatePlan({len(self.leaves)} leaves)"


class TopologyInputs(NamedTuple):
    """What a topology rule sees, as lists aligned with ``plan`` (one entry per sparsified leaf).

    ``grads`` are the raw (dense) gradients of this step, ``None`` at init. Under a structure,
    each plan leaf carries it (``leaf.structure``, ``leaf.layout``; budgets ``leaf.keep_units`` in
    whole groups): a topology selects with :func:`jaxsparse.structures.select_top_k` (entry
    scores aggregated per group, as many leaves as wanted in shared passes),
    ``leaf.layout.select(scores, leaf.sparsity)``, or
    :func:`jaxsparse.dst.drop_and_grow` with ``structures=``, so its masks are made of whole groups.
    With gradient annealing, ``params`` are the dense shadow weights and ``alpha`` is this
    step's annealing factor (a traced float32 scalar); without, ``alpha`` is None.
    """

    plan: tuple[LeafPlan, ...]
    masks: list
    params: list
    grads: list | None
    step: jax.Array
    key: jax.Array
    aux: Any
    alpha: Any = None


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
      inner_params: ``inputs -> list`` of the weights the inner transformation updates, passed
        to it as its ``params`` (default: params). Methods that train dense shadow weights kept
        in ``aux`` (Top-KAST) return them, so anything in the inner transformation that reads
        params (adamw's weight decay, ``add_decayed_weights``, lookahead) sees the weights it
        updates.
      forward: with gradient annealing, ``inputs -> list`` of the params (forward weights) made
        from the shadow weights ``inputs.params`` and the new masks (default: the shadow weights
        where kept, exactly 0 elsewhere). It must be exactly 0 where ``inputs.masks`` is False;
        ST-3 and AutoSparse soft-threshold here.

    ``is_update_step`` may return a Python ``True`` (a rule that runs on every step, as STE's):
    the update then runs without ``lax.cond``.

    ``name`` says which method the rule is (e.g. ``"drop_and_grow(drop=magnitude, grow=random)"``),
    for :func:`describe` and so for checkpoints, which refuse to restore a run of one method into
    another whose state has the same tree; default: the module and qualified name of ``update``
    (or ``init``), which tells apart every rule whose functions differ.
    """

    init: Callable[[TopologyInputs], tuple]
    update: Callable[[TopologyInputs], tuple] | None
    is_update_step: Callable[[jax.Array], jax.Array] | None
    mask_gradients: bool = True
    observe: Callable[[TopologyInputs], tuple] | None = None
    trained: Callable[[list, Any], list] | None = None
    finish: Callable[[TopologyInputs, list], tuple] | None = None
    inner_params: Callable[[TopologyInputs], list] | None = None
    forward: Callable[[TopologyInputs], list] | None = None
    name: str | None = None


def every_step(step) -> bool:
    """``is_update_step`` of a rule that changes the topology on every step (STE and its family)."""
    del step
    return True


def as_annealing(gradient_annealing) -> Callable | None:
    """``gradient_annealing`` as a ``step -> alpha`` function (float32), or None.

    A float in [0, 1] is a constant factor; a callable (an optax schedule, or
    :func:`jaxsparse.schedules.sigmoid_cosine_decay`) is called with the traced step; None (the
    default of every preset) keeps gradients of pruned weights at zero without shadow weights.
    """
    if gradient_annealing is None:
        return None
    if callable(gradient_annealing):
        return lambda step: jnp.asarray(gradient_annealing(step), jnp.float32)
    if isinstance(gradient_annealing, bool) or not isinstance(gradient_annealing, (int, float, np.floating, np.integer)):
        raise ValueError(f"gradient_annealing must be None, a float in [0, 1] or a step -> alpha function; got {gradient_annealing!r}")
    alpha = float(gradient_annealing)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"gradient_annealing must be in [0, 1]; got {gradient_annealing!r}")
    return lambda step: jnp.float32(alpha)


# Set by :func:`describe` while it traces an init: every sparsifier's init appends its configuration.
_DESCRIBING: contextvars.ContextVar = contextvars.ContextVar("jaxsparse_describing", default=None)


def function_name(fn) -> str:
    """A short name of a function (a score, a schedule) for :attr:`Topology.name`."""
    return getattr(fn, "__name__", None) or repr(fn)


def describe(tx: optax.GradientTransformation, params) -> list[dict]:
    """What every jaxsparse sparsifier inside ``tx`` is, in the order of their ``init``: a list
    of JSON-ready dicts ``{"topology": name, "gradient_annealing": None | "constant" |
    "schedule", "leaves": {leaf: [target sparsity, structure]}}``.

    Found by tracing ``tx.init`` on ``params`` (arrays or ``jax.ShapeDtypeStruct``; nothing is
    computed), so sparsifiers nested in any optax wrapper (``chain``, ``inject_hyperparams``,
    ``MultiSteps``, ``multi_transform``) are found. Checkpoints store it (:mod:`jaxsparse.checkpoint`):
    RigL and SET, or the same method with another sparsity or structure, have states of the same
    tree, and only this tells them apart. Optimizer hyperparameters (learning rates, alpha's
    value, seeds) are not part of it: changing them on resume is legitimate.
    """
    found: list = []
    token = _DESCRIBING.set(found)
    try:  # a new function each time: eval_shape caches traces by function, and a cached trace records nothing
        jax.eval_shape(lambda p: tx.init(p), params)
    finally:
        _DESCRIBING.reset(token)
    return found


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


def plan_leaves(
    params, sparsity, *, include=None, exclude=None, overrides=None, structure=None, dense_if_untileable=False
) -> tuple[LeafPlan, ...]:
    """The sparsified leaves of ``params`` with their targets and exact budgets, in leaf order.

    What every sparsifier computes at ``init`` from its ``sparsity`` (a float or a distribution;
    None when every leaf's structure implies one, as N:M does), ``include`` / ``exclude``
    filters, ``overrides`` and ``structure`` (see :func:`sparsifier`); budgets count whole groups
    of the leaf's structure. :func:`jaxsparse.preview_sparsity` prints it as a table.
    """
    distribution = None if sparsity is None else as_distribution(sparsity)
    chosen = select_leaves(params, include, exclude)
    names = [n for n, ok in chosen.items() if ok]
    shapes = {path_to_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    structures = structures_by_leaf(names, structure)
    if dense_if_untileable:
        names = [n for n in names if structures[n].tileable(shapes[n])]
    for name in names:
        structures[name].check(name, shapes[name])
    fixed = match_overrides(names, overrides)
    for name, value in fixed.items():
        if value is not None:
            fixed[name] = check_sparsity(value, f"override for leaf {name!r}")
    free = {n: shapes[n] for n in names if n not in fixed}
    solved = {} if distribution is None else distribution.solve(free)
    plan = []
    for name in names:
        layout = structures[name]
        s = fixed[name] if name in fixed else solved.get(name, layout.implied_sparsity)
        if name not in fixed and distribution is None and s is None:
            raise ValueError(
                f"leaf {name!r} needs a target sparsity: sparsity=None is only for structures that imply one "
                f"(n_of_m), and its structure is {layout!r}"
            )
        if s is None:
            continue
        check_leaf_size(name, shapes[name])
        keep = layout.keep(shapes[name], s, name)  # checks s against the structure (N:M: 1 - n/m)
        plan.append(LeafPlan(name, shapes[name], float(s), keep, name in fixed, None if layout.is_unstructured else layout))
    return tuple(plan)


def _to_list(tree, plan):
    """Leaves of a params-structured tree for the plan's leaves, in plan order."""
    by_name = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return [by_name[leaf.name] for leaf in plan]


def _named_tree(params, by_name: dict):
    """A tree of ``params``' structure holding ``by_name[leaf name]``, and None where it has none."""
    return jax.tree_util.tree_map_with_path(lambda p, _: by_name.get(path_to_str(p)), params)


def _masks_tree(params, plan, masks_list):
    return _named_tree(params, {leaf.name: m for leaf, m in zip(plan, masks_list)})


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


def as_key(seed) -> jax.Array:
    """A raw ``uint32[2]`` PRNG key from a seed: a Python or numpy integer, an integer jax array of
    shape ``()`` (traced too, so a run can be vmapped over seeds), or a PRNG key (typed or raw)."""
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"seed must be an int or a PRNG key; got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        return jax.random.PRNGKey(int(seed))
    try:
        x = jnp.asarray(seed)
    except TypeError:
        raise ValueError(f"seed must be an int or a PRNG key; got {seed!r}") from None
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.integer) and x.shape == ():
        return jax.random.PRNGKey(x)
    if x.dtype == jnp.uint32 and x.shape == (2,):
        return x
    raise ValueError(
        f"seed must be an int, an integer array of shape () or a PRNG key; got an array of shape {x.shape} and "
        f"dtype {x.dtype}"
    )


def _warn_if_chained_before_others() -> None:
    """Warn, at trace time, when this update runs inside an ``optax.chain`` with transformations
    after it: they would change the ``-param`` updates that zero pruned entries, so params would
    keep nonzeros off the masks.

    Found from the Python stack (the chain's loop over its transformations), so it costs nothing
    in the compiled step. A check of params in the compiled step would need a host callback to
    report, and on CPU the mere presence of one slowed every step of the benchmark MLP by ~30%,
    so it is not done.
    """
    frame = sys._getframe(2)
    while frame is not None:
        in_optax = frame.f_globals.get("__name__", "").startswith("optax.")
        if in_optax and frame.f_code.co_name == "update_fn" and "update_fns" in frame.f_locals:
            fns, fn = frame.f_locals.get("update_fns"), frame.f_locals.get("fn")
            position = [i for i, f in enumerate(fns or ()) if f is fn]
            if position and position[-1] < len(fns) - 1:
                warnings.warn(
                    f"a jaxsparse sparsifier runs inside optax.chain with {len(fns) - 1 - position[-1]} "
                    "transformation(s) after it: they change the updates that keep pruned weights at exactly 0, "
                    "so params will hold nonzeros off the masks. Put every other transformation inside the "
                    "sparsifier's inner optimizer instead: js.magnitude_pruning(optax.chain(optax.clip_by_global_norm(1.0), "
                    "optax.adamw(lr)), ...)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return
        frame = frame.f_back


def _not_a_state_message(state) -> str:
    kind = type(state).__name__
    if _looks_restored(state):
        return (
            f"the sparsifier state is a {kind} with the fields of SparsifierState: it was restored from a "
            "checkpoint without a target, which turns NamedTuples into dicts and lists. Restore into the "
            "abstract state instead, e.g. orbax: manager.restore(step, args=ocp.args.StandardRestore("
            "jax.eval_shape(tx.init, params)))"
        )
    return f"expected the state returned by this sparsifier's init (a SparsifierState); got a {kind}"


def _looks_restored(x) -> bool:
    # ``shadow`` may be missing from a checkpoint written before gradient annealing existed, and
    # ``plan`` (static, no arrays) is never written
    fields = set(SparsifierState._fields)
    return isinstance(x, dict) and set(x) in (fields, fields - {"plan"}, fields - {"shadow", "plan"})


def sparsifier(
    inner: optax.GradientTransformation,
    *,
    sparsity,
    topology: Topology,
    include=None,
    exclude=None,
    overrides=None,
    seed=0,
    structure=None,
    dense_if_untileable: bool = False,
    gradient_annealing=None,
) -> optax.GradientTransformationExtraArgs:
    """The core sparsifier transformation that every jaxsparse algorithm configures.

    Args:
      inner: the optax transformation to wrap (adam, sgd, a chain, ``inject_hyperparams``...).
      sparsity: a float (uniform) or a :class:`~jaxsparse.distributions.Distribution` giving
        each sparsified leaf's target sparsity; None with a structure that implies it (N:M).
      topology: the rule that initialises and updates masks (see :class:`Topology`).
      include, exclude: regexes on leaf paths choosing the sparsified leaves (default: the
        weights of dense, convolution, attention and embedding layers; no bias, norm parameter
        or positional table: :func:`jaxsparse.leaves.is_sparsifiable`).
      overrides: ``{regex: sparsity or None}``; a matched leaf gets that sparsity instead of the
        distribution's (``None`` keeps it dense); the distribution is solved over the rest.
      seed: int or PRNG key for the topology's randomness.
      structure: how scores become masks (:mod:`jaxsparse.structures`): None (unstructured),
        ``js.n_of_m(2, 4)``, ``js.blocks(128, 128)``, ``js.channels()``, ``js.constant_fan_in()``,
        or ``{regex: structure or None}`` per leaf (first match; unmatched leaves unstructured).
        Budgets count whole groups (a leaf of ``T`` tiles at ``s`` keeps ``T - floor(s T)``
        tiles; N:M keeps ``n`` of every ``m``), and the topology selects whole groups by their
        aggregated scores, so dynamic sparse training keeps each leaf's group count constant.
      dense_if_untileable: a leaf the structure cannot tile raises a ValueError naming the leaf,
        its shape and the structure; True keeps such leaves dense instead.
      gradient_annealing: None (default: gradients of pruned weights are zero, no shadow
        weights), or a float in [0, 1] or a ``step -> alpha`` function: train dense shadow
        weights kept in the state, pruned positions' gradients scaled by ``alpha(t)`` (see the
        module docstring). Not with a topology that keeps its own shadow weights (``finish``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SparsifierState`.
      ``update`` requires ``params``. Give every other transformation as (part of) ``inner``
      rather than chaining it before or after: a transformation after it would rescale the
      ``-param`` updates that zero pruned entries (the sparsifier warns when traced so), one before it would
      see the pruned weights' gradients (``clip_by_global_norm`` would count them).
    """
    distribution = None if sparsity is None else as_distribution(sparsity)
    if not isinstance(structure, dict):
        layout = as_structure(structure)  # a bad value fails here rather than at init
        if distribution is None and layout.implied_sparsity is None:
            raise ValueError(
                f"sparsity is required with the structure {layout!r} (only n_of_m implies one); got None"
            )
        if layout.implied_sparsity is not None and distribution is not None:  # N:M: fail before init too
            if distribution.name != "uniform":
                raise ValueError(
                    f"{layout!r} fixes every leaf's sparsity at {layout.implied_sparsity:g}; got the distribution "
                    f"{distribution!r}: omit the sparsity (sparsity=None) or give that number"
                )
            layout.check_sparsity(distribution.sparsity)
    inner = optax.with_extra_args_support(inner)
    annealing = as_annealing(gradient_annealing)
    if annealing is not None and (topology.finish is not None or topology.inner_params is not None):
        raise ValueError(
            "gradient_annealing needs the core's shadow weights, but this topology keeps its own (it defines "
            "finish or inner_params, as Top-KAST does)"
        )
    # A constant positive alpha never freezes a pruned weight: no per-step reset of the moments.
    may_vanish = annealing is not None and (callable(gradient_annealing) or float(gradient_annealing) == 0.0)
    plans: dict = {}

    def plan_for(params):
        # The plan depends only on the params' tree structure and shapes (static under jit);
        # it is cached so update does not redo the distribution's solve at every trace.
        flat, treedef = jax.tree_util.tree_flatten(params)
        signature = (treedef, tuple(tuple(getattr(x, "shape", ())) for x in flat))
        if signature not in plans:
            plans[signature] = plan_leaves(
                params, distribution, include=include, exclude=exclude, overrides=overrides, structure=structure,
                dense_if_untileable=dense_if_untileable,
            )
        return plans[signature]

    def init_fn(params):
        plan = plan_for(params)
        key = as_key(seed)
        if _DESCRIBING.get() is not None:
            rule = topology.update or topology.init
            _DESCRIBING.get().append({
                "topology": topology.name or f"{rule.__module__}.{rule.__qualname__}",
                "gradient_annealing": None if annealing is None else ("schedule" if callable(gradient_annealing) else "constant"),
                "leaves": {leaf.name: [leaf.sparsity, repr(leaf.layout)] for leaf in plan},
            })

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
            shadow=None if annealing is None else _masks_tree(params, plan, _to_list(params, plan)),
            plan=StatePlan(plan),
        )

    def annealed_update(updates, state, params, extra_args, plan):
        """The step with dense shadow weights (see the module docstring)."""
        alpha = annealing(state.step)
        key = jax.random.fold_in(state.key, state.step)
        masks, aux = _to_list(state.masks, plan), state.aux
        shadow = _to_list(state.shadow, plan)

        def inputs_at(masks, aux, grads, weights):
            return TopologyInputs(plan, masks, weights, grads, state.step, key, aux, alpha)

        grads = _to_list(updates, plan)
        if topology.observe is not None:
            grads, aux = topology.observe(inputs_at(masks, aux, grads, shadow))
        # The gradient with respect to the masked params is the straight-through gradient; the
        # pruned positions get it scaled by alpha(t).
        annealed = [jnp.where(m, g, (alpha * g.astype(jnp.float32)).astype(g.dtype)) for m, g in zip(masks, grads)]
        inner_updates, inner_state = inner.update(
            _with_leaves(updates, plan, annealed), state.inner_state, _with_leaves(params, plan, shadow), **extra_args
        )
        # A pruned weight moves only while alpha > 0 (momentum or weight decay would move it too).
        moves = alpha > 0
        shadow = [
            jnp.where(m | moves, (w + u.astype(w.dtype)).astype(w.dtype), w)
            for m, w, u in zip(masks, shadow, _to_list(inner_updates, plan))
        ]
        new_masks = masks
        if topology.is_update_step is not None:
            change = lambda operands: topology.update(inputs_at(operands[0], operands[1], grads, shadow))
            predicate = topology.is_update_step(state.step)
            if predicate is True:
                new_masks, aux = change((masks, aux))
            else:
                new_masks, aux = lax.cond(predicate, change, lambda operands: operands, (masks, aux))
            if may_vanish:  # where alpha is 0, moments restart where the mask changed (as without annealing)
                keep = [(m & n) | moves for m, n in zip(masks, new_masks)]
                inner_state = reset_inner_state(inner, inner_state, _masks_tree(params, plan, keep))
        inputs = inputs_at(new_masks, aux, grads, shadow)
        if topology.forward is not None:
            forward = topology.forward(inputs)
        else:
            forward = [jnp.where(m, w, jnp.zeros((), w.dtype)) for m, w in zip(new_masks, shadow)]
        # apply_updates adds in the params' dtype: params become exactly the forward weights
        new_updates = _with_leaves(
            inner_updates, plan, [(f.astype(p.dtype) - p) for f, p in zip(forward, _to_list(params, plan))]
        )
        new_state = SparsifierState(
            _masks_tree(params, plan, new_masks), state.step + 1, state.key, inner_state, aux,
            _masks_tree(params, plan, shadow), state.plan,
        )
        return new_updates, new_state

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("jaxsparse sparsifiers need params: call tx.update(grads, state, params)")
        if not isinstance(state, SparsifierState):
            raise ValueError(_not_a_state_message(state))
        check_structure(state.masks, params, "params")
        check_structure(state.masks, updates, "updates")
        _warn_if_chained_before_others()
        plan = plan_for(params)
        if annealing is not None:
            return annealed_update(updates, state, params, extra_args, plan)
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
        inner_params = params
        if topology.inner_params is not None:
            inner_params = _with_leaves(params, plan, topology.inner_params(inputs_at(masks, aux, _to_list(grads, plan))))
        new_updates, inner_state = inner.update(grads, inner_state, inner_params, **extra_args)
        if topology.finish is not None:
            inputs = inputs_at(masks, aux, _to_list(grads, plan))
            finished, aux = topology.finish(inputs, _to_list(new_updates, plan))
            new_updates = _with_leaves(new_updates, plan, finished)
        else:  # pruned entries get -param: apply_updates then stores exactly 0.0 there
            new_updates = map_masked(lambda m, u, p: jnp.where(m, u, -p.astype(u.dtype)), masks, new_updates, params)
        new_state = SparsifierState(masks, state.step + 1, state.key, inner_state, aux, None, state.plan)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unwrap_variables(tree):
    """Replace flax nnx Variables (``nnx.Optimizer`` wraps state arrays in them) by their values."""
    is_variable = lambda x: hasattr(x, "get_value") and not isinstance(x, jax.Array)
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def _is_state(x) -> bool:
    return isinstance(x, SparsifierState) or _looks_restored(x)


def sparsifier_states(tree) -> list:
    """Every jaxsparse sparsifier state inside an optimizer state, however nested (also dicts
    restored from a checkpoint without a target); empty when there is none."""
    if hasattr(tree, "opt_state") and not isinstance(tree, tuple):  # nnx.Optimizer and friends
        tree = tree.opt_state
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_state) if _is_state(x)]


def _is_masked_node(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _children(x):
    """One level of a pytree node: ``(children, treedef)``, ``None`` children kept."""
    return jax.tree_util.tree_flatten(x, is_leaf=lambda c: c is not x)


def _merge_masks(a, b):
    """Merge two mask trees of sparsifiers that own different leaves (``optax.multi_transform``).

    Where one tree has a leaf's mask the other has ``None`` there or an ``optax.MaskedNode``
    standing for the subtree it does not own (with prefix labels, a whole layer).
    """
    if _is_masked_node(a) or a is None:
        return b
    if _is_masked_node(b) or b is None:
        return a
    a_children, a_def = _children(a)
    b_children, b_def = _children(b)
    if jax.tree_util.treedef_is_leaf(a_def) or a_def != b_def:  # two masks for one leaf, or different trees
        raise ValueError(
            f"cannot merge the masks of two sparsifiers: both own the same leaves, or their trees differ "
            f"({a_def} vs {b_def})"
        )
    return jax.tree_util.tree_unflatten(a_def, [_merge_masks(x, y) for x, y in zip(a_children, b_children)])


def get_masks(state, params=None):
    """The current masks of the jaxsparse sparsifiers inside an optimizer state, however nested.

    Works on the state of ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
    ``optax.multi_transform`` and on a flax ``nnx.Optimizer`` (or its ``opt_state``), and on a
    state restored from a checkpoint without a target (dicts and lists). Returns a params-shaped
    tree with a bool array per sparsified leaf and ``None`` elsewhere. With several sparsifiers
    (e.g. one per parameter group of ``optax.multi_transform``), their masks are merged.

    Args:
      state: the optimizer state.
      params: optional params tree (arrays or ``jax.ShapeDtypeStruct``). Needed only to get the
        exact params structure back under ``optax.multi_transform`` with prefix labels (such as
        ``{"Dense_1": "dense"}``), where optax replaces a whole subtree that no sparsifier sees by
        one node: without params that subtree comes back as a single ``None``.

    Raises:
      ValueError: if the state holds no jaxsparse sparsifier.
    """
    states = sparsifier_states(state)
    if not states:
        raise ValueError(
            f"no jaxsparse sparsifier state found in {type(state).__name__}: pass the state returned by the "
            "sparsifier's init (or by an optax transformation wrapping it)"
        )
    trees = [_unwrap_variables(s.masks if isinstance(s, SparsifierState) else s["masks"]) for s in states]
    merged = functools.reduce(_merge_masks, trees)
    merged = jax.tree.map(lambda x: None if _is_masked_node(x) else x, merged, is_leaf=lambda x: _is_masked_node(x) or x is None)
    if params is None:
        return merged
    return _named_tree(params, {path_to_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(merged)[0]})


def get_shadow(state):
    """The dense shadow weights of the jaxsparse sparsifiers with gradient annealing inside an
    optimizer state, however nested (like :func:`get_masks`): a params-shaped tree with the dense
    weights on sparsified leaves and ``None`` elsewhere (several sparsifiers: merged).

    These are the weights the inner optimizer trains under ``gradient_annealing=`` and in the
    straight-through family (STE, SR-STE, ST-3, AutoSparse, MDGF, SDGF); params hold their forward
    (masked) version.

    Raises:
      ValueError: if the state holds no sparsifier with shadow weights.
    """
    states = sparsifier_states(state)
    trees = [s.shadow if isinstance(s, SparsifierState) else s.get("shadow") for s in states]
    trees = [_unwrap_variables(t) for t in trees if t is not None]
    if not trees:
        raise ValueError(
            "no shadow weights in this state: they exist only with gradient_annealing= (and in the STE family); "
            "Top-KAST keeps its own in state.aux.shadow"
        )
    merged = functools.reduce(_merge_masks, trees)
    return jax.tree.map(lambda x: None if _is_masked_node(x) else x, merged, is_leaf=lambda x: _is_masked_node(x) or x is None)


def get_plan(state) -> dict:
    """``{leaf name: LeafPlan}`` of every sparsifier inside an optimizer state, however nested
    (like :func:`get_masks`): each sparsified leaf's target sparsity, exact budget and structure
    (``leaf.layout``; ``leaf.keep_units`` whole groups), as the sparsifier planned them at init.

    Raises:
      ValueError: if the state holds no sparsifier, or one without a plan (a state restored from
        a checkpoint without a target: restore into ``jax.eval_shape(tx.init, params)``).
    """
    states = sparsifier_states(state)
    if not states:
        raise ValueError(
            f"no jaxsparse sparsifier state found in {type(state).__name__}: pass the state returned by the "
            "sparsifier's init (or by an optax transformation wrapping it)"
        )
    plans = [s.plan if isinstance(s, SparsifierState) else s.get("plan") for s in states]
    if any(not isinstance(p, StatePlan) for p in plans):
        raise ValueError(
            "a sparsifier state has no plan: it was restored from a checkpoint without a target (dicts). Restore "
            "into the abstract state instead (jax.eval_shape(tx.init, params))"
        )
    return {leaf.name: leaf for p in plans for leaf in p.leaves}


def init(tx: optax.GradientTransformation, params):
    """Initialise a sparsified optimizer and return ``(masked_params, state)``.

    ``tx.init`` cannot change params, so after it the params are still dense while the masks
    already hold the initial topology (random for static sparsity and dynamic sparse training,
    magnitude-chosen for Top-KAST): the first step would train the dense model. This applies the
    initial masks, so step 0 already trains the sparse model::

        params, opt_state = js.init(tx, params)

    Works for any transformation that contains jaxsparse sparsifiers (``optax.chain``,
    ``inject_hyperparams``, ``MultiSteps``, ``multi_transform``); for one that contains none
    (a dense baseline run by the same loop) params come back unchanged. For flax nnx, see
    :func:`jaxsparse.nnx_optimizer`.
    """
    state = tx.init(params)
    if not sparsifier_states(state):
        return params, state
    return apply_masks(params, get_masks(state, params)), state

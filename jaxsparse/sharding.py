"""State shardings from params shardings (DESIGN.md invariant 7: sharding follows params).

Every array of an optimizer state that belongs to one param (its mask, adam's moments, a
momentum trace, SNFS's gradient average, the dense shadow weights of gradient annealing and of
the straight-through family, Top-KAST's shadow weights and backward masks) takes that param's
sharding; everything else (step counters, PRNG keys, scalars such as the per-layer thresholds of
ST-3 and AutoSparse) is replicated. No partition spec is written for the state:
:func:`state_shardings` derives it from the params' shardings, for ``jax.jit(...,
out_shardings=...)`` and for restoring a checkpoint into sharded abstract targets
(:func:`abstract_state`), also onto another mesh.

A state leaf belongs to a param when

1. its key path ends with the param's path and it has the param's shape (params-shaped subtrees:
   masks, optax moments and traces, ``inject_hyperparams``, ``MultiSteps``, ``chain``), or
2. it sits in a sparsifier's ``aux`` at a list index ``i`` with the shape of the sparsifier's
   ``i``-th sparsified leaf (per-leaf lists of topologies, aligned with the plan, which is the
   order of the sparsified leaves in the state's masks).

Selection itself never gathers a sharded param: every preset's topology update is built from
elementwise scores, histogram scatter-adds and reductions that XLA partitions into per-device
partial results and an all-reduce (:mod:`jaxsparse.selection`); the presets' docstrings say which.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxsparse.core import SparsifierState
from jaxsparse.leaves import path_to_str
from jaxsparse.masks import is_none

__all__ = ["state_shardings", "abstract_state", "param_shardings", "replicated_like"]


def replicated_like(sharding):
    """A fully replicated sharding on the devices of ``sharding`` (a NamedSharding's mesh)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if len(sharding.device_set) == 1:
        return sharding
    raise ValueError(
        f"params must be placed with NamedSharding (jax.sharding.NamedSharding(mesh, spec)) or on one device; "
        f"got {type(sharding).__name__}"
    )


def param_shardings(params, shardings=None):
    """Each param's sharding: ``shardings`` if given, else the params' own ``.sharding``, and the
    default device for a ``jax.ShapeDtypeStruct`` without one."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, params)
    return shardings


def _param_shardings(params, shardings):
    shardings = param_shardings(params, shardings)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(flat_params) != len(flat_shardings):
        raise ValueError(f"shardings has {len(flat_shardings)} leaves for params' {len(flat_params)}")
    return {path_to_str(p): (tuple(x.shape), s) for (p, x), s in zip(flat_params, flat_shardings)}


def _is_state(x):
    return isinstance(x, SparsifierState)


def _shardings_of(state, by_name: dict):
    """Shardings for every array leaf of ``state`` by the rules of the module docstring."""
    replicated = replicated_like(next(iter(by_name.values()))[1]) if by_name else None
    names = sorted(by_name, key=len, reverse=True)  # longest suffix wins

    def by_path(path, x):
        text = path_to_str(path)
        for name in names:
            shape, sharding = by_name[name]
            if (text == name or text.endswith("/" + name)) and tuple(x.shape) == shape:
                return sharding
        return None

    def generic(path, x):
        return by_path(path, x) or replicated

    def sparsifier(path, s: SparsifierState):
        plan = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(s.masks)[0]]
        plan = [name for name in plan if name in by_name]

        def aux_leaf(aux_path, x):
            found = by_path(aux_path, x)
            if found is None:
                index = [k.idx for k in aux_path if isinstance(k, jax.tree_util.SequenceKey)]
                if index and index[-1] < len(plan) and tuple(x.shape) == by_name[plan[index[-1]]][0]:
                    found = by_name[plan[index[-1]]][1]
            return found or replicated

        return SparsifierState(
            masks=jax.tree_util.tree_map_with_path(generic, s.masks),
            step=replicated,
            key=replicated,
            inner_state=jax.tree_util.tree_map_with_path(generic, s.inner_state),
            aux=jax.tree_util.tree_map_with_path(aux_leaf, s.aux),
            shadow=jax.tree_util.tree_map_with_path(generic, s.shadow),
            plan=s.plan,
        )

    return jax.tree_util.tree_map_with_path(
        lambda p, x: sparsifier(p, x) if _is_state(x) else generic(p, x), state, is_leaf=_is_state
    )


def state_shardings(tx, params, shardings=None):
    """The shardings of ``tx.init(params)``'s state, derived from the params' shardings.

    Args:
      tx: any optax transformation (jaxsparse sparsifiers, chains and wrappers of them, or none).
      params: arrays or ``jax.ShapeDtypeStruct`` (nothing is computed: ``jax.eval_shape``).
      shardings: a tree of the params' structure holding each param's sharding (default: the
        params' own ``.sharding``), e.g. NamedShardings on a ``("data", "model")`` mesh.

    Returns:
      A tree of the state's structure with a sharding per array: the param's for arrays that
      belong to a param (module docstring), replicated for the others. Use it as the state's
      ``out_shardings`` of a jitted init and step::

        state_sh = js.state_shardings(tx, params)
        init = jax.jit(tx.init, out_shardings=state_sh)
        step = jax.jit(train_step, out_shardings=(params_sh, state_sh))
    """
    by_name = _param_shardings(params, shardings)
    return _shardings_of(jax.eval_shape(tx.init, params), by_name)


def abstract_state(tx, params, shardings=None):
    """``jax.ShapeDtypeStruct`` of ``tx.init(params)``'s state with :func:`state_shardings`:
    the target to restore a checkpoint into (orbax ``StandardRestore``), on any mesh."""
    abstract = jax.eval_shape(tx.init, params)
    by_name = _param_shardings(params, shardings)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, _shardings_of(abstract, by_name)
    )

"""Helpers shared by the dynamic sparse training tests: run a transformation and record every step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import optax

import jaxsparse as js
from conformance import batch, mlp_loss, mlp_params


class Record(NamedTuple):
    """What a step left behind, as numpy: params, masks (``{name: bool array}``), the state."""

    params: dict
    masks: dict
    state: object


def named(tree) -> dict:
    """``{leaf name: numpy array}`` of a tree's leaves."""
    return {js.path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def make_step(tx, loss=mlp_loss):
    """The jitted standard optax step for ``tx``."""

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run(tx, steps, params=None, loss=mlp_loss, batches=batch, step=None, state=None):
    """Train with the standard jitted optax loop (``step`` from :func:`make_step` to reuse a
    compiled one, ``state`` to start from a given state); returns ``[initial record, record
    after each step]``."""
    params = mlp_params() if params is None else params
    state = jax.jit(tx.init)(params) if state is None else state
    step = make_step(tx, loss) if step is None else step
    records = [Record(named(params), named(js.get_masks(state)), state)]
    for t in range(steps):
        params, state = step(params, state, *batches(t))
        records.append(Record(named(params), named(js.get_masks(state)), state))
    return records


def params_shaped_leaves(inner_state, name, shape):
    """Leaves of an optimizer state at leaf ``name`` with the param's shape (moments, traces)."""
    found = []
    for path, x in jax.tree_util.tree_flatten_with_path(inner_state)[0]:
        if js.path_to_str(path).endswith(name) and tuple(np.shape(x)) == tuple(shape):
            found.append(np.asarray(x))
    return found

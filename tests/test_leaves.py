from typing import NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxsparse as js


class Dense(NamedTuple):
    kernel: jax.Array
    bias: jax.Array


def test_paths_for_dicts_and_namedtuples():
    tree = {"a": Dense(jnp.ones((2, 3)), jnp.ones(3)), "b": [jnp.ones((4, 4)), jnp.ones((1,), jnp.int32)]}
    assert js.leaf_paths(tree) == ["a/kernel", "a/bias", "b/0", "b/1"]
    assert js.select_leaves(tree) == {"a/kernel": True, "a/bias": False, "b/0": True, "b/1": False}


class Box:
    """A pytree node registered without key names: its children get ``FlattenedIndexKey``s."""

    def __init__(self, children):
        self.children = children


jax.tree_util.register_pytree_node(Box, lambda b: (b.children, None), lambda _, c: Box(list(c)))


def test_paths_for_int_keys_and_nodes_without_key_names():
    tree = {"box": Box([jnp.ones(2), {0: jnp.ones(2), 1: [jnp.ones(2)]}])}
    assert js.leaf_paths(tree) == ["box/0", "box/1/0", "box/1/1/0"]


@pytest.mark.compat
def test_flax_linen_params():
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))
    chosen = js.select_leaves(variables)
    assert chosen == {
        "params/layers_0/bias": False,
        "params/layers_0/kernel": True,
        "params/layers_2/bias": False,
        "params/layers_2/kernel": True,
    }


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)


def test_flax_nnx_state_names_drop_variable_value():
    state = nnx.state(NnxMLP(nnx.Rngs(0)), nnx.Param)
    assert sorted(js.leaf_paths(state)) == ["hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
    masks = js.dense_masks(state)
    counts = js.count_nonzeros(masks)
    assert counts == {"hidden/kernel": 40, "out/kernel": 16}


def test_equinox_module():
    model = eqx.nn.MLP(5, 2, 8, depth=1, key=jax.random.PRNGKey(0))
    params = eqx.filter(model, eqx.is_array)
    chosen = js.select_leaves(params)
    assert chosen == {"layers/0/weight": True, "layers/0/bias": False, "layers/1/weight": True, "layers/1/bias": False}
    masks = js.dense_masks(params)
    sparse = js.apply_masks(params, jax.tree.map(lambda m: m.at[0].set(False), masks))
    assert float(jnp.abs(sparse.layers[0].weight[0]).sum()) == 0.0
    assert jnp.array_equal(sparse.layers[0].bias, params.layers[0].bias)


def test_include_exclude():
    tree = {"embed": jnp.ones((10, 4)), "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "head": jnp.ones((4, 2))}
    assert js.select_leaves(tree, exclude="head|embed") == {
        "embed": False, "dense/kernel": True, "dense/bias": False, "head": False,
    }
    # include can pick a 1-D leaf explicitly
    assert js.select_leaves(tree, include=["dense/"]) == {
        "embed": False, "dense/kernel": True, "dense/bias": True, "head": False,
    }


def test_patterns_that_match_nothing_or_are_invalid_raise():
    tree = {"dense": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match="'conv' matches no leaf"):
        js.select_leaves(tree, include="conv")
    with pytest.raises(ValueError, match="exclude pattern 'Dense_9'"):
        js.select_leaves(tree, exclude="Dense_9")
    with pytest.raises(ValueError, match="invalid regular expression"):
        js.select_leaves(tree, include="(")
    with pytest.raises(ValueError, match="override pattern 'head' matches no sparsified leaf"):
        js.leaves.match_overrides(["dense/kernel"], {"head": 0.5})

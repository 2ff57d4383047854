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


# Default rule on real models: every kernel / weight / token embedding is sparsified; no bias,
# no norm parameter, no positional table, whatever its shape.


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(100, 32)(tokens)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, 16, 32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h)
        h = nn.DenseGeneral((4, 8))(nn.LayerNorm()(x))  # kernel (32, 4, 8), bias (4, 8)
        x = x + nn.DenseGeneral(32, axis=(-2, -1))(h)  # kernel (4, 8, 32)
        return nn.Conv(16, (3,))(nn.RMSNorm()(x))


def test_default_rule_on_a_flax_linen_transformer_block():
    variables = LinenBlock().init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    chosen = js.select_leaves(variables)
    attn = "params/MultiHeadDotProductAttention_0"
    kernels = [f"{attn}/{p}/kernel" for p in ("query", "key", "value", "out")] + [
        "params/DenseGeneral_0/kernel", "params/DenseGeneral_1/kernel", "params/Embed_0/embedding",
        "params/Conv_0/kernel",
    ]
    assert sorted(n for n, ok in chosen.items() if ok) == sorted(kernels)
    # the leaves the old ndim >= 2 rule got wrong are among those left dense
    for name in (f"{attn}/query/bias", "params/DenseGeneral_0/bias", "params/pos_embedding"):
        assert chosen[name] is False


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(100, 32, rngs=rngs)
        self.pos_embedding = nnx.Param(jnp.zeros((1, 16, 32)))
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=rngs)
        self.proj = nnx.LinearGeneral(32, (4, 8), rngs=rngs)
        self.ln = nnx.LayerNorm(32, rngs=rngs)
        self.rms = nnx.RMSNorm(32, rngs=rngs)
        self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)


def test_default_rule_on_flax_nnx_modules():
    state = nnx.state(NnxBlock(nnx.Rngs(0)), nnx.Param)
    kernels = [f"attn/{p}/kernel" for p in ("query", "key", "value", "out")] + [
        "proj/kernel", "embed/embedding", "conv/kernel",
    ]
    for tree in (state, nnx.to_pure_dict(state)):
        chosen = js.select_leaves(tree)
        assert sorted(n for n, ok in chosen.items() if ok) == sorted(kernels)
        assert {"attn/query/bias", "proj/bias", "pos_embedding", "ln/scale", "rms/scale"} <= set(chosen)


class EqxBlock(eqx.Module):
    conv: eqx.nn.Conv2d
    attn: eqx.nn.MultiheadAttention
    ln: eqx.nn.LayerNorm
    linear: eqx.nn.Linear
    embed: eqx.nn.Embedding

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(3, 16, 3, key=k[0])  # bias of shape (16, 1, 1)
        self.attn = eqx.nn.MultiheadAttention(
            4, 32, use_query_bias=True, use_key_bias=True, use_value_bias=True, use_output_bias=True, key=k[1]
        )
        self.ln = eqx.nn.LayerNorm(32)
        self.linear = eqx.nn.Linear(32, 8, key=k[2])
        self.embed = eqx.nn.Embedding(100, 32, key=k[3])


def test_default_rule_on_equinox_modules():
    params = eqx.filter(EqxBlock(jax.random.PRNGKey(0)), eqx.is_array)
    assert params.conv.bias.shape == (16, 1, 1)
    chosen = js.select_leaves(params)
    weights = [f"attn/{p}_proj/weight" for p in ("query", "key", "value", "output")] + [
        "conv/weight", "linear/weight", "embed/weight",
    ]
    assert sorted(n for n, ok in chosen.items() if ok) == sorted(weights)
    assert chosen["conv/bias"] is False and chosen["ln/weight"] is False


def test_default_rule_names_and_shapes():
    tree = {
        "wpe": jnp.ones((64, 8)),  # GPT-2's positional table
        "pos": jnp.ones((64, 8)),  # the positional table of examples/sparse_attention_lm.py
        "wte": jnp.ones((100, 8)),  # GPT-2's token table
        "embeddings": {"position_embeddings": {"embedding": jnp.ones((64, 8))}},
        "Transformer": {"posembed_input": {"pos_embedding": jnp.ones((1, 64, 8))}},
        "decoder": {"embed_positions": {"embedding": jnp.ones((64, 8))}, "rel_pos_h": jnp.ones((15, 8))},
        "cls": jnp.ones((1, 1, 8)),  # one axis of size > 1: a vector
        "head": {"kernel": jnp.ones((8, 1)), "scale": jnp.ones((4, 8)), "offset": jnp.ones((4, 8))},
        "conv1x1": jnp.ones((1, 1, 8, 16)),
    }
    assert js.select_leaves(tree) == {
        "wpe": False, "pos": False, "wte": True, "embeddings/position_embeddings/embedding": False,
        "Transformer/posembed_input/pos_embedding": False, "cls": False,
        "decoder/embed_positions/embedding": False, "decoder/rel_pos_h": False,
        "head/kernel": False, "head/offset": False, "head/scale": False, "conv1x1": True,
    }
    # include= still picks any floating leaf explicitly
    assert js.select_leaves(tree, include="wpe|cls|head/scale") == {
        **{n: False for n in js.leaf_paths(tree)}, "wpe": True, "cls": True, "head/scale": True,
    }
    assert js.leaves.is_sparsifiable("dense/kernel", jnp.ones((4, 4)))
    assert not js.leaves.is_sparsifiable("dense/bias", jnp.ones((4, 4)))
    assert not js.leaves.is_sparsifiable("dense/kernel", jnp.ones((4, 4), jnp.int32))

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.core.partition import trainable_base_paths
from jlora.core.paths import leaves


def params_tree():
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return {
        "params": {
            "layer_0": {
                "query": {"kernel": arr(4, 4), "bias": arr(4)},
                "key": {"kernel": arr(4, 4), "bias": arr(4)},
                "value": {"kernel": arr(4, 4)},
                "norm": {"scale": arr(4), "bias": arr(4)},
            },
            "head": {"kernel": arr(4, 2), "bias": arr(2)},
        }
    }


ALL_BIASES = [
    "params/head/bias", "params/layer_0/key/bias", "params/layer_0/norm/bias", "params/layer_0/query/bias",
]


@pytest.mark.parametrize(
    "bias, expected",
    [("none", []), ("all", ALL_BIASES), ("lora_only", ["params/layer_0/query/bias"])],
)
def test_bias_modes_choose_exactly_these_paths(bias, expected):
    params = params_tree()
    adapters = jlora.init(params, rank=2)  # query and value; value has no bias
    assert sorted(trainable_base_paths(params, adapters, bias)) == expected
    frozen, trainable = jlora.split(params, adapters, bias=bias)
    assert sorted(p for p, _ in leaves(trainable.base)) == expected
    holes = [p for p, leaf in leaves(frozen, is_leaf=lambda x: x is None) if leaf is None]
    assert sorted(holes) == expected
    for path, leaf in leaves(trainable.base):
        np.testing.assert_array_equal(leaf, dict(leaves(params))[path])


def test_lora_only_follows_the_adapted_modules():
    params = params_tree()
    adapters = jlora.init(params, rank=2, targets=["key", "head"])
    assert sorted(trainable_base_paths(params, adapters, "lora_only")) == ["params/head/bias", "params/layer_0/key/bias"]


def test_split_keeps_the_adapters_as_they_are():
    params = params_tree()
    adapters = jlora.init(params, rank=2)
    _, trainable = jlora.split(params, adapters)
    assert trainable.adapters is adapters
    assert trainable.base == {}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_combine_inverts_split(bias):
    params = params_tree()
    adapters = jlora.init(params, rank=2)
    frozen, trainable = jlora.split(params, adapters, bias=bias)
    back, back_adapters = jlora.combine(frozen, trainable)
    assert back_adapters is adapters
    chex.assert_trees_all_equal(back, params)


def test_combine_puts_updated_base_leaves_in_place():
    params = params_tree()
    adapters = jlora.init(params, rank=2)
    frozen, trainable = jlora.split(params, adapters, bias="lora_only")
    new_bias = jnp.full((4,), 7.0)
    trainable = trainable._replace(base={"params": {"layer_0": {"query": {"bias": new_bias}}}})
    back, _ = jlora.combine(frozen, trainable)
    np.testing.assert_array_equal(back["params"]["layer_0"]["query"]["bias"], new_bias)
    np.testing.assert_array_equal(back["params"]["layer_0"]["key"]["bias"], params["params"]["layer_0"]["key"]["bias"])


def test_split_and_combine_work_on_nnx_state():
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(3, 3, rngs=rngs)
            self.mlp = nnx.Linear(3, 3, rngs=rngs)

    _, state = nnx.split(Layer(nnx.Rngs(0)))
    adapters = jlora.init(state, rank=1)
    frozen, trainable = jlora.split(state, adapters, bias="lora_only")
    assert [p for p, _ in leaves(trainable.base)] == ["query/bias"]
    back, _ = jlora.combine(frozen, trainable)
    chex.assert_trees_all_equal(back, state)


def test_combine_rejects_base_leaves_without_a_place():
    params = params_tree()
    adapters = jlora.init(params, rank=2)
    frozen, trainable = jlora.split(params, adapters, bias="lora_only")
    stray = trainable._replace(base={"params": {"layer_0": {"query": {"bias": jnp.ones(4)}}, "extra": {"bias": jnp.ones(2)}}})
    with pytest.raises(ValueError, match=r"trainable base leaves params/extra/bias have no place in the frozen tree"):
        jlora.combine(frozen, stray)


@pytest.mark.parametrize("bias", ["lora", "None", None, "ALL"])
def test_bad_bias_mode_names_the_value_and_the_choices(bias):
    params = params_tree()
    adapters = jlora.init(params, rank=2)
    message = rf"bias must be one of \('none', 'all', 'lora_only'\), got {bias!r}"
    with pytest.raises(ValueError, match=message):
        jlora.split(params, adapters, bias=bias)
    with pytest.raises(ValueError, match=message):
        jlora.count_params(params, adapters, bias=bias)

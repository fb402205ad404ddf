import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from helpers import normal
from jlora.core.adapter import table
from jlora.kinds.lora import LoRA


def lora_at(adapters, path):
    node = adapters
    for part in path.split("/"):
        node = node[part]
    assert isinstance(node, LoRA)
    return node


# --- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, stack_axes, in_axes, a_shape, b_shape",
    [
        ((16, 32), 0, 1, (16, 4), (4, 32)),
        ((3, 16, 32), 1, 1, (3, 16, 4), (3, 4, 32)),  # nn.scan: (L, in, out)
        ((16, 2, 8), 0, 1, (16, 4), (4, 2, 8)),  # DenseGeneral (in, heads, head_dim)
        ((2, 8, 16), 0, 2, (2, 8, 4), (4, 16)),  # DenseGeneral out projection (heads, head_dim, out)
        ((3, 3, 2, 8), 0, 3, (3, 3, 2, 4), (4, 8)),  # conv (h, w, c_in, c_out)
    ],
)
def test_factor_shapes(shape, stack_axes, in_axes, a_shape, b_shape):
    params = {"w": {"kernel": jnp.ones(shape)}}
    adapters = jlora.init(params, rank=4, targets=["w"], stack_axes=stack_axes, in_axes=in_axes)
    lora = lora_at(adapters, "w/kernel")
    assert (lora.a.shape, lora.b.shape) == (a_shape, b_shape)
    assert lora.kernel_shape == shape
    assert lora.rank == 4
    assert lora.stack_axes == stack_axes
    np.testing.assert_array_equal(lora.b, np.zeros(b_shape))


def test_adapters_mirror_only_the_targeted_paths():
    params = {
        "params": {
            "attn": {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}, "key": {"kernel": jnp.ones((8, 8))}},
            "mlp": {"kernel": jnp.ones((8, 16))},
        }
    }
    adapters = jlora.init(params, rank=2)
    assert list(adapters) == ["params"]
    assert list(adapters["params"]) == ["attn"]
    assert list(adapters["params"]["attn"]) == ["query"]
    assert list(adapters["params"]["attn"]["query"]) == ["kernel"]


def test_each_weight_gets_its_own_random_a():
    params = {"query": {"kernel": jnp.ones((8, 8))}, "value": {"kernel": jnp.ones((8, 8))}}
    adapters = jlora.init(params, rank=2)
    assert not np.array_equal(adapters["query"]["kernel"].a, adapters["value"]["kernel"].a)


def test_dtype_sets_both_factors_and_bf16_bases_are_targets():
    params = {"query": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}
    lora = jlora.init(params, rank=2, dtype=jnp.bfloat16)["query"]["kernel"]
    assert (lora.a.dtype, lora.b.dtype) == (jnp.bfloat16, jnp.bfloat16)
    lora = jlora.init(params, rank=2)["query"]["kernel"]
    assert (lora.a.dtype, lora.b.dtype) == (jnp.float32, jnp.float32)


def test_shape_dtype_structs_are_enough_to_init():
    params = {"query": {"kernel": jax.ShapeDtypeStruct((12, 6), jnp.float32)}}
    assert jlora.init(params, rank=3)["query"]["kernel"].kernel_shape == (12, 6)


# --- scaling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, alpha, rslora, expected",
    [
        (8, None, False, 1.0),
        (8, 16, False, 2.0),
        (4, 1, False, 0.25),
        (8, 16, True, 16 / math.sqrt(8)),
        (4, None, True, 2.0),  # alpha defaults to r, so rsLoRA gives sqrt(r)
    ],
)
def test_scaling(rank, alpha, rslora, expected):
    params = {"query": {"kernel": jnp.ones((16, 16))}}
    lora = jlora.init(params, rank=rank, alpha=alpha, use_rslora=rslora)["query"]["kernel"]
    assert lora.scaling == pytest.approx(expected, rel=1e-12)


def test_rank_and_alpha_patterns_override_per_path():
    params = {name: {"kernel": jnp.ones((16, 16))} for name in ("query", "value", "key")}
    adapters = jlora.init(
        params, rank=8, alpha=16, targets=["query", "value", "key"],
        rank_pattern={"value": 2, r"key/.*": 4}, alpha_pattern={"key": 1.0},
    )
    ranks = {n: adapters[n]["kernel"].rank for n in params}
    scalings = {n: adapters[n]["kernel"].scaling for n in params}
    assert ranks == {"query": 8, "value": 2, "key": 4}
    assert scalings == {"query": 2.0, "value": 8.0, "key": 0.25}


def test_in_axes_and_stack_axes_mappings_are_per_path():
    params = {"proj": {"kernel": jnp.ones((2, 8, 16))}, "query": {"kernel": jnp.ones((3, 16, 8))}}
    adapters = jlora.init(params, rank=2, targets=["proj", "query"], in_axes={"proj": 2}, stack_axes={"query": 1})
    assert adapters["proj"]["kernel"].a.shape == (2, 8, 2)
    assert adapters["query"]["kernel"].a.shape == (3, 16, 2)
    assert adapters["query"]["kernel"].b.shape == (3, 2, 8)


# --- random A -----------------------------------------------------------------------------------


def test_same_key_same_a_other_key_other_a():
    params = {"query": {"kernel": jnp.ones((32, 32))}}
    first = jlora.init(params, rank=4, key=jax.random.key(7))["query"]["kernel"].a
    again = jlora.init(params, rank=4, key=jax.random.key(7))["query"]["kernel"].a
    other = jlora.init(params, rank=4, key=jax.random.key(8))["query"]["kernel"].a
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Default key is jax.random.key(0).
    np.testing.assert_array_equal(
        jlora.init(params, rank=4)["query"]["kernel"].a, jlora.init(params, rank=4, key=jax.random.key(0))["query"]["kernel"].a
    )


def test_kaiming_a_is_uniform_within_one_over_sqrt_fan_in():
    # fan_in = 4 * 64 = 256 for a DenseGeneral (heads, head_dim, out) with in_axes=2: bound 1/16.
    params = {"out": {"kernel": jnp.ones((4, 64, 512))}}
    a = np.asarray(jlora.init(params, rank=64, targets=["out"], in_axes=2, init="kaiming")["out"]["kernel"].a)
    bound = 1 / 16
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound  # fills the interval, not a narrower one
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_gaussian_a_has_std_one_over_rank():
    params = {"query": {"kernel": jnp.ones((1024, 1024))}}
    a = np.asarray(jlora.init(params, rank=32, init="gaussian")["query"]["kernel"].a)
    assert a.mean() == pytest.approx(0.0, abs=0.01 / 32)
    assert a.std() == pytest.approx(1 / 32, rel=0.03)


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="init must be 'gaussian' or 'kaiming', got 'xavier'"):
        jlora.init({"query": {"kernel": jnp.ones((4, 4))}}, init="xavier")


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 7, 2.0])
def test_rank_must_be_an_integer_in_1_to_min_in_out(rank):
    params = {"query": {"kernel": jnp.ones((6, 10))}}
    with pytest.raises(ValueError, match=rf"rank {rank!r} for 'query/kernel' \(shape \(6, 10\), in 6, out 10\) must be an integer in 1\.\.6"):
        jlora.init(params, rank=rank)


def test_rank_limit_counts_all_input_and_output_axes():
    # (2, 3, 4) DenseGeneral with in_axes=2: in 6, out 4, so rank 4 fits and 5 does not.
    params = {"proj": {"kernel": jnp.ones((2, 3, 4))}}
    assert jlora.init(params, rank=4, targets=["proj"], in_axes=2)["proj"]["kernel"].rank == 4
    with pytest.raises(ValueError, match=r"rank 5 for 'proj/kernel' \(shape \(2, 3, 4\), in 6, out 4\) must be an integer in 1\.\.4"):
        jlora.init(params, rank=5, targets=["proj"], in_axes=2)


def test_rank_pattern_value_is_checked_too():
    params = {"query": {"kernel": jnp.ones((6, 10))}, "value": {"kernel": jnp.ones((6, 10))}}
    with pytest.raises(ValueError, match=r"rank 0 for 'value/kernel'"):
        jlora.init(params, rank=2, rank_pattern={"value": 0})


@pytest.mark.parametrize(
    "shape, stack_axes, in_axes",
    [((4, 8), 0, 2), ((3, 4, 8), 2, 1), ((4, 8), 1, 1), ((4, 8), 0, 0), ((4, 8), -1, 1)],
)
def test_axes_that_leave_no_output_axis_are_rejected(shape, stack_axes, in_axes):
    params = {"query": {"kernel": jnp.ones(shape)}}
    with pytest.raises(
        ValueError,
        match=rf"'query/kernel' has shape {re.escape(str(shape))}: stack_axes={stack_axes}, in_axes={in_axes} leave no output axis",
    ):
        jlora.init(params, rank=1, stack_axes=stack_axes, in_axes=in_axes)


def test_targets_that_match_nothing_list_candidates():
    params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"targets \('query', 'value', 'q_proj', 'v_proj', 'c_attn'\) match no weight; candidate paths: dense/kernel$"):
        jlora.init(params)


def test_targeting_a_vector_or_int_matrix_names_it():
    params = {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "ids": jnp.ones((4, 4), jnp.int32)}
    with pytest.raises(ValueError, match=r"target 'query/bias' is not a floating-point matrix \(shape \(4,\)"):
        jlora.init(params, targets=r"query/bias")
    with pytest.raises(ValueError, match=r"target 'ids' is not a floating-point matrix \(shape \(4, 4\), dtype int32\)"):
        jlora.init(params, targets="ids")


# --- the model is unchanged at init (B = 0) -----------------------------------------------------


class LinenAttention(nn.Module):
    """Dense query/value and DenseGeneral 3-D projections, as in Flax's attention."""

    heads: int = 2
    head_dim: int = 4

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(self.heads * self.head_dim, name="query")(x)
        v = nn.Dense(self.heads * self.head_dim, name="value")(x)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="key_general")(x)  # (d, h, hd)
        q = q.reshape(q.shape[:-1] + (self.heads, self.head_dim))
        v = v.reshape(q.shape)
        att = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", q, k), axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", att, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out_general")(out)  # (h, hd, d)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_linen_output_is_unchanged_at_init():
    model = LinenAttention()
    x = normal(1, 2, 5, 8)
    variables = model.init(jax.random.key(0), x)
    adapters = jlora.init(
        variables, rank=2, targets=["query", "value", "key_general", "out_general"], in_axes={"out_general": 2},
    )
    assert lora_at(adapters, "params/key_general/kernel").b.shape == (2, 2, 4)
    assert lora_at(adapters, "params/out_general/kernel").a.shape == (2, 4, 2)
    expected = model.apply(variables, x)
    np.testing.assert_array_equal(model.apply(jlora.merge(variables, adapters), x), expected)
    np.testing.assert_array_equal(jlora.adapt(model.apply)(variables, adapters, x), expected)


class NnxLayer(nnx.Module):
    def __init__(self, d, rngs):
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return self.mlp(jax.nn.gelu(self.query(x) * self.value(x)))


class NnxModel(nnx.Module):
    def __init__(self, d, rngs):
        self.layers = nnx.List([NnxLayer(d, rngs), NnxLayer(d, rngs)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_nnx_output_is_unchanged_at_init():
    model = NnxModel(8, nnx.Rngs(0))
    x = normal(2, 3, 8)
    expected = model(x)
    graphdef, state = nnx.split(model)
    adapters = jlora.init(state, rank=2)
    assert _paths(adapters) == [
        "layers/0/query/kernel", "layers/0/value/kernel", "layers/1/query/kernel", "layers/1/value/kernel",
    ]
    merged = jlora.merge(state, adapters)
    np.testing.assert_array_equal(nnx.merge(graphdef, merged)(x), expected)

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_array_equal(jlora.adapt(run)(state, adapters, x), expected)


def test_nnx_regex_target_adapts_one_layer():
    model = NnxModel(8, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    adapters = jlora.init(state, rank=2, targets="layers/0/query/kernel")
    assert _paths(adapters) == ["layers/0/query/kernel"]
    x = normal(3, 3, 8)
    np.testing.assert_array_equal(nnx.merge(graphdef, jlora.merge(state, adapters))(x), model(x))


def test_plain_function_output_is_unchanged_at_init():
    params = {"enc": {"query": {"kernel": normal(4, 6, 6)}, "w": normal(5, 6, 3)}}

    def fn(params, x):
        return jnp.tanh(x @ params["enc"]["query"]["kernel"]) @ params["enc"]["w"]

    x = normal(6, 4, 6)
    adapters = jlora.init(params, rank=3)
    np.testing.assert_array_equal(fn(jlora.merge(params, adapters), x), fn(params, x))
    np.testing.assert_array_equal(jlora.adapt(fn)(params, adapters, x), fn(params, x))


def _paths(adapters):
    return sorted(table(adapters))



@pytest.mark.parametrize("alpha", [0, -8.0, float("nan"), float("inf"), True])
def test_alpha_must_be_a_finite_positive_number(alpha):
    params = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    with pytest.raises(ValueError, match=rf"alpha {alpha!r} for 'q_proj/kernel' must be a finite number > 0"):
        jlora.init(params, alpha=alpha)
    with pytest.raises(ValueError, match=r"must be a finite number > 0"):
        jlora.pissa.init(params, rank=2, alpha=alpha)
    with pytest.raises(ValueError, match=r"must be a finite number > 0"):
        jlora.init(params, alpha_pattern={"q_proj": alpha})


def test_rank_and_alpha_patterns_must_name_a_target():
    params = {"q_proj": {"kernel": jnp.ones((8, 8))}, "v_proj": {"kernel": jnp.ones((8, 8))}}
    with pytest.raises(ValueError, match=r"rank_pattern keys \['o_proj'\] match none of the targeted weights \(q_proj/kernel, v_proj/kernel\)"):
        jlora.init(params, rank_pattern={"o_proj": 2})
    with pytest.raises(ValueError, match=r"alpha_pattern keys \['k_proj'\]"):
        jlora.init(params, alpha_pattern={"q_proj": 2.0, "k_proj": 4.0})


# --- a reading of a weight's axes that the bias beside it contradicts is refused, naming the fix ---


@pytest.mark.parametrize("params, message", [
    ({"layers": {"dense": {"kernel": jnp.ones((3, 8, 16)), "bias": jnp.ones((3, 16))}}},
     r"'layers/dense/kernel' has shape \(3, 8, 16\): read with stack_axes=0, in_axes=1, its update would be low rank from "
     r"inputs \(3,\) to outputs \(8, 16\) \(stacked over \(\)\), but 'layers/dense/bias' has shape \(3, 16\), so the outputs "
     r"are other axes; pass stack_axes=\{'layers/dense': 1\}, in_axes=\{'layers/dense': 1\}"),
    ({"out": {"kernel": jnp.ones((4, 8, 32)), "bias": jnp.ones(32)}},
     r"'out/kernel' has shape \(4, 8, 32\).* but 'out/bias' has shape \(32,\).*; pass stack_axes=\{'out': 0\}, in_axes=\{'out': 2\}"),
    ({"lin": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(16)}},
     r"'lin/kernel' has shape \(16, 8\).* but 'lin/bias' has shape \(16,\), so the outputs are other axes; a weight laid out "
     r"\(out, in\), as PyTorch and Equinox store them, must be transposed to \(in, out\) first"),
])
def test_axes_the_bias_contradicts_are_refused_with_the_option_that_fits(params, message):
    module = next(iter(params))
    with pytest.raises(ValueError, match=message):
        jlora.init(params, rank=2, targets=[module])


def test_the_option_the_refusal_names_gives_a_low_rank_update_per_stacked_layer():
    params = {"layers": {"dense": {"kernel": jnp.ones((3, 8, 16)), "bias": jnp.ones((3, 16))}}}
    adapters = jlora.init(params, rank=2, targets=["dense"], stack_axes={"layers/dense": 1}, in_axes={"layers/dense": 1})
    lora = jlora.adapter.table(adapters)["layers/dense/kernel"]
    assert (lora.a.shape, lora.b.shape, lora.stack_axes) == ((3, 8, 2), (3, 2, 16), 1)

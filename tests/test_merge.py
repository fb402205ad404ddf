import dataclasses
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
from helpers import trained
from jlora.core.adapter import table

# Each layout: (stack_axes, in_axes, number of output axes) and the einsum that is A·B for it,
# written out independently of jlora's reshape-and-matmul.
LAYOUTS = {
    "dense": (0, 1, 1, "ir,ro->io"),
    "stacked": (1, 1, 1, "lir,lro->lio"),
    "general_in1": (0, 1, 2, "ir,rhd->ihd"),
    "general_in2": (0, 2, 1, "hdr,ro->hdo"),
    "conv": (0, 3, 1, "xycr,ro->xyco"),
}

BF16_HALF_ULP = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding moves a value by at most this fraction


def expected_merge(w, lora, spec, scaling):
    a = np.asarray(lora.a, np.float64)
    b = np.asarray(lora.b, np.float64)
    return np.asarray(w, np.float64) + scaling * np.einsum(spec, a, b)


def magnitude(w, lora, spec, scaling):
    """A bound on |W0| + |scaling·A·B| elementwise, which float error is relative to."""
    a, b = np.abs(np.asarray(lora.a, np.float64)), np.abs(np.asarray(lora.b, np.float64))
    return np.abs(np.asarray(w, np.float64)) + abs(scaling) * np.einsum(spec, a, b)


@st.composite
def cases(draw, layout, dtype):
    stack, n_in, n_out, spec = LAYOUTS[layout]
    dim = st.integers(1, 5)
    shape = tuple(draw(dim) for _ in range(stack + n_in + n_out))
    fan_in = math.prod(shape[stack : stack + n_in])
    fan_out = math.prod(shape[stack + n_in :])
    rank = draw(st.integers(1, min(fan_in, fan_out)))
    return dict(
        layout=layout, shape=shape, rank=rank,
        dtype=dtype,
        alpha=draw(st.sampled_from([None, 1.0, 16.0, 0.5])),
        rslora=draw(st.booleans()),
        init=draw(st.sampled_from(["gaussian", "kaiming"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case):
    stack, n_in, _, spec = LAYOUTS[case["layout"]]
    rng = np.random.default_rng(case["seed"])
    dtype = jnp.dtype(case["dtype"])
    w = jnp.asarray(rng.standard_normal(case["shape"]).astype(np.float32) * 0.1, dtype)
    params = {"params": {"block": {"query": {"kernel": w}}, "other": jnp.asarray(rng.standard_normal((3, 2)), dtype)}}
    adapters = jlora.init(
        params, rank=case["rank"], alpha=case["alpha"], use_rslora=case["rslora"], init=case["init"],
        targets=["query"], in_axes=n_in, stack_axes=stack, key=jax.random.key(case["seed"]),
    )
    adapters = trained(adapters, rng, std=1.0, fields=["b"])  # A as the case's init drew it
    lora = adapters["params"]["block"]["query"]["kernel"]
    alpha = case["rank"] if case["alpha"] is None else case["alpha"]
    scaling = alpha / (math.sqrt(case["rank"]) if case["rslora"] else case["rank"])
    return params, adapters, w, lora, spec, scaling


# Every layout in both dtypes, a few drawn shapes, ranks and scalings each (about 25 in all).
@pytest.mark.slow  # heavy compile: kept out of the fast tier
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@settings(max_examples=3, deadline=None, derandomize=True)
@given(data=st.data())
def test_merge_is_w0_plus_scaling_a_b_and_unmerge_gives_back_the_params(layout, dtype, data):
    case = data.draw(cases(layout, dtype))
    params, adapters, w, lora, spec, scaling = build(case)
    merged = jlora.merge(params, adapters)
    restored = jlora.unmerge(merged, adapters)
    for tree in (merged, restored):
        chex.assert_trees_all_equal_shapes_and_dtypes(tree, params)
        # The untouched leaf comes through bit for bit.
        np.testing.assert_array_equal(tree["params"]["other"], params["params"]["other"])

    mid = np.asarray(merged["params"]["block"]["query"]["kernel"], np.float64)
    back = np.asarray(restored["params"]["block"]["query"]["kernel"], np.float64)
    w0 = np.asarray(w, np.float64)
    expected = expected_merge(w, lora, spec, scaling)
    mag = magnitude(w, lora, spec, scaling)
    assert not np.array_equal(mid, w0)
    if case["dtype"] == "float32":
        np.testing.assert_allclose(mid, expected, rtol=0, atol=1e-6 * mag.max())
        np.testing.assert_allclose(back, w0, rtol=0, atol=1e-6 * mag.max())
    else:
        assert np.all(np.abs(mid - expected) <= BF16_HALF_ULP * np.abs(expected) + 1e-6 * mag)
        # Two roundings to bfloat16: of the merged weight, then of the unmerged one.
        assert np.all(np.abs(back - w0) <= BF16_HALF_ULP * (np.abs(mid) + np.abs(w0)) + 1e-6 * mag)


def mixed_params():
    return {
        "params": {
            "query": {"kernel": jnp.full((4, 6), 0.5, jnp.bfloat16), "bias": jnp.ones(6, jnp.bfloat16)},
            "value": {"kernel": jnp.full((4, 6), 0.25, jnp.float32)},
            "ids": jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
        },
        "batch_stats": {"mean": jnp.zeros(6)},
    }


def test_merge_keeps_structure_shapes_dtypes_and_untouched_leaves():
    params = mixed_params()
    adapters = trained(jlora.init(params, rank=2), std=1.0, fields=["b"])
    merged = jlora.merge(params, adapters)
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, params)
    for untouched in (("params", "query", "bias"), ("params", "ids"), ("batch_stats", "mean")):
        got, want = merged, params
        for key in untouched:
            got, want = got[key], want[key]
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(merged["params"]["value"]["kernel"], params["params"]["value"]["kernel"])


def test_patterns_and_rslora_set_each_weights_scaling_in_the_merge():
    rng = np.random.default_rng(1)
    params = {name: {"kernel": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)} for name in ("query", "value", "key")}
    for use_rslora in (False, True):
        adapters = jlora.init(
            params, rank=4, alpha=8, targets=["query", "value", "key"], use_rslora=use_rslora,
            rank_pattern={"value": 2}, alpha_pattern={"key": 3.0},
        )
        adapters = trained(adapters, rng, std=1.0, fields=["b"])
        merged = jlora.merge(params, adapters)
        norm = math.sqrt if use_rslora else (lambda r: r)
        scalings = {"query": 8 / norm(4), "value": 8 / norm(2), "key": 3.0 / norm(4)}
        for name, scaling in scalings.items():
            lora = adapters[name]["kernel"]
            assert lora.rank == (2 if name == "value" else 4)
            expected = expected_merge(params[name]["kernel"], lora, "ir,ro->io", scaling)
            np.testing.assert_allclose(merged[name]["kernel"], expected, rtol=1e-6, atol=1e-6)


def test_unmerge_lets_another_adapter_be_merged_into_the_shared_base():
    rng = np.random.default_rng(2)
    params = {"query": {"kernel": jnp.asarray(rng.standard_normal((6, 6)), jnp.float32)}}
    first = trained(jlora.init(params, rank=2, key=jax.random.key(1)), rng, std=1.0, fields=["b"])
    second = trained(jlora.init(params, rank=3, key=jax.random.key(2)), rng, std=1.0, fields=["b"])
    swapped = jlora.merge(jlora.unmerge(jlora.merge(params, first), first), second)
    np.testing.assert_allclose(swapped["query"]["kernel"], jlora.merge(params, second)["query"]["kernel"], atol=1e-6)


def test_merge_under_jit_matches_eager():
    rng = np.random.default_rng(3)
    params = {"query": {"kernel": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)}}
    adapters = trained(jlora.init(params, rank=2), rng, std=1.0, fields=["b"])
    np.testing.assert_allclose(
        jax.jit(jlora.merge)(params, adapters)["query"]["kernel"], jlora.merge(params, adapters)["query"]["kernel"],
        rtol=1e-6, atol=1e-6,
    )


# --- adapters that do not fit the params ---------------------------------------------------------


def test_adapter_path_missing_from_params_is_named():
    params = {"query": {"kernel": jnp.ones((4, 4))}, "value": {"kernel": jnp.ones((4, 4))}}
    adapters = jlora.init(params, rank=2)
    with pytest.raises(ValueError, match=r"adapters for value/kernel have no weight at that path in the params; params have e\.g\. query/kernel"):
        jlora.merge({"query": params["query"]}, adapters)
    with pytest.raises(ValueError, match=r"adapters for value/kernel have no weight"):
        jlora.unmerge({"query": params["query"]}, adapters)


def test_adapter_shape_mismatch_is_named():
    params = {"query": {"kernel": jnp.ones((4, 6))}}
    adapters = jlora.init(params, rank=2)
    with pytest.raises(
        ValueError, match=re.escape("adapter at 'query/kernel' is for a weight of shape (4, 6), but the params have shape (6, 4) there")
    ):
        jlora.merge({"query": {"kernel": jnp.ones((6, 4))}}, adapters)


def test_stacked_adapter_checks_the_stack_axis_too():
    params = {"query": {"kernel": jnp.ones((3, 4, 6))}}
    adapters = jlora.init(params, rank=2, stack_axes=1)
    with pytest.raises(ValueError, match=re.escape("is for a weight of shape (3, 4, 6), but the params have shape (2, 4, 6)")):
        jlora.merge({"query": {"kernel": jnp.ones((2, 4, 6))}}, adapters)


def test_adapter_tree_with_a_stray_array_is_a_type_error():
    params = {"query": {"kernel": jnp.ones((4, 4))}}
    adapters = jlora.init(params, rank=2)
    adapters["query"]["bias"] = jnp.ones(4)
    with pytest.raises(TypeError, match=r"adapter tree holds \w+ at 'query/bias', not an Adapter"):
        jlora.merge(params, adapters)
    assert sorted(table({"query": {"kernel": adapters["query"]["kernel"]}})) == ["query/kernel"]


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_adapters_are_refused_by_merge_and_unmerge(bad):
    params = {"q_proj": {"kernel": jnp.ones((4, 6))}}
    adapters = jlora.init(params, rank=2)
    lora = adapters["q_proj"]["kernel"]
    broken = {"q_proj": {"kernel": dataclasses.replace(lora, b=lora.b.at[1, 3].set(bad))}}
    for method in ("merge", "unmerge"):
        with pytest.raises(ValueError, match=rf"cannot {method} the adapter at 'q_proj/kernel': its b holds 1 non-finite value\(s\) of 12"):
            getattr(jlora, method)(params, broken)
    # Under jit the values are not known; the check does not break tracing.
    assert jax.jit(jlora.merge)(params, adapters)["q_proj"]["kernel"].shape == (4, 6)

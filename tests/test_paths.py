import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.core import paths


def zeros(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def model_zoo():
    """Projection names of Flax BERT/T5-style, Llama and GPT-2 attention blocks, plus an MLP."""
    return {
        "flax": {
            "query": {"kernel": zeros(8, 8), "bias": zeros(8)},
            "key": {"kernel": zeros(8, 8), "bias": zeros(8)},
            "value": {"kernel": zeros(8, 8), "bias": zeros(8)},
            "out": {"kernel": zeros(8, 8)},
        },
        "llama": {
            "q_proj": {"kernel": zeros(8, 8)},
            "k_proj": {"kernel": zeros(8, 4)},
            "v_proj": {"kernel": zeros(8, 4)},
            "o_proj": {"kernel": zeros(8, 8)},
        },
        "gpt2": {
            "attn": {"c_attn": {"kernel": zeros(8, 24), "bias": zeros(24)}, "c_proj": {"kernel": zeros(8, 8)}},
            "mlp": {"c_fc": {"kernel": zeros(8, 32)}, "c_proj": {"kernel": zeros(32, 8)}},
        },
    }


def test_path_str_joins_dict_keys_and_sequence_indices():
    tree = {"params": {"layers": [{"kernel": zeros(2, 2)}, {"kernel": zeros(2, 3)}]}}
    assert [p for p, _ in paths.leaves(tree)] == ["params/layers/0/kernel", "params/layers/1/kernel"]


def test_nnx_state_paths_drop_the_variable_value_attribute():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])

    _, state = nnx.split(Block(nnx.Rngs(0)))
    found = {p: leaf.shape for p, leaf in paths.leaves(state)}
    assert found == {
        "layers/0/kernel": (3, 5), "layers/0/bias": (5,),
        "layers/1/kernel": (5, 2), "layers/1/bias": (2,),
    }


def test_map_with_path_passes_path_and_rest_leaves():
    tree = {"a": {"b": jnp.array(1.0)}, "c": jnp.array(2.0)}
    out = paths.map_with_path(lambda p, x, y: (p, float(x + y)), tree, tree)
    assert out == {"a": {"b": ("a/b", 2.0)}, "c": ("c", 4.0)}


def test_nest_inverts_path_flattening():
    assert paths.nest({"a/b/c": 1, "a/d": 2, "e": 3}) == {"a": {"b": {"c": 1}, "d": 2}, "e": 3}


@pytest.mark.parametrize(
    "leaf, expected",
    [
        (zeros(2, 3), True),
        (zeros(2, 3, 4, dtype=jnp.bfloat16), True),
        (zeros(2, 3, dtype=jnp.float16), True),
        (jax.ShapeDtypeStruct((4, 4), jnp.float32), True),
        (zeros(3), False),
        (zeros(2, 3, dtype=jnp.int32), False),
        (np.zeros((2, 2), np.bool_), False),
        (1.0, False),
    ],
)
def test_is_floating_matrix(leaf, expected):
    assert paths.is_floating_matrix(leaf) is expected


def test_default_targets_take_query_value_projections_only():
    chosen = paths.select(model_zoo(), jlora.lora.DEFAULT_TARGETS)
    assert sorted(chosen) == [
        "flax/query/kernel", "flax/value/kernel",
        "gpt2/attn/c_attn/kernel",
        "llama/q_proj/kernel", "llama/v_proj/kernel",
    ]


def test_names_skip_non_matrix_leaves_of_a_named_module():
    # c_attn holds a bias too; naming the module takes its kernel and leaves the bias alone.
    assert list(paths.select(model_zoo(), ["c_attn"])) == ["gpt2/attn/c_attn/kernel"]


def test_multi_component_name_matches_only_that_run_of_components():
    assert list(paths.select(model_zoo(), ["attn/c_proj"])) == ["gpt2/attn/c_proj/kernel"]
    assert sorted(paths.select(model_zoo(), ["c_proj"])) == ["gpt2/attn/c_proj/kernel", "gpt2/mlp/c_proj/kernel"]


def test_name_is_a_whole_component_not_a_substring():
    # 'proj' is a substring of q_proj etc. but no component is called 'proj'.
    with pytest.raises(ValueError, match=r"targets \['proj'\] match no weight"):
        paths.select(model_zoo(), ["proj"])


def test_regex_is_fullmatched_against_the_whole_path():
    assert sorted(paths.select(model_zoo(), r".*/(k|o)_proj/kernel")) == ["llama/k_proj/kernel", "llama/o_proj/kernel"]
    # A regex that would only match a prefix (re.match) or substring (re.search) selects nothing.
    with pytest.raises(ValueError, match="match no weight"):
        paths.select(model_zoo(), r"llama/q_proj")


def test_predicate_gets_path_and_leaf():
    chosen = paths.select(model_zoo(), lambda path, leaf: path.startswith("gpt2/mlp") and leaf.shape[0] == 32)
    assert list(chosen) == ["gpt2/mlp/c_proj/kernel"]


def test_regex_on_nnx_state_paths():
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(4, 4, rngs=rngs)
            self.key = nnx.Linear(4, 4, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Layer(rngs), Layer(rngs)])

    _, state = nnx.split(Model(nnx.Rngs(0)))
    assert list(paths.select(state, "layers/0/query/kernel")) == ["layers/0/query/kernel"]
    assert sorted(paths.select(state, ["query"])) == ["layers/0/query/kernel", "layers/1/query/kernel"]


def test_no_match_lists_candidate_paths():
    # Candidates come in flattening order (dict keys sorted), the first eight, then '...'.
    with pytest.raises(
        ValueError,
        match=r"targets \['nope'\] match no weight; candidate paths: flax/key/kernel, flax/out/kernel, "
        r"flax/query/kernel, .*, gpt2/mlp/c_proj/kernel, \.\.\.$",
    ):
        paths.select(model_zoo(), ["nope"])


def test_no_match_without_any_matrix_says_none():
    with pytest.raises(ValueError, match="candidate paths: none"):
        paths.select({"w": zeros(3)}, ["w"])


def test_a_regex_onto_a_kernel_and_a_vector_takes_the_kernel_and_says_what_it_skipped():
    with pytest.warns(UserWarning, match=r"^targets 'flax/query/.\*': skipped 1 matched leaf that LoRA cannot adapt \(not "
                                         r"floating-point matrices\): flax/query/bias \(shape \(8,\), dtype float32\); a "
                                         r"narrower pattern \(e.g. '.\*/kernel'\) leaves them out$"):
        assert list(paths.select(model_zoo(), r"flax/query/.*")) == ["flax/query/kernel"]


def test_a_regex_onto_vectors_only_names_path_and_shape():
    with pytest.raises(ValueError, match=r"target 'flax/query/bias' is not a floating-point matrix \(shape \(8,\), dtype float32\)"):
        paths.select(model_zoo(), r"flax/query/bias")


def test_every_weight_that_can_be_adapted_and_the_rest_reported():
    tree = {"emb": {"table": zeros(10, 4, dtype=jnp.int32)}, "dense": {"kernel": zeros(4, 4), "bias": zeros(4)}, "step": 3}
    with pytest.warns(UserWarning, match=r"skipped 3 matched leaves .*: dense/bias \(shape \(4,\), dtype float32\), "
                                         r"emb/table \(shape \(10, 4\), dtype int32\), step \(shape None, dtype int\)"):
        assert list(paths.select(tree, ".*")) == ["dense/kernel"]


def test_a_list_mixes_module_names_and_regexes_told_apart_by_re_prefix_or_compiled_pattern():
    tree = model_zoo()
    names = [p for p, leaf in paths.leaves(tree) if paths.is_floating_matrix(leaf)]
    by_regex = [p for p in names if re.fullmatch(r".*/query/kernel", p)]
    assert list(paths.select(tree, ["re:.*/query/kernel"])) == by_regex and by_regex
    assert list(paths.select(tree, [re.compile(r".*/query/kernel")])) == by_regex
    mixed = paths.select(tree, ["re:.*/query/kernel", "value"])
    assert set(mixed) == set(by_regex) | set(paths.select(tree, ["value"]))


def test_a_regex_written_as_a_module_name_or_one_matching_nothing_is_an_error_saying_so():
    with pytest.raises(ValueError, match=r"^targets \['q.\*'\] match no weight; 'q.\*' looks like a regular expression, but a "
                                         r"list's entries are module names; write 're:q.\*' for a regex fullmatched against the path"):
        paths.select(model_zoo(), ["q.*"])
    with pytest.raises(ValueError, match=r"^targets 're:zzz' match no weight; 're:zzz' is a regex fullmatched against whole paths"):
        paths.select(model_zoo(), ["re:zzz", "query"])
    with pytest.raises(ValueError, match=r"target 're:\(': the regex '\(' is not a valid regular expression"):
        paths.select(model_zoo(), ["re:("])


def test_regex_onto_an_int_matrix_names_path_and_dtype():
    tree = {"emb": {"table": zeros(10, 4, dtype=jnp.int32)}}
    with pytest.raises(ValueError, match=r"target 'emb/table' is not a floating-point matrix \(shape \(10, 4\), dtype int32\)"):
        paths.select(tree, "emb/table")


def test_predicate_onto_a_python_scalar_is_rejected():
    with pytest.raises(ValueError, match=r"target 'step' is not a floating-point matrix \(shape None, dtype int\)"):
        paths.select({"step": 3, "w": zeros(2, 2)}, lambda path, leaf: path == "step")


@pytest.mark.parametrize("targets", [[], [1, 2], ("query", 3)])
def test_bad_target_spec_is_a_type_error(targets):
    with pytest.raises(TypeError, match="targets must be a regex str, a non-empty list of module names \\(or .re:. regexes\\) or a predicate"):
        paths.matcher(targets)


def test_per_path_takes_the_first_matching_pattern_else_default():
    pattern = {r".*/q_proj/kernel": 4, "attn": 2, "v_proj": 16}
    assert paths.per_path(pattern, "llama/q_proj/kernel", 8) == 4
    assert paths.per_path(pattern, "gpt2/attn/q_proj/kernel", 8) == 4
    assert paths.per_path(pattern, "gpt2/attn/c_attn/kernel", 8) == 2
    assert paths.per_path(pattern, "llama/v_proj/kernel", 8) == 16
    assert paths.per_path(pattern, "llama/o_proj/kernel", 8) == 8
    assert paths.per_path(None, "x", 8) == 8
    assert paths.per_path(3, "x", 8) == 3


def test_fmt_paths_shortens_long_lists():
    assert paths.fmt_paths(["a", "b"]) == "a, b"
    assert paths.fmt_paths([str(i) for i in range(7)]) == "0, 1, 2, 3, 4, ... (7 in all)"


# ---- bad targets are errors that say what would be right ----

LLAMA_LIKE = {"params": {f"layers_{i}": {"self_attn": {n: {"kernel": zeros(4, 4)} for n in ("q_proj", "k_proj")},
                                         "mlp": {"down_proj": {"kernel": zeros(4, 4)}}} for i in range(2)}}


def test_peft_dotted_module_names_select_what_peft_would():
    assert list(paths.select(LLAMA_LIKE, ["layers.1.self_attn.k_proj"])) == ["params/layers_1/self_attn/k_proj/kernel"]
    assert sorted(paths.select(LLAMA_LIKE, ["self_attn.q_proj", "mlp.down_proj"])) == [
        "params/layers_0/mlp/down_proj/kernel", "params/layers_0/self_attn/q_proj/kernel",
        "params/layers_1/mlp/down_proj/kernel", "params/layers_1/self_attn/q_proj/kernel"]
    gpt2 = {"params": {"h_0": {"attn": {"c_proj": {"kernel": zeros(4, 4)}}, "mlp": {"c_proj": {"kernel": zeros(4, 4)}}}}}
    assert list(paths.select(gpt2, ["attn.c_proj"])) == ["params/h_0/attn/c_proj/kernel"]


def test_every_named_target_must_match_and_a_typo_gets_close_names():
    with pytest.raises(ValueError, match=r"targets 'q_prj' match no weight; 'q_prj': did you mean 'q_proj', 'k_proj'\?; candidate paths: params/layers_0"):
        paths.select(LLAMA_LIKE, ["k_proj", "q_prj"])
    assert list(paths.select(LLAMA_LIKE, ["k_proj", "nothing"], every_name=False)) == [
        "params/layers_0/self_attn/k_proj/kernel", "params/layers_1/self_attn/k_proj/kernel"]


def test_bad_target_specs_raise_value_or_type_errors_that_name_them():
    with pytest.raises(ValueError, match=r"targets 'q_proj\(' is not a valid regular expression: missing \)"):
        paths.select(LLAMA_LIKE, "q_proj(")
    with pytest.raises(TypeError, match=r"targets must be a regex str, a non-empty list of module names .* or a predicate .* got 5"):
        paths.select(LLAMA_LIKE, 5)
    with pytest.raises(TypeError, match=r"got \[\]"):
        paths.select(LLAMA_LIKE, [])


def test_naming_integer_weights_says_why_they_cannot_be_adapted():
    tree = {"embed": {"kernel": zeros(4, 4, dtype=jnp.int8)}, "head": {"kernel": zeros(4, 4)}}
    with pytest.raises(ValueError, match=r"'embed' names only weights that are not floating-point matrices: "
                                         r"embed/kernel \(shape \(4, 4\), dtype int8\); candidate paths: head/kernel"):
        paths.select(tree, ["embed"])


def test_pattern_keys_that_match_no_target_are_refused():
    chosen = ["params/layers_0/self_attn/q_proj/kernel"]
    paths.check_patterns("rank_pattern", {"q_proj": 4, r".*layers_0.*": 2}, chosen)
    with pytest.raises(ValueError, match=r"rank_pattern keys \['v_proj'\] match none of the targeted weights"):
        paths.check_patterns("rank_pattern", {"q_proj": 4, "v_proj": 2}, chosen)
    with pytest.raises(ValueError, match=r"pattern key '\[' is not a valid regular expression"):
        paths.check_patterns("rank_pattern", {"[": 4}, chosen)

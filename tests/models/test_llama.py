import json
from functools import partial

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import pre_tokenizers

import jlora.models
import tiny
from jlora.models import CheckpointError, Llama, LlamaConfig, generate
from jlora.models.gguf import unpermute_rope
from jlora.models.llama import hf_key_map, rope

GQA = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)
TIED = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, tie_word_embeddings=True)


def flat(params):
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


# Every param N(0, 0.3), norm scales included, so a misplaced tensor changes the output.
random_variables = partial(tiny.random_variables, std=0.3, norms=0.0)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_param_paths_are_hugging_face_names_with_2d_kernels():
    shapes = {p: leaf.shape for p, leaf in flat(random_variables(Llama(GQA))["params"]).items()}
    expected = {"embed_tokens/embedding": (67, 32), "norm/weight": (32,), "lm_head/kernel": (32, 67)}
    for i in range(2):
        expected.update({
            f"layers_{i}/input_layernorm/weight": (32,), f"layers_{i}/post_attention_layernorm/weight": (32,),
            f"layers_{i}/self_attn/q_proj/kernel": (32, 32), f"layers_{i}/self_attn/k_proj/kernel": (32, 16),
            f"layers_{i}/self_attn/v_proj/kernel": (32, 16), f"layers_{i}/self_attn/o_proj/kernel": (32, 32),
            f"layers_{i}/mlp/gate_proj/kernel": (32, 48), f"layers_{i}/mlp/up_proj/kernel": (32, 48),
            f"layers_{i}/mlp/down_proj/kernel": (48, 32),
        })
    assert shapes == expected
    tied = flat(random_variables(Llama(TIED))["params"])
    assert "lm_head/kernel" not in tied and len(tied) == len(expected) - 1


def test_tied_head_is_the_embedding_transposed():
    model = Llama(TIED)
    variables = random_variables(model)
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    logits, state = jax.jit(lambda v, t: model.apply(v, t, capture_intermediates=True))(variables, tokens)
    hidden = state["intermediates"]["norm"]["__call__"][0]
    assert logits.shape == (1, 5, 67) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, hidden @ variables["params"]["embed_tokens"]["embedding"].T, atol=1e-5)


def test_rope_scores_depend_only_on_the_distance_between_positions():
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 8))
    score = lambda m, n: float(jnp.sum(rope(q, jnp.array([m]), 100.0) * rope(k, jnp.array([n]), 100.0)))
    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) == pytest.approx(score(2, 0), abs=1e-5)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    # Position 0 is the identity, and the first half pairs with the second half (rotate_half), not neighbours.
    np.testing.assert_allclose(rope(q, jnp.array([0]), 100.0), q)
    x = jnp.zeros((1, 1, 1, 8)).at[..., 0].set(1.0)
    rotated = rope(x, jnp.array([1]), 100.0)[0, 0, 0]
    np.testing.assert_allclose(rotated, [np.cos(1.0), 0, 0, 0, np.sin(1.0), 0, 0, 0], atol=1e-6)


@pytest.mark.parametrize("config", [GQA, TIED], ids=["gqa-untied", "mha-tied"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(config):
    model = Llama(config)
    forward = jax.jit(model.apply)
    variables = random_variables(model)
    tokens = jnp.array([[5, 9, 2, 7, 1, 3]])
    before, after = forward(variables, tokens), forward(variables, tokens.at[0, 3].set(40))
    np.testing.assert_allclose(before[:, :3], after[:, :3], atol=1e-6)
    assert np.abs(before[:, 3:] - after[:, 3:]).min() > 1e-4


def test_cached_steps_equal_full_forward_passes_with_grouped_query_attention():
    model = Llama(GQA)
    forward = jax.jit(model.apply)
    variables = random_variables(model)
    tokens = jnp.array([[5, 9, 2, 7, 1, 3, 11, 30], [8, 8, 1, 0, 60, 4, 2, 9]])
    full = forward(variables, tokens)
    prefill, cache = forward(variables, tokens[:, :5], model.init_cache(2, 10))
    np.testing.assert_allclose(prefill, full[:, :5], atol=1e-5)
    for t in range(5, 8):
        step, cache = forward(variables, tokens[:, t:t + 1], cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
    assert int(cache["index"]) == 8 and cache["layers_1"]["key"].shape == (2, 10, 2, 8)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_greedy_generation_equals_recomputing_the_whole_sequence_each_token():
    model = Llama(GQA)
    variables = random_variables(model, std=0.5)
    prompt = np.array([[5, 9, 2], [1, 1, 4]])
    ids = generate(model.apply, variables, prompt, model.init_cache(2, 9), max_new_tokens=6)
    forward = jax.jit(model.apply)
    recomputed = prompt
    for _ in range(6):
        next_token = np.argmax(forward(variables, jnp.asarray(recomputed))[:, -1], axis=-1)
        recomputed = np.concatenate([recomputed, next_token[:, None]], axis=1)
    np.testing.assert_array_equal(ids, recomputed)


def test_bfloat16_params_and_compute_stay_close_to_float32():
    variables = random_variables(Llama(GQA))
    tokens = jnp.array([[5, 9, 2, 7, 1, 3]])
    reference = jax.jit(Llama(GQA).apply)(variables, tokens)
    model = Llama(GQA, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    logits = jax.jit(model.apply)(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), variables), tokens)
    assert logits.dtype == jnp.float32
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    cache = model.init_cache(1, 8)
    assert cache["layers_0"]["key"].dtype == jnp.bfloat16


def write_hf_dir(directory, config, variables, overrides=None, dtype=np.float32):
    params = flat(variables["params"])
    tensors = {name: np.asarray(params[path].T if transform else params[path]).astype(dtype)
               for name, (path, transform) in hf_key_map(config).items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, dtype)
    save_file(tensors, str(directory / "model.safetensors"))
    hf = dict(model_type="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
              num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
              max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
              rope_parameters={"rope_theta": config.rope_theta, "rope_type": "default"}, hidden_act="silu",
              tie_word_embeddings=config.tie_word_embeddings)
    hf.update(overrides or {})
    (directory / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("config", [GQA, TIED], ids=["gqa-untied", "mha-tied"])
def test_load_directory_round_trips_params_exactly(tmp_path, config):
    variables = random_variables(Llama(config), seed=4)
    write_hf_dir(tmp_path, config, variables)
    model, loaded, tokenizer, loaded_config = jlora.models.load(tmp_path)
    assert loaded_config == config and tokenizer is None
    assert flat(loaded["params"]).keys() == flat(variables["params"]).keys()
    for path, value in flat(variables["params"]).items():
        np.testing.assert_array_equal(flat(loaded["params"])[path], value, err_msg=path)


def test_load_bfloat16_safetensors_into_float32_params(tmp_path):
    import ml_dtypes

    variables = random_variables(Llama(GQA))
    write_hf_dir(tmp_path, GQA, variables, dtype=ml_dtypes.bfloat16)
    _, loaded, _, _ = jlora.models.load(tmp_path)
    kernel = loaded["params"]["layers_1"]["self_attn"]["k_proj"]["kernel"]
    expected = variables["params"]["layers_1"]["self_attn"]["k_proj"]["kernel"].astype(jnp.bfloat16)
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(kernel, expected.astype(jnp.float32))


def test_wrong_key_value_head_count_names_tensor_and_both_shapes(tmp_path):
    write_hf_dir(tmp_path, GQA, random_variables(Llama(GQA)), {"num_key_value_heads": 4})
    message = (r"'model\.layers\.0\.self_attn\.k_proj\.weight' gives shape \(32, 16\) "
               r"for layers_0/self_attn/k_proj/kernel, but the config implies \(32, 32\)")
    with pytest.raises(CheckpointError, match=message):
        jlora.models.load(tmp_path)


def test_tied_and_untied_mixups_are_refused(tmp_path):
    write_hf_dir(tmp_path, GQA, random_variables(Llama(GQA)), {"tie_word_embeddings": True})
    with pytest.raises(CheckpointError, match=r"ties the output head to 'model\.embed_tokens\.weight', but the file "
                                              r"stores a different 'lm_head\.weight'"):
        jlora.models.load(tmp_path)
    write_hf_dir(tmp_path, TIED, random_variables(Llama(TIED)), {"tie_word_embeddings": False})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\).*\['lm_head\.weight'\]"):
        jlora.models.load(tmp_path)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    write_hf_dir(tmp_path, GQA, random_variables(Llama(GQA)),
                 {"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(NotImplementedError, match="rope scaling 'yarn'"):
        jlora.models.load(tmp_path)
    write_hf_dir(tmp_path, GQA, random_variables(Llama(GQA)),
                 {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match=r"the config lacks \['low_freq_factor', 'high_freq_factor', "
                                         r"'original_max_position_embeddings'\]"):
        jlora.models.load(tmp_path)


# ---------------------------------------------------------------- GGUF

def llama_cpp_permute(weight, num_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to HF q/k weights."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_unpermute_rope_inverts_llama_cpp_permutation():
    weight = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 3, 6):
        permuted = llama_cpp_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(unpermute_rope(permuted, heads), weight)


# A byte-level vocabulary: 256 byte symbols, four merges, three control tokens.
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["h e", "l l", "he ll", "Ġ w"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + BYTES + ["".join(m.split()) for m in MERGES]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
GGUF_CONFIG = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          rope_theta=10000.0, rms_norm_eps=float(np.float32(1e-5)),  # GGUF stores float32
                          bos_token_id=1, eos_token_id=2)
Q8_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1


def write_gguf(path, config, variables, quantized=None):
    """A llama.cpp-style GGUF: torch-layout tensors, q/k permuted, optional quantized tensors.

    Returns:
      `{param_path: the value a correct loader must give}` (quantized tensors round-tripped).
    """
    c = config
    quantized = quantized or {}
    params = flat(variables["params"])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    expected = {}

    def add(name, value):
        value = np.asarray(value, np.float32)
        if name in quantized:
            data = gguf.quants.quantize(value, quantized[name])
            writer.add_tensor(name, data, raw_dtype=quantized[name])
            value = gguf.quants.dequantize(data, quantized[name])
        else:
            writer.add_tensor(name, value)
        return value

    expected["embed_tokens/embedding"] = add("token_embd.weight", params["embed_tokens/embedding"])
    expected["norm/weight"] = add("output_norm.weight", params["norm/weight"])
    if not c.tie_word_embeddings:
        expected["lm_head/kernel"] = add("output.weight", params["lm_head/kernel"].T).T
    for i in range(c.num_hidden_layers):
        p, b = f"layers_{i}", f"blk.{i}"
        for ours, theirs in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]:
            expected[f"{p}/{ours}/weight"] = add(f"{b}.{theirs}.weight", params[f"{p}/{ours}/weight"])
        for ours, theirs, heads in [("self_attn/q_proj", "attn_q", c.num_attention_heads),
                                    ("self_attn/k_proj", "attn_k", c.num_key_value_heads),
                                    ("self_attn/v_proj", "attn_v", None), ("self_attn/o_proj", "attn_output", None),
                                    ("mlp/gate_proj", "ffn_gate", None), ("mlp/up_proj", "ffn_up", None),
                                    ("mlp/down_proj", "ffn_down", None)]:
            torch_layout = np.asarray(params[f"{p}/{ours}/kernel"]).T
            if heads:
                rows = llama_cpp_permute(np.arange(torch_layout.shape[0]), heads)
                stored = add(f"{b}.{theirs}.weight", torch_layout[rows])
                expected[f"{p}/{ours}/kernel"] = stored[np.argsort(rows)].T
            else:
                expected[f"{p}/{ours}/kernel"] = add(f"{b}.{theirs}.weight", torch_layout).T
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_gguf_loads_weights_and_config_exactly(tmp_path, tied):
    config = LlamaConfig(**{**GGUF_CONFIG.__dict__, "tie_word_embeddings": tied})
    model = Llama(config)
    variables = random_variables(model, seed=7)
    write_gguf(tmp_path / "tiny.gguf", config, variables)
    loaded_model, loaded, tokenizer, loaded_config = jlora.models.load(tmp_path / "tiny.gguf")
    assert loaded_config == config
    assert flat(loaded["params"]).keys() == flat(variables["params"]).keys()
    for path, value in flat(variables["params"]).items():
        np.testing.assert_array_equal(flat(loaded["params"])[path], value, err_msg=path)
    tokens = jnp.array([[3, 100, 7, 250, 12]])
    np.testing.assert_array_equal(jax.jit(loaded_model.apply)(loaded, tokens), jax.jit(model.apply)(variables, tokens))


def test_gguf_quantized_tensors_are_dequantized(tmp_path):
    model = Llama(GGUF_CONFIG)
    variables = random_variables(model, seed=8)
    quantized = {"blk.0.ffn_down.weight": Q8_0, "blk.1.attn_q.weight": Q4_1, "blk.1.ffn_gate.weight": Q4_1}
    expected = write_gguf(tmp_path / "q.gguf", GGUF_CONFIG, variables, quantized)
    _, loaded, _, _ = jlora.models.load(tmp_path / "q.gguf")
    params = flat(loaded["params"])
    for path, value in expected.items():
        np.testing.assert_array_equal(params[path], value, err_msg=path)
    original = flat(variables["params"])
    q_error = np.abs(params["layers_1/self_attn/q_proj/kernel"] - original["layers_1/self_attn/q_proj/kernel"]).max()
    assert 0 < q_error < 0.2  # 4-bit: lossy, but the permutation is undone (a wrong one would be ~1.0 off)


def test_gguf_tokenizer_from_metadata(tmp_path):
    write_gguf(tmp_path / "t.gguf", GGUF_CONFIG, random_variables(Llama(GGUF_CONFIG)))
    _, _, tokenizer, _ = jlora.models.load(tmp_path / "t.gguf")
    index = {token: i for i, token in enumerate(TOKENS)}
    ids = tokenizer.encode("<|im_start|>hello world 42")
    assert ids == [1, index["hell"], index["o"], index["Ġw"], index["o"], index["r"], index["l"], index["d"],
                   index["Ġ"], index["4"], index["2"]]
    assert tokenizer.decode(ids) == "<|im_start|>hello world 42"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world 42"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, len(TOKENS))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"


def test_truncated_gguf_is_reported_with_its_path(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(path, GGUF_CONFIG, random_variables(Llama(GGUF_CONFIG)))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf is not a readable GGUF file"):
        jlora.models.load(path)


def test_gguf_with_a_different_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotImplementedError, match=r"GGUF architecture is 'phi3'; jlora.models.gguf reads \['gemma', 'llama', 'qwen2', 'qwen3'\]"):
        jlora.models.load(tmp_path / "g.gguf")


def test_gguf_lacking_a_key_the_shape_needs_is_one_error_naming_file_and_key(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "short.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)  # no feed_forward_length
    writer.add_token_list(TOKENS)
    writer.add_tensor("token_embd.weight", np.zeros((len(TOKENS), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"short\.gguf: GGUF metadata lacks llama\.feed_forward_length, which "
                                              r"the model's shape needs"):
        jlora.models.load(tmp_path / "short.gguf")
    metadata = {"general.architecture": "qwen2", "qwen2.attention.head_count": "two"}
    with pytest.raises(CheckpointError, match=r"^x\.gguf: GGUF metadata: 'qwen2\.attention\.head_count' is \"two\"; "
                                              r"expected an integer or null$"):
        jlora.models.gguf.config_from_gguf(metadata, [], source="x.gguf")
    metadata = {"general.architecture": "qwen2", "qwen2.attention.head_count": 2, **{f"qwen2.{k}": 16 for k in (
        "embedding_length", "feed_forward_length", "block_count", "context_length", "attention.layer_norm_rms_epsilon")}}
    with pytest.raises(CheckpointError, match=r"neither qwen2\.vocab_size nor tokenizer\.ggml\.tokens"):
        jlora.models.gguf.config_from_gguf(metadata, [], source="x.gguf")
    assert jlora.models.gguf.config_from_gguf({**metadata, "qwen2.vocab_size": 16}, []).vocab_size == 16


def test_gguf_with_an_unknown_pre_tokenizer_is_refused():
    from jlora.models import Tokenizer

    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken", "tokenizer.ggml.tokens": TOKENS,
                "tokenizer.ggml.merges": MERGES}
    with pytest.raises(NotImplementedError, match=r"pre-tokenizer 'tekken' is not implemented; known: \['default'"):
        Tokenizer.from_gguf_metadata(metadata)
    with pytest.raises(NotImplementedError, match=r"tokenizer model is 'llama'; only byte-level BPE"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.model": "llama"})


def test_gguf_blocks_are_kept_as_shipped(tmp_path):
    # Q4_0/Q4_1/Q8_0 tensors stay in their blocks (the q/k rope rows unpermuted with their scales) and
    # dequantise to exactly what the dequantizing loader gives.
    model = Llama(GGUF_CONFIG)
    variables = random_variables(model, seed=9)
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    quantized = {"token_embd.weight": Q8_0, "blk.0.ffn_down.weight": Q8_0, "blk.1.attn_q.weight": Q4_1,
                 "blk.1.attn_k.weight": Q4_0}
    write_gguf(tmp_path / "q.gguf", GGUF_CONFIG, variables, quantized)
    _, loaded, _, config = jlora.models.load(tmp_path / "q.gguf")
    kept = jlora.models.quantize_base(tmp_path / "q.gguf", loaded, config, "gguf")
    formats = {p: leaf.format for p, leaf in jlora.paths.leaves(kept) if isinstance(leaf, jlora.Quantized)}
    assert formats == {"params/embed_tokens/embedding": "q8_0", "params/layers_0/mlp/down_proj/kernel": "q8_0",
                       "params/layers_1/self_attn/q_proj/kernel": "q4_1", "params/layers_1/self_attn/k_proj/kernel": "q4_0"}
    q_proj = kept["params"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert q_proj.nbytes == 64 * 64 // 32 * 20  # 64 rows of 2 blocks: float16 scale and min, 16 bytes of codes
    dense = flat(jlora.dequantize(kept)["params"])
    for path, value in flat(loaded["params"]).items():
        np.testing.assert_array_equal(dense[path], value, err_msg=path)
    with pytest.raises(ValueError, match=r"base 'smollm2-135m-dir' is not a GGUF file; choose nf4, int4 or int8"):
        jlora.models.quantize_base("smollm2-135m-dir", loaded, config, "gguf")

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jlora.models
import tiny
from jlora.models import CheckpointError, GPT2, GPT2Config, generate
from jlora.models.gpt2 import hf_key_map

CONFIG = GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=4)
# Every param N(0, 0.3), biases and norm scales included, so a misplaced tensor changes the output.
random_variables = partial(tiny.random_variables, std=0.3, norms=0.0)


def flat(params):
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def write_hf_dir(directory, config, variables, hf_config_overrides=None):
    """A GPT2LMHeadModel-shaped directory: 'transformer.'-prefixed Conv1D tensors, old mask buffers, tied lm_head."""
    params = flat(variables["params"])
    tensors = {f"transformer.{name}": np.asarray(params[path]) for name, (path, _) in hf_key_map(config).items()}
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    hf = dict(model_type="gpt2", vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
              n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5)
    hf.update(hf_config_overrides or {})
    (directory / "config.json").write_text(json.dumps(hf))


def test_param_paths_are_hugging_face_names_with_2d_kernels():
    variables = jax.eval_shape(GPT2(CONFIG).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shapes = {path: leaf.shape for path, leaf in flat(variables["params"]).items()}
    expected = {"wte/embedding": (61, 16), "wpe/embedding": (32, 16), "ln_f/scale": (16,), "ln_f/bias": (16,)}
    for i in range(2):
        expected.update({
            f"h_{i}/ln_1/scale": (16,), f"h_{i}/ln_1/bias": (16,),
            f"h_{i}/attn/c_attn/kernel": (16, 48), f"h_{i}/attn/c_attn/bias": (48,),
            f"h_{i}/attn/c_proj/kernel": (16, 16), f"h_{i}/attn/c_proj/bias": (16,),
            f"h_{i}/ln_2/scale": (16,), f"h_{i}/ln_2/bias": (16,),
            f"h_{i}/mlp/c_fc/kernel": (16, 64), f"h_{i}/mlp/c_fc/bias": (64,),
            f"h_{i}/mlp/c_proj/kernel": (64, 16), f"h_{i}/mlp/c_proj/bias": (16,),
        })
    assert shapes == expected


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_logits_are_float32_batch_by_time_by_vocab_and_head_is_tied():
    model = GPT2(CONFIG)
    variables = random_variables(model)
    tokens = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    logits = jax.jit(model.apply)(variables, tokens)
    assert logits.shape == (2, 5, 61) and logits.dtype == jnp.float32
    _, state = jax.jit(partial(model.apply, capture_intermediates=True))(variables, tokens)
    final_hidden = state["intermediates"]["ln_f"]["__call__"][0]
    np.testing.assert_allclose(logits, final_hidden @ variables["params"]["wte"]["embedding"].T, atol=1e-5)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = GPT2(CONFIG)
    variables = random_variables(model)
    tokens = jnp.array([[5, 9, 2, 7, 1, 3]])
    changed = tokens.at[0, 3].set(40)
    before, after = jax.jit(model.apply)(variables, tokens), jax.jit(model.apply)(variables, changed)
    np.testing.assert_allclose(before[:, :3], after[:, :3], atol=1e-6)
    assert np.abs(before[:, 3:] - after[:, 3:]).min() > 1e-4


def test_cached_steps_equal_full_forward_passes():
    model = GPT2(CONFIG)
    variables = random_variables(model)
    tokens = jnp.array([[5, 9, 2, 7, 1, 3, 11, 30], [8, 8, 1, 0, 60, 4, 2, 9]])
    full = jax.jit(model.apply)(variables, tokens)
    cache = model.init_cache(batch_size=2, max_length=8)
    prefill, cache = jax.jit(model.apply)(variables, tokens[:, :5], cache)
    np.testing.assert_allclose(prefill, full[:, :5], atol=1e-5)
    for t in range(5, 8):
        step, cache = jax.jit(model.apply)(variables, tokens[:, t:t + 1], cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
    assert int(cache["index"]) == 8


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_greedy_generation_equals_recomputing_the_whole_sequence_each_token():
    model = GPT2(CONFIG)
    variables = random_variables(model)
    prompt = np.array([[5, 9, 2], [1, 1, 4]])
    ids = generate(model.apply, variables, prompt, model.init_cache(2, 9), max_new_tokens=6)
    recomputed = prompt
    forward = jax.jit(model.apply)
    for _ in range(6):
        next_token = np.argmax(forward(variables, jnp.asarray(recomputed))[:, -1], axis=-1)
        recomputed = np.concatenate([recomputed, next_token[:, None]], axis=1)
    np.testing.assert_array_equal(ids, recomputed)


def test_bfloat16_params_and_compute_stay_close_to_float32():
    variables = random_variables(GPT2(CONFIG))
    tokens = jnp.array([[5, 9, 2, 7, 1, 3]])
    reference = jax.jit(GPT2(CONFIG).apply)(variables, tokens)
    model = GPT2(CONFIG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), variables)
    logits = jax.jit(model.apply)(bf16, tokens)
    assert logits.dtype == jnp.float32
    initialized = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(initialized)} == {jnp.dtype(jnp.bfloat16)}
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


def test_load_directory_round_trips_params_exactly(tmp_path):
    model = GPT2(CONFIG)
    variables = random_variables(model, seed=3)
    write_hf_dir(tmp_path, CONFIG, variables)
    loaded_model, loaded, tokenizer, config = jlora.models.load(tmp_path)
    assert config == CONFIG and tokenizer is None
    for path, value in flat(variables["params"]).items():
        np.testing.assert_array_equal(flat(loaded["params"])[path], value, err_msg=path)
    tokens = jnp.array([[1, 2, 3]])
    np.testing.assert_array_equal(jax.jit(loaded_model.apply)(loaded, tokens), jax.jit(model.apply)(variables, tokens))


def test_load_in_bfloat16_stores_bfloat16_params(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_variables(GPT2(CONFIG)))
    model, variables, _, _ = jlora.models.load(tmp_path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.jit(model.apply)(variables, jnp.array([[1, 2]])).shape == (1, 2, 61)


def test_config_that_does_not_match_the_weights_names_tensor_and_both_shapes(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_variables(GPT2(CONFIG)), {"vocab_size": 60})
    with pytest.raises(CheckpointError, match=r"'wte.weight' gives shape \(61, 16\) for wte/embedding, "
                                              r"but the config implies \(60, 16\)"):
        jlora.models.load(tmp_path)


def test_checkpoint_with_more_layers_than_the_config_is_refused(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_variables(GPT2(CONFIG)), {"n_layer": 1})
    with pytest.raises(CheckpointError, match=r"does not account for.*h\.1\."):
        jlora.models.load(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_variables(GPT2(CONFIG)), {"n_layer": 3})
    with pytest.raises(CheckpointError, match=r"lacks 12 tensor\(s\).*'h\.2\.ln_1\.weight'"):
        jlora.models.load(tmp_path)


def test_truncated_safetensors_is_reported_with_its_path(tmp_path):
    write_hf_dir(tmp_path, CONFIG, random_variables(GPT2(CONFIG)))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        jlora.models.load(tmp_path)


def test_directory_without_weights_says_what_it_holds(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors.*\['config\.json'\]"):
        jlora.models.load(tmp_path)


def test_gpt2_tokenizer_from_vocab_and_merges(tmp_path):
    from tokenizers import pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = ["h e", "l l", "he ll", "Ġ w"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from jlora.models import Tokenizer

    tokenizer = Tokenizer.from_hf_dir(tmp_path, {"bos_token_id": vocab["<|endoftext|>"],
                                                 "eos_token_id": vocab["<|endoftext|>"]})
    ids = tokenizer.encode("hello world<|endoftext|>")
    assert ids == [vocab["hell"], vocab["o"], vocab["Ġw"], vocab["o"], vocab["r"], vocab["l"], vocab["d"],
                   vocab["<|endoftext|>"]]
    assert tokenizer.decode(ids) == "hello world<|endoftext|>"
    assert tokenizer.eos_id == tokenizer.bos_id == 260 and tokenizer.vocab_size == 261

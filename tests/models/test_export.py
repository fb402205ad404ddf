"""Merged export to Hugging Face's layout: transformers loads it with jlora's logits, jlora loads it bitwise."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
import jlora.models
from helpers import trained
from jlora.interop import hf as export
from jlora.models import gpt2, llama
from tiny import random_variables, randomized_torch

TOKENS = [[5, 17, 2, 60, 33, 1, 9, 44, 12, 3], [0, 61, 7, 7, 20, 39, 41, 2, 8, 50]]
GPT2 = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
LLAMA = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0,
                          rms_norm_eps=1e-5, eos_token_id=(2, 3))
CONFIGS = {
    "gpt2": GPT2,
    "llama-untied": LLAMA,
    "llama-tied": dataclasses.replace(LLAMA, tie_word_embeddings=True),
    "llama-bias": dataclasses.replace(LLAMA, attention_bias=True, mlp_bias=True, num_key_value_heads=1),
}
# The tied cases adapt the shared embedding, so its change must reach both the lookup and the head.
TARGETS = {
    "gpt2": ["c_attn", "c_fc", "wte"],
    "llama-untied": ["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"],
    "llama-tied": ["q_proj", "o_proj", "up_proj", "embed_tokens"],
}


def variables_of(config, param_dtype=jnp.float32):
    """Random variables of the config's model: a misplaced or mis-transposed tensor shows in the logits."""
    return random_variables(export.family(config).model(config, param_dtype=param_dtype))


@pytest.mark.slow  # heavy compile: kept out of the fast tier
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_directory_loads_back_bitwise(tmp_path, name, param_dtype):
    config = CONFIGS[name]
    variables = variables_of(config, param_dtype)
    export.save_hf(tmp_path, variables, config)
    _, loaded, _, loaded_config = jlora.models.load(tmp_path, param_dtype=param_dtype)
    assert loaded_config == config
    chex.assert_trees_all_equal(loaded, variables, strict=True)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == jnp.dtype(param_dtype).name
    stored = load_file(tmp_path / "model.safetensors")
    assert {str(a.dtype) for a in stored.values()} == {jnp.dtype(param_dtype).name}
    assert ("lm_head.weight" in stored) == (name in ("llama-untied", "llama-bias"))


def test_config_json_is_the_reverse_of_from_hf(tmp_path):
    export.save_hf(tmp_path, variables_of(CONFIGS["llama-bias"]), CONFIGS["llama-bias"])
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["architectures"], written["hidden_act"]) == ("llama", ["LlamaForCausalLM"], "silu")
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000.0}
    assert (written["num_key_value_heads"], written["attention_bias"], written["eos_token_id"]) == (1, True, [2, 3])
    assert llama.LlamaConfig.from_hf(written) == CONFIGS["llama-bias"]
    export.save_hf(tmp_path, variables_of(GPT2), GPT2)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["architectures"], written["n_embd"]) == ("gpt2", ["GPT2LMHeadModel"], 32)
    assert gpt2.GPT2Config.from_hf(written) == GPT2


def test_params_that_do_not_fit_the_config_are_refused(tmp_path):
    variables = variables_of(GPT2)
    with pytest.raises(export.CheckpointError, match=r"missing \['h_1/attn/c_attn/bias'\], unexpected \[\]"):
        params = jax.tree.map(lambda x: x, variables["params"])
        del params["h_1"]["attn"]["c_attn"]["bias"]
        export.save_hf(tmp_path, {"params": params}, GPT2)
    with pytest.raises(export.CheckpointError, match=r"28 param\(s\) have shapes this GPT2Config does not imply: "
                                                     r"h_0/attn/c_attn/bias \(96,\) \(config: \(144,\)\), "):
        export.save_hf(tmp_path, variables, dataclasses.replace(GPT2, n_embd=48))
    with pytest.raises(TypeError, match=r"dict is not a model config jlora can export; known: GPT2Config, LlamaConfig"):
        export.save_hf(tmp_path, variables, {"model_type": "gpt2"})
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.interop
@pytest.mark.parametrize("name", list(TARGETS))
def test_merged_export_loads_in_transformers_with_jloras_logits(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = CONFIGS[name]
    if isinstance(config, gpt2.GPT2Config):
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**dataclasses.asdict(config)))
    else:
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items() if k != "rope_theta"}
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **fields, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}))
    randomized_torch(theirs).save_pretrained(tmp_path / "base", safe_serialization=True)
    model, variables, _, loaded = jlora.models.load(str(tmp_path / "base"))
    assert loaded == config

    merged = jlora.merge(variables, trained(jlora.init(variables, rank=4, alpha=8.0, targets=TARGETS[name]), seed=1))
    ours = np.asarray(jax.jit(model.apply)(merged, jnp.array(TOKENS)))
    assert np.abs(ours - np.asarray(jax.jit(model.apply)(variables, jnp.array(TOKENS)))).max() > 0.1
    export.save_hf(tmp_path / "merged", merged, config)
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert type(exported).__name__ == export.family(config).architecture
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        expected = exported.eval()(torch.tensor(TOKENS)).logits.numpy()
    diff = np.abs(ours - expected).max()
    print(f"{name}: merged export max |logit diff| {diff:.2e}")
    assert diff < 1e-4

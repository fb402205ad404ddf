"""Llama 3, Qwen2, Qwen3, Mistral and Gemma: each a tiny random transformers model, loaded by jlora with the
same logits, adapted by LoRA as its merge, and exported back (PEFT adapter, merged directory) to the same logits."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models
from helpers import assert_adapt_equals_merge, assert_trees_close, float32_tol, trained
from jlora.interop import peft as jpeft
from jlora.interop import hf as export
from jlora.models import llama
from tiny import LLAMA_LINEAR, random_variables, randomized_torch

pytestmark = pytest.mark.interop

TOKENS = [[5, 17, 2, 60, 33, 1, 9, 44, 12, 3, 3, 58], [0, 61, 7, 7, 20, 39, 41, 2, 8, 50, 11, 6]]
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
REDUCTION = max(SIZES["hidden_size"], SIZES["intermediate_size"])  # the longest sum inside a layer
# head_dim 16 gives the llama3 rope all three regimes: wavelengths 6.3 (kept), 20 (smoothed), 63 and up (slowed).
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)

# name: (transformers config class, its settings, the switches that make the family; each must change the logits)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(head_dim=16, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
               dict(rope_scaling=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), dict(qkv_bias=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16), dict(qk_norm=False)),
    "mistral": ("MistralConfig", dict(sliding_window=4), dict(sliding_window=None)),
    "gemma": ("GemmaConfig", dict(head_dim=16),
              dict(norm_unit_offset=False, scale_embeddings=False, hidden_act="silu")),
}
NAMES = list(FAMILIES)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def their_config(name):
    config_class, settings, _ = FAMILIES[name]
    return getattr(transformers, config_class)(**SIZES, **settings)


def their_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """`name -> (directory, torch model, jlora model, variables, config)`: one random checkpoint per family."""
    made = {}

    def get(name):
        if name not in made:
            theirs = randomized_torch(transformers.AutoModelForCausalLM.from_config(their_config(name)), seed=2)
            directory = tmp_path_factory.mktemp(name)
            theirs.save_pretrained(directory, safe_serialization=True)
            model, variables, _, config = jlora.models.load(directory)
            made[name] = directory, theirs, model, variables, config
        return made[name]

    return get


def lora_targets(config):
    # A tied embedding is both lookup and head: adapting it checks that its change reaches both.
    return LLAMA_LINEAR + (["embed_tokens"] if config.tie_word_embeddings else ["lm_head"])


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(hf_base, name):
    _, theirs, model, variables, config = hf_base(name)
    assert config.model_type == their_config(name).model_type
    forward = jax.jit(model.apply)
    ours = np.asarray(forward(variables, jnp.array(TOKENS)))
    expected = their_logits(theirs)
    assert np.abs(expected).max() > 1.0
    assert np.abs(ours - expected).max() < float32_tol(expected, REDUCTION)
    # Each switch of the family is exercised: without it the logits move far beyond the tolerance (< 1e-3).
    for field, value in FAMILIES[name][2].items():
        other = llama.Llama(dataclasses.replace(config, **{field: value}))
        assert np.abs(np.asarray(jax.jit(other.apply)(variables, jnp.array(TOKENS))) - expected).max() > 1e-2, field


def test_config_of_each_family():
    configs = {name: llama.LlamaConfig.from_hf(their_config(name).to_dict()) for name in NAMES}
    assert configs["llama3"].rope_scaling == llama.Llama3RopeScaling(8.0, 1.0, 4.0, 32)
    assert (configs["llama3"].head_dim, configs["llama3"].tie_word_embeddings) == (16, True)
    assert (configs["qwen2"].qkv_bias, configs["qwen2"].attention_bias, configs["qwen2"].sliding_window) == (True, False, None)
    assert (configs["qwen3"].qk_norm, configs["qwen3"].head_dim) == (True, 16)
    assert (configs["mistral"].sliding_window, configs["mistral"].num_key_value_heads) == (4, 2)
    gemma = configs["gemma"]
    assert (gemma.norm_unit_offset, gemma.scale_embeddings, gemma.hidden_act, gemma.head_dim) == (
        True, True, "gelu_pytorch_tanh", 16)
    assert gemma.tie_word_embeddings


def test_llama_3_2_config_json_as_published():
    """The rope scaling fields as Llama-3.2-1B's config.json (written by transformers 4.45) has them."""
    published = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                 "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                 "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    config = llama.LlamaConfig.from_hf(published)
    assert (config.rope_theta, config.rope_scaling) == (500000.0, llama.Llama3RopeScaling(32.0, 1.0, 4.0, 8192))
    assert (config.tie_word_embeddings, config.eos_token_id) == (True, (128001, 128008, 128009))
    assert llama.LlamaConfig.from_hf(config.to_hf()) == config


def test_what_is_not_implemented_is_refused():
    qwen2 = their_config("qwen2").to_dict()
    with pytest.raises(NotImplementedError, match=r"qwen2 config uses sliding-window layers \(use_sliding_window=True, "
                                                  r"layer_types \['sliding_attention'\]\)"):
        llama.LlamaConfig.from_hf({**qwen2, "use_sliding_window": True,
                                   "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(NotImplementedError, match=r"gemma config has hidden_act='relu'"):
        llama.LlamaConfig.from_hf({**their_config("gemma").to_dict(), "hidden_act": "relu"})
    with pytest.raises(NotImplementedError, match=r"model_type='gemma2' is not a Llama-style family"):
        llama.LlamaConfig.from_hf({**their_config("gemma").to_dict(), "model_type": "gemma2"})
    with pytest.raises(ValueError, match=r"sliding_window=0 must be at least 1"):
        llama.LlamaConfig(**SIZES, sliding_window=0)


def test_sliding_window_hides_keys_that_far_back():
    config = llama.LlamaConfig.from_hf(their_config("mistral").to_dict())
    model = llama.Llama(config)
    variables = random_variables(model, seed=3)
    tokens = jnp.array(TOKENS)
    forward = jax.jit(model.apply)
    before, after = forward(variables, tokens), forward(variables, tokens.at[:, 2].set(40))
    # Position 2 is seen by queries 2..5 in the first layer, and through them by queries up to 8 in the second.
    np.testing.assert_array_equal(before[:, 9:], after[:, 9:])
    assert np.abs(before[:, 2:9] - after[:, 2:9]).min() > 1e-5
    # Cached decoding sees the same window.
    prefill, cache = forward(variables, tokens[:, :7], model.init_cache(2, 12))
    for t in range(7, 12):
        step, cache = forward(variables, tokens[:, t:t + 1], cache)
        np.testing.assert_allclose(step[:, 0], before[:, t], atol=1e-5)


def one_layer_with_adapters(name, targets=None):
    # std 0.1 keeps the float32 rounding of the factored and the merged route below the helpers' tolerance.
    config = dataclasses.replace(llama.LlamaConfig.from_hf(their_config(name).to_dict()), num_hidden_layers=1)
    model = llama.Llama(config)
    variables = random_variables(model)
    adapters = trained(jlora.init(variables, rank=4, alpha=8.0, targets=targets or lora_targets(config)), seed=1, std=0.1)
    return model, variables, adapters


@pytest.mark.parametrize("name", NAMES)
def test_lora_adapt_equals_merge(name):
    model, variables, adapters = one_layer_with_adapters(name)
    tokens = jnp.array(TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every adapted weight has a factored rule, no fallback to merging
        adapted = jax.jit(jlora.adapt(model.apply, strict=True))(variables, adapters, tokens)
    merged = jax.jit(model.apply)(jlora.merge(variables, adapters), tokens)
    assert_trees_close(adapted, merged)
    assert np.abs(merged - jax.jit(model.apply)(variables, tokens)).max() > 0.1


def test_lora_adapt_equals_merge_in_gradients_too():
    """Gemma has the most switches (scaled tied embedding, (1 + w) norms, GeGLU): values eagerly and jitted, and grads."""
    model, variables, adapters = one_layer_with_adapters("gemma")
    assert_adapt_equals_merge(model.apply, variables, adapters, jnp.array(TOKENS))


@pytest.mark.parametrize("name", NAMES)
def test_peft_export_gives_jloras_logits_in_peft(hf_base, tmp_path, name):
    from test_peft import load_in_peft

    directory, _, model, variables, config = hf_base(name)
    # PEFT adapts a tied embedding's lookup only, so jlora refuses to export one; the linear layers are the point here.
    targets = LLAMA_LINEAR + ([] if config.tie_word_embeddings else ["lm_head"])
    adapters = trained(jlora.init(variables, rank=4, alpha=8.0, targets=targets), seed=1)
    ours = np.asarray(jax.jit(jlora.adapt(model.apply))(variables, adapters, jnp.array(TOKENS)))
    assert np.abs(ours - np.asarray(jax.jit(model.apply)(variables, jnp.array(TOKENS)))).max() > 0.1
    jpeft.export_peft(adapters, config, tmp_path)
    assert np.abs(their_logits(load_in_peft(directory, tmp_path)) - ours).max() < float32_tol(ours, REDUCTION)
    back = jpeft.import_peft(tmp_path, variables, config)
    np.testing.assert_allclose(jax.jit(jlora.adapt(model.apply))(variables, back, jnp.array(TOKENS)), ours, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_merged_export_loads_in_transformers_with_jloras_logits(hf_base, tmp_path, name):
    _, _, model, variables, config = hf_base(name)
    adapters = trained(jlora.init(variables, rank=4, alpha=8.0, targets=lora_targets(config)), seed=1)
    merged = jlora.merge(variables, adapters)
    ours = np.asarray(jax.jit(model.apply)(merged, jnp.array(TOKENS)))
    export.save_hf(tmp_path, merged, config)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == (config.model_type, [export.family(config).architecture])
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(exported).__name__ == export.family(config).architecture
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert np.abs(their_logits(exported.eval()) - ours).max() < float32_tol(ours, REDUCTION)
    _, _, _, loaded = jlora.models.load(tmp_path)
    assert loaded == config


# ---------------------------------------------------------------- GGUF, written as llama.cpp's converter does

GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}


def llama_cpp_permute(weight, heads):
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(theta, dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """convert_hf_to_gguf.py's `rope_freqs.weight` for rope_type llama3."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelength = 2 * np.pi / freq
        if wavelength < original_max_position_embeddings / high_freq_factor:
            factors.append(1.0)
        elif wavelength > original_max_position_embeddings / low_freq_factor:
            factors.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def write_llama_cpp_gguf(path, name, theirs):
    """A float32 GGUF of the torch model as llama.cpp's converter writes it: its names, q/k rows permuted for the
    llama architecture, Gemma's norms stored plus one, Llama 3's rope scaling as a rope_freqs tensor."""
    import gguf

    config, arch = theirs.config, GGUF_ARCH[name]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # Qwen2 has none
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for hf_name, tensor in theirs.state_dict().items():
        if hf_name == "lm_head.weight" and (config.tie_word_embeddings or arch == "gemma"):
            continue
        value = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            value = llama_cpp_permute(value, config.num_attention_heads)
        if arch == "llama" and ".k_proj." in hf_name:
            value = llama_cpp_permute(value, config.num_key_value_heads)
        if arch == "gemma" and hf_name.endswith("norm.weight"):
            value = value + 1
        gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}.get(hf_name)
        if gguf_name is None:
            _, _, layer, *module, kind = hf_name.split(".")
            gguf_name = f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.{kind}"
        writer.add_tensor(gguf_name, value)
    if config.rope_parameters["rope_type"] == "llama3":
        rope = {k: v for k, v in config.rope_parameters.items() if k != "rope_type"}
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope.pop("rope_theta"), head_dim, **rope))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", list(GGUF_ARCH))
def test_gguf_written_like_llama_cpp_gives_transformers_logits(hf_base, tmp_path, name):
    _, theirs, _, hf_variables, hf_config = hf_base(name)
    write_llama_cpp_gguf(tmp_path / "tiny.gguf", name, theirs)
    model, variables, config = jlora.models.gguf.from_gguf(tmp_path / "tiny.gguf")
    assert (config.model_type, config.tie_word_embeddings, config.head_dim) == (
        hf_config.model_type, hf_config.tie_word_embeddings, hf_config.head_dim)
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.array(TOKENS)))
    assert np.abs(ours - their_logits(theirs)).max() < float32_tol(ours, REDUCTION)
    # The same params as from the Hugging Face directory (Gemma's norms only up to float32 rounding of w + 1 - 1).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), variables, hf_variables)
    if name == "llama3":  # rope_freqs factors have no config.json form: a merged export says so
        with pytest.raises(NotImplementedError, match="came from a GGUF's rope_freqs, which config.json cannot express"):
            export.save_hf(tmp_path / "merged", variables, config)


@pytest.mark.parametrize("arch, pre", [("llama", "llama-bpe"), ("qwen2", "qwen2")], ids=["llama3", "qwen2"])
def test_gguf_tokenizer_splits_as_transformers_gguf_tokenizer(tmp_path, arch, pre):
    """Llama 3's and Qwen's GGUFs name their split regex; transformers' own GGUF reader must encode the same ids."""
    import gguf

    from .test_llama import MERGES, SPECIALS, TOKENS

    merges = MERGES + ["1 2", "12 3", "4 5"]  # digits merge, so only the split can keep them apart
    vocabulary = TOKENS + ["12", "123", "45"]
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), arch)
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocabulary)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocabulary) - len(SPECIALS)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((len(vocabulary), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata, _ = jlora.quant.gguf.read(tmp_path / "t.gguf")
    ours = jlora.models.Tokenizer.from_gguf_metadata(metadata)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in ["hello world 12345 x1y22z4444", "it's I'LL  spaced\n\n\tlines  ", "naïve 東京 🙂!!\r\n", "<|im_start|>hello"]:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    index = {token: i for i, token in enumerate(vocabulary)}
    expected = [index["123"], index["45"]] if pre == "llama-bpe" else [index[d] for d in "12345"]
    assert ours.encode("12345") == expected  # Llama 3 keeps up to three digits together, Qwen none

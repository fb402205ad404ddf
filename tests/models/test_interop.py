"""Logits equal transformers' on the same small random checkpoints (needs torch and transformers)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora.models
from jlora.models import generate
from tiny import randomized_torch

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = [[5, 17, 2, 60, 33, 1, 9, 44, 12, 3, 3, 58], [0, 61, 7, 7, 20, 39, 41, 2, 8, 50, 11, 6]]


def their_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_gpt2_logits_equal_gpt2lmheadmodel(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    theirs = randomized_torch(transformers.GPT2LMHeadModel(config), seed=0)
    theirs.save_pretrained(tmp_path)
    model, variables, _, _ = jlora.models.load(tmp_path)
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.array(TOKENS)))
    expected = their_logits(theirs)
    assert np.abs(expected).max() > 1.0
    assert np.abs(ours - expected).max() < 1e-4


def test_gpt2_greedy_generation_equals_transformers_generate(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    theirs = randomized_torch(transformers.GPT2LMHeadModel(config), seed=1)
    theirs.save_pretrained(tmp_path)
    model, variables, _, _ = jlora.models.load(tmp_path)
    prompt = np.array(TOKENS)[:, :4]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                   pad_token_id=0).numpy()
    ours = generate(model.apply, variables, prompt, model.init_cache(2, 12), max_new_tokens=8)
    np.testing.assert_array_equal(ours, expected)


def test_gpt2_tokenizer_from_vocab_and_merges_equals_transformers(tmp_path):
    from tokenizers import pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "Ġ 4", "Ġ4 2"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ours = jlora.models.Tokenizer.from_hf_dir(tmp_path)
    theirs = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    for text in ["hello world", "hello world 42<|endoftext|>", "  spaced\n\nlines\t", "naïve 東京 🙂", "it's 1234"]:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text


LLAMA_CASES = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "mha-bias": dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", LLAMA_CASES, ids=list(LLAMA_CASES))
def test_llama_logits_equal_llamaforcausallm(tmp_path, case):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      max_position_embeddings=64, rope_theta=1000.0, rms_norm_eps=1e-5,
                                      **LLAMA_CASES[case])
    theirs = randomized_torch(transformers.LlamaForCausalLM(config), seed=2)
    theirs.save_pretrained(tmp_path)
    model, variables, _, loaded = jlora.models.load(tmp_path)
    assert loaded.tie_word_embeddings == config.tie_word_embeddings and loaded.rope_theta == 1000.0
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.array(TOKENS)))
    expected = their_logits(theirs)
    assert np.abs(expected).max() > 1.0
    assert np.abs(ours - expected).max() < 1e-4


def test_llama_gguf_written_like_llama_cpp_loads_the_same_in_transformers(tmp_path):
    """Our tiny llama.cpp-style GGUF (q/k permuted) means the same model to transformers' GGUF loader and to ours."""
    from .test_llama import GGUF_CONFIG, random_variables, write_gguf

    write_gguf(tmp_path / "tiny.gguf", GGUF_CONFIG, random_variables(jlora.models.Llama(GGUF_CONFIG), seed=9))
    model, variables, _, _ = jlora.models.load(tmp_path / "tiny.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    tokens = [[3, 100, 7, 250, 12, 40], [9, 9, 1, 0, 200, 260]]
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.array(tokens)))
    assert np.abs(ours - their_logits(theirs, tokens)).max() < 1e-4

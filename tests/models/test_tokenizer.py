"""jlora.models.tokenizer: a byte-level BPE from GGUF metadata (special tokens whole, BOS added when the
file says so, each pre-tokenizer the metadata names), from a HF directory, and the chat template."""

import json

import pytest

from jlora.models.tokenizer import CONTROL, Tokenizer

# A byte-level vocabulary: every byte a token (GPT-2's printable map for the ones used), two merges, two specials.
BYTES = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["Ġ", "Ċ"]
TOKENS = BYTES + ["ab", "abc", "<s>", "<|im_end|>"]
MERGES = ["a b", "ab c"]


def metadata(**extra):
    types = [1] * len(BYTES) + [1, 1, CONTROL, CONTROL]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": MERGES,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": TOKENS.index("<s>"),
            "tokenizer.ggml.eos_token_id": TOKENS.index("<|im_end|>"), **extra}


def test_merges_apply_and_decode_inverts_encode():
    tokenizer = Tokenizer.from_gguf_metadata(metadata())
    ids = tokenizer.encode("abc ab")
    assert [TOKENS[i] for i in ids] == ["abc", "Ġ", "ab"]
    assert tokenizer.decode(ids) == "abc ab"
    assert tokenizer.vocab_size == len(TOKENS)


def test_special_tokens_stay_whole_and_bos_is_added_when_the_file_says_so():
    plain = Tokenizer.from_gguf_metadata(metadata())
    assert plain.encode("a<|im_end|>") == [0, TOKENS.index("<|im_end|>")]
    with_bos = Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert with_bos.encode("a") == [TOKENS.index("<s>"), 0]
    assert with_bos.encode_with_offsets("a")[0] == [0]  # the template's text as written: no BOS
    assert with_bos.decode(with_bos.encode("a"), skip_special_tokens=True) == "a"


@pytest.mark.parametrize("pre, ids", [
    ("default", ["1", "2", "3"]),  # no merges among digits: bytes
    ("smollm", ["1", "2", "3"]),  # every digit its own word
    ("qwen2", ["1", "2", "3"]),
    ("llama-bpe", ["1", "2", "3"]),
])
def test_each_named_pre_tokenizer_is_built(pre, ids):
    tokenizer = Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.ggml.pre": pre}))
    assert [TOKENS[i] for i in tokenizer.encode("123")] == ids


def test_unknown_tokenizer_models_and_pre_tokenizers_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="GGUF tokenizer model is 'llama'; only byte-level BPE"):
        Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(NotImplementedError, match="GGUF pre-tokenizer 'deepseek-coder' is not implemented"):
        Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.ggml.pre": "deepseek-coder"}))


def test_chat_template_renders_with_the_special_tokens_and_refuses_without_one():
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer = Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.chat_template": template}))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<s>user: hi<|im_end|>assistant:"
    with pytest.raises(ValueError, match="this tokenizer has no chat template"):
        Tokenizer.from_gguf_metadata(metadata()).apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_template_that_raises_says_so():
    template = "{{ raise_exception('roles must alternate') }}"
    tokenizer = Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.chat_template": template}))
    with pytest.raises(ValueError, match="chat template error: roles must alternate"):
        tokenizer.apply_chat_template([])


def test_a_hugging_face_directory_gives_the_same_ids_and_its_special_tokens(tmp_path):
    ours = Tokenizer.from_gguf_metadata(metadata())
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ messages[0]['content'] }}"}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.encode("abc ab<|im_end|>") == ours.encode("abc ab<|im_end|>")
    assert (loaded.bos_id, loaded.eos_id) == (TOKENS.index("<s>"), TOKENS.index("<|im_end|>"))
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    assert Tokenizer.from_hf_dir(tmp_path / "missing") is None

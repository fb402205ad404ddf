"""Property tests of every reader of a user's file: the data loaders, the --config file, config.json,
safetensors headers and their index, tokenizer files, adapter_config.json, GGUF files and metadata.
Given arbitrary bytes, wrong JSON types, truncated or empty files or invalid UTF-8, each gives a
correct result or a jlora error (a ValueError, or NotImplementedError for a valid file of something
not implemented) whose message names the file; never another exception."""

import json
import struct

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jlora.cli import config as cli_config
from jlora.interop import peft
from jlora.models import checkpoint, gpt2, llama
from jlora.models import gguf as gguf_model
from jlora.models.tokenizer import Tokenizer
from jlora.quant import gguf as gguf_file
from jlora.training import data, loop

from tiny import tiny_tokenizer

EXAMPLES = 120
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=8)
json_texts = json_values.map(lambda v: json.dumps(v).encode())
# Bytes a file may hold: anything, empty, invalid UTF-8, JSON of any type.
raw = st.binary(max_size=120) | st.just(b"") | st.binary(min_size=1, max_size=40).map(lambda b: b"\xff\xfe" + b) | json_texts


def mutated(valid: dict):
    """``valid`` with some keys deleted and others given values of any JSON type."""
    keys = sorted(valid)
    return st.tuples(st.sets(st.sampled_from(keys), max_size=3), st.dictionaries(st.sampled_from(keys), json_values, max_size=3)).map(
        lambda change: {k: v for k, v in valid.items() if k not in change[0]} | change[1])


def holds(valid: dict):
    """Bytes of a file that should hold ``valid``: arbitrary ones, truncations of it, mutations of it."""
    text = json.dumps(valid).encode()
    return raw | st.integers(0, len(text)).map(lambda n: text[:n]) | mutated(valid).map(lambda v: json.dumps(v).encode())


def named_error_or_result(read, where, *, also=()):
    """``read()``'s result, or None after checking that it raised a jlora error naming ``where``."""
    try:
        return read()
    except (ValueError, NotImplementedError, *also) as error:
        assert str(where) in str(error), f"{type(error).__name__} not naming {where}: {error}"
        return None


# ---- data files ----

TOKENIZER = tiny_tokenizer()
RECORD = {"prompt": "ROMEO: ", "completion": "But soft"}


@SETTINGS
@given(lines=st.lists(holds(RECORD) | holds({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                      | holds({"instruction": "say", "input": "", "output": "so"}) | holds({"text": "ROMEO"}), min_size=0, max_size=4))
def test_a_jsonl_data_file_is_rows_or_an_error_naming_it(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    dataset = named_error_or_result(lambda: data.load([path], TOKENIZER, 16), path)
    assert dataset is None or dataset.tokens.shape[1] == 16


@SETTINGS
@given(content=raw | st.text(max_size=300).map(str.encode))
def test_a_text_data_file_is_rows_or_an_error_naming_it(tmp_path, content):
    path = tmp_path / "play.txt"
    path.write_bytes(content)
    dataset = named_error_or_result(lambda: data.load([path], TOKENIZER, 8), path)
    assert dataset is None or dataset.tokens.shape[1] == 8


@SETTINGS
@given(lines=st.lists(holds({"step": 1, "loss": 0.5}), max_size=4))
def test_a_history_file_is_its_entries_or_an_error_naming_it(tmp_path, lines):
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(lines))
    entries = named_error_or_result(lambda: loop.read_history(path, until=3), path)
    assert entries is None or all(isinstance(e, dict) and e["step"] <= 3 for e in entries)


# ---- the --config file ----


@SETTINGS
@given(content=raw | st.text(max_size=80).map(str.encode), suffix=st.sampled_from([".yaml", ".toml"]))
def test_a_config_file_is_a_mapping_or_an_error_naming_it(tmp_path, content, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_bytes(content)
    values = named_error_or_result(lambda: cli_config.read(path), path)
    assert values is None or isinstance(values, dict)


# ---- a model directory: config.json, the safetensors index and file, tokenizer files ----

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
         "rope_scaling": None, "hidden_act": "silu", "head_dim": 8}
GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}


@SETTINGS
@given(content=holds(LLAMA) | holds(GPT2))
def test_config_json_is_a_config_or_an_error_naming_it(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    path = tmp_path / "config.json"

    def read():
        hf = checkpoint.read_config(tmp_path)
        family = gpt2.GPT2Config if hf.get("model_type") == "gpt2" else llama.LlamaConfig
        return family.from_hf(hf, source=path)

    config = named_error_or_result(read, path)
    assert config is None or config.vocab_size >= 1


@SETTINGS
@given(content=holds({"metadata": {"total_size": 4}, "weight_map": {"model.norm.weight": "model-00001.safetensors"}}))
def test_a_safetensors_index_is_its_files_or_an_error_naming_it(tmp_path, content):
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    named_error_or_result(lambda: checkpoint.read_safetensors(tmp_path), tmp_path)


def safetensors_bytes(header: dict, payload: bytes = b"\0" * 16) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


HEADER = {"model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}


@SETTINGS
@given(content=raw | holds(HEADER).map(lambda b: struct.pack("<Q", len(b)) + b + b"\0" * 16)
       | st.integers(0, len(safetensors_bytes(HEADER))).map(lambda n: safetensors_bytes(HEADER)[:n]))
def test_a_safetensors_file_is_its_tensors_or_an_error_naming_it(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    tensors = named_error_or_result(lambda: checkpoint.read_safetensors(tmp_path), tmp_path / "model.safetensors")
    assert tensors is None or all(isinstance(v, np.ndarray) for v in tensors.values())


@SETTINGS
@given(config=holds({"eos_token": "<|im_end|>", "bos_token": {"content": "<|endoftext|>"}, "chat_template": "{{ x }}"}),
       backend=st.none() | raw)
def test_tokenizer_files_are_a_tokenizer_or_an_error_naming_the_file(tmp_path, config, backend):
    (tmp_path / "tokenizer_config.json").write_bytes(config)
    TOKENIZER.backend.save(str(tmp_path / "tokenizer.json"))
    if backend is not None:
        (tmp_path / "tokenizer.json").write_bytes(backend)
    tokenizer = named_error_or_result(lambda: Tokenizer.from_hf_dir(tmp_path, {"eos_token_id": 2}), tmp_path)
    assert tokenizer is None or tokenizer.encode("ROMEO") == TOKENIZER.encode("ROMEO")


# ---- a PEFT adapter's adapter_config.json ----

ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
           "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 4}, "bias": "none",
           "lora_dropout": 0.0, "modules_to_save": None, "layers_to_transform": None}


@SETTINGS
@given(content=holds(ADAPTER) | holds({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []}))
def test_adapter_config_json_is_a_config_or_an_error_naming_it(tmp_path, content):
    (tmp_path / "adapter_config.json").write_bytes(content)
    config = named_error_or_result(lambda: peft.read_config(tmp_path), tmp_path / "adapter_config.json")
    assert config is None or isinstance(config, dict)


# ---- GGUF: the file, then the metadata a model and its tokenizer are built from ----


def tiny_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@SETTINGS
@given(cut=st.integers(0, 10_000), content=st.none() | raw)
def test_a_gguf_file_is_its_contents_or_an_error_naming_it(tmp_path, cut, content):
    path = tmp_path / "m.gguf"
    whole = tiny_gguf(path)
    path.write_bytes(whole[:cut] if content is None else b"GGUF" + content)
    contents = named_error_or_result(lambda: gguf_file.read(path), path)
    assert contents is None or cut >= len(whole) and contents[1]["token_embd.weight"].shape == (4, 8)


METADATA = {"general.architecture": "llama", "llama.block_count": 1, "llama.context_length": 32, "llama.embedding_length": 16,
            "llama.feed_forward_length": 32, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0, "llama.vocab_size": 4,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
            "tokenizer.ggml.token_type": [1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.bos_token_id": 3,
            "tokenizer.ggml.eos_token_id": 3, "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": "{{ x }}"}


@SETTINGS
@given(metadata=mutated(METADATA))
def test_gguf_metadata_is_a_model_config_and_tokenizer_or_an_error_naming_the_file(metadata):
    named_error_or_result(lambda: gguf_model.config_from_gguf(metadata, ["token_embd.weight"], source="m.gguf"), "m.gguf")
    tokenizer = named_error_or_result(lambda: Tokenizer.from_gguf_metadata(metadata, source="m.gguf"), "m.gguf")
    assert tokenizer is None or tokenizer.backend.get_vocab_size() >= 1


def test_the_valid_files_the_properties_start_from_read(tmp_path):
    """The properties above hold for readers that refuse everything too; the unmutated files read."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert llama.LlamaConfig.from_hf(checkpoint.read_config(tmp_path), source="c").head_dim == 8
    assert gpt2.GPT2Config.from_hf(GPT2, source="c").head_dim == 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(ADAPTER))
    assert peft.read_config(tmp_path)["r"] == 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(ADAPTER | {"alpha_pattern": {"q_pr(oj": 4}}))
    with pytest.raises(peft.PeftFormatError, match=r"adapter_config.json: 'q_pr\(oj' is not a valid regular expression"):
        peft.read_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(HEADER))
    assert checkpoint.read_safetensors(tmp_path)["model.norm.weight"].shape == (4,)
    assert gguf_model.config_from_gguf(METADATA, ["token_embd.weight"], source="m").num_key_value_heads == 1
    assert Tokenizer.from_gguf_metadata(METADATA, source="m").encode("ab") == [2]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    TOKENIZER.backend.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_hf_dir(tmp_path).eos_id == 2
    (tmp_path / "run.yaml").write_text("rank: 4\n")
    assert cli_config.read(tmp_path / "run.yaml") == {"rank": 4}
    (tmp_path / "d.jsonl").write_text(json.dumps(RECORD) + "\n")
    assert data.load([tmp_path / "d.jsonl"], TOKENIZER, 16).tokens.shape == (1, 16)
    path = tmp_path / "m.gguf"
    assert gguf_file.read(path if tiny_gguf(path) else None)[1]["token_embd.weight"].shape == (4, 8)

"""Exports that stand alone: transformers reads the written folder alone (tokenizer, generation config,
weights) and encodes, renders chats and generates exactly as jlora does; files are readable by others."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import trained
from jlora.interop import card
from jlora.interop import hf as export
from jlora.models import Tokenizer, complete, llama
from tiny import random_variables, tiny_tokenizer

TEXTS = ["ROMEO: But soft, what light", "In 2024, 12345 apples", "naïve café 🙂\n\tx = 1",
         "<|im_start|>user\nHi<|im_end|>\n", "  two  spaces, then <|endoftext|> and more"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Juliet?"}]


def smollm2_tokenizer():
    """The default base's tokenizer, from its GGUF's metadata alone (no weights read)."""
    import gguf

    reader = gguf.GGUFReader(jlora.models.fetch_smollm2())
    return Tokenizer.from_gguf_metadata({k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")})


def assert_same_tokenizer(theirs, ours):
    for text in TEXTS:
        assert theirs(text).input_ids == ours.encode(text), text
        ids = ours.encode(text)
        assert theirs.decode(ids) == ours.decode(ids)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    rendered = ours.apply_chat_template(MESSAGES)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == rendered
    assert theirs(rendered).input_ids == ours.encode(rendered)
    if not ours.add_bos:  # transformers' apply_chat_template encodes without adding BOS
        chat_ids = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        assert (chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids) == ours.encode(rendered)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.eos_id)


@pytest.mark.interop
@pytest.mark.parametrize("add_bos", [False, True], ids=["as-is", "adds-bos"])
def test_autotokenizer_of_the_written_files_encodes_decodes_and_chats_as_jlora(tmp_path, add_bos):
    transformers = pytest.importorskip("transformers")
    ours = tiny_tokenizer(add_bos)
    export.save_tokenizer(tmp_path, ours, model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.is_fast and theirs.model_max_length == 64
    assert ("<|im_start|>" in TEXTS[3]) and ours.encode(TEXTS[3])[add_bos] == 1  # the special token stays whole
    assert_same_tokenizer(theirs, ours)
    assert ours.backend.post_processor is None  # the written copy adds BOS, jlora's own pipeline is untouched


@pytest.mark.interop
def test_the_smollm2_gguf_tokenizer_written_out_encodes_as_jlora(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = smollm2_tokenizer()
    export.save_tokenizer(tmp_path, ours)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_tokenizer(theirs, ours)
    assert ours.encode(ours.apply_chat_template(MESSAGES))[:3] == [1, 9690, 198]  # <|im_start|>system\n
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1000.0)


@pytest.mark.interop
def test_pipeline_on_the_merged_folder_alone_generates_jloras_greedy_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer = tiny_tokenizer()
    config = llama.LlamaConfig(vocab_size=tokenizer.vocab_size, **TINY)
    model = llama.Llama(config)
    variables = random_variables(model)
    merged = jlora.merge(variables, trained(jlora.init(variables, rank=4, targets=["q_proj", "v_proj"])))
    export.save_hf(tmp_path, merged, config, dtype="float32", tokenizer=tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "pad_token_id": 2, "eos_token_id": 2}

    prompt = "ROMEO: But"
    ours = complete(model, merged, tokenizer, prompt, 12)
    generate = transformers.pipeline("text-generation", model=str(tmp_path))
    theirs = generate(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert len(tokenizer.encode(ours)) >= 8  # a real continuation, not an early EOS
    assert theirs == prompt + ours


def safetensors_dtypes(path):
    """The dtypes a safetensors file's header names, and the bytes of tensor data after it."""
    with open(path, "rb") as file:
        size = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(size))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}, path.stat().st_size - 8 - size


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_bf16_export_halves_the_weights_and_every_file_has_the_umasks_mode(tmp_path, umask):
    tokenizer = tiny_tokenizer()
    config = llama.LlamaConfig(vocab_size=tokenizer.vocab_size, **TINY)
    variables = random_variables(llama.Llama(config))
    old = os.umask(umask)
    try:
        export.save_hf(tmp_path / "f32", variables, config, tokenizer=tokenizer)
        export.save_hf(tmp_path / "bf16", variables, config, dtype="bf16", tokenizer=tokenizer)
    finally:
        os.umask(old)
    weights = sum(x.size for x in jax.tree.leaves(variables))
    assert safetensors_dtypes(tmp_path / "bf16" / "model.safetensors") == ({"BF16"}, 2 * weights)
    assert safetensors_dtypes(tmp_path / "f32" / "model.safetensors") == ({"F32"}, 4 * weights)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for d in ("f32", "bf16") for p in (tmp_path / d).iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    loaded = jlora.models.load(tmp_path / "bf16")[1]
    np.testing.assert_array_equal(loaded["params"]["norm"]["weight"],
                                  np.asarray(variables["params"]["norm"]["weight"]).astype(jnp.bfloat16).astype(np.float32))


def test_an_unknown_export_dtype_is_refused_before_anything_is_written(tmp_path):
    config = llama.LlamaConfig(vocab_size=64, **TINY)
    with pytest.raises(ValueError, match=r"dtype 'float16' is not one an export is written in; choose one of "
                                         r"\['bf16', 'bfloat16', 'float32'\]"):
        export.save_hf(tmp_path, random_variables(llama.Llama(config)), config, dtype="float16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_base_source_names_the_hub_id_the_directory_or_the_gguf_quantisation(tmp_path):
    assert card.base_source("SmolLM2-135M") == card.BaseSource(
        "SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct", None, "Q4_1")
    assert card.base_source(jlora.models.fetch_smollm2()).gguf_type == "Q4_1"
    (tmp_path / "base").mkdir()
    source = card.base_source(tmp_path / "base")
    assert (source.directory, source.reference) == (tmp_path / "base", str(tmp_path / "base"))
    assert card.base_source("nowhere").reference == "nowhere"


def test_model_cards_state_the_training_and_warn_when_the_peft_base_is_not_the_one_trained_on():
    variables = random_variables(llama.Llama(llama.LlamaConfig(vocab_size=64, **TINY)))
    adapters = jlora.init(variables, rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    source = card.base_source("smollm2-135m")
    facts = dict(base=source, adapters=adapters, data=["play.txt"], steps=3, perplexity=(68.49, 47.7234),
                 command="jlora finetune --rank 4 --alpha 8 --data play.txt")
    merged = card.model_card(kind="merged", where="runs/x/merged", dtype="bfloat16", **facts)
    for row in ["| base | `smollm2-135m` (HuggingFaceTB/SmolLM2-135M-Instruct), the GGUF file's Q4_1 weights "
                "dequantised to float |", "| method | lora |", "| rank | 4 |", "| alpha | 8 |",
                "| targets | q_proj, v_proj (4 weights) |", "| data | play.txt |", "| steps | 3 |",
                "| validation perplexity | 68.490 → 47.723 (before → after) |", "| weights | bfloat16 |",
                "| command | `jlora finetune --rank 4 --alpha 8 --data play.txt` |",
                'generate = pipeline("text-generation", model="runs/x/merged")', "base_model: HuggingFaceTB/SmolLM2-135M-Instruct"]:
        assert row in merged.splitlines(), row
    assert "--with-base" not in merged
    peft_card = card.model_card(kind="peft", where="out", **facts)
    assert 'model = AutoPeftModelForCausalLM.from_pretrained("out")' in peft_card
    assert "jlora trained this adapter on `smollm2-135m` (HuggingFaceTB/SmolLM2-135M-Instruct), the GGUF file's Q4_1" in peft_card
    assert "`jlora export-peft RUN OUT --with-base`" in peft_card
    with_base = card.model_card(kind="peft", where="out", base_copy="/abs/out/base", **facts)
    assert "--with-base" not in with_base and "`base_model_name_or_path` is `/abs/out/base`" in with_base
    with pytest.raises(ValueError, match="kind 'gguf' is not an export jlora writes; choose 'merged' or 'peft'"):
        card.model_card(kind="gguf", where="out", **facts)

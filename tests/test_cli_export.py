"""`jlora finetune`, `merge` and `export-peft` write folders that transformers and PEFT load offline with
nothing else (tokenizer included), generating what `jlora generate` does; on the real default base
(SmolLM2-135M from its Q4_1 GGUF) and on a tiny Hugging Face directory base."""

import json
import os
import struct

import pytest

from jlora import cli
from jlora.cli import common

pytestmark = [pytest.mark.slow, pytest.mark.interop]
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SMALL = ["--seq-len", "16", "--batch-size", "8", "--eval-batches", "1", "--sample-tokens", "4", "--warmup", "1"]
PROMPT, NEW = "ROMEO:", 10
NO_SAMPLES = ["--sample-tokens", "0"]  # the shared run's samples: a compile no assertion reads
from helpers import load_base_once as _load_base_once  # noqa: E402 - once per test process


@pytest.fixture(autouse=True)
def cached_base(monkeypatch):
    """Load each base once for the whole module."""
    monkeypatch.setattr(common, "load_base", _load_base_once)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """transformers and PEFT must find everything in the written folders: any hub lookup fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run(*argv):
    return cli.main([str(a) for a in argv])


def jlora_generate(run_dir, capsys, *base):
    capsys.readouterr()
    greedy = ["--temperature", 0, "--repetition-penalty", 1]  # transformers' generate(do_sample=False)
    assert run("generate", "--checkpoint", run_dir, "--prompt", PROMPT, "--max-new-tokens", NEW, *greedy, *base) == 0
    return capsys.readouterr().out[:-1]  # print's newline


def greedy(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    return PROMPT + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def modes(directory):
    return {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir() if p.is_file()}


def weights_dtypes(path):
    with open(path, "rb") as file:
        header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "run"
    assert run("finetune", "--max-steps", 2, "--rank", 4, "--merged", "float32", "--out", out, *SMALL, *NO_SAMPLES) == 0
    return out


def test_the_merged_folder_alone_tokenizes_and_generates_as_jlora(smollm2_run, capsys):
    merged = smollm2_run / "merged"
    expected = jlora_generate(smollm2_run, capsys)
    assert len(expected) > len(PROMPT) + 10
    generate = transformers.pipeline("text-generation", model=str(merged))
    assert generate(PROMPT, max_new_tokens=NEW, do_sample=False)[0]["generated_text"] == expected

    ours = common.load_base("smollm2-135m", "float32", None)[2]  # the cached copy the commands loaded
    theirs = transformers.AutoTokenizer.from_pretrained(merged)
    messages = [{"role": "user", "content": "Who is <|im_end|> Juliet? 12345"}]
    rendered = ours.apply_chat_template(messages)
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    assert theirs(rendered).input_ids == ours.encode(rendered) and ours.encode(rendered)[0] == 1
    assert weights_dtypes(merged / "model.safetensors") == {"F32"}
    assert set(modes(merged).values()) == {0o666 & ~current_umask()}, modes(merged)
    card = (merged / "README.md").read_text()
    report = json.loads((smollm2_run / "run.json").read_text())
    for row in ["| rank | 4 |", "| targets | q_proj, v_proj (60 weights) |", "| steps | 2 |", "| weights | float32 |",
                f"| validation perplexity | {report['valid_perplexity_before']:.3f} → "
                f"{report['valid_perplexity_after']:.3f} (before → after) |",
                f"| command | `jlora finetune --max-steps 2 --rank 4 --merged float32 --out {smollm2_run} "
                f"{' '.join(SMALL + NO_SAMPLES)}` |"]:
        assert row in card.splitlines(), row


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_jlora_merge_writes_bf16_by_default_and_float32_when_asked(smollm2_run, tmp_path):
    assert run("merge", smollm2_run, tmp_path / "bf16") == 0
    assert weights_dtypes(tmp_path / "bf16" / "model.safetensors") == {"BF16"}
    assert run("merge", smollm2_run, tmp_path / "f32", "--save-dtype", "float32") == 0
    assert weights_dtypes(tmp_path / "f32" / "model.safetensors") == {"F32"}
    same = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for name in same[1:]:
        assert (tmp_path / "f32" / name).read_text() == (smollm2_run / "merged" / name).read_text(), name
    # the card of a later merge still knows the run: its perplexity and command come from run.json
    assert "| command | `jlora finetune --max-steps 2" in (tmp_path / "bf16" / "README.md").read_text()
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < (tmp_path / "f32" / "model.safetensors").stat().st_size / 1.9


def test_export_peft_with_base_loads_in_peft_offline_and_generates_as_jlora(smollm2_run, tmp_path, capsys):
    out = tmp_path / "peft"
    assert run("export-peft", smollm2_run, out, "--with-base") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert greedy(model.eval(), tokenizer) == jlora_generate(smollm2_run, capsys)
    assert "`base_model_name_or_path` is `" + str((out / "base").resolve()) in (out / "README.md").read_text()


def test_export_peft_without_base_names_the_hub_model_and_says_it_is_not_what_jlora_trained_on(smollm2_run, tmp_path):
    out = tmp_path / "peft"
    assert run("export-peft", smollm2_run, out) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (out / "base").exists()
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= set(modes(out))
    card = (out / "README.md").read_text()
    assert "the GGUF file's Q4_1 weights dequantised to float" in card and "`jlora export-peft RUN OUT --with-base`" in card
    assert set(modes(out).values()) == {0o666 & ~current_umask()}


# ---- a tiny Hugging Face directory base: --merged none, and PEFT pointed at the base's own directory ----


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from jlora.interop import hf as export
    from tiny import tiny_tokenizer

    base = tmp_path_factory.mktemp("tiny") / "base"
    tokenizer = tiny_tokenizer()
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    export.save_tokenizer(base, tokenizer)
    return base


def test_merged_none_writes_no_merged_folder(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--base", tiny_base, "--max-steps", 1, "--merged", "none", "--out", out, *SMALL) == 0
    assert "merged export: none (--merged none)" in capsys.readouterr().err
    assert not (out / "merged").exists() and (out / "checkpoints" / "1").is_dir()


def test_a_directory_base_is_named_by_its_path_and_peft_loads_it(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--base", tiny_base, "--max-steps", 2, "--lr", "3e-2", "--out", out, *SMALL) == 0
    assert weights_dtypes(out / "merged" / "model.safetensors") == {"BF16"}  # --merged's default
    assert run("export-peft", out, tmp_path / "peft") == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base.resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft", dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "peft")
    assert greedy(model.eval(), tokenizer) == jlora_generate(out, capsys)

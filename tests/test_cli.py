"""The `jlora` command end to end on the real default base (SmolLM2-135M), small settings."""

import functools
import json
import re

import jax
import numpy as np
import pytest

import jlora
from jlora import checkpoint, cli, train

pytestmark = pytest.mark.slow
SMALL = ["--seq-len", "16", "--batch-size", "8", "--eval-batches", "1", "--sample-tokens", "4", "--warmup", "1"]


_load_base_once = functools.lru_cache(maxsize=None)(cli.load_base)


@pytest.fixture(autouse=True)
def cached_base(monkeypatch):
    """Load the 135M base once for the whole module."""
    monkeypatch.setattr(cli, "load_base", _load_base_once)


def run(*argv):
    return cli.main([str(a) for a in argv])


def adapters_of(run_dir):
    *_, adapters, metadata = cli.load_run(run_dir)
    return jax.device_get(adapters), metadata


def test_finetune_leaves_checkpoint_merged_export_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--max-steps", 3, "--out", out, *SMALL) == 0
    err = capsys.readouterr().err
    assert "validation perplexity before" in err and "validation perplexity after" in err
    assert (out / "checkpoints" / "3").is_dir()
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    report = json.loads((out / "run.json").read_text())
    assert report["steps"] == 3 and report["checkpoint_bytes"] < report["base_bytes"] / 50
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    args = ["--max-steps", 4, "--save-every", 2, "--dropout", 0.1, *SMALL]
    assert run("finetune", "--out", straight, *args) == 0

    real_make_step = train.make_step

    def make_step_then_ctrl_c_at_step_3(*a, **kw):
        step, calls = real_make_step(*a, **kw), []

        def wrapped(state, frozen, batch):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return step(state, frozen, batch)

        return wrapped

    monkeypatch.setattr(train, "make_step", make_step_then_ctrl_c_at_step_3)
    assert run("finetune", "--out", interrupted, *args) == 130
    assert "the last checkpoint is step 2" in capsys.readouterr().err
    monkeypatch.setattr(train, "make_step", real_make_step)
    assert run("finetune", "--out", interrupted, "--resume", *args) == 0

    (a, meta_a), (b, meta_b) = adapters_of(straight), adapters_of(interrupted)
    assert meta_a["step"] == meta_b["step"] == 4
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_generate_eval_and_merge_from_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--max-steps", 1, "--out", out, *SMALL) == 0
    capsys.readouterr()
    assert run("generate", "--checkpoint", out, "--prompt", "ROMEO:", "--max-new-tokens", 3) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert run("eval", "--checkpoint", out, "--seq-len", 16, "--batch-size", 8, "--max-batches", 1) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0
    assert run("merge", out, tmp_path / "merged") == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_make_step = train.make_step

    def nan_at_step_3(*a, **kw):
        step = real_make_step(*a, **kw)

        def wrapped(state, frozen, batch):
            state, metrics = step(state, frozen, batch)
            return state, {**metrics, "loss": metrics["loss"] * (np.nan if int(state.step) == 3 else 1.0)}

        return wrapped

    monkeypatch.setattr(train, "make_step", nan_at_step_3)
    out = tmp_path / "run"
    assert run("finetune", "--max-steps", 5, "--save-every", 1, "--out", out, *SMALL) == 1
    assert "loss is nan at step 3" in capsys.readouterr().err
    assert checkpoint.Checkpointer(out / "checkpoints").latest_step() == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "100000"], r"rank 100000 for 'params/layers_0/self_attn/q_proj/kernel' \(shape \(576, 576\)"),
        (["--targets", "nothing_here"], r"match no weight; candidate paths: params/embed_tokens/embedding"),
        (["--resume"], r"--resume: no checkpoint in"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, capsys, extra, message):
    assert run("finetune", "--max-steps", 1, "--out", tmp_path / "run", *SMALL, *extra) == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_data_files_are_clear_errors(tmp_path, capsys):
    empty, short, jsonl = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "pairs.jsonl"
    empty.write_text("")
    short.write_text("To be.")
    jsonl.write_text('{"prompt": "a", "answer": "b"}\n')
    for path, message in [(empty, "empty.txt"), (short, "short.txt: .* tokens"), (jsonl, "pairs.jsonl:1")]:
        assert run("finetune", "--max-steps", 1, "--out", tmp_path / "run", "--data", path, *SMALL) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err


def test_unwritable_out_and_existing_or_mismatched_checkpoints_lose_nothing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("finetune", "--out", blocker / "run", *SMALL) == 2
    assert "cannot create output directory" in capsys.readouterr().err

    out = tmp_path / "run"
    assert run("finetune", "--max-steps", 1, "--out", out, *SMALL) == 0
    capsys.readouterr()
    assert run("finetune", "--max-steps", 2, "--out", out, *SMALL) == 2
    assert "already holds checkpoints up to step 1; pass --resume" in capsys.readouterr().err
    assert run("finetune", "--max-steps", 2, "--out", out, "--resume", "--rank", 4, *SMALL) == 2
    assert "--resume continues the adapters in" in (err := capsys.readouterr().err) and "drop --rank 4" in err
    assert checkpoint.Checkpointer(out / "checkpoints").latest_step() == 1


def test_export_peft_then_import_peft_gives_the_same_adapters(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--max-steps", 1, "--out", out, "--rank", 4, "--alpha", 6, *SMALL) == 0
    assert run("export-peft", out, tmp_path / "peft") == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert run("import-peft", tmp_path / "peft", tmp_path / "imported") == 0
    (original, _), (imported, meta) = adapters_of(out), adapters_of(tmp_path / "imported")
    assert meta["adapter"]["method"] == "lora"
    jax.tree.map(np.testing.assert_array_equal, imported, original)
    assert run("import-peft", tmp_path / "peft", tmp_path / "imported") == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_other_adapter_kinds_train_and_reload(tmp_path, capsys, method):
    out = tmp_path / method
    assert run("finetune", "--method", method, "--max-steps", 1, "--out", out, *SMALL) == 0
    adapters, meta = adapters_of(out)
    assert meta["adapter"]["method"] == method
    kinds = {type(a).__name__ for a in jlora.adapter.table(adapters).values()}
    assert kinds == {"IA3" if method == "ia3" else "DoRA"}
    assert run("generate", "--checkpoint", out, "--max-new-tokens", 2) == 0

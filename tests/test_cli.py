"""The `jlora` command end to end on the real default base (SmolLM2-135M), small settings."""

import contextlib
import io
import json
import re
import shutil

import jax
import numpy as np
import pytest

import jlora
from jlora import cli, kinds
from jlora.training import checkpoint, metrics
from jlora import training as train
from jlora.cli import common

SMALL = ["--seq-len", "16", "--batch-size", "8", "--eval-batches", "1", "--sample-tokens", "4", "--warmup", "1"]
# For runs whose samples and merged export no assertion reads: each costs a compile or a 135M write.
LEAN = ["--sample-tokens", "0", "--merged", "none"]


from helpers import load_base_once as _load_base_once  # noqa: E402 - once per test process


@pytest.fixture(autouse=True)
def cached_base(monkeypatch):
    """Load the 135M base once for the whole module."""
    monkeypatch.setattr(common, "load_base", _load_base_once)


def run(*argv):
    return cli.main([str(a) for a in argv])


def adapters_of(run_dir):
    *_, adapters, info = common.load_run(run_dir)
    return jax.device_get(adapters), info


@pytest.fixture(scope="module")
def two_step_run_and_err(tmp_path_factory):
    """One default run of 2 steps, a checkpoint each, and what it said on stderr: the tests that only
    read a run share it (copying it where they would change it)."""
    out = tmp_path_factory.mktemp("two-steps") / "run"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert run("finetune", "--max-steps", 2, "--save-every", 1, "--out", out, *SMALL) == 0
    return out, err.getvalue()


@pytest.fixture
def two_step_run(two_step_run_and_err):
    return two_step_run_and_err[0]


@pytest.mark.slow
def test_finetune_leaves_checkpoint_merged_export_and_plot(two_step_run_and_err):
    out, err = two_step_run_and_err
    assert "validation perplexity before" in err and "validation perplexity after" in err
    assert (out / "checkpoints" / "2").is_dir()
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    report = json.loads((out / "run.json").read_text())
    assert report["steps"] == 2 and report["checkpoint_bytes"] < report["base_bytes"] / 50
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


@pytest.mark.slow
def test_periodic_evaluation_best_checkpoint_metrics_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--max-steps", 4, "--eval-every", 2, "--out", out, *SMALL, *LEAN) == 0
    err = capsys.readouterr().err
    for status in ("loading base smollm2-135m ...", "evaluating on 8 sequences ...", "compiling the train step ..."):
        assert err.count(status) == (3 if status.startswith("evaluating") else 1), status
    assert "validation perplexity at step 2:" in err and re.search(r"step 4/4  loss \d\.\d{4}  [\d,]+ tok/s  ETA 00:00\n", err)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    evals = [h for h in history if "valid_perplexity" in h]
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4] and [h["step"] for h in steps] == [1, 2, 3, 4]
    assert all(h["valid_loss"] == pytest.approx(np.log(h["valid_perplexity"])) for h in evals)
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second"):
        assert all(np.isfinite(h[key]) and h[key] > 0 for h in steps), key
    assert steps[0]["learning_rate"] == pytest.approx(1e-3)  # --warmup 1: the first step at the full rate, not 0

    report = json.loads((out / "run.json").read_text())
    best = min(evals, key=lambda h: h["valid_perplexity"])
    assert report["best"] == best and report["eval_sequences"] == 8 and report["eval_tokens"] == 8 * 16
    assert checkpoint.Checkpointer(out / "best").all_steps() == [best["step"]]
    assert checkpoint.Checkpointer(out / "checkpoints").all_steps() == [2, 4]  # each evaluation's step is saved

    # TensorBoard holds every number of the history, by step (as float32).
    expected = {}
    for entry in history:
        for key, value in entry.items():
            if key != "step":
                expected.setdefault(key, []).append((entry["step"], float(np.float32(value))))
    assert metrics.read_scalars(out / "tensorboard") == expected

    # `jlora eval` of the run, all defaults, scores the sequences the run validated on.
    assert run("eval", "--checkpoint", out) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["sequences"] == 8 and scored["seq_len"] == 16
    assert scored["perplexity"] == pytest.approx(report["valid_perplexity_after"], rel=1e-5)
    assert run("eval", "--checkpoint", out / "best") == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(best["valid_perplexity"], rel=1e-5)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    args = ["--max-steps", 3, "--save-every", 2, "--dropout", 0.1, *SMALL, *LEAN]
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
    assert meta_a.step == meta_b.step == 3
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_generate_eval_and_merge_from_a_checkpoint(two_step_run, tmp_path, capsys):
    out = two_step_run
    assert run("generate", "--checkpoint", out, "--prompt", "ROMEO:", "--max-new-tokens", 3) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert run("eval", "--checkpoint", out, "--seq-len", 16, "--batch-size", 8, "--max-batches", 1) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0
    assert run("merge", out, tmp_path / "merged") == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_generate_runs_several_checkpoints_in_one_batch(two_step_run, tmp_path, capsys):
    runs = [two_step_run, tmp_path / "b"]  # the shared run (--lr 1e-3) and one more at --lr 3e-2
    assert run("finetune", "--max-steps", 1, "--lr", "3e-2", "--out", runs[1], *SMALL, *LEAN) == 0
    capsys.readouterr()
    flags = ["--prompt", "ROMEO:", "--max-new-tokens", 6, "--temperature", 0]  # one key draws a whole batch
    alone = []
    for out in runs:
        assert run("generate", "--checkpoint", out, *flags) == 0
        alone.append(capsys.readouterr().out)
    assert run("generate", "--checkpoint", runs[0], "--checkpoint", runs[1], *flags) == 0
    assert capsys.readouterr().out == "".join(f"==> {out} <==\n{text}" for out, text in zip(runs, alone))


@pytest.mark.slow
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
    assert run("finetune", "--max-steps", 3, "--save-every", 1, "--out", out, *SMALL, *LEAN) == 1
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
@pytest.mark.slow
def test_bad_settings_are_clear_errors(tmp_path, capsys, extra, message):
    assert run("finetune", "--max-steps", 1, "--out", tmp_path / "run", *SMALL, *extra) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_bad_data_files_are_clear_errors(tmp_path, capsys):
    empty, short, jsonl = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "pairs.jsonl"
    empty.write_text("")
    short.write_text("To be.")
    jsonl.write_text('{"prompt": "a", "answer": "b"}\n')
    for path, message in [(empty, "empty.txt"), (short, "short.txt: .* tokens"), (jsonl, "pairs.jsonl:1")]:
        assert run("finetune", "--max-steps", 1, "--out", tmp_path / "run", "--data", path, *SMALL) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err


@pytest.mark.slow
def test_unwritable_out_and_existing_or_mismatched_checkpoints_lose_nothing(two_step_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("finetune", "--out", blocker / "run", *SMALL) == 2
    assert "cannot create output directory" in capsys.readouterr().err

    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    assert run("finetune", "--max-steps", 3, "--out", out, *SMALL) == 2
    assert "already holds checkpoints up to step 2; pass --resume" in capsys.readouterr().err
    assert run("finetune", "--max-steps", 3, "--out", out, "--resume", "--rank", 4, *SMALL) == 2
    assert "--resume continues the adapters in" in (err := capsys.readouterr().err) and "drop --rank 4" in err
    assert checkpoint.Checkpointer(out / "checkpoints").latest_step() == 2


@pytest.mark.slow
def test_export_peft_then_import_peft_gives_the_same_adapters(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--max-steps", 1, "--out", out, "--rank", 4, "--alpha", 6, *SMALL, *LEAN) == 0
    assert run("export-peft", out, tmp_path / "peft") == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert run("import-peft", tmp_path / "peft", tmp_path / "imported") == 0
    (original, _), (imported, meta) = adapters_of(out), adapters_of(tmp_path / "imported")
    assert meta.method == "lora"
    jax.tree.map(np.testing.assert_array_equal, imported, original)
    assert run("import-peft", tmp_path / "peft", tmp_path / "imported") == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_other_adapter_kinds_train_and_reload(tmp_path, capsys, method):
    out = tmp_path / method
    assert run("finetune", "--method", method, "--max-steps", 1, "--out", out, *SMALL, *LEAN) == 0
    adapters, meta = adapters_of(out)
    assert meta.method == method
    kinds = {type(a).__name__ for a in jlora.adapter.table(adapters).values()}
    assert kinds == {"IA3" if method == "ia3" else "DoRA"}
    assert run("generate", "--checkpoint", out, "--max-new-tokens", 2) == 0


# ---- bad input: one line, exit status 2, no traceback, nothing lost ----


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", 0], "argument --max-steps: 0 is out of range: it must be >= 1"),
    (["--max-steps", -1], "argument --max-steps: -1 is out of range: it must be >= 1"),
    (["--batch-size", 0], "argument --batch-size: 0 is out of range"),
    (["--accumulate", 0], "argument --accumulate: 0 is out of range"),
    (["--seed", -1], "argument --seed: -1 is out of range: it must be >= 0"),
    (["--dropout", 1.5], "argument --dropout: 1.5 is out of range: it must be >= 0 and < 1"),
    (["--save-every", 0], "argument --save-every: 0 is out of range"),
    (["--keep", 0], "argument --keep: 0 is out of range: it must be >= 1"),
    (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["--max-step", 5], "unrecognized arguments: --max-step 5"),
])
def test_bad_flags_are_one_line_errors_with_status_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        run("finetune", "--out", tmp_path / "run", *flags)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["finetune", "--targets", "q_proj("], "error: targets 'q_proj(' is not a valid regular expression"),
    (["finetune", "--targets", "q_proj,v_prj"], "targets 'v_prj' match no weight; 'v_prj': did you mean 'v_proj'"),
    (["finetune", "--seq-len", 100000], "--seq-len 100000 is longer than the base's context of 8192 tokens"),
    (["finetune", "--alpha", 8, "--rank", 600], "rank 600 for 'params/layers_0/self_attn/q_proj/kernel'"),
    (["generate", "--prompt", ""], "error: the prompt is empty"),
    (["finetune", "--method", "ia3", "--rank", 4], "--rank does not apply to --method ia3 (it takes --targets)"),
    (["finetune", "--loss-vocab-block", 1024], "--loss-vocab-block splits the chunks of --loss-chunk; give --loss-chunk too"),
])
def test_refusals_from_the_library_are_one_line_errors(tmp_path, capsys, argv, message):
    extra = ["--out", tmp_path / "run", *SMALL] if argv[0] == "finetune" else ["--max-new-tokens", 2]
    assert run(argv[0], *extra, *argv[1:]) == 2  # argparse keeps a flag's last value
    err = capsys.readouterr().err
    said = [line for line in err.strip().splitlines() if not line.startswith("loading base ")]  # the status line
    assert message in err and "Traceback" not in err and len(said) == 1, err


@pytest.mark.slow
@pytest.mark.interop
def test_an_unsupported_base_is_a_one_line_error(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, hidden_act="relu")
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "relu")
    assert run("finetune", "--base", tmp_path / "relu", "--out", tmp_path / "run", *SMALL) == 2
    assert ("llama config has hidden_act='relu'; implemented: ['gelu', 'gelu_pytorch_tanh', 'silu']."
            in capsys.readouterr().err)
    config.hidden_act = "silu"
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "no-tokenizer")
    assert run("generate", "--base", tmp_path / "no-tokenizer") == 2
    assert "has no tokenizer (tokenizer.json, or vocab.json + merges.txt)" in capsys.readouterr().err


@pytest.mark.slow
def test_merge_and_export_peft_never_replace_files_without_overwrite(two_step_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for command in ("merge", "export-peft"):
        assert run(command, two_step_run, taken) == 2
        assert f"{taken} already holds notes.txt; pass --overwrite" in capsys.readouterr().err
        assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert run("export-peft", two_step_run, tmp_path / "file") == 2
    assert "is a file; give a directory" in capsys.readouterr().err
    assert run("export-peft", two_step_run, taken, "--overwrite") == 0
    assert (taken / "adapter_config.json").is_file() and (taken / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(two_step_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    (out / "checkpoints" / "2" / "meta" / "metadata").unlink()
    assert run("finetune", "--max-steps", 3, "--save-every", 1, "--out", out, "--resume", *SMALL, *LEAN) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped a damaged checkpoint: cannot read the metadata of {out / 'checkpoints' / '2'}" in err
    assert "resuming from step 1" in err
    assert (out / "checkpoints" / "2.damaged").is_dir()
    assert checkpoint.Checkpointer(out / "checkpoints").latest_step() == 3


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_finishes_says_nothing_is_saved(tmp_path, monkeypatch, capsys):
    def interrupted_while_compiling(*a, **kw):
        def step(state, frozen, batch):
            raise KeyboardInterrupt

        return step

    monkeypatch.setattr(train, "make_step", interrupted_while_compiling)
    assert run("finetune", "--max-steps", 2, "--out", tmp_path / "run", *SMALL, *LEAN) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 0; no checkpoint was written yet" in err and "Traceback" not in err
    assert checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").latest_step() is None


def test_the_base_directory_itself_is_never_an_export_target(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    with pytest.raises(cli.UsageError, match="is the base model's own directory; writing there would replace the base"):
        common.prepare_out(tmp_path / "base", overwrite=True, base=tmp_path / "base")


@pytest.mark.slow
def test_scanned_remat_chunked_run_exports_as_an_unrolled_one(tmp_path, capsys):
    """--scan trains stacked adapters; the checkpoint says so, and merge/export-peft/resume unstack
    them: the exported adapters have the per-layer names and equal the stacked ones layer by layer."""
    out = tmp_path / "run"
    flags = ["--scan", "--remat", "full", "--loss-chunk", 5, "--rank", 4]
    assert run("finetune", "--max-steps", 1, "--out", out, *flags, *SMALL, "--merged", "none") == 0
    adapters, metadata = adapters_of(out)
    assert metadata.scan == "layers" and metadata.to_json()["model"] == {"scan": "layers"}
    stacked = checkpoint.Checkpointer(out / "checkpoints").restore()[0].trainable.adapters
    q = stacked["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.a.shape == (30, 576, 4) and q.stack_axes == 1
    np.testing.assert_array_equal(adapters["params"]["layers_29"]["self_attn"]["q_proj"]["kernel"].a, q.a[29])
    assert run("export-peft", out, tmp_path / "peft") == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4
    assert run("finetune", "--max-steps", 2, "--out", out, "--resume", *SMALL) == 2
    assert "the checkpoint was trained with --scan; pass --scan to continue it" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_eval_and_merge_on_a_4bit_base(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("finetune", "--quantize", "nf4", "--max-steps", 1, "--out", out, *SMALL, *LEAN) == 0
    report = json.loads((out / "run.json").read_text())
    # NF4 codes and scales of every matrix (69,460,732 bytes, experiments/README.md) and 61 float32 norms of 576.
    assert report["base_bytes"] == 69_460_732 + 61 * 576 * 2
    _, metadata = adapters_of(out)
    assert metadata.quantize == "nf4"
    capsys.readouterr()
    # eval and merge load the base quantised as the run's was, from the checkpoint's metadata.
    assert run("eval", "--checkpoint", out, "--seq-len", 16, "--batch-size", 8, "--max-batches", 1) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0
    assert run("merge", out, tmp_path / "merged") == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.interop
def test_a_scanned_run_on_a_4bit_base_trains_the_unrolled_runs_adapters(tmp_path, capsys):
    """--scan --quantize nf4: the quantised layers stack for the scan and unstack, each its own
    Quantized again, for the checkpoint's eval, generate and merged export. The scanned run also
    takes the MLP 7 tokens at a time (--mlp-block), which changes no number beyond rounding."""
    from helpers import tiny_llama_dir

    # Sizes NF4's blocks of 64 divide (the vocabulary 320 beyond the tokenizer's 257 entries).
    base = tiny_llama_dir(tmp_path / "base", vocab_size=320, hidden_size=64, intermediate_size=128)
    text = tmp_path / "play.txt"
    text.write_text("".join(f"ROMEO {i}: what light through yonder window breaks? It is the east.\n" for i in range(40)))
    flags = ["--base", base, "--data", text, "--quantize", "nf4", "--max-steps", 2, "--rank", 4, "--lr", "1e-2",
             "--targets", "q_proj,v_proj,up_proj", *SMALL]
    assert run("finetune", *flags, "--out", tmp_path / "unrolled") == 0
    assert run("finetune", *flags, "--scan", "--remat", "full", "--mlp-block", 7, "--out", tmp_path / "scan") == 0
    stacked = checkpoint.Checkpointer(tmp_path / "scan" / "checkpoints").restore()[0].trainable.adapters
    assert stacked["params"]["layers"]["mlp"]["up_proj"]["kernel"].stack_axes == 1
    scanned, metadata = adapters_of(tmp_path / "scan")
    assert metadata.quantize == "nf4" and metadata.to_json()["model"] == {"scan": "layers"}
    unrolled, _ = adapters_of(tmp_path / "unrolled")
    assert jax.tree.structure(scanned) == jax.tree.structure(unrolled)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    _, params, *_ = common.load_run(tmp_path / "scan")
    kernel = params["params"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, jlora.Quantized) and (kernel.shape, kernel.lead) == ((64, 128), 0)
    report = json.loads((tmp_path / "scan" / "run.json").read_text())
    assert report["base_bytes"] == json.loads((tmp_path / "unrolled" / "run.json").read_text())["base_bytes"]
    assert (tmp_path / "scan" / "merged" / "model.safetensors").is_file()
    capsys.readouterr()
    assert run("eval", "--checkpoint", tmp_path / "scan", "--seq-len", 16, "--batch-size", 8, "--max-batches", 1) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0
    assert run("generate", "--checkpoint", tmp_path / "scan", "--prompt", "ROMEO", "--max-new-tokens", 3) == 0


@pytest.mark.subprocess
def test_help_does_not_import_jax_and_the_method_choices_are_the_adapter_kinds():
    import subprocess
    import sys


    assert cli.METHODS == sorted(kinds.BUNDLED)
    probe = "import sys; from jlora import cli; cli.parser(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'orbax')))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ---- sampling, chat, help texts, no empty output folders ----


def test_every_flag_of_every_command_has_help_and_shows_its_default_once():
    top = cli.parser()
    commands = next(a for a in top._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    assert set(commands) == {"finetune", "generate", "chat", "eval", "merge", "export-peft", "import-peft"}
    assert top.allow_abbrev is False
    for name, command in commands.items():
        assert command.allow_abbrev is False, name
        formatter = command._get_formatter()
        for action in command._actions:
            assert action.help and action.help.strip(), f"{name} {action.dest} has no help"
            text = formatter._get_help_string(action) % {"default": action.default}
            assert text.count("default") <= 1, f"{name} {action.dest}: {text}"
            if action.option_strings and action.dest != "help" and not any(action.default is v for v in (None, False)):
                assert f"(default: {action.default!r})" in text or f"(default: {action.default})" in text, text
    # The base of a checkpoint command is the checkpoint's: the help says so, and names no unused default.
    for name in ("merge", "export-peft"):
        base = next(a for a in commands[name]._actions if a.dest == "base")
        assert base.default is None and base.help.endswith("(default: the base the checkpoint records)")


@pytest.mark.parametrize("argv", [["finetune", "--max-step", 5], ["generate", "--temp", 0], ["chat", "--checkpo", "x"],
                                  ["eval", "--max-batch", 1], ["merge", "a", "b", "--over"]])
def test_abbreviated_flags_are_errors_in_every_command(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        run(*argv)
    flag = next(a for a in argv if str(a).startswith("--"))
    assert exited.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


class Typed:
    """stdin fed line by line; `after_each` runs when a reply is done and the next line is read."""

    def __init__(self, lines, after_each):
        self.lines, self.after_each, self.read = list(lines), after_each, 0

    def isatty(self):
        return False

    def readline(self):
        if self.read:
            self.after_each()
        self.read += 1
        return self.lines.pop(0) if self.lines else ""


@pytest.mark.slow
def test_chat_replies_as_generate_does_and_compiles_once(monkeypatch, capsys):
    import importlib
    import sys

    generation = importlib.import_module("jlora.models.generate")
    prompts = ["ROMEO:", "JULIET, my love, where art thou?"]  # 3 and 11 tokens: one prompt bucket
    flags = ["--max-new-tokens", 6, "--temperature", 0]
    expected = []
    for prompt in prompts:
        assert run("generate", "--prompt", prompt, *flags) == 0
        expected.append(capsys.readouterr().out[len(prompt):])
    compiles = []
    monkeypatch.setattr(sys, "stdin", Typed([p + "\n" for p in prompts], lambda: compiles.append(
        (generation._prefill._cache_size(), generation._decode._cache_size()))))
    assert run("chat", "--no-template", "--context", 64, *flags) == 0
    assert capsys.readouterr().out == "".join(expected)
    assert len(compiles) == 2 and compiles[0] == compiles[1]  # the second prompt compiled nothing


@pytest.mark.slow
def test_finetune_samples_with_the_sampling_flags(tmp_path, capsys):
    flags = ["--temperature", 1.5, "--top-k", 50, "--top-p", 0.95, "--repetition-penalty", 1.3, "--seed", 3]
    assert run("finetune", "--max-steps", 1, "--out", tmp_path / "run", *SMALL, *flags, "--merged", "none") == 0
    before = json.loads((tmp_path / "run" / "run.json").read_text())["sample_before"]
    capsys.readouterr()
    assert run("generate", "--max-new-tokens", 4, *flags) == 0
    assert capsys.readouterr().out == cli.DEFAULT_PROMPT + before + "\n"
    assert run("generate", "--max-new-tokens", 4, *flags[:-1], 4) == 0  # another seed, another sample
    assert capsys.readouterr().out != cli.DEFAULT_PROMPT + before + "\n"


@pytest.mark.slow
def test_failed_commands_leave_no_new_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    assert run("finetune", "--out", out, "--data", tmp_path / "missing.txt", *SMALL) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert run("finetune", "--out", out, "--base", tmp_path / "no-such-model", *SMALL) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()
    # In an existing folder: what the command made goes, what was there stays.
    kept = tmp_path / "kept"
    (kept / "empty-before").mkdir(parents=True)
    assert run("finetune", "--out", kept, "--data", tmp_path / "missing.txt", *SMALL) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["empty-before"]
    (tmp_path / "not-a-run").mkdir()
    for bad in (tmp_path / "no-such-run", tmp_path / "not-a-run"):
        assert run("merge", bad, tmp_path / "merged" / "here") == 2
        capsys.readouterr()
        assert not (tmp_path / "merged").exists()

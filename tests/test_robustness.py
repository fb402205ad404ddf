"""The `jlora` command under refusals and faults, on a tiny random Llama: a refused command changes no
byte on disk, a failed write or Ctrl-C is one line naming the last checkpoint, a damaged newest step
is passed over (and left in place), and only the commands that encode or decode text need a tokenizer."""

import contextlib
import errno
import hashlib
import io
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jlora import cli
from jlora.cli import common, export
from jlora.training import checkpoint, loop, metrics

pytestmark = [pytest.mark.slow, pytest.mark.interop]  # each test runs the command; the base is built by transformers

FLAGS = ["--seq-len", "16", "--batch-size", "8", "--eval-batches", "1", "--warmup", "1", "--sample-tokens", "0",
         "--merged", "none", "--valid-fraction", "0.1"]
FULL = "No space left on device"


def run(*argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base, a text, and a run of 2 steps with a checkpoint each (tests copy it where they change it)."""
    from helpers import tiny_llama_dir

    where = tmp_path_factory.mktemp("tiny")
    base = tiny_llama_dir(where / "base")
    text = where / "play.txt"
    text.write_text("".join(f"ROMEO {i}: what light through yonder window breaks? It is the east.\n" for i in range(40)))
    with contextlib.redirect_stderr(io.StringIO()):
        assert run("finetune", "--base", base, "--data", text, "--max-steps", 2, "--save-every", 1,
                   "--out", where / "run", *FLAGS) == 0
    return base, text, where / "run"


@pytest.fixture
def a_run(tiny, tmp_path):
    shutil.copytree(tiny[2], tmp_path / "run")
    return tmp_path / "run"


def snapshot(root) -> dict:
    """Every file and directory under ``root``: a file's SHA-256, a directory's None."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(pathlib.Path(root).rglob("*"))}


def one_line(err: str) -> str:
    """The command's last line of stderr, after asserting that there was no traceback."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ---- group 1: a refusal changes nothing on disk ----


def refusals(base, text, run_dir, tmp_path):
    """Each refused command line with (a part of) its one-line error."""
    resume = ["finetune", "--base", base, "--data", text, "--max-steps", 3, "--out", run_dir, *FLAGS]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    return [
        ([*resume], "already holds checkpoints up to step 2; pass --resume"),
        ([*resume, "--resume", "--rank", 4], "drop --rank 4"),
        ([*resume, "--resume", "--scan"], "the checkpoint was trained without --scan; drop --scan"),
        (["finetune", "--base", base, "--task", f"a={text}", "--max-steps", 3, "--out", run_dir, *FLAGS, "--resume"],
         "--resume: the checkpoint trained one dataset; give the same --task flags"),
        (["merge", run_dir, tmp_path / "taken"], "already holds notes.txt; pass --overwrite"),
        (["merge", run_dir, tmp_path / "merged", "--task", "a"], "was trained on one dataset, not with --task"),
        (["export-peft", run_dir, tmp_path / "file"], "is a file; give a directory"),
        (["export-peft", run_dir, tmp_path / "peft", "--with-base", tmp_path / "taken"], "already holds files"),
        (["import-peft", "--base", base, tmp_path / "taken", tmp_path / "imported"], "adapter_config.json"),
        (["import-peft", "--base", base, tmp_path / "taken", run_dir / "checkpoints"], "adapter_config.json"),
    ]


def test_every_refusal_leaves_every_file_byte_identical(tiny, a_run, tmp_path, capsys):
    base, text, _ = tiny
    for argv, message in refusals(base, text, a_run, tmp_path):
        before = snapshot(tmp_path)
        assert run(*argv) == 2, argv
        said = one_line(capsys.readouterr().err)
        assert message in said, (argv, said)
        assert snapshot(tmp_path) == before, argv


def test_a_resume_on_a_base_whose_weights_changed_is_refused_and_writes_nothing(tiny, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    _, text, _ = tiny
    base = tmp_path / "base"
    shutil.copytree(tiny[0], base)
    argv = ["finetune", "--base", base, "--data", text, "--max-steps", 1, "--out", tmp_path / "run", *FLAGS]
    assert run(*argv) == 0
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert run(*argv[:6], 2, *argv[7:], "--resume") == 2
    assert "base" in one_line(capsys.readouterr().err)
    assert snapshot(tmp_path / "run") == before


# ---- group 3: a failed write is one line naming the file and the last checkpoint ----


def disk_full(path):
    return OSError(errno.ENOSPC, FULL, str(path))


def fail_checkpoint(monkeypatch, out):
    real = checkpoint.Checkpointer.save

    def save(self, state, metadata=None):
        if int(state.step) == 2:
            raise disk_full(self.directory / "2")
        return real(self, state, metadata)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    return f"saving the checkpoint of step 2 failed: {FULL}; the last checkpoint is step 1 in {out / 'checkpoints'}"


def fail_tensorboard(monkeypatch, out):
    def write(self, entry):
        if entry["step"] == 2:
            raise disk_full(self.directory / "events")

    monkeypatch.setattr(metrics.TensorBoard, "__call__", write)
    return f"writing {out / 'tensorboard' / 'events'} failed after step 2: {FULL}; the last checkpoint is step 1"


def fail_plot(monkeypatch, out):
    def plot(history, path=None, smoothing=0.9):
        raise disk_full(path)

    monkeypatch.setattr(loop, "plot_history", plot)
    return f"writing {out / 'loss.png'} failed: {FULL}; the last checkpoint is step 2 in {out / 'checkpoints'}"


def fail_run_json(monkeypatch, out):
    real = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "run.json":
            raise disk_full(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    return f"writing {out / 'run.json'} failed: {FULL}; the last checkpoint is step 2"


def fail_merged(monkeypatch, out):
    def save_merged(where, *args):
        raise disk_full(where / "model.safetensors")

    monkeypatch.setattr(export, "save_merged", save_merged)
    return f"writing {out / 'merged' / 'model.safetensors'} failed: {FULL}; the last checkpoint is step 2"


def fail_history_folder(monkeypatch, out):
    real = loop._reopen_history

    def removed(path, *args):  # the run's folder removed under it: the history cannot be made
        raise loop.WriteFailed(path, 0, None, OSError(errno.ENOENT, "No such file or directory", str(path)))

    monkeypatch.setattr(loop, "_reopen_history", removed)
    assert real is not removed
    return f"writing {out / 'history.jsonl'} failed after step 0: No such file or directory; no checkpoint was written yet"


@pytest.mark.parametrize("fault", [fail_checkpoint, fail_tensorboard, fail_plot, fail_run_json, fail_merged,
                                   fail_history_folder])
def test_a_failed_write_is_one_line_naming_the_file_and_the_last_checkpoint(tiny, tmp_path, monkeypatch, capsys, fault):
    base, text, _ = tiny
    out = tmp_path / "run"
    message = fault(monkeypatch, out)
    flags = [*FLAGS[:-4], "--merged", "float32", *FLAGS[-2:]] if fault is fail_merged else FLAGS
    assert run("finetune", "--base", base, "--data", text, "--max-steps", 2, "--save-every", 1, "--out", out, *flags) == 1
    assert message in one_line(capsys.readouterr().err)
    assert [p.name for p in out.iterdir() if p.suffix == ".partial"] == []


def test_ctrl_c_while_a_checkpoint_is_written_finishes_it_and_says_so(tiny, tmp_path, monkeypatch, capsys):
    base, text, _ = tiny
    real = checkpoint.Checkpointer.save

    def interrupted_mid_save(self, state, metadata=None):
        if self.directory.name == "checkpoints":  # not OUT/best, saved at step 0
            signal.raise_signal(signal.SIGINT)
        return real(self, state, metadata)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", interrupted_mid_save)
    out = tmp_path / "run"
    assert run("finetune", "--base", base, "--data", text, "--max-steps", 3, "--out", out, "--save-every", 1, *FLAGS) == 130
    assert one_line(capsys.readouterr().err) == (f"interrupted after step 1; the last checkpoint is step 1 in "
                                                 f"{out / 'checkpoints'}; continue with --resume")
    state, metadata = checkpoint.Checkpointer(out / "checkpoints").restore()
    assert int(state.step) == 1 and metadata["step"] == 1


@pytest.mark.subprocess
def test_ctrl_c_at_any_moment_of_a_run_is_one_line_and_status_130(tiny, tmp_path):
    """SIGINT to the `jlora` process while it imports, while the first step compiles, and while it trains."""
    base, text, _ = tiny
    argv = [sys.executable, "-m", "jlora.cli", "finetune", "--base", base, "--data", text, "--max-steps", 100000,
            "--save-every", 5, *FLAGS]
    for n, when in enumerate(["importing", "compiling the train step", "training"]):
        process = subprocess.Popen([*map(str, argv), "--out", str(tmp_path / f"run{n}")], stderr=subprocess.PIPE,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
        err = bytearray()
        reader = threading.Thread(target=lambda: [err.extend(chunk) for chunk in iter(lambda: process.stderr.read1(4096), b"")],
                                  daemon=True)
        reader.start()
        deadline, out = time.monotonic() + 120, tmp_path / f"run{n}"
        while not (when == "importing" or when.encode() in err or (when == "training" and (out / "checkpoints" / "5").is_dir())):
            assert time.monotonic() < deadline, err.decode()
            time.sleep(0.05)
        time.sleep(1.0 if when == "importing" else 0)  # the command watches Ctrl-C from its first line, before JAX loads
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, (when, err.decode())
        reader.join(timeout=10)
        said = err.decode().replace("\r", "\n")
        assert "Traceback" not in said and "interrupted" in said.strip().splitlines()[-1], (when, said)
        if when == "training":
            stopped = re.fullmatch(r"interrupted after step (\d+); the last checkpoint is step (\d+) in (.*); continue "
                                   "with --resume", said.strip().splitlines()[-1])
            steps, saved = int(stopped[1]), int(stopped[2])
            assert saved == steps // 5 * 5 >= 5 and stopped[3] == str(tmp_path / f"run{n}" / "checkpoints")
            assert checkpoint.Checkpointer(stopped[3]).restore()[1]["step"] == saved


# ---- group 4: only the commands that encode or decode text need a tokenizer ----


def test_the_weight_commands_take_a_base_without_tokenizer_and_the_text_commands_refuse_it(tiny, a_run, tmp_path, capsys):
    base = tmp_path / "no-tokenizer"
    shutil.copytree(tiny[0], base, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert run("export-peft", a_run, tmp_path / "peft") == 0
    assert run("import-peft", "--base", base, tmp_path / "peft", tmp_path / "imported") == 0
    assert run("merge", tmp_path / "imported", tmp_path / "merged") == 0
    assert "no tokenizer: the base has none" in capsys.readouterr().err
    assert not (tmp_path / "merged" / "tokenizer.json").exists() and (tmp_path / "merged" / "model.safetensors").is_file()
    assert run("export-peft", tmp_path / "imported", tmp_path / "peft-again") == 0
    imported = common.load_run(tmp_path / "imported", text=False)[4]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(imported), jax.device_get(common.load_run(a_run)[4]))
    capsys.readouterr()
    for argv in (["generate", "--checkpoint", tmp_path / "imported"], ["eval", "--checkpoint", tmp_path / "imported"]):
        assert run(*argv) == 2
        assert f"base {base} has no tokenizer" in one_line(capsys.readouterr().err)


# ---- group 5: a damaged newest step is passed over by every command that reads a run ----


def test_every_command_reading_a_run_uses_the_newest_intact_step_and_leaves_the_damaged_one(a_run, tmp_path, capsys):
    (a_run / "checkpoints" / "2" / "meta" / "metadata").unlink()
    step_one = checkpoint.Checkpointer(a_run / "checkpoints").restore(step=1)[0].trainable
    for argv in (["generate", "--checkpoint", a_run, "--max-new-tokens", 2], ["eval", "--checkpoint", a_run,
                 "--seq-len", 16, "--batch-size", 8, "--max-batches", 1],
                 ["merge", a_run, tmp_path / "merged"], ["export-peft", a_run, tmp_path / "peft"]):
        assert run(*argv) == 0, argv
        err = capsys.readouterr().err
        assert (f"warning: using step 1, the newest intact checkpoint in {a_run / 'checkpoints'}; skipped cannot read "
                f"the metadata of {a_run / 'checkpoints' / '2'}") in err, argv
        assert (a_run / "checkpoints" / "2").is_dir() and not (a_run / "checkpoints" / "2.damaged").exists()
    adapters = common.load_run(a_run)[4]  # step 1's
    for got, want in zip(jax.tree.leaves(jax.device_get(adapters)), jax.tree.leaves(jax.device_get(step_one.adapters)),
                         strict=True):
        np.testing.assert_array_equal(got, want)

"""`jlora finetune --task NAME=PATH ...`: one adapter per dataset, all trained in one run on one base."""

import json

import jax
import numpy as np
import pytest
from helpers import tiny_llama_dir

from jlora import cli
from jlora import training as train
from jlora.cli import common

pytestmark = [pytest.mark.slow, pytest.mark.interop]  # real finetune runs, on a base torch builds
FLAGS = ["--seq-len", "16", "--max-steps", "2", "--warmup", "1", "--lr", "1e-2", "--grad-clip", "0",
         "--valid-fraction", "0.2", "--eval-batches", "2", "--sample-tokens", "0", "--rank", "4"]


def run(*argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Llama, two texts, the 2-task run (batch 16) and each task's run alone (batch 8;
    the tests run on 8 host devices)."""
    root = tmp_path_factory.mktemp("tasks")
    base = tiny_llama_dir(root / "base")
    texts = {"romeo": "ROMEO {}: what light through yonder window breaks? It is the east.\n",
             "hamlet": "HAMLET {}: to be, or not to be, that is the question; whether 'tis nobler.\n"}
    paths = {}
    for name, line in texts.items():
        paths[name] = root / f"{name}.txt"
        paths[name].write_text("".join(line.format(i) for i in range(30)))
    tasks = [a for name, path in paths.items() for a in ("--task", f"{name}={path}")]
    assert run("finetune", "--base", base, *tasks, "--batch-size", 16, *FLAGS, "--out", root / "both") == 0
    for name, path in paths.items():
        assert run("finetune", "--base", base, "--data", path, "--batch-size", 8, *FLAGS, "--out", root / name) == 0
    return root, base


def adapters_of(run_dir, task=None):
    *_, adapters, info = common.load_run(run_dir, task=task)
    return jax.device_get(adapters), info


def test_each_task_trains_as_it_would_alone_and_gets_its_merged_export(runs):
    root, _ = runs
    for name in ("romeo", "hamlet"):
        together, metadata = adapters_of(root / "both", name)
        alone, _ = adapters_of(root / name)
        assert metadata.tasks == ["romeo", "hamlet"]
        leaves = jax.tree.leaves_with_path(alone)
        assert len(leaves) == len(jax.tree.leaves(together)) > 0
        for (path, a), b in zip(leaves, jax.tree.leaves(together)):
            np.testing.assert_allclose(b, a, atol=1e-5, err_msg=jax.tree_util.keystr(path))
        # trained: B moved away from its zero initialization
        assert max(float(np.abs(x).max()) for p, x in leaves if p[-1].name == "b") > 1e-3
        assert (root / "both" / "tasks" / name / "merged" / "model.safetensors").is_file()
    assert not (root / "both" / "merged").exists()
    assert (root / "romeo" / "merged" / "model.safetensors").is_file()  # a single-dataset run as before
    report = json.loads((root / "both" / "run.json").read_text())
    assert report["valid_perplexity/hamlet_after"] < report["valid_perplexity/hamlet_before"]
    both = [json.loads(line) for line in (root / "both" / "history.jsonl").read_text().splitlines()]
    for name in ("romeo", "hamlet"):
        alone = [json.loads(line) for line in (root / name / "history.jsonl").read_text().splitlines()]
        per_task = [h[f"valid_perplexity/{name}"] for h in both if f"valid_perplexity/{name}" in h]
        assert per_task == pytest.approx([h["valid_perplexity"] for h in alone if "valid_perplexity" in h], rel=1e-5)
        assert len(per_task) == 2 and per_task[1] < per_task[0]
    # the logged loss is the sum of the tasks' own losses
    losses = {name: [h["loss"] for h in map(json.loads, (root / name / "history.jsonl").read_text().splitlines())
                     if "loss" in h] for name in ("romeo", "hamlet")}
    assert [h["loss"] for h in both if "loss" in h] == pytest.approx(np.add(*losses.values()).tolist(), rel=1e-5)


def test_a_scanned_run_trains_the_same_adapters(runs, tmp_path):
    root, base = runs
    tasks = [a for name in ("romeo", "hamlet") for a in ("--task", f"{name}={root / name}.txt")]
    assert run("finetune", "--base", base, *tasks, "--batch-size", 16, *FLAGS, "--scan", "--out", tmp_path / "scan") == 0
    for name in ("romeo", "hamlet"):
        scanned, unrolled = adapters_of(tmp_path / "scan", name)[0], adapters_of(root / "both", name)[0]
        for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-5)


def test_eval_and_generate_pick_a_task_and_name_the_choices(runs, capsys):
    root, _ = runs
    text = root / "romeo.txt"
    capsys.readouterr()
    ppl = {}
    for name in ("romeo", "hamlet"):
        assert run("eval", "--checkpoint", root / "both", "--task", name, "--data", text, "--seq-len", 16,
                   "--batch-size", 8, "--max-batches", 2) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["perplexity"]
    assert run("eval", "--checkpoint", root / "romeo", "--data", text, "--seq-len", 16, "--batch-size", 8,
               "--max-batches", 2) == 0
    assert ppl["romeo"] == pytest.approx(json.loads(capsys.readouterr().out)["perplexity"], rel=1e-5)
    assert ppl["romeo"] != pytest.approx(ppl["hamlet"], rel=1e-3)
    assert run("generate", "--checkpoint", root / "both", "--task", "hamlet", "--prompt", "HAM",
               "--max-new-tokens", 3) == 0
    assert capsys.readouterr().out.startswith("HAM")
    for extra, message in (([], "holds one adapter per task (romeo, hamlet); choose one with --task NAME"),
                           (["--task", "othello"], "there is no task 'othello'")):
        assert run("eval", "--checkpoint", root / "both", "--data", text, "--seq-len", 16, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert run("eval", "--checkpoint", root / "romeo", "--task", "romeo", "--data", text, "--seq-len", 16) == 2
    assert "was trained on one dataset, not with --task" in capsys.readouterr().err



def test_an_interrupted_task_run_resumes_exactly(runs, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 2 of a 2-task run, then --resume: the stacked adapters equal the uninterrupted run's."""
    root, base = runs
    tasks = [a for name in ("romeo", "hamlet") for a in ("--task", f"{name}={root / name}.txt")]
    args = ["--base", base, *tasks, "--batch-size", 16, *FLAGS, "--save-every", 1, "--out", tmp_path / "run"]
    real_make_step = train.make_step

    def make_step_then_ctrl_c_at_step_2(*a, **kw):
        step, calls = real_make_step(*a, **kw), []

        def wrapped(state, frozen, batch):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return step(state, frozen, batch)

        return wrapped

    monkeypatch.setattr(train, "make_step", make_step_then_ctrl_c_at_step_2)
    assert run("finetune", *args) == 130
    assert "the last checkpoint is step 1" in capsys.readouterr().err
    monkeypatch.setattr(train, "make_step", real_make_step)
    one_task = ["--base", base, "--task", f"romeo={root / 'romeo.txt'}", "--batch-size", 16, *FLAGS,
                "--out", tmp_path / "run", "--resume"]
    assert run("finetune", *one_task) == 2
    assert "the checkpoint trained tasks romeo, hamlet; give the same --task flags" in capsys.readouterr().err
    assert run("finetune", *args, "--resume") == 0
    for name in ("romeo", "hamlet"):
        resumed, metadata = adapters_of(tmp_path / "run", name)
        straight, _ = adapters_of(root / "both", name)
        assert metadata.step == 2
        for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-6)

@pytest.mark.parametrize("tasks, extra, message", [
    (["a=x.txt", "a=y.txt"], [], "--task names must differ"),
    (["a-b=x.txt"], [], "give NAME=PATH"),
    (["a"], [], "give NAME=PATH"),
    (["a=x.txt", "b=y.txt"], ["--batch-size", "15"], "must be a multiple of the 2 tasks"),
    (["a=x.txt", "b=y.txt"], ["--data", "x.txt"], "does not combine with --data"),
    (["a=x.txt", "b=y.txt"], ["--accumulate", "2"], "does not combine with --accumulate > 1"),
    (["a=x.txt", "b=y.txt"], ["--loss-chunk", "4"], "does not combine with --loss-chunk"),
])
def test_bad_task_flags_are_one_line_errors(runs, tmp_path, capsys, tasks, extra, message):
    root, base = runs
    flags = [a for t in tasks for a in ("--task", t)]
    assert run("finetune", "--base", base, *flags, "--batch-size", 16, "--seq-len", 16, *extra, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if not line.startswith("loading base ")]  # the status line
    assert message in err and len(said) == 1, err

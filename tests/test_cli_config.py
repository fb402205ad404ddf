"""``--config FILE``: flags from YAML or TOML, the command line on top, values checked by the flags' own types."""

import pytest

from jlora import cli
from jlora.cli import config


def parse(*argv):
    return cli.parse([str(a) for a in argv])


def resolved(args):
    return {k: v for k, v in vars(args).items() if k != "config"}


def test_file_values_become_the_flags_and_the_command_line_overrides_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max-steps: 7\nlr: 1e-4\nseq_len: 64\ndata: [a.jsonl, b.jsonl]\nscan: true\nrslora: true\n"
                    "task: [a=a.txt, b=b.txt]\nfsdp: 0\ndistributed: false\nmethod: dora\n")
    args = parse("finetune", "--config", path, "--lr", "0.01", "--data", "c.jsonl", "--task", "c=c.txt")
    assert (args.max_steps, args.seq_len, args.scan, args.use_rslora, args.fsdp, args.distributed, args.method) == (
        7, 64, True, True, 0, False, "dora")
    assert args.lr == 0.01 and args.data == ["c.jsonl"] and args.task == ["c=c.txt"]  # the command line wins
    assert args.batch_size == 4  # neither gave it: the flag's default
    without = parse("finetune", "--config", path, "--lr", "0.01")
    assert without.data == ["a.jsonl", "b.jsonl"] and without.task == ["a=a.txt", "b=b.txt"] and without.lr == 0.01


def test_toml_reads_like_yaml(tmp_path):
    (tmp_path / "run.toml").write_text('max_steps = 7\nlr = 1e-4\ndata = ["a.jsonl"]\nscan = true\n')
    (tmp_path / "run.yaml").write_text("max_steps: 7\nlr: 0.0001\ndata: a.jsonl\nscan: true\n")
    from_toml = parse("finetune", "--config", tmp_path / "run.toml")
    assert resolved(from_toml) == resolved(parse("finetune", "--config", tmp_path / "run.yaml"))
    assert (from_toml.max_steps, from_toml.lr, from_toml.data, from_toml.scan) == (7, 1e-4, ["a.jsonl"], True)


def test_a_dumped_config_resolves_to_the_same_arguments(tmp_path):
    argv = ["finetune", "--data", "chat.jsonl", "--valid-fraction", "0.25", "--rank", "4", "--alpha", "6.5",
            "--rslora", "--lr", "3e-05", "--fsdp", "--no-distributed", "--prompt", "Q: 'x'\n\tA:", "--task", "a=a.txt",
            "--out", "runs/x", "--remat", "dots"]
    args = parse(*argv)
    (tmp_path / "config.yaml").write_text(config.dump(args))
    again = parse("finetune", "--config", tmp_path / "config.yaml")
    assert resolved(again) == resolved(args)
    defaults = parse("eval")
    (tmp_path / "eval.yaml").write_text(config.dump(defaults))
    assert resolved(parse("eval", "--config", tmp_path / "eval.yaml")) == resolved(defaults)


def test_resume_is_not_written(tmp_path):
    assert "resume" not in config.dump(parse("finetune", "--resume")) and "max_steps: 100" in config.dump(parse("finetune"))


@pytest.mark.parametrize("text, message", [
    ("max_step: 5\n", "run.yaml: unknown key 'max_step'; did you mean max_steps (--max-steps)?"),
    ("learning-rate: 5\n", "run.yaml: unknown key 'learning-rate'; the keys of jlora finetune are accumulate, alpha,"),
    ("max-steps: 0\n", "run.yaml: max-steps: argument --max-steps: 0 is out of range: it must be >= 1"),
    ("lr: fast\n", "run.yaml: lr: argument --lr: 'fast' is not a number"),
    ("method: lora2\n", "run.yaml: method: argument --method: invalid choice: 'lora2'"),
    ("scan: 1\n", "run.yaml: scan: --scan is a switch; give true or false, not 1"),
    ("seq_len: [1, 2]\n", "run.yaml: seq_len: --seq-len takes one value, not a list"),
    ("max_steps: null\n", "run.yaml: max_steps: null is not a value of --max-steps; leave the key out for its default, 100"),
    ("config: other.yaml\n", "run.yaml: a config file cannot name another config file"),
    ("- max_steps\n", "holds a list; it must be a mapping of flag names to values"),
    ("max_steps: [\n", "does not parse"),
])
def test_bad_files_are_argparse_errors_naming_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exited:
        parse("finetune", "--config", path)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and err.startswith("usage: jlora finetune"), err


def test_positionals_and_file_names_are_refused(tmp_path, capsys):
    (tmp_path / "merge.yaml").write_text("checkpoint: runs/a\n")
    (tmp_path / "run.json").write_text("{}")
    for argv, message in [(["merge", "runs/a", "out", "--config", tmp_path / "merge.yaml"],
                           "checkpoint is given on the command line (jlora merge ... CHECKPOINT), not in a config file"),
                          (["finetune", "--config", tmp_path / "run.json"], "the name must end in .yaml, .yml or .toml"),
                          (["finetune", "--config", tmp_path / "none.yaml"], "none.yaml does not exist")]:
        with pytest.raises(SystemExit):
            parse(*argv)
        assert message in capsys.readouterr().err


def test_other_commands_take_a_config_too(tmp_path):
    (tmp_path / "gen.yaml").write_text("max-new-tokens: 5\ntemperature: 0.7\ncheckpoint: [runs/a, runs/b]\nchat: true\n")
    args = parse("generate", "--config", tmp_path / "gen.yaml", "--temperature", "0")
    assert (args.max_new_tokens, args.temperature, args.checkpoint, args.chat) == (5, 0.0, ["runs/a", "runs/b"], True)

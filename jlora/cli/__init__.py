"""The ``jlora`` command: fine-tune, generate, evaluate, merge, and move adapters to and from PEFT.

It only wires the library's parts together: ``jlora.models`` loads the base, ``jlora.data`` makes
batches, ``jlora.train`` steps, ``jlora.checkpoint`` saves adapters.

    jlora finetune --max-steps 100 --out runs/shakespeare
    jlora generate --checkpoint runs/shakespeare --prompt "ROMEO:"
    jlora generate --checkpoint runs/a --checkpoint runs/b --prompt "ROMEO:"   # both in one batch
    jlora chat --checkpoint runs/shakespeare --no-template    # one prompt per line of stdin, one compile
    jlora eval --checkpoint runs/shakespeare --data play.txt
    jlora finetune --task a=a.txt --task b=b.txt --out runs/ab     # one adapter per dataset, one base
    jlora eval --checkpoint runs/ab --task a --data a.txt
    jlora merge runs/shakespeare runs/shakespeare/merged
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from jlora.core import interrupts

# Only argparse at import time, so `jlora --help` answers at once; each command imports JAX and its
# module (jlora.cli.finetune, .generate, .export) when it runs.
DEFAULT_BASE = "smollm2-135m"
DEFAULT_METHOD = "lora"
DEFAULT_PROMPT = "ROMEO:\n"
DTYPES = ["bfloat16", "float32"]
METHODS = ["dora", "ia3", "lora"]  # jlora.kinds.BUNDLED (a test keeps them equal); no JAX for --help
QUANTIZE = ["gguf", "int4", "int8", "nf4"]
MERGED = ["none", "bf16", "float32"]  # --merged: the merged export's dtype, or none
# The flags that choose adapters (each kind's `init_options` picks its own); on --resume they come
# from the checkpoint.
ADAPTER_FLAGS = {"targets": "--targets", "rank": "--rank", "alpha": "--alpha", "use_rslora": "--rslora"}


class UsageError(Exception):
    """Bad input from the command line: printed without a traceback, exit status 2."""


def number(kind, low, high=None, *, above=False):
    """An argparse type: ``kind`` (int or float) ``>= low`` (``> low`` if ``above``) and ``< high``."""
    bound = f"{'>' if above else '>='} {low}" + ("" if high is None else f" and < {high}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bound}")
        return value

    return parse


COUNT, SIZE, NONNEGATIVE = number(int, 1), number(int, 1), number(int, 0)
POSITIVE, SHARE = number(float, 0, above=True), number(float, 0, 1)


def methods() -> list[str]:
    """The bundled adapter kinds, and any other a program registered before building the parser."""
    registry = sys.modules.get("jlora.core.adapter")
    return sorted(set(METHODS) | set(registry.KINDS if registry else ()))


def probability(text):
    """An argparse type: a number > 0 and <= 1."""
    value = number(float, 0, above=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range: it must be > 0 and <= 1")
    return value


class Help(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help when it has a default worth showing (not None, False or
    a default the text already describes)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        return text if not shown or "default" in text else f"{text} (default: %(default)s)"


def sampling_flags(p, what, temperature):
    """--temperature, --top-k, --top-p, --repetition-penalty and --seed for `what`."""
    p.add_argument("--temperature", type=number(float, 0), default=temperature,
                   help=f"divide the logits of {what} by this before sampling; 0: greedy, always the most likely token")
    p.add_argument("--top-k", type=NONNEGATIVE, default=0, help="sample among the k most likely tokens only; 0: all")
    p.add_argument("--top-p", type=probability, default=0.9,
                   help="sample among the most likely tokens whose probabilities add up to this (nucleus); 1: all")
    p.add_argument("--repetition-penalty", type=POSITIVE, default=1.1,
                   help="divide the logit of each token already in the prompt or reply by this (multiply if negative), "
                        "as transformers' repetition_penalty; 1: off")


def add_command(sub, name, help, base_help, quantize=True):
    """A subcommand's parser with the flags every command takes: --base, --dtype, --config (--quantize, --task)."""
    p = sub.add_parser(name, help=help, description=help, allow_abbrev=False, formatter_class=Help)
    p.add_argument("--base", default=DEFAULT_BASE if name in ("finetune", "import-peft") else None,
                   help=f"the base model: a name, a GGUF file or a Hugging Face directory{base_help}")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the base's weights and compute")
    p.add_argument("--config", metavar="FILE", help="read flags from a .yaml or .toml file (keys: the flag names, "
                   "e.g. max_steps: 200); flags given here override it")
    if quantize:
        p.add_argument("--quantize", choices=QUANTIZE, help="keep the frozen base in 4 or 8 bits (QLoRA); gguf: a "
                       "GGUF base's Q4_0/Q4_1/Q8_0 blocks as shipped (default: what the checkpoint's run used, "
                       "else none)" if name != "finetune" else "keep the frozen base in 4 or 8 bits (QLoRA); "
                       "gguf: a GGUF base's Q4_0/Q4_1/Q8_0 blocks as shipped (default: none)")
    if name in ("generate", "chat", "eval", "merge", "export-peft"):
        p.add_argument("--task", metavar="NAME", help="of a checkpoint trained with --task: this task's adapter")
    return p


def data_and_adapter_flags(p):
    """finetune's data and adapter flags."""
    p.add_argument("--data", nargs="+", help="training .txt or .jsonl files (default: bundled Shakespeare)")
    p.add_argument("--task", action="append", metavar="NAME=PATH",
                   help="instead of --data: one adapter per task, trained on PATH, all in one run on one base (repeat)")
    p.add_argument("--valid", nargs="+", help="validation files (default: the corpus's held-out plays)")
    p.add_argument("--valid-fraction", type=number(float, 0, 1, above=True),
                   help="hold out this share of --data instead of --valid")
    p.add_argument("--method", choices=methods(), help=f"adapter kind (default: {DEFAULT_METHOD})")
    p.add_argument("--rank", type=COUNT, help="LoRA rank r (default: 8)")
    p.add_argument("--alpha", type=POSITIVE, help="lora_alpha (default: the rank, so scaling 1)")
    p.add_argument("--rslora", dest="use_rslora", action="store_true", default=None,
                   help="scale by alpha/sqrt(rank) instead of alpha/rank")
    p.add_argument("--targets", help="comma-separated module names or a regex (default: the kind's)")
    p.add_argument("--bias", choices=["none", "all", "lora_only"], help="base biases that train (default: none)")


def optimizer_flags(p):
    """finetune's optimisation flags."""
    p.add_argument("--max-steps", type=COUNT, default=100, help="optimizer steps in all (a resumed run counts its earlier ones)")
    p.add_argument("--batch-size", type=SIZE, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=number(int, 2), default=128, help="tokens per training sequence")
    p.add_argument("--accumulate", type=COUNT, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=NONNEGATIVE, default=10, help="steps of linear warm-up to --lr")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="decay of the learning rate after warm-up")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.0, help="AdamW weight decay of the adapters")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="global norm clip (0: none)")
    p.add_argument("--dropout", type=SHARE, default=0.0, help="LoRA dropout")
    p.add_argument("--lora-plus-ratio", type=POSITIVE, help="LoRA+: B's learning rate over A's (default: 1, plain LoRA)")


def scale_flags(p):
    """finetune's flags for many devices, processes and long sequences."""
    p.add_argument("--fsdp", nargs="?", const=0, type=COUNT, metavar="N",
                   help="shard the frozen base over every device, or over groups of N devices (a copy per group)")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction,
                   help="join a multi-process job (default: when JAX_COORDINATOR_ADDRESS is set or JAX detects "
                        "SLURM, Open MPI, Kubernetes or a Cloud TPU slice); --no-distributed: run alone")
    p.add_argument("--coordinator", help="host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=COUNT, help="processes in the job (default: $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=NONNEGATIVE, help="this process's index (default: $JAX_PROCESS_ID)")
    p.add_argument("--scan", action="store_true", help="stack the layers with nn.scan (compile time independent of depth)")
    p.add_argument("--remat", choices=["none", "dots", "full"], default="none",
                   help="recompute activations in the backward pass: none, the matmul outputs kept (dots), or all (full)")
    p.add_argument("--attention-block", type=COUNT, metavar="N",
                   help="compute attention N queries at a time, never holding the [batch, heads, seq, seq] scores "
                        "(long sequences; default: all at once)")
    p.add_argument("--mlp-block", type=COUNT, metavar="N",
                   help="run each layer's MLP N tokens (of batch x seq) at a time, never holding the full "
                        "[tokens, intermediate] activations (long sequences; default: none, all at once)")
    p.add_argument("--loss-chunk", type=COUNT, help="apply the output head this many positions at a time in the loss, "
                   "never holding the full [batch, seq, vocab] logits (default: all at once)")
    p.add_argument("--loss-vocab-block", type=COUNT, metavar="N",
                   help="with --loss-chunk: also N vocabulary entries at a time (an online softmax), never holding "
                        "a chunk's full logits (large vocabularies; default: all at once)")


def eval_and_output_flags(p):
    """finetune's validation, checkpoint, sample and output flags."""
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="random seed of the adapters' init, data order, dropout and samples")
    p.add_argument("--eval-batches", type=COUNT, help="validate on this many batches of --batch-size sequences instead of --eval-tokens")
    p.add_argument("--eval-tokens", type=COUNT, help="validate on this many tokens, in sequences spread over the "
                   "validation data: the sample `jlora eval` scores when given no --data (default: 8192)")
    p.add_argument("--eval-every", type=COUNT, metavar="N", help="also validate every N steps (default: before and "
                   "after training only); RUN/best keeps the checkpoint of the lowest validation loss")
    p.add_argument("--save-every", type=COUNT, default=50, help="steps between checkpoints")
    p.add_argument("--keep", type=COUNT, default=3, help="checkpoints to keep (at least 1)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt for the before/after samples (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--sample-tokens", type=NONNEGATIVE, default=40, help="tokens in each sample (0: no samples)")
    sampling_flags(p, "the before/after samples", 0.7)
    p.add_argument("--out", default="runs/jlora", help="run directory: checkpoints, merged model, history, loss plot")
    p.add_argument("--merged", choices=MERGED, default="bf16", help="dtype of the merged model written to OUT/merged "
                   "(with tokenizer and model card; none: skip it, the adapter checkpoint alone is kept)")
    p.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --out")
    p.set_defaults(run="finetune:finetune")


def generate_flags(p):
    """generate's flags."""
    p.add_argument("--checkpoint", action="append",
                   help="a run directory or its checkpoints/; repeat it to run several in one batch, one sequence each")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the text to continue (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=NONNEGATIVE, default=60, help="the most tokens to add")
    sampling_flags(p, "each new token", 0.7)
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="random seed of the sampling")
    p.set_defaults(run="generate:generate_cmd")


def chat_flags(p):
    """chat's flags."""
    p.add_argument("--checkpoint", help="a run directory or its checkpoints/")
    p.add_argument("--template", action=argparse.BooleanOptionalAction,
                   help="keep the conversation in the model's chat template (default: when the model has one); "
                        "--no-template: continue each line alone as plain text")
    p.add_argument("--max-new-tokens", type=COUNT, default=200, help="the most tokens in each reply")
    p.add_argument("--context", type=number(int, 2), default=2048,
                   help="tokens of conversation and reply held at once (at most the model's); older turns are dropped")
    sampling_flags(p, "each new token", 0.7)
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="random seed of the sampling; every reply starts from it")
    p.set_defaults(run="generate:chat_cmd")


def eval_flags(p):
    """eval's flags."""
    p.add_argument("--checkpoint", help="a run directory or its checkpoints/ (default: the base alone)")
    p.add_argument("--data", nargs="+", help="text or JSONL files (default: the corpus's validation plays)")
    p.add_argument("--seq-len", type=number(int, 2), help="tokens per sequence (default: the checkpoint's, else 128)")
    p.add_argument("--batch-size", type=SIZE, default=8, help="sequences per batch")
    p.add_argument("--eval-tokens", type=COUNT, help="score this many tokens, in sequences spread over the data "
                   "(default: what the checkpoint's run validated on, else 8192)")
    p.add_argument("--max-batches", type=COUNT, help="score at most this many batches of the sample")
    p.set_defaults(run="generate:eval_cmd")


def export_flags(p, name):
    """merge's and export-peft's flags."""
    p.add_argument("checkpoint", help="a run directory or its checkpoints/")
    p.add_argument("out", help="a new or empty directory")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
    if name == "merge":
        p.add_argument("--save-dtype", choices=MERGED[1:], default="bf16",
                       help="dtype of the weights written (--dtype is the one the base is loaded and merged in)")
    if name == "export-peft":
        p.add_argument("--with-base", nargs="?", const="", metavar="DIR",
                       help="also write the exact base weights trained on (dequantised, float32, HF layout) to DIR "
                            "(default OUT/base) and name it as the adapter's base_model_name_or_path")


def import_flags(p):
    """import-peft's flags."""
    p.add_argument("peft_dir", help="a directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("out", help="an empty directory for the checkpoint")
    p.set_defaults(run="export:import_peft_cmd")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="jlora", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                  formatter_class=Help)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    with_checkpoint = f" (default: the base the checkpoint records; without --checkpoint, {DEFAULT_BASE})"
    p = add_command(sub, "finetune", "fine-tune adapters on text or prompt/completion JSONL", "")
    for flags in (data_and_adapter_flags, optimizer_flags, scale_flags, eval_and_output_flags):
        flags(p)
    generate_flags(add_command(sub, "generate", "continue a prompt with the base or base + adapters", with_checkpoint))
    chat_flags(add_command(sub, "chat", "talk to the base or base + adapters: one prompt per line of stdin, until end of "
                       "input; loaded and compiled once", with_checkpoint))
    eval_flags(add_command(sub, "eval", "perplexity of the base or base + adapters on a file", with_checkpoint))
    for name, help, run in (("merge", "write base + adapters as one Hugging Face safetensors model", "export:merge_cmd"),
                            ("export-peft", "write a checkpoint's adapters in PEFT's format", "export:export_peft_cmd")):
        p = add_command(sub, name, help, " (default: the base the checkpoint records)", quantize=False)
        export_flags(p, name)
        p.set_defaults(run=run)
    import_flags(add_command(sub, "import-peft", "turn a PEFT adapter (LoRA, DoRA, IA3) into a jlora checkpoint", "",
                         quantize=False))
    top.commands = sub.choices  # each command's parser by name, for --config
    return top


def parse(argv=None) -> argparse.Namespace:
    """The command line's arguments; with ``--config FILE``, the file's values under the flags given.

    A value that the file gives and the command line does not is the file's; a repeatable flag
    (``--task``, ``--checkpoint``) given on the command line replaces the file's list.
    """
    top = parser()
    args = top.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    from jlora.cli import config

    command = top.commands[args.command]
    try:
        late = config.apply(command, config.read(args.config), args.config)
    except ValueError as error:
        command.error(str(error))
    args = top.parse_args(argv)
    for dest, value in late.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return args


# Errors that mean bad input or a refused setting, not a bug: one line, exit status 2.
EXPECTED = (UsageError, ValueError, NotImplementedError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def main(argv=None, *, exits: bool = False) -> int:
    """Runs a command line; returns its exit status. ``exits``: the process ends right after (the
    ``jlora`` command), so a second Ctrl-C may be ignored while it winds down."""
    try:
        args = parse(argv)
    except KeyboardInterrupt:
        return interrupted("jlora", exits)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for the model card
    out = getattr(args, "out", None)
    made = new_directories(out) if out else None
    status = 1
    try:
        status = command(args.run)(args)
        return status
    except KeyboardInterrupt:
        return (status := interrupted(f"jlora {args.command}", exits))
    except Exception as error:
        if interrupts.pending():  # an error that Ctrl-C caused: an import or a callback cut short
            return (status := interrupted(f"jlora {args.command}", exits))
        if isinstance(error, EXPECTED):
            print(f"jlora {args.command}: error: {error}", file=sys.stderr)
            return (status := 2)
        if isinstance(error, OSError):  # a full disk, a read-only or removed folder
            where = f" {error.filename}" if error.filename else ""
            print(f"jlora {args.command}: error: writing or reading{where} failed: {error.strerror or error}",
                  file=sys.stderr)
            return (status := 1)
        raise
    finally:
        if made and status != 0:
            remove_if_empty(made())


def interrupted(who: str, exits: bool) -> int:
    """Ctrl-C: one line, exit status 130; when the process ``exits``, a second Ctrl-C is ignored."""
    interrupts.clear()
    if exits:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"\n{who}: interrupted", file=sys.stderr)
    return 130


def entry() -> None:
    """The ``jlora`` command: :func:`main`, Ctrl-C watched throughout (:mod:`jlora.core.interrupts`),
    then exit. After Ctrl-C it exits at once, so that no library's exit handler (JAX's, orbax's) runs
    into the interrupt and prints a traceback."""
    with interrupts.watch():
        status = main(exits=True)
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(status)


def command(run: str):
    """The function a subcommand runs, from its ``module:function`` name; the command modules load
    here, on use, so that ``jlora --help`` imports no JAX."""
    from jlora.cli import export, finetune, generate

    module, name = run.split(":")
    return getattr({"export": export, "finetune": finetune, "generate": generate}[module], name)


def new_directories(path):
    """A function that lists the directories made since this call where a command writes to ``path``:
    ``path`` and its parents that do not exist yet, or, when ``path`` is a directory already, those
    that appear in it. Deepest first."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        before = set(path.iterdir())
        return lambda: [p for p in path.iterdir() if p not in before and p.is_dir()]
    missing = [p for p in [path, *path.parents] if not p.exists()]
    return lambda: missing


def remove_if_empty(directories):
    """Removes each of ``directories`` that holds no file (only empty directories, if any), so a failed
    command leaves no empty output folder behind; never a file, nor a directory that holds one."""
    for directory in directories:
        if not directory.is_dir() or any(not p.is_dir() for p in directory.rglob("*")):
            continue
        for inner in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            inner.rmdir()
        directory.rmdir()

"""The ``jlora`` command: fine-tune, generate, evaluate, merge, and move adapters to and from PEFT.

It only wires the library's parts together: ``jlora.models`` loads the base, ``jlora.data`` makes
batches, ``jlora.train`` steps, ``jlora.checkpoint`` saves adapters.

    jlora finetune --max-steps 100 --out runs/shakespeare
    jlora generate --checkpoint runs/shakespeare --prompt "ROMEO:"
    jlora generate --checkpoint runs/a --checkpoint runs/b --prompt "ROMEO:"   # both in one batch
    jlora eval --checkpoint runs/shakespeare --data play.txt
    jlora finetune --task a=a.txt --task b=b.txt --out runs/ab     # one adapter per dataset, one base
    jlora eval --checkpoint runs/ab --task a --data a.txt
    jlora merge runs/shakespeare runs/shakespeare/merged
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

# Only argparse at import time, so `jlora --help` answers at once; each command imports JAX and its
# module (jlora.cli.finetune, .generate, .export) when it runs.
DEFAULT_BASE = "smollm2-135m"
DEFAULT_METHOD = "lora"
DEFAULT_PROMPT = "ROMEO:\n"
DTYPES = ["bfloat16", "float32"]
METHODS = ["dora", "ia3", "lora"]  # jlora.adapter.KINDS (a test keeps them equal)
QUANTIZE = ["gguf", "int4", "int8", "nf4"]
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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="jlora", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = top.add_subparsers(dest="command", required=True)

    def command(name, help, base_help):
        p = sub.add_parser(name, help=help, allow_abbrev=False)
        p.add_argument("--base", default=DEFAULT_BASE if name == "finetune" else None, help=base_help)
        p.add_argument("--dtype", choices=DTYPES, default="float32")
        p.add_argument("--quantize", choices=QUANTIZE, help="keep the frozen base in 4 or 8 bits (QLoRA); gguf: a GGUF "
                       "base's Q4_0/Q4_1/Q8_0 blocks as shipped (default: the checkpoint's, else none)")
        if name in ("generate", "eval", "merge", "export-peft"):
            p.add_argument("--task", metavar="NAME", help="of a checkpoint trained with --task: this task's adapter")
        return p

    from_checkpoint = f"model name or path (default: the checkpoint's base, else {DEFAULT_BASE})"
    p = command("finetune", "fine-tune adapters on text or prompt/completion JSONL", f"model name or path (default {DEFAULT_BASE})")
    p.add_argument("--data", nargs="+", help="training .txt or .jsonl files (default: bundled Shakespeare)")
    p.add_argument("--task", action="append", metavar="NAME=PATH",
                   help="instead of --data: one adapter per task, trained on PATH, all in one run on one base (repeat)")
    p.add_argument("--valid", nargs="+", help="validation files (default: the corpus's held-out plays)")
    p.add_argument("--valid-fraction", type=number(float, 0, 1, above=True), help="hold out this share of --data instead of --valid")
    p.add_argument("--method", choices=METHODS, help=f"adapter kind (default {DEFAULT_METHOD})")
    p.add_argument("--rank", type=COUNT, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=POSITIVE, help="lora_alpha (default: rank, so scaling 1)")
    p.add_argument("--rslora", dest="use_rslora", action="store_true", default=None, help="scaling alpha/sqrt(rank)")
    p.add_argument("--targets", help="comma-separated module names or a regex (default: the kind's)")
    p.add_argument("--bias", choices=["none", "all", "lora_only"], help="base biases that train (default none)")
    p.add_argument("--max-steps", type=COUNT, default=100)
    p.add_argument("--batch-size", type=SIZE, default=4)
    p.add_argument("--seq-len", type=number(int, 2), default=128)
    p.add_argument("--accumulate", type=COUNT, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=POSITIVE, default=1e-3)
    p.add_argument("--warmup", type=NONNEGATIVE, default=10)
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.0)
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="global norm clip (0: none)")
    p.add_argument("--dropout", type=SHARE, default=0.0, help="LoRA dropout")
    p.add_argument("--lora-plus-ratio", type=POSITIVE, help="LoRA+: B's learning rate over A's")
    p.add_argument("--fsdp", nargs="?", const=0, type=COUNT, metavar="N",
                   help="shard the frozen base over every device, or over groups of N devices (a copy per group)")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction,
                   help="join a multi-process job (default: when JAX_COORDINATOR_ADDRESS is set or JAX detects "
                        "SLURM, Open MPI, Kubernetes or a Cloud TPU slice); --no-distributed: run alone")
    p.add_argument("--coordinator", help="host:port of process 0 (default $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=COUNT, help="processes in the job (default $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=NONNEGATIVE, help="this process's index (default $JAX_PROCESS_ID)")
    p.add_argument("--scan", action="store_true", help="stack the layers with nn.scan (compile time independent of depth)")
    p.add_argument("--remat", choices=["none", "dots", "full"], default="none",
                   help="recompute activations in the backward pass: none, the matmul outputs kept (dots), or all (full)")
    p.add_argument("--loss-chunk", type=COUNT, help="apply the output head this many positions at a time in the loss, "
                   "never holding the full [batch, seq, vocab] logits")
    p.add_argument("--seed", type=NONNEGATIVE, default=0)
    p.add_argument("--eval-batches", type=COUNT, help="validate on this many batches of --batch-size sequences instead of --eval-tokens")
    p.add_argument("--eval-tokens", type=COUNT, help="validate on this many tokens, in sequences spread over the "
                   "validation data, the sample `jlora eval` scores by default (default 8192)")
    p.add_argument("--eval-every", type=COUNT, metavar="N", help="also validate every N steps (default: before and "
                   "after training only); RUN/best keeps the checkpoint of the lowest validation loss")
    p.add_argument("--save-every", type=COUNT, default=50)
    p.add_argument("--keep", type=COUNT, default=3, help="checkpoints to keep (at least 1)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the before/after samples")
    p.add_argument("--sample-tokens", type=NONNEGATIVE, default=40)
    p.add_argument("--out", default="runs/jlora")
    p.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --out")
    p.set_defaults(run="finetune:finetune")

    p = command("generate", "continue a prompt with the base or base + adapters", from_checkpoint)
    p.add_argument("--checkpoint", action="append",
                   help="a run directory or its checkpoints/; repeat it to run several in one batch, one sequence each")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=NONNEGATIVE, default=60)
    p.add_argument("--temperature", type=number(float, 0), default=0.0)
    p.add_argument("--seed", type=NONNEGATIVE, default=0)
    p.set_defaults(run="generate:generate_cmd")

    p = command("eval", "perplexity of the base or base + adapters on a file", from_checkpoint)
    p.add_argument("--checkpoint")
    p.add_argument("--data", nargs="+", help="text or JSONL files (default: the corpus's validation plays)")
    p.add_argument("--seq-len", type=number(int, 2), help="tokens per sequence (default: the checkpoint's, else 128)")
    p.add_argument("--batch-size", type=SIZE, default=8)
    p.add_argument("--eval-tokens", type=COUNT, help="score this many tokens, in sequences spread over the data "
                   "(default: what the checkpoint's run validated on, else 8192)")
    p.add_argument("--max-batches", type=COUNT, help="score at most this many batches of the sample")
    p.set_defaults(run="generate:eval_cmd")

    for name, help, run in (("merge", "write base + adapters as one Hugging Face safetensors model", "export:merge_cmd"),
                            ("export-peft", "write a checkpoint's adapters in PEFT's format", "export:export_peft_cmd")):
        p = command(name, help, from_checkpoint)
        p.add_argument("checkpoint")
        p.add_argument("out", help="a new or empty directory")
        p.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
        p.set_defaults(run=run)

    p = command("import-peft", "turn a PEFT adapter (LoRA, DoRA, IA3) into a jlora checkpoint", f"model name or path (default {DEFAULT_BASE})")
    p.add_argument("peft_dir")
    p.add_argument("out", help="an empty directory for the checkpoint")
    p.set_defaults(run="export:import_peft_cmd")
    return top


# Errors that mean bad input or a refused setting, not a bug: one line, exit status 2.
EXPECTED = (UsageError, ValueError, NotImplementedError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        module, name = args.run.split(":")
        return getattr(importlib.import_module(f"jlora.cli.{module}"), name)(args)
    except EXPECTED as error:
        print(f"jlora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\njlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

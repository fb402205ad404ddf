"""What the commands share: loading a base or a run, naming its identity, checking an output directory."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp

from jlora import kinds  # noqa: F401 - registers the bundled kinds: --method looks them up by name
from jlora.core import adapter
from jlora.training import checkpoint
from jlora.training.runinfo import RunInfo
from jlora.cli import ADAPTER_FLAGS, DEFAULT_METHOD, UsageError
from jlora.core import multi
from jlora.core.partition import combine

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_base(name, dtype="float32", quantize=None, *, text=True):
    """``(model, params, tokenizer, config)`` of a base, its weights quantised when ``quantize`` names a
    format (``--quantize``). ``text``: the command encodes or decodes text, so a base without tokenizer
    files is refused; the commands that only move weights (merge, export-peft, import-peft) pass False
    and get ``tokenizer`` None for such a base."""
    from jlora import models

    model, params, tokenizer, config = models.load(name, param_dtype=DTYPES[dtype], dtype=DTYPES[dtype])
    if text:
        need_tokenizer(tokenizer, name)
    if quantize:
        params = models.quantize_base(name, params, config, quantize, dtype=DTYPES[dtype])
    return model, params, tokenizer, config


def need_tokenizer(tokenizer, name):
    """Refuses a base without tokenizer files for a command that encodes or decodes text."""
    if tokenizer is None:
        raise UsageError(f"base {name} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                         "this command encodes or decodes text with it")


def prepare_out(out, overwrite: bool, base=None) -> Path:
    """``out`` for an export: refused when it is a file, the base's own directory, or (without
    ``--overwrite``) a directory that already holds files."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; give a directory to write into")
    if base is not None and Path(str(base)).expanduser().is_dir() and out.resolve() == Path(str(base)).expanduser().resolve():
        raise UsageError(f"{out} is the base model's own directory; writing there would replace the base")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already holds {', '.join(sorted(p.name for p in out.iterdir())[:5])}; "
                         "pass --overwrite to replace it, or choose a new directory")
    return out


def adapter_options(args) -> dict:
    """The `create` options of --method's kind that the command line sets (flags left out use the kind's defaults)."""
    kind = adapter.kind(args.method or DEFAULT_METHOD)
    ignored = [flag for k, flag in ADAPTER_FLAGS.items() if getattr(args, k) is not None and k not in kind.init_options]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} does not apply to --method {kind.name} (it takes "
                         f"{', '.join(ADAPTER_FLAGS.get(k, k) for k in kind.init_options)})")
    options = {k: getattr(args, k) for k in kind.init_options if getattr(args, k, None) is not None}
    if isinstance(options.get("targets"), str) and "," in options["targets"]:  # "q_proj,v_proj": module names
        options["targets"] = options["targets"].split(",")
    return options


def run_dir_checkpoints(path) -> Path:
    """Accepts a run directory (holding checkpoints/) or the checkpoints directory itself."""
    path = Path(path).expanduser()
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise UsageError(f"no checkpoint directory at {path}")


def pick_task(adapters, info: RunInfo, task, where):
    """Task ``task``'s adapters of a run trained with --task (a stack of one adapter tree per task);
    a run with one adapter tree is returned as it is."""
    names = info.tasks
    if not names:
        if task is not None:
            raise UsageError(f"--task {task}: {where} was trained on one dataset, not with --task")
        return adapters
    if task not in names:
        raise UsageError(f"{where} holds one adapter per task ({', '.join(names)}); "
                         f"{'choose one with --task NAME' if task is None else f'there is no task {task!r}'}")
    return multi.take(adapters, names.index(task))


def load_run(checkpoint_path, base=None, dtype="float32", quantize=None, task=None, *, text=True):
    """Base model (quantised as the run's was, unless ``quantize`` says otherwise) plus the adapters of
    a run's latest checkpoint: (model, params, tokenizer, config, adapters, info), ``info`` its
    :class:`RunInfo`; of task ``task`` in a run trained with --task. ``text``: as :func:`load_base`'s.
    A damaged newest step is skipped (and left in place) for the newest intact one, with a warning."""
    ckpt = checkpoint.Checkpointer(run_dir_checkpoints(checkpoint_path))
    info = RunInfo.from_json(readable_metadata(ckpt))
    quantize = quantize or info.quantize
    model, params, tokenizer, config = load_base(base or info.base_name, dtype, quantize, text=text)
    from jlora.models import layers

    # A run with --scan saved its adapters stacked like the scanned layers; unstack them for the unrolled model.
    stacked = info.scan
    expect = {"base": base_identity(info.base_name, params, quantize)}
    base = layers.stack_layers(params, stacked) if stacked else params
    state, metadata, damaged = ckpt.newest_intact(expect=expect, base=base)  # a read moves no damaged step aside
    info = RunInfo.from_json(metadata)
    if damaged:
        print(f"warning: using step {info.step}, the newest intact checkpoint in {ckpt.directory}; skipped "
              f"{'; '.join(damaged.values())}", file=sys.stderr)
    params, adapters = combine(base, state.trainable)
    adapters = pick_task(adapters, info, task, checkpoint_path)
    if stacked:
        params, adapters = layers.unstack_layers(params, stacked), layers.unstack_layers(adapters, stacked)
    return model, params, tokenizer, config, adapters, info


def readable_metadata(ckpt) -> dict:
    """The metadata of the newest step whose metadata reads (a run's base and settings, before its arrays load)."""
    for step in reversed(ckpt.all_steps()[1:]):
        try:
            return ckpt.metadata(step)
        except checkpoint.DamagedCheckpoint:
            continue
    return ckpt.metadata(ckpt.all_steps()[0] if ckpt.all_steps() else None)


def base_identity(name, params, quantize=None) -> dict:
    identity = {"name": str(name), "fingerprint": checkpoint.base_fingerprint(params)}
    return identity | {"quantize": quantize} if quantize else identity


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024

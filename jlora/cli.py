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
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import adapter, checkpoint, data, distributed, loop, train

DEFAULT_BASE = "smollm2-135m"
DEFAULT_METHOD = "lora"
DEFAULT_PROMPT = "ROMEO:\n"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QUANTIZE = ["gguf", "int4", "int8", "nf4"]
# The flags that choose adapters (each kind's `init_options` picks its own); on --resume they come
# from the checkpoint.
ADAPTER_FLAGS = {"targets": "--targets", "rank": "--rank", "alpha": "--alpha", "use_rslora": "--rslora"}


class UsageError(Exception):
    """Bad input from the command line: printed without a traceback, exit status 2."""


# ---- pieces shared by the commands ----


def load_base(name, dtype="float32", quantize=None):
    """``(model, params, tokenizer, config)`` of a base, its weights quantised when ``quantize`` names a
    format (``--quantize``); one without tokenizer files is refused."""
    from jlora import models

    model, params, tokenizer, config = models.load(name, param_dtype=DTYPES[dtype], dtype=DTYPES[dtype])
    if tokenizer is None:
        raise UsageError(f"base {name} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                         "jlora's commands encode text with it")
    if quantize:
        params = models.quantize_base(name, params, config, quantize, dtype=DTYPES[dtype])
    return model, params, tokenizer, config


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


def pick_task(adapters, metadata, task, where):
    """Task ``task``'s adapters of a run trained with --task (a stack of one adapter tree per task);
    a run with one adapter tree is returned as it is."""
    names = metadata.get("tasks")
    if not names:
        if task is not None:
            raise UsageError(f"--task {task}: {where} was trained on one dataset, not with --task")
        return adapters
    if task not in names:
        raise UsageError(f"{where} holds one adapter per task ({', '.join(names)}); "
                         f"{'choose one with --task NAME' if task is None else f'there is no task {task!r}'}")
    return jlora.multi.take(adapters, names.index(task))


def load_run(checkpoint_path, base=None, dtype="float32", quantize=None, task=None):
    """Base model (quantised as the run's was, unless ``quantize`` says otherwise) plus the adapters of
    a run's latest checkpoint: (model, params, tokenizer, config, adapters, metadata); of task ``task``
    in a run trained with --task."""
    ckpt = checkpoint.Checkpointer(run_dir_checkpoints(checkpoint_path))
    metadata = ckpt.metadata()
    quantize = quantize or metadata["base"].get("quantize")
    model, params, tokenizer, config = load_base(base or metadata["base"]["name"], dtype, quantize)
    from jlora.models import layers

    # A run with --scan saved its adapters stacked like the scanned layers; unstack them for the unrolled model.
    stacked = (metadata.get("model") or {}).get("scan")
    expect = {"base": base_identity(metadata["base"]["name"], params, quantize)}
    base = layers.stack_layers(params, stacked) if stacked else params
    state, metadata = ckpt.restore(expect=expect, base=base)
    params, adapters = jlora.combine(base, state.trainable)
    adapters = pick_task(adapters, metadata, task, checkpoint_path)
    if stacked:
        params, adapters = layers.unstack_layers(params, stacked), layers.unstack_layers(adapters, stacked)
    return model, params, tokenizer, config, adapters, metadata


def base_identity(name, params, quantize=None) -> dict:
    identity = {"name": str(name), "fingerprint": checkpoint.base_fingerprint(params)}
    return identity | {"quantize": quantize} if quantize else identity


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


class Progress:
    """One status line: step, loss, tokens/s and ETA; a plain line every `every` steps off a TTY."""

    def __init__(self, total: int, start: int, tokens_per_step: int, every: int = 10):
        self.total, self.start, self.tokens_per_step, self.every = total, start, tokens_per_step, every
        self.began = None
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float):
        now = time.perf_counter()
        if self.began is None:  # the first step compiles; rates count from its end
            self.began, self.first = now, step
        done = step - self.first
        rate = done / (now - self.began) if done else 0.0
        eta = (self.total - step) / rate if rate else float("nan")
        width = 24
        filled = int(width * step / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total}  loss {loss:.4f}  "
                f"{rate * self.tokens_per_step:,.0f} tok/s  ETA {eta:.0f}s")
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)


# ---- commands ----


def resume_conflicts(args, saved: dict) -> list[str]:
    """Adapter flags given with --resume that differ from what made the checkpoint's adapters."""
    given = {"method": ("--method", args.method), "bias": ("--bias", args.bias)}
    given |= {k: (flag, getattr(args, k)) for k, flag in ADAPTER_FLAGS.items()}
    recorded = {"method": saved.get("method"), "bias": saved.get("bias", "none"), **(saved.get("options") or {})}
    return [f"{flag} {value}" for k, (flag, value) in given.items() if value is not None and recorded.get(k) != value]


def join_job(args) -> bool:
    """Joins the multi-process job that the flags, ``JAX_*`` variables or a detected cluster
    describe (before any other JAX call); False on a lone host."""
    try:
        return distributed.initialize(args.coordinator, args.num_processes, args.process_id, join=args.distributed)
    except (RuntimeError, ValueError) as error:
        raise UsageError(str(error)) from None


def task_splits(args, tokenizer) -> tuple[list[str], list]:
    """``--task NAME=PATH``'s names and each task's ``(train, valid)`` (``valid`` from
    --valid-fraction, or None), after checking the flags that --task changes."""
    names, paths = zip(*(t.split("=", 1) if "=" in t else (t, "") for t in args.task))
    bad = [t for t, name, path in zip(args.task, names, paths) if not name.isidentifier() or not path]
    if bad:
        raise UsageError(f"--task {bad[0]!r}: give NAME=PATH, NAME an identifier (letters, digits, _)")
    if len(set(names)) < len(names):
        raise UsageError(f"--task names must differ; given {', '.join(names)}")
    refused = {"--data": args.data, "--valid": args.valid, "--loss-chunk": args.loss_chunk,
               "--accumulate > 1": args.accumulate > 1, "--bias": args.bias not in (None, "none")}
    refused = [flag for flag, given in refused.items() if given]
    if refused:
        raise UsageError(f"--task does not combine with {', '.join(refused)} (each task's data is its PATH, "
                         "held out with --valid-fraction; its loss is a mean over its own rows of each step)")
    if args.batch_size % (len(names) * jax.device_count()):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the {len(names)} tasks times "
                         f"the {jax.device_count()} devices (each step takes batch-size / tasks rows of each task)")
    splits = [data.load_splits(tokenizer, args.seq_len, [path], None, args.valid_fraction, args.seed) for path in paths]
    for name, (train_set, _) in zip(names, splits):
        if len(train_set) < args.batch_size // len(names):
            raise UsageError(f"task {name} has {len(train_set)} training sequences of {args.seq_len} tokens, "
                             f"fewer than its {args.batch_size // len(names)} rows of each batch")
    return list(names), splits


def finetune(args) -> int:
    start_time = time.perf_counter()
    join_job(args)
    writer = distributed.is_writer()  # one process prints and writes what the job has one of

    def say(text):
        if writer:
            print(text, file=sys.stderr)

    out = checkpoint.writable_dir(args.out)
    ckpt = checkpoint.Checkpointer(out / "checkpoints", max_to_keep=args.keep)
    latest = ckpt.latest_step()
    if args.resume and latest is None:
        raise UsageError(f"--resume: no checkpoint in {ckpt.directory}")
    if not args.resume and latest is not None:
        raise UsageError(f"{ckpt.directory} already holds checkpoints up to step {latest}; "
                         "pass --resume to continue that run, or choose another --out")

    if args.batch_size % (args.accumulate * jax.device_count()):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of --accumulate ({args.accumulate}) "
                         f"times the {jax.device_count()} devices the batch is split over")
    if args.fsdp and jax.device_count() % args.fsdp:
        raise UsageError(f"--fsdp {args.fsdp} must divide the {jax.device_count()} devices")
    from jlora.models import layers

    base_model, params, tokenizer, config = load_base(args.base, args.dtype, args.quantize)
    base_params = params  # this host's whole copy, unstacked: the sample before training reads it
    model = base_model.clone(scan=args.scan, remat=args.remat)
    # The scanned layers' name ("layers", "h"): params and adapters train stacked along it, and are
    # unstacked again for sampling, merging and export.
    stacked = model.layer_name if args.scan else None
    if args.seq_len > model.max_length:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the base's context of {model.max_length} tokens")
    names, splits = task_splits(args, tokenizer) if args.task else ([], [])
    train_set, valid_set = splits[0] if splits else data.load_splits(
        tokenizer, args.seq_len, args.data, args.valid, args.valid_fraction, args.seed)
    if not names and len(train_set) < args.batch_size:
        raise UsageError(f"training data has {len(train_set)} sequences of {args.seq_len} tokens, "
                         f"fewer than one batch of {args.batch_size}")
    config_train = train.TrainConfig(
        learning_rate=args.lr, warmup_steps=args.warmup, max_steps=args.max_steps, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_size=args.batch_size,
        accumulate=args.accumulate, dropout=args.dropout, lora_plus_ratio=args.lora_plus_ratio, seed=args.seed,
        loss_chunk=args.loss_chunk or 0,
    )
    metadata = {
        "base": base_identity(args.base, params, args.quantize),
        "train": dataclasses.asdict(config_train),
        "data": {"train": [str(p) for p in args.data or []] or "default corpus", "seq_len": args.seq_len},
        "model": {"scan": stacked},
    }
    if names:
        metadata |= {"tasks": names, "data": {"train": dict(zip(names, (t.split("=", 1)[1] for t in args.task))),
                                              "seq_len": args.seq_len}}
    params = layers.stack_layers(params, stacked) if stacked else params
    mesh = train.mesh(fsdp=args.fsdp or 1)
    if args.resume:
        try:
            state, saved, damaged = ckpt.restore_intact(expect={"base": base_identity(args.base, params, args.quantize)}, base=params)
        except checkpoint.CheckpointError as error:
            raise UsageError(f"--resume: {error}") from None
        for report in damaged:
            say(f"warning: skipped a damaged checkpoint: {report}")
        conflicts = resume_conflicts(args, saved.get("adapter") or {})
        if conflicts:
            raise UsageError(f"--resume continues the adapters in {ckpt.directory}, made with "
                             f"{saved.get('adapter')}; drop {', '.join(conflicts)}")
        say(f"resuming from step {int(state.step)} in {ckpt.directory}")
        metadata["adapter"] = saved.get("adapter")
        if (saved.get("tasks") or []) != names:
            raise UsageError(f"--resume: the checkpoint trained "
                             f"{'tasks ' + ', '.join(saved['tasks']) if saved.get('tasks') else 'one dataset'}; "
                             "give the same --task flags (or none) to continue it")
        if (saved.get("model") or {}).get("scan") != stacked:
            raise UsageError(f"--resume: the checkpoint was trained {'with' if not stacked else 'without'} --scan; "
                             f"{'pass' if not stacked else 'drop'} --scan to continue it")
        if saved.get("train") != metadata["train"]:
            say(f"note: training settings differ from the checkpoint's {saved.get('train')}; "
                "the resumed run will not equal an uninterrupted one")
        params, adapters = jlora.combine(params, state.trainable)
        adapters = jlora.multi.take(adapters, 0) if names else adapters  # each task's adapter splits the base alike
        frozen, _ = jlora.split(params, adapters, metadata["adapter"].get("bias", "none"))
    else:
        method, bias = args.method or DEFAULT_METHOD, args.bias or "none"
        options = adapter_options(args)
        adapters = adapter.kind(method).create(base_params, **options)
        adapters = layers.stack_layers(adapters, stacked) if stacked else adapters
        metadata["adapter"] = {"method": method, "options": options, "bias": bias}
        frozen, trainable = jlora.split(params, adapters, bias)
        if names:  # one adapter per task, each initialized as a run on that task alone would be
            trainable = trainable._replace(adapters=jlora.stack([adapters] * len(names)))
        state = train.init_state(trainable, config_train)
    say(jlora.count_params(params, adapters, metadata["adapter"].get("bias", "none")))
    if names:
        say(f"{len(names)} tasks, one such adapter each: {', '.join(names)}")
    frozen = train.shard_fsdp(frozen, mesh) if args.fsdp is not None else train.replicate(frozen, mesh)
    state = train.shard_state(state, frozen, mesh)
    start = int(state.step)

    evaluate = train.make_eval(model.apply)
    report = {"base": args.base, "method": metadata["adapter"].get("method"), "devices": jax.device_count(),
              "processes": jax.process_count()}
    if args.sample_tokens and start == 0 and writer:
        report["sample_before"] = sample(base_model, jlora.dequantize(base_params), tokenizer, args)
        say(f"sample before: {args.prompt}{report['sample_before']}")

    def validation(state):
        params, adapters = jlora.combine(frozen, state.trainable)
        if names:
            return {f"valid_perplexity/{name}": train.perplexity(evaluate, params, jlora.multi.take(adapters, i), valid,
                                                                 args.batch_size // len(names), args.eval_batches, mesh=mesh)
                    for i, (name, (_, valid)) in enumerate(zip(names, splits))}
        return {"valid_perplexity": train.perplexity(evaluate, params, adapters, valid_set, args.batch_size,
                                                     args.eval_batches, mesh=mesh)}

    progress = Progress(args.max_steps, start, args.batch_size * args.seq_len)

    def log(entry):
        if "loss" in entry:
            progress.update(entry["step"], entry["loss"])
        else:
            when = "before" if entry["step"] == 0 else "after" if entry["step"] == args.max_steps else f"at step {entry['step']}"
            for key, value in entry.items():
                if key.startswith("valid_perplexity"):
                    print(f"validation perplexity{key[16:].replace('/', ' of ')} {when}: {value:.3f}", file=sys.stderr)

    step_fn = (train.make_step(functools.partial(model.apply, hidden=True), config_train, head_fn=model.head)
               if args.loss_chunk else train.make_step(model.apply, config_train, tasks=len(names)))
    rows = distributed.process_rows(args.batch_size, train.batch_sharding(mesh))  # this process's share

    def batch_at(k):
        if not names:
            return data.batch_at(train_set, args.batch_size, args.seed, k, rows=rows)
        per = args.batch_size // len(names)  # each task's rows, shuffled as a run on that task alone
        parts = [data.batch_at(t, per, args.seed, k) for t, _ in splits]
        whole = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return {key: v[rows] for key, v in (whole | {"adapter_ids": np.repeat(np.arange(len(names)), per)}).items()}
    train_began = time.perf_counter()
    try:
        result = loop.fit(
            lambda state, batch: step_fn(state, frozen, batch), state,
            lambda k: train.shard_batch(batch_at(k), mesh),
            max_steps=args.max_steps, checkpointer=ckpt, metadata=metadata, save_every=args.save_every,
            evaluate=validation if valid_set is not None else None, history_path=out / "history.jsonl", log=log,
        )
    except loop.LossNotFinite as error:
        print(f"\n{error}; {saved_note(error.last_saved, ckpt)}", file=sys.stderr)
        return 1
    except loop.SaveFailed as error:
        print(f"\n{error}; {saved_note(error.last_saved, ckpt)}", file=sys.stderr)
        return 1
    except loop.Interrupted as interrupt:
        print(f"\ninterrupted after step {interrupt.step}; {saved_note(interrupt.last_saved, ckpt)}", file=sys.stderr)
        return 130
    train_seconds = time.perf_counter() - train_began

    # The frozen base did not change: this host's copy plus the trained arrays (gathered where they
    # are split across processes) is the whole model, and no shard of the base is fetched.
    params, adapters = jlora.combine(params, distributed.fetch(result.state.trainable))
    tasks = [jlora.multi.take(adapters, i) for i in range(len(names))] or [adapters]
    if stacked:
        params, tasks = layers.unstack_layers(params, stacked), [layers.unstack_layers(a, stacked) for a in tasks]
    if not writer:
        return 0
    evaluated = [h for h in result.history if any(k.startswith("valid_perplexity") for k in h)]
    for key in (k for k in evaluated[-1] if k.startswith("valid_perplexity")) if evaluated else ():
        report[f"{key}_before"] = evaluated[0][key] if evaluated[0]["step"] == 0 else None
        report[f"{key}_after"] = evaluated[-1][key]
    from jlora.models.export import save_hf

    for name, task_adapters in zip(names, tasks):  # each task's own merged model
        save_hf(out / "tasks" / name / "merged", jlora.merge(params, task_adapters), config)
        print(f"task {name}: merged export {out / 'tasks' / name / 'merged'}", file=sys.stderr)
    merged = jlora.merge(params, tasks[0])
    if args.sample_tokens:
        report["sample_after"] = sample(base_model, merged, tokenizer, args)
        print(f"sample after{f' (task {names[0]})' if names else ''}: {args.prompt}{report['sample_after']}", file=sys.stderr)
    try:
        loop.plot_history(result.history, out / "loss.png")
    except ImportError as error:
        print(f"note: no loss plot: {error}", file=sys.stderr)
    if not names:
        save_hf(out / "merged", merged, config)
    checkpoint_bytes = checkpoint.dir_bytes(ckpt.directory / str(ckpt.latest_step()))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # a quantised base: its codes and scales
    steps_run = args.max_steps - start
    report |= {
        "steps": args.max_steps, "steps_this_run": steps_run, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(steps_run * args.batch_size * args.seq_len / max(train_seconds, 1e-9), 1),
        "checkpoint_bytes": checkpoint_bytes, "base_bytes": base_bytes,
        "total_seconds": round(time.perf_counter() - start_time, 1),
    }
    (out / "run.json").write_text(json.dumps(report, indent=2))
    print(f"checkpoint: {ckpt.directory / str(ckpt.latest_step())} ({human_bytes(checkpoint_bytes)}; "
          f"base model {human_bytes(base_bytes)})\nmerged export: {out / 'tasks/*/merged' if names else out / 'merged'}\nloss curve: {out / 'loss.png'}",
          file=sys.stderr)
    return 0


def saved_note(last_saved, ckpt) -> str:
    if last_saved is None:
        return f"no checkpoint was written yet in {ckpt.directory}"
    return f"the last checkpoint is step {last_saved} in {ckpt.directory}; continue with --resume"


def sample(model, params, tokenizer, args) -> str:
    from jlora.models import complete

    return complete(model, params, tokenizer, args.prompt, args.sample_tokens)


def generate_many(args) -> int:
    """The prompt continued by each checkpoint's adapters, all in one batch (one sequence per
    checkpoint) on one copy of the base: ``jlora.stack`` and per-example ``adapter_ids``."""
    from jlora.models import generate

    checkpoints = [checkpoint.Checkpointer(run_dir_checkpoints(path)) for path in args.checkpoint]
    bases = {ckpt.metadata()["base"]["name"] for ckpt in checkpoints}
    if args.base is None and len(bases) > 1:
        raise UsageError(f"the checkpoints were trained on different bases ({', '.join(sorted(bases))}); "
                         "one batch runs on one base")
    name = args.base or bases.pop()
    model, params, tokenizer, _ = load_base(name, args.dtype)
    trees = []
    for path, ckpt in zip(args.checkpoint, checkpoints):
        state, saved = ckpt.restore(expect={"base": base_identity(ckpt.metadata()["base"]["name"], params)}, base=params)
        if jax.tree.leaves(state.trainable.base):
            raise UsageError(f"{path} also trains base weights (--bias), which one shared base cannot hold per "
                             "sequence; generate with it alone")
        trees.append(pick_task(state.trainable.adapters, saved, args.task, path))
    try:
        stacked = jlora.stack(trees)
    except ValueError as error:
        raise UsageError(f"these checkpoints cannot share one batch: {error}") from None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = tokenizer.encode(prompt)
    if not ids or len(ids) >= model.max_length:
        raise UsageError(f"the prompt is {len(ids)} tokens; it needs 1 to {model.max_length - 1}")
    new = min(args.max_new_tokens, model.max_length - len(ids))
    adapted = jlora.adapt(model.apply)
    n = len(trees)
    out = generate(lambda v, tokens, cache: adapted(v["params"], v["adapters"], tokens, cache, adapter_ids=v["ids"]),
                   dict(params=params, adapters=stacked, ids=jnp.arange(n)), jnp.tile(jnp.array([ids]), (n, 1)),
                   model.init_cache(n, len(ids) + new), max_new_tokens=new, eos_id=tokenizer.eos_id,
                   temperature=args.temperature, rng=jax.random.key(args.seed))
    for path, row in zip(args.checkpoint, out):
        print(f"==> {path} <==\n{prompt}{tokenizer.decode(row[len(ids):].tolist(), skip_special_tokens=True)}")
    return 0


def generate_cmd(args) -> int:
    if args.checkpoint and len(args.checkpoint) > 1:
        return generate_many(args)
    if args.checkpoint:
        model, params, tokenizer, _, adapters, _ = load_run(args.checkpoint[0], args.base, args.dtype, args.quantize, task=args.task)
        params = jlora.merge(params, adapters)  # merged once: no extra latency per token
    else:
        model, params, tokenizer, _ = load_base(args.base or DEFAULT_BASE, args.dtype, args.quantize)
        params = jlora.dequantize(params)  # generation runs on the dequantised weights
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    from jlora.models import complete

    print(prompt + complete(model, params, tokenizer, prompt, args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed))
    return 0


def eval_cmd(args) -> int:
    if args.checkpoint:
        model, params, tokenizer, _, adapters, _ = load_run(args.checkpoint, args.base, args.dtype, args.quantize, task=args.task)
    else:
        (model, params, tokenizer, _), adapters = load_base(args.base or DEFAULT_BASE, args.dtype, args.quantize), None
    dataset = data.load(args.data, tokenizer, args.seq_len) if args.data else data.load_splits(tokenizer, args.seq_len)[1]
    ppl = train.perplexity(train.make_eval(model.apply), params, adapters, dataset, args.batch_size, args.max_batches)
    print(json.dumps({"perplexity": ppl, "sequences": min(len(dataset), args.batch_size * args.max_batches)}))
    return 0


def merge_cmd(args) -> int:
    from jlora.models.export import save_hf

    model, params, _, config, adapters, metadata = load_run(args.checkpoint, args.base, args.dtype, task=args.task)
    out = prepare_out(args.out, args.overwrite, args.base or metadata["base"]["name"])
    save_hf(out, jlora.merge(params, adapters), config)
    print(f"merged weights written to {args.out}", file=sys.stderr)
    return 0


def export_peft_cmd(args) -> int:
    import jlora.peft

    model, params, _, config, adapters, metadata = load_run(args.checkpoint, args.base, args.dtype, task=args.task)
    options = (metadata.get("adapter") or {}).get("options") or {}
    out = prepare_out(args.out, args.overwrite, args.base or metadata["base"]["name"])
    out = jlora.peft.export_peft(adapters, config, out, base_model_name_or_path=metadata["base"]["name"],
                                 use_rslora=bool(options.get("use_rslora")))
    print(f"PEFT adapter written to {out}", file=sys.stderr)
    return 0


def import_peft_cmd(args) -> int:
    import jlora.peft

    base = args.base or DEFAULT_BASE
    model, params, _, config = load_base(base, args.dtype)
    adapters = jlora.peft.import_peft(args.peft_dir, params, config)
    ckpt = checkpoint.Checkpointer(args.out)
    if ckpt.latest_step() is not None:
        raise UsageError(f"{ckpt.directory} already holds checkpoints; choose an empty directory")
    kinds = sorted({a.name for a in adapter.table(adapters).values()})
    frozen, trainable = jlora.split(params, adapters)
    state = train.init_state(trainable, train.TrainConfig())
    metadata = {"base": base_identity(base, params),
                "adapter": {"method": "+".join(kinds), "options": {}, "bias": "none"},
                "train": dataclasses.asdict(train.TrainConfig()), "data": {"imported_from": str(args.peft_dir)}}
    path = ckpt.save(state, metadata)
    print(f"jlora checkpoint written to {path}", file=sys.stderr)
    return 0


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
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
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
    p.add_argument("--method", choices=sorted(adapter.KINDS), help=f"adapter kind (default {DEFAULT_METHOD})")
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
    p.add_argument("--eval-batches", type=COUNT, default=8, help="validation batches before and after")
    p.add_argument("--save-every", type=COUNT, default=50)
    p.add_argument("--keep", type=COUNT, default=3, help="checkpoints to keep (at least 1)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the before/after samples")
    p.add_argument("--sample-tokens", type=NONNEGATIVE, default=40)
    p.add_argument("--out", default="runs/jlora")
    p.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --out")
    p.set_defaults(run=finetune)

    p = command("generate", "continue a prompt with the base or base + adapters", from_checkpoint)
    p.add_argument("--checkpoint", action="append",
                   help="a run directory or its checkpoints/; repeat it to run several in one batch, one sequence each")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=NONNEGATIVE, default=60)
    p.add_argument("--temperature", type=number(float, 0), default=0.0)
    p.add_argument("--seed", type=NONNEGATIVE, default=0)
    p.set_defaults(run=generate_cmd)

    p = command("eval", "perplexity of the base or base + adapters on a file", from_checkpoint)
    p.add_argument("--checkpoint")
    p.add_argument("--data", nargs="+", help="text or JSONL files (default: the corpus's validation plays)")
    p.add_argument("--seq-len", type=number(int, 2), default=128)
    p.add_argument("--batch-size", type=SIZE, default=8)
    p.add_argument("--max-batches", type=COUNT, default=16)
    p.set_defaults(run=eval_cmd)

    for name, help, run in (("merge", "write base + adapters as one Hugging Face safetensors model", merge_cmd),
                            ("export-peft", "write a checkpoint's adapters in PEFT's format", export_peft_cmd)):
        p = command(name, help, from_checkpoint)
        p.add_argument("checkpoint")
        p.add_argument("out", help="a new or empty directory")
        p.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
        p.set_defaults(run=run)

    p = command("import-peft", "turn a PEFT adapter (LoRA, DoRA, IA3) into a jlora checkpoint", f"model name or path (default {DEFAULT_BASE})")
    p.add_argument("peft_dir")
    p.add_argument("out", help="an empty directory for the checkpoint")
    p.set_defaults(run=import_peft_cmd)
    return top


# Errors that mean bad input or a refused setting, not a bug: one line, exit status 2.
EXPECTED = (UsageError, ValueError, NotImplementedError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except EXPECTED as error:
        print(f"jlora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\njlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

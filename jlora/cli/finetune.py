"""``jlora finetune``: train adapters on a base, checkpointing as it goes, then sample and export."""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import math
import sys
import time

import jax
import numpy as np

from jlora.core import adapter
from jlora import training
from jlora.training import checkpoint, data, distributed, loop, metrics
from jlora.cli import DEFAULT_METHOD, ADAPTER_FLAGS, UsageError, common
from jlora.cli import config as cli_config  # `config` is the model's config below
from jlora.core import multi
from jlora.core.count import count_params
from jlora.core.merge import merge
from jlora.core.multi import stack
from jlora.core.partition import combine
from jlora.core.partition import split
from jlora.quant.quantize import dequantize


class Progress:
    """The run's progress on stderr: a tqdm bar with step, loss, tokens/s and ETA on a terminal,
    else (a log file, a pipe) a plain line every ``every`` steps; :meth:`status` prints a line
    between updates without breaking the bar. Rates and ETA count from the end of the first step,
    which compiles."""

    def __init__(self, total: int, tokens_per_step: int, every: int = 10, file=None):
        self.total, self.tokens_per_step, self.every = total, tokens_per_step, every
        self.file = file or sys.stderr
        self.tty = self.file.isatty()
        self.bar, self.first = None, None

    def status(self, text: str):
        from tqdm import tqdm

        tqdm.write(text, file=self.file)  # clears the bar, prints, draws it again

    def update(self, step: int, loss: float):
        from tqdm import tqdm

        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        steps, seconds = step - self.first[0], now - self.first[1]
        rate = steps / seconds if steps and seconds > 0 else None  # steps per second
        speed = f"{rate * self.tokens_per_step:,.0f} tok/s" if rate else "- tok/s"
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=self.total, initial=step, file=self.file, dynamic_ncols=True, smoothing=0.1,
                                bar_format="{percentage:3.0f}%|{bar}| step {n}/{total} [{elapsed}<{remaining}{postfix}]")
            self.bar.set_postfix_str(f"loss {loss:.4f}, {speed}", refresh=False)
            self.bar.update(step - self.bar.n)
            if step >= self.total:
                self.close()
        elif step % self.every == 0 or step == self.total or steps == 0:
            eta = tqdm.format_interval((self.total - step) / rate) if rate else "?"
            print(f"step {step}/{self.total}  loss {loss:.4f}  {speed}  ETA {eta}", file=self.file, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
    if args.loss_vocab_block and not args.loss_chunk:
        raise UsageError("--loss-vocab-block splits the chunks of --loss-chunk; give --loss-chunk too")
    if args.fsdp and jax.device_count() % args.fsdp:
        raise UsageError(f"--fsdp {args.fsdp} must divide the {jax.device_count()} devices")
    from jlora.models import layers

    say(f"loading base {args.base} ...")
    base_model, params, tokenizer, config = common.load_base(args.base, args.dtype, args.quantize)
    base_params = params  # this host's whole copy, unstacked: the sample before training reads it
    model = base_model.clone(scan=args.scan, remat=args.remat, attention_block=args.attention_block,
                             mlp_block=args.mlp_block)
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
    config_train = training.TrainConfig(
        learning_rate=args.lr, warmup_steps=args.warmup, max_steps=args.max_steps, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_size=args.batch_size,
        accumulate=args.accumulate, dropout=args.dropout, lora_plus_ratio=args.lora_plus_ratio, seed=args.seed,
        loss_chunk=args.loss_chunk or 0, loss_vocab_block=args.loss_vocab_block or 0,
    )
    # The validation sample (`jlora eval`'s default for this run, from metadata["eval"]): --eval-batches
    # batches of the step's rows (of each task's), else --eval-tokens, spread over the held-out data.
    eval_rows = args.batch_size // max(len(names), 1)
    eval_tokens = args.eval_batches * eval_rows * args.seq_len if args.eval_batches else args.eval_tokens or training.EVAL_TOKENS
    splits = [(t, v if v is None else training.eval_sample(v, eval_tokens)) for t, v in splits]
    valid_set = valid_set if valid_set is None else training.eval_sample(valid_set, eval_tokens)
    metadata = {
        "base": common.base_identity(args.base, params, args.quantize),
        "train": dataclasses.asdict(config_train),
        "data": {"train": [str(p) for p in args.data or []] or "default corpus", "seq_len": args.seq_len},
        "model": {"scan": stacked},
        "eval": {"tokens": eval_tokens, "seq_len": args.seq_len},
    }
    if writer:  # every flag's final value: `jlora finetune --config OUT/config.yaml` runs this again
        (out / "config.yaml").write_text(cli_config.dump(args), encoding="utf-8")
    if names:
        metadata |= {"tasks": names, "data": {"train": dict(zip(names, (t.split("=", 1)[1] for t in args.task))),
                                              "seq_len": args.seq_len}}
    params = layers.stack_layers(params, stacked) if stacked else params
    mesh = training.mesh(fsdp=args.fsdp or 1)
    if args.resume:
        try:
            state, saved, damaged = ckpt.restore_intact(expect={"base": common.base_identity(args.base, params, args.quantize)}, base=params)
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
        params, adapters = combine(params, state.trainable)
        adapters = multi.take(adapters, 0) if names else adapters  # each task's adapter splits the base alike
        frozen, _ = split(params, adapters, metadata["adapter"].get("bias", "none"))
    else:
        method, bias = args.method or DEFAULT_METHOD, args.bias or "none"
        options = common.adapter_options(args)
        adapters = adapter.kind(method).create(base_params, **options)
        adapters = layers.stack_layers(adapters, stacked) if stacked else adapters
        metadata["adapter"] = {"method": method, "options": options, "bias": bias}
        frozen, trainable = split(params, adapters, bias)
        if names:  # one adapter per task, each initialized as a run on that task alone would be
            trainable = trainable._replace(adapters=stack([adapters] * len(names)))
        state = training.init_state(trainable, config_train)
    say(count_params(params, adapters, metadata["adapter"].get("bias", "none")))
    if names:
        say(f"{len(names)} tasks, one such adapter each: {', '.join(names)}")
    frozen = training.shard_fsdp(frozen, mesh) if args.fsdp is not None else training.replicate(frozen, mesh)
    state = training.shard_state(state, frozen, mesh)
    start = int(state.step)

    evaluate = training.make_eval(model.apply)
    report = {"base": args.base, "method": metadata["adapter"].get("method"), "devices": jax.device_count(),
              "processes": jax.process_count()}
    if args.sample_tokens and start == 0 and writer:
        report["sample_before"] = sample(base_model, dequantize(base_params), tokenizer, args)
        say(f"sample before: {args.prompt}{report['sample_before']}")

    progress = Progress(args.max_steps, args.batch_size * args.seq_len)

    def validation(state):
        if writer:
            progress.status(f"evaluating on {len(splits[0][1]) if names else len(valid_set)} sequences"
                            f"{' per task' if names else ''} ...")
        params, adapters = combine(frozen, state.trainable)
        if names:
            found = {name: training.perplexity(evaluate, params, multi.take(adapters, i), valid, eval_rows, mesh=mesh)
                     for i, (name, (_, valid)) in enumerate(zip(names, splits))}
        else:
            found = {"": training.perplexity(evaluate, params, adapters, valid_set, args.batch_size, mesh=mesh)}
        suffix = lambda name: f"/{name}" if name else ""
        return ({f"valid_perplexity{suffix(n)}": ppl for n, ppl in found.items()}
                | {f"valid_loss{suffix(n)}": math.log(ppl) for n, ppl in found.items()})

    board = None  # opened just before the loop, closed after it

    def log(entry):
        if board is not None:
            board(entry)
        if "loss" in entry:
            progress.update(entry["step"], entry["loss"])
        else:
            when = "before" if entry["step"] == 0 else "after" if entry["step"] == args.max_steps else f"at step {entry['step']}"
            for key, value in entry.items():
                if key.startswith("valid_perplexity"):
                    progress.status(f"validation perplexity{key[16:].replace('/', ' of ')} {when}: {value:.3f}")

    step_fn = (training.make_step(functools.partial(model.apply, hidden=True), config_train, head_fn=model.head,
                               vocab_size=config.vocab_size)
               if args.loss_chunk else training.make_step(model.apply, config_train, tasks=len(names)))
    rows = distributed.process_rows(args.batch_size, training.batch_sharding(mesh))  # this process's share

    def batch_at(k):
        if not names:
            return data.batch_at(train_set, args.batch_size, args.seed, k, rows=rows)
        per = args.batch_size // len(names)  # each task's rows, shuffled as a run on that task alone
        parts = [data.batch_at(t, per, args.seed, k) for t, _ in splits]
        whole = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return {key: v[rows] for key, v in (whole | {"adapter_ids": np.repeat(np.arange(len(names)), per)}).items()}

    compiled = []

    def step(state, batch):
        if not compiled and writer:  # the first call traces and compiles: the longest silence of a run
            progress.status("compiling the train step ...")
        compiled.append(True)
        return step_fn(state, frozen, batch)

    best = checkpoint.Checkpointer(out / "best", max_to_keep=1) if valid_set is not None else None
    if writer:
        try:
            board = metrics.TensorBoard(out / "tensorboard", start=start)
        except ImportError as error:
            say(f"note: no TensorBoard files: {error}")
    train_began = time.perf_counter()
    try:
        result = loop.fit(
            step, state, lambda k: training.shard_batch(batch_at(k), mesh),
            max_steps=args.max_steps, checkpointer=ckpt, metadata=metadata, save_every=args.save_every,
            evaluate=validation if valid_set is not None else None, eval_every=args.eval_every,
            history_path=out / "history.jsonl", log=log, tokens_per_step=args.batch_size * args.seq_len, best=best,
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
    finally:
        progress.close()
        if board is not None:
            board.close()
    train_seconds = time.perf_counter() - train_began

    # The frozen base did not change: this host's copy plus the trained arrays (gathered where they
    # are split across processes) is the whole model, and no shard of the base is fetched.
    params, adapters = combine(params, distributed.fetch(result.state.trainable))
    tasks = [multi.take(adapters, i) for i in range(len(names))] or [adapters]
    if stacked:
        params, tasks = layers.unstack_layers(params, stacked), [layers.unstack_layers(a, stacked) for a in tasks]
    if not writer:
        return 0
    evaluated = [h for h in result.history if any(k.startswith("valid_perplexity") for k in h)]
    for key in (k for k in evaluated[-1] if k.startswith("valid_perplexity")) if evaluated else ():
        report[f"{key}_before"] = evaluated[0][key] if evaluated[0]["step"] == 0 else None
        report[f"{key}_after"] = evaluated[-1][key]
    if result.best is not None:  # the checkpoint in OUT/best: `jlora generate --checkpoint OUT/best`
        report["best"] = {k: v for k, v in result.best.items() if k == "step" or k.startswith("valid_")}
    report["eval_sequences"] = sum(len(v) for _, v in splits) if names else len(valid_set) if valid_set is not None else 0
    report["eval_tokens"] = eval_tokens
    from jlora.cli import export

    report["command"] = "jlora " + shlex.join(map(str, getattr(args, "argv", [])))  # for cards and `jlora merge`
    for name, task_adapters in zip(names, tasks) if args.merged != "none" else ():
        # each task's own merged model, with tokenizer and model card
        export.save_merged(out / "tasks" / name / "merged", merge(params, task_adapters), task_adapters, config,
                           tokenizer, args.base, args.merged, export.card_facts(metadata | {"step": args.max_steps}, report, name))
        print(f"task {name}: merged export {out / 'tasks' / name / 'merged'}", file=sys.stderr)
    merged = merge(params, tasks[0])
    if args.sample_tokens:
        report["sample_after"] = sample(base_model, merged, tokenizer, args)
        print(f"sample after{f' (task {names[0]})' if names else ''}: {args.prompt}{report['sample_after']}", file=sys.stderr)
    try:
        loop.plot_history(result.history, out / "loss.png")
    except ImportError as error:
        print(f"note: no loss plot: {error}", file=sys.stderr)
    if not names and args.merged != "none":
        export.save_merged(out / "merged", merged, tasks[0], config, tokenizer, args.base, args.merged,
                           export.card_facts(metadata | {"step": args.max_steps}, report))
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
    merged_at = "none (--merged none)" if args.merged == "none" else out / "tasks/*/merged" if names else out / "merged"
    print(f"checkpoint: {ckpt.directory / str(ckpt.latest_step())} ({common.human_bytes(checkpoint_bytes)}; "
          f"base model {common.human_bytes(base_bytes)})\nmerged export: {merged_at}\nloss curve: {out / 'loss.png'}",
          file=sys.stderr)
    return 0


def saved_note(last_saved, ckpt) -> str:
    if last_saved is None:
        return f"no checkpoint was written yet in {ckpt.directory}"
    return f"the last checkpoint is step {last_saved} in {ckpt.directory}; continue with --resume"


def sample(model, params, tokenizer, args) -> str:
    from jlora.cli.generate import sampling
    from jlora.models import complete

    return complete(model, params, tokenizer, args.prompt, args.sample_tokens, seed=args.seed, **sampling(args))

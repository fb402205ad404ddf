"""``jlora finetune``: train adapters on a base, checkpointing as it goes, then sample and export."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shlex
import sys
import time

import jax
from jlora.core import adapter
from jlora import training
from jlora.training import checkpoint, data, distributed, loop, metrics, tasks
from jlora.training.runinfo import RunInfo
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


def check_task_flags(args) -> dict:
    """``--task NAME=PATH``'s tasks, name -> path, after checking the flags that --task changes."""
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
    return dict(zip(names, paths))


def check_flags(args):
    """The refusals that need no base: batch split, loss chunks, FSDP."""
    if args.batch_size % (args.accumulate * jax.device_count()):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of --accumulate ({args.accumulate}) "
                         f"times the {jax.device_count()} devices the batch is split over")
    if args.loss_vocab_block and not args.loss_chunk:
        raise UsageError("--loss-vocab-block splits the chunks of --loss-chunk; give --loss-chunk too")
    if args.fsdp and jax.device_count() % args.fsdp:
        raise UsageError(f"--fsdp {args.fsdp} must divide the {jax.device_count()} devices")


def open_out(args) -> tuple:
    """``(out, checkpointer)``: the run directory, refused when --resume finds nothing to continue or
    a fresh run would write over checkpoints."""
    out = checkpoint.writable_dir(args.out)
    ckpt = checkpoint.Checkpointer(out / "checkpoints", max_to_keep=args.keep)
    latest = ckpt.latest_step()
    if args.resume and latest is None:
        raise UsageError(f"--resume: no checkpoint in {ckpt.directory}")
    if not args.resume and latest is not None:
        raise UsageError(f"{ckpt.directory} already holds checkpoints up to step {latest}; "
                         "pass --resume to continue that run, or choose another --out")
    return out, ckpt


@dataclasses.dataclass
class Setup:
    """What training reads: the base (as loaded, and as trained: stacked along ``scan``), the tasks
    (one unnamed task for a run on one dataset), the settings and the metadata checkpoints carry."""

    base_model: object
    model: object
    base_params: dict
    params: dict
    tokenizer: object
    config: object
    tasks: list
    train: training.TrainConfig
    eval_rows: int
    eval_tokens: int
    info: RunInfo
    mesh: object

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks if t.name]


def load_tasks(args, tokenizer) -> list:
    """--task's datasets, else --data / --valid's (the default corpus without them), as tasks."""
    if not args.task:
        train_set, valid_set = data.load_splits(tokenizer, args.seq_len, args.data, args.valid, args.valid_fraction, args.seed)
        if len(train_set) < args.batch_size:
            raise UsageError(f"training data has {len(train_set)} sequences of {args.seq_len} tokens, "
                             f"fewer than one batch of {args.batch_size}")
        return [tasks.Task("", train_set, valid_set)]
    paths = check_task_flags(args)
    try:
        return tasks.load_tasks(tokenizer, args.seq_len, paths, args.valid_fraction, args.seed, args.batch_size)
    except ValueError as error:
        raise UsageError(str(error)) from None


def load(args, say) -> Setup:
    """The base, the data and the run's settings (phase 1 after the flags)."""
    from jlora.models import layers

    say(f"loading base {args.base} ...")
    base_model, base_params, tokenizer, config = common.load_base(args.base, args.dtype, args.quantize)
    model = base_model.clone(scan=args.scan, remat=args.remat, attention_block=args.attention_block,
                             mlp_block=args.mlp_block)
    # The scanned layers' name ("layers", "h"): params and adapters train stacked along it, and are
    # unstacked again for sampling, merging and export.
    scan = model.layer_name if args.scan else None
    if args.seq_len > model.max_length:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the base's context of {model.max_length} tokens")
    run_tasks = load_tasks(args, tokenizer)
    train = training.TrainConfig(
        learning_rate=args.lr, warmup_steps=args.warmup, max_steps=args.max_steps, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_size=args.batch_size,
        accumulate=args.accumulate, dropout=args.dropout, lora_plus_ratio=args.lora_plus_ratio, seed=args.seed,
        loss_chunk=args.loss_chunk or 0, loss_vocab_block=args.loss_vocab_block or 0,
    )
    # The validation sample (`jlora eval`'s default for this run, from RunInfo.eval): --eval-batches
    # batches of the step's rows (of each task's), else --eval-tokens, spread over the held-out data.
    eval_rows = args.batch_size // len(run_tasks)
    eval_tokens = args.eval_batches * eval_rows * args.seq_len if args.eval_batches else args.eval_tokens or training.EVAL_TOKENS
    run_tasks = [dataclasses.replace(t, valid=t.valid if t.valid is None else training.eval_sample(t.valid, eval_tokens))
                 for t in run_tasks]
    named = tasks.stacked(run_tasks)
    info = RunInfo(base=common.base_identity(args.base, base_params, args.quantize), train=dataclasses.asdict(train),
                   data={"train": dict(zip((t.name for t in run_tasks), (t.split("=", 1)[1] for t in args.task)))
                         if named else [str(p) for p in args.data or []] or "default corpus", "seq_len": args.seq_len},
                   scan=scan, eval={"tokens": eval_tokens, "seq_len": args.seq_len},
                   tasks=[t.name for t in run_tasks] if named else None)
    params = layers.stack_layers(base_params, scan) if scan else base_params
    return Setup(base_model, model, base_params, params, tokenizer, config, run_tasks, train, eval_rows, eval_tokens,
                 info, training.mesh(fsdp=args.fsdp or 1))


def resume(args, run: Setup, ckpt, say):
    """``(state, adapters)`` of the run's checkpoint, refused where the flags would change what it trains."""
    try:
        state, saved, damaged = ckpt.newest_intact(expect={"base": run.info.base}, base=run.params)
    except checkpoint.CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    saved = RunInfo.from_json(saved)
    conflicts = resume_conflicts(args, saved.adapter or {})
    if conflicts:
        raise UsageError(f"--resume continues the adapters in {ckpt.directory}, made with "
                         f"{saved.adapter}; drop {', '.join(conflicts)}")
    run.info.adapter = saved.adapter
    differences = run.info.resume_differences(saved)
    if "tasks" in differences:
        raise UsageError(f"--resume: the checkpoint trained "
                         f"{'tasks ' + ', '.join(saved.tasks) if saved.tasks else 'one dataset'}; "
                         "give the same --task flags (or none) to continue it")
    if "scan" in differences:
        stacked = run.info.scan
        raise UsageError(f"--resume: the checkpoint was trained {'with' if not stacked else 'without'} --scan; "
                         f"{'pass' if not stacked else 'drop'} --scan to continue it")
    for step, report in damaged.items():  # moved aside only now that nothing refuses the resume
        say(f"warning: skipped a damaged checkpoint: {report} (moved to {ckpt.set_aside(step)})")
    say(f"resuming from step {int(state.step)} in {ckpt.directory}")
    if "train" in differences:
        say(f"note: training settings differ from the checkpoint's {saved.train}; "
            "the resumed run will not equal an uninterrupted one")
    _, adapters = combine(run.params, state.trainable)
    adapters = multi.take(adapters, 0) if run.names else adapters  # each task's adapter splits the base alike
    return state, adapters


def initialize(args, run: Setup):
    """``(state, adapters)`` of a fresh run: --method's adapters, one per task (each as a run on that task alone would be)."""
    from jlora.models import layers

    method, bias = args.method or DEFAULT_METHOD, args.bias or "none"
    options = common.adapter_options(args)
    adapters = adapter.kind(method).create(run.base_params, **options)
    adapters = layers.stack_layers(adapters, run.info.scan) if run.info.scan else adapters
    run.info.adapter = {"method": method, "options": options, "bias": bias}
    _, trainable = split(run.params, adapters, bias)
    if run.names:
        trainable = trainable._replace(adapters=stack([adapters] * len(run.names)))
    return training.init_state(trainable, run.train), adapters


def place(args, run: Setup, state, adapters, say):
    """``(frozen, state)`` on the mesh: the base replicated (or FSDP-split), the trainable arrays beside it."""
    say(count_params(run.params, adapters, run.info.bias))
    if run.names:
        say(f"{len(run.names)} tasks, one such adapter each: {', '.join(run.names)}")
    frozen, _ = split(run.params, adapters, run.info.bias)
    frozen = training.shard_fsdp(frozen, run.mesh) if args.fsdp is not None else training.replicate(frozen, run.mesh)
    return frozen, training.shard_state(state, frozen, run.mesh)


def finetune(args) -> int:
    start_time = time.perf_counter()
    join_job(args)
    writer = distributed.is_writer()  # one process prints and writes what the job has one of
    say = (lambda text: print(text, file=sys.stderr)) if writer else (lambda text: None)
    out, ckpt = open_out(args)
    check_flags(args)
    run = load(args, say)
    state, adapters = resume(args, run, ckpt, say) if args.resume else initialize(args, run)
    try:
        return run_and_finish(args, run, state, adapters, out, ckpt, writer, say, start_time)
    except OSError as error:  # a full disk, a read-only or removed folder: the checkpoints written are whole
        print(f"\n{write_fault(error)}; {saved_note(ckpt.latest_step(), ckpt)}", file=sys.stderr)
        return 1


def write_fault(error: OSError) -> str:
    """``writing FILE failed: reason`` of an OSError met while writing a run's files."""
    where = f" {error.filename}" if error.filename else ""
    return f"writing{where} failed: {loop.reason(error)}"


def run_and_finish(args, run: Setup, state, adapters, out, ckpt, writer, say, start_time) -> int:
    """The run's writing part: config.yaml, training, then what :func:`finish` writes."""
    if writer:  # every flag's final value, written once nothing refuses the run: `jlora finetune --config OUT/config.yaml` runs it again
        (out / "config.yaml").write_text(cli_config.dump(args), encoding="utf-8")
    frozen, state = place(args, run, state, adapters, say)
    report = {"base": args.base, "method": run.info.method, "devices": jax.device_count(),
              "processes": jax.process_count()}
    if args.sample_tokens and int(state.step) == 0 and writer:
        report["sample_before"] = sample(run.base_model, dequantize(run.base_params), run.tokenizer, args)
        say(f"sample before: {args.prompt}{report['sample_before']}")
    trained = train(args, run, frozen, state, ckpt, out, writer)
    if isinstance(trained, int):
        return trained
    result, train_seconds, start = trained
    return finish(args, run, result, report, out, ckpt, writer, steps_run=args.max_steps - start,
                  train_seconds=train_seconds, start_time=start_time)


def train(args, run: Setup, frozen, state, ckpt, out, writer):
    """``loop.fit`` with progress, validation, TensorBoard and checkpoints: ``(result, seconds, first
    step)``, or the exit status of a run that stopped (non-finite loss, failed save, Ctrl-C)."""
    start, progress = int(state.step), Progress(args.max_steps, args.batch_size * args.seq_len)
    validation = make_validation(run, frozen, progress, writer)
    step_fn = (training.make_step(functools.partial(run.model.apply, hidden=True), run.train, head_fn=run.model.head,
                                  vocab_size=run.config.vocab_size)
               if args.loss_chunk else training.make_step(run.model.apply, run.train, tasks=len(run.names)))
    rows = distributed.process_rows(args.batch_size, training.batch_sharding(run.mesh))  # this process's share
    compiled = []

    def step(state, batch):
        if not compiled and writer:  # the first call traces and compiles: the longest silence of a run
            progress.status("compiling the train step ...")
        compiled.append(True)
        return step_fn(state, frozen, batch)

    has_valid = run.tasks[0].valid is not None
    best = checkpoint.Checkpointer(out / "best", max_to_keep=1) if has_valid else None
    board = open_board(out, start) if writer else None
    began = time.perf_counter()
    try:
        result = loop.fit(
            step, state, lambda k: training.shard_batch(tasks.batch_at(run.tasks, args.batch_size, args.seed, k, rows), run.mesh),
            max_steps=args.max_steps, checkpointer=ckpt, metadata=run.info.to_json(), save_every=args.save_every,
            evaluate=validation if has_valid else None, eval_every=args.eval_every, history_path=out / "history.jsonl",
            log=make_log(args, progress, board), tokens_per_step=args.batch_size * args.seq_len, best=best,
        )
        if board is not None:
            board.close()  # its last events: a full disk here is a failed write like the others
    except (loop.LossNotFinite, loop.WriteFailed) as error:
        print(f"\n{error}; {saved_note(error.last_saved, ckpt)}", file=sys.stderr)
        return 1
    except loop.Interrupted as interrupt:
        print(f"\ninterrupted after step {interrupt.step}; {saved_note(interrupt.last_saved, ckpt)}", file=sys.stderr)
        return 130
    finally:
        progress.close()
        if board is not None:
            with contextlib.suppress(OSError):  # closed above, or the run stopped on an error already reported
                board.close()
    return result, time.perf_counter() - began, start


def open_board(out, start):
    """The run's TensorBoard writer, or None (with a note) where TensorBoard is not installed."""
    try:
        return metrics.TensorBoard(out / "tensorboard", start=start)
    except ImportError as error:
        print(f"note: no TensorBoard files: {error}", file=sys.stderr)
        return None


def make_validation(run: Setup, frozen, progress, writer):
    """The loop's ``evaluate``: each task's validation perplexity and loss of a state."""
    evaluate = training.make_eval(run.model.apply)

    def validation(state):
        if writer:
            progress.status(f"evaluating on {len(run.tasks[0].valid)} sequences"
                            f"{' per task' if run.names else ''} ...")
        params, adapters = combine(frozen, state.trainable)
        return tasks.validation_metrics(tasks.perplexities(evaluate, params, adapters, run.tasks, run.eval_rows, run.mesh))

    return validation


def make_log(args, progress, board):
    """The loop's ``log``: each entry to TensorBoard, a step's loss to the progress bar, a validation as a line."""
    def log(entry):
        if board is not None:
            board(entry)
        if "loss" in entry:
            progress.update(entry["step"], entry["loss"])
            return
        when = "before" if entry["step"] == 0 else "after" if entry["step"] == args.max_steps else f"at step {entry['step']}"
        for key, value in entry.items():
            if key.startswith("valid_perplexity"):
                progress.status(f"validation perplexity{key[16:].replace('/', ' of ')} {when}: {value:.3f}")

    return log


def finish(args, run: Setup, result, report, out, ckpt, writer, *, steps_run, train_seconds, start_time) -> int:
    """After training: the merged exports, the sample after, the loss plot, run.json and the summary."""
    from jlora.models import layers

    # The frozen base did not change: this host's copy plus the trained arrays (gathered where they
    # are split across processes) is the whole model, and no shard of the base is fetched.
    params, adapters = combine(run.params, distributed.fetch(result.state.trainable))
    per_task = [multi.take(adapters, i) for i in range(len(run.names))] or [adapters]
    if run.info.scan:
        params, per_task = layers.unstack_layers(params, run.info.scan), [layers.unstack_layers(a, run.info.scan) for a in per_task]
    if not writer:
        return 0
    report |= validation_report(result, run)
    report["command"] = "jlora " + shlex.join(map(str, getattr(args, "argv", [])))  # for cards and `jlora merge`
    export_merged(args, run, params, per_task, report, out)
    try:
        loop.plot_history(result.history, out / "loss.png")
    except ImportError as error:
        print(f"note: no loss plot: {error}", file=sys.stderr)
    checkpoint_bytes = checkpoint.dir_bytes(ckpt.directory / str(ckpt.latest_step()))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # a quantised base: its codes and scales
    report |= {
        "steps": args.max_steps, "steps_this_run": steps_run, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(steps_run * args.batch_size * args.seq_len / max(train_seconds, 1e-9), 1),
        "checkpoint_bytes": checkpoint_bytes, "base_bytes": base_bytes,
        "total_seconds": round(time.perf_counter() - start_time, 1),
    }
    (out / "run.json").write_text(json.dumps(report, indent=2))
    merged_at = "none (--merged none)" if args.merged == "none" else out / "tasks/*/merged" if run.names else out / "merged"
    print(f"checkpoint: {ckpt.directory / str(ckpt.latest_step())} ({common.human_bytes(checkpoint_bytes)}; "
          f"base model {common.human_bytes(base_bytes)})\nmerged export: {merged_at}\nloss curve: {out / 'loss.png'}",
          file=sys.stderr)
    return 0


def validation_report(result, run: Setup) -> dict:
    """run.json's perplexities before and after (per task), the best checkpoint's, and the sample's size."""
    report = {}
    evaluated = [h for h in result.history if any(k.startswith("valid_perplexity") for k in h)]
    for key in (k for k in evaluated[-1] if k.startswith("valid_perplexity")) if evaluated else ():
        report[f"{key}_before"] = evaluated[0][key] if evaluated[0]["step"] == 0 else None
        report[f"{key}_after"] = evaluated[-1][key]
    if result.best is not None:  # the checkpoint in OUT/best: `jlora generate --checkpoint OUT/best`
        report["best"] = {k: v for k, v in result.best.items() if k == "step" or k.startswith("valid_")}
    report["eval_sequences"] = sum(len(t.valid) for t in run.tasks if t.valid is not None)
    report["eval_tokens"] = run.eval_tokens
    return report


def export_merged(args, run: Setup, params, per_task, report, out):
    """Each task's merged model (or the run's) with tokenizer and card, and the sample after training."""
    from jlora.cli import export

    facts = lambda name=None: export.card_facts(dataclasses.replace(run.info, step=args.max_steps), report, name)
    for name, task_adapters in zip(run.names, per_task) if args.merged != "none" else ():
        export.save_merged(out / "tasks" / name / "merged", merge(params, task_adapters), task_adapters, run.config,
                           run.tokenizer, args.base, args.merged, facts(name))
        print(f"task {name}: merged export {out / 'tasks' / name / 'merged'}", file=sys.stderr)
    merged = merge(params, per_task[0])
    if args.sample_tokens:
        report["sample_after"] = sample(run.base_model, merged, run.tokenizer, args)
        print(f"sample after{f' (task {run.names[0]})' if run.names else ''}: {args.prompt}{report['sample_after']}",
              file=sys.stderr)
    if not run.names and args.merged != "none":
        export.save_merged(out / "merged", merged, per_task[0], run.config, run.tokenizer, args.base, args.merged,
                           facts())


def saved_note(last_saved, ckpt) -> str:
    if last_saved is None:
        return f"no checkpoint was written yet in {ckpt.directory}"
    return f"the last checkpoint is step {last_saved} in {ckpt.directory}; continue with --resume"


def sample(model, params, tokenizer, args) -> str:
    from jlora.cli.generate import sampling
    from jlora.models import complete

    return complete(model, params, tokenizer, args.prompt, args.sample_tokens, seed=args.seed, **sampling(args))

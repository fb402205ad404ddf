"""The training loop: steps, a metrics history, periodic evaluation, checkpoints, and stopping cleanly.

``fit`` drives any step function ``step(state, batch) -> (state, metrics)`` (``jlora.train.make_step``
closed over the frozen base, or a full fine-tuning step) from the state's step to ``max_steps``:

    result = jlora.fit(lambda s, b: step(s, frozen, b), state, batch_at, max_steps=100,
                       checkpointer=ckpt, save_every=50, evaluate=validation, eval_every=25)

Every step and every evaluation becomes one history entry (a dict with ``step``), appended to
``history_path`` as a JSON line as soon as it exists: a step's ``loss``, ``grad_norm`` and
``learning_rate`` (what the step function returns), ``seconds`` and ``tokens_per_second``; an
evaluation's values (``valid_perplexity``...). With ``best``, the state of the lowest validation
loss is kept in a second checkpointer. A NaN loss or Ctrl-C stops the loop with an exception that
names the last checkpoint, which is left intact for ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from jlora.core import files, interrupts
from jlora.core.files import reason


class LossNotFinite(RuntimeError):
    """The loss became NaN or infinite at ``step``; ``last_saved`` is the last checkpoint's step (or None)."""

    def __init__(self, step: int, loss: float, last_saved: int | None = None):
        super().__init__(f"loss is {loss} at step {step}; stopping (the last checkpoint is kept)")
        self.step, self.loss, self.last_saved = step, loss, last_saved


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`; ``last_saved`` is the last checkpoint's step (or None), ``step`` the
    steps completed."""

    def __init__(self, step: int, last_saved: int | None):
        super().__init__(step, last_saved)
        self.step, self.last_saved = step, last_saved


class WriteFailed(RuntimeError):
    """Writing ``path`` failed (a full disk, a read-only or removed folder) after ``step`` steps;
    ``last_saved`` is the last complete checkpoint's step (or None), ``error`` the cause."""

    def __init__(self, path, step: int, last_saved: int | None, error: Exception, text: str | None = None):
        super().__init__(text or f"writing {path} failed after step {step}: {reason(error)}")
        self.path, self.step, self.last_saved, self.error = path, step, last_saved, error


class SaveFailed(WriteFailed):
    """Writing the checkpoint of ``step`` failed; ``last_saved`` is the last good one."""

    def __init__(self, step: int, last_saved: int | None, error: Exception, path=None):
        super().__init__(path, step, last_saved, error, f"saving the checkpoint of step {step} failed: {reason(error)}")


class FitResult(NamedTuple):
    state: Any
    history: list[dict]
    last_saved: int | None
    best: dict | None = None  # the evaluation entry of the state kept in ``best``


def validation_loss(entry: dict) -> float | None:
    """The mean validation loss (nats per token) of an evaluation entry: the mean log of its
    ``valid_perplexity*`` values (one per task); None for an entry without any.

    Example:
      >>> round(validation_loss({"step": 4, "valid_perplexity/a": 2.0, "valid_perplexity/b": 8.0}), 4)
      1.3863
    """
    values = [math.log(v) for k, v in entry.items() if k.startswith("valid_perplexity")]
    return sum(values) / len(values) if values else None


def check_finite(step: int, metrics: dict) -> float:
    """The loss of ``metrics`` as a float; :class:`LossNotFinite` when it is NaN or infinite."""
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise LossNotFinite(step, loss)
    return loss


def read_history(path, until: int | None = None) -> list[dict]:
    """The entries of a history.jsonl (those with ``step <= until``, when given); [] if it does not exist.
    A last line cut short (a crash while it was written) is dropped.

    Raises:
      ValueError: naming the file and line, for one that is not an entry (a JSON object with an integer ``step``).
    """
    path = Path(path)
    if not path.exists():
        return []
    text = files.read_text(path, ValueError)
    lines = text.splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            entry = ...
        if entry is None:
            continue
        if not isinstance(entry, dict) or not files.fits(entry.get("step"), int):
            if number == len(lines) and not text.endswith("\n"):
                break  # the write of this line was cut off
            raise ValueError(f"{path}:{number}: not a history entry (a JSON object with an integer 'step'): {line[:60]!r}")
        entries.append(entry)
    return [e for e in entries if until is None or e["step"] <= until]


def fit(
    step: Callable,
    state,
    batches: Callable[[int], Any],
    *,
    max_steps: int,
    start: int | None = None,
    checkpointer=None,
    metadata: dict | None = None,
    save_every: int | None = None,
    evaluate: Callable[[Any], dict] | None = None,
    eval_every: int | None = None,
    history_path=None,
    log: Callable[[dict], None] | None = None,
    writer: bool | None = None,
    tokens_per_step: int | None = None,
    best=None,
    best_of: Callable[[dict], float | None] = validation_loss,
) -> FitResult:
    """Runs ``step`` from ``start`` to ``max_steps``, checkpointing, evaluating and logging.

    Args:
      step: ``step(state, batch) -> (state, metrics)``; ``metrics`` holds at least ``loss``.
      state: the state to start from; a fresh one, or one restored for a resume.
      batches: ``batches(k)`` is the batch of step ``k`` (0-based), so a resumed run sees the same
        batches as an uninterrupted one (``jlora.data.batch_at``).
      max_steps: the step to stop at.
      start: the step ``state`` is at; default ``int(state.step)``.
      checkpointer: a ``jlora.checkpoint.Checkpointer``; saves every ``save_every`` steps (if given)
        and after the last step, with ``metadata``.
      evaluate: ``evaluate(state) -> {name: value}``, run before the first step of a fresh run,
        every ``eval_every`` steps (if given) and after the last step.
      history_path: a JSON-lines file: entries after ``start`` (from an interrupted run) are dropped,
        then every new entry is appended and flushed.
      log: called with each new history entry (progress display).
      writer: whether this process writes ``history_path`` and calls ``log``; default: it is
        process 0 of its job (``jax.process_index() == 0``). Every process steps, evaluates and
        saves: those are collective.
      tokens_per_step: token positions in one step's batch; each step's entry then holds
        ``tokens_per_second`` (the first step's includes its compilation).
      best: a second checkpointer (``max_to_keep=1``) that keeps the state whose evaluation has
        the lowest ``best_of`` (the validation loss), with that entry as ``metadata["evaluation"]``.
        Its steps after ``start`` (all of them on a fresh run) are dropped first, like the history's;
        ``checkpointer`` then also saves at every evaluation, so a resume never starts before the
        kept best and the best so far is the one ``best`` holds.
      best_of: ``best_of(entry) -> float`` (lower is better) of an evaluation entry.

    Returns:
      :class:`FitResult`: the final state, the whole history (earlier entries of a resumed run
      included), the step of the last checkpoint, and the evaluation entry of the kept best.

    Raises:
      LossNotFinite: a step's loss is NaN or infinite (no checkpoint of that step is written).
      SaveFailed: a checkpoint could not be written; the earlier ones are intact.
      WriteFailed: ``history_path`` or ``log`` met an OSError (a full disk, say); the checkpoints are intact.
      Interrupted: Ctrl-C; a save in progress is finished first (Ctrl-C is held until it ends).

    Example:
      >>> step = lambda n, batch: (n + 1, {"loss": 1.0 / (n + 1)})
      >>> result = fit(step, 0, lambda k: None, max_steps=3, start=0)
      >>> result.state, [entry["loss"] for entry in result.history]
      (3, [1.0, 0.5, 0.3333333333333333])
    """
    start = int(state.step) if start is None else start
    last_saved = checkpointer.latest_step() if checkpointer is not None else None
    writer = jax.process_index() == 0 if writer is None else writer
    # Only the writer reads it too: another process could catch it half rewritten.
    history = read_history(history_path, until=start) if history_path is not None and writer else []
    log_file = None
    if history_path is not None and writer:
        log_file = _reopen_history(Path(history_path), history, start, last_saved)
    best_entry = _best_so_far(best, start) if best is not None else None

    def record(entry: dict):
        history.append(entry)
        try:
            if log_file is not None:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
            if log is not None and writer:
                log(entry)  # TensorBoard, say
        except OSError as error:
            raise WriteFailed(error.filename or history_path, done, last_saved, error) from error

    def save(at: int):
        nonlocal last_saved
        with interrupts.held():  # Ctrl-C waits for the checkpoint to be whole
            try:
                checkpointer.save(state, metadata)
            except Exception as error:  # orbax wraps OSError (ENOSPC, EACCES) in its own types
                raise SaveFailed(at, last_saved, error, checkpointer.directory) from error
            last_saved = at

    def run_eval(at: int):
        nonlocal best_entry
        entry = {"step": at, **{k: float(v) for k, v in evaluate(state).items()}}
        record(entry)
        score = best_of(entry) if best is not None else None
        if score is not None and (best_entry is None or score < best_of(best_entry)):
            if at in best.all_steps():  # an earlier run's, of other settings
                best.delete(at)
            with interrupts.held():  # Ctrl-C waits for the checkpoint to be whole
                try:
                    best.save(state, {**(metadata or {}), "evaluation": entry})
                except Exception as error:
                    raise SaveFailed(at, last_saved, error, best.directory) from error
                best_entry = entry

    done = start
    with interrupts.watch():  # Ctrl-C is never lost, and waits for a checkpoint being written
        try:
            if evaluate is not None and start == 0:
                run_eval(0)
            began = time.perf_counter()
            for k in range(start, max_steps):
                interrupts.check()  # a Ctrl-C that a callback (JAX's garbage collection hook, say) swallowed
                state, metrics = step(state, batches(k))
                loss = check_finite(k + 1, metrics)
                now, done = time.perf_counter(), k + 1
                entry = {"step": done, **{name: float(v) for name, v in metrics.items()}, "loss": loss,
                         "seconds": now - began}
                if tokens_per_step:
                    entry["tokens_per_second"] = tokens_per_step / max(now - began, 1e-9)
                record(entry)
                evaluating = evaluate is not None and (done == max_steps or bool(eval_every and done % eval_every == 0))
                if checkpointer is not None and (done == max_steps or (save_every and done % save_every == 0)
                                                 or (evaluating and best is not None)):
                    save(done)
                if evaluating:
                    run_eval(done)
                began = time.perf_counter()  # a step's seconds leave out the saves and evaluations before it
            interrupts.check()
        except LossNotFinite as error:
            error.last_saved = last_saved
            raise
        except KeyboardInterrupt:
            interrupts.clear()
            raise Interrupted(done, last_saved) from None
        finally:
            if log_file is not None:
                log_file.close()
    return FitResult(state, history, last_saved, best_entry)


def _reopen_history(path: Path, history: list[dict], start: int, last_saved):
    """``path`` holding exactly ``history`` (rewritten beside it, then moved over it: a full disk leaves
    the old file whole), open for appending."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w") as file:
            file.writelines(json.dumps(entry) + "\n" for entry in history)
        os.replace(partial, path)
        return path.open("a")
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise WriteFailed(error.filename or path, start, last_saved, error) from error


def _best_so_far(best, start: int) -> dict | None:
    """The evaluation entry ``best`` holds at or before ``start``, after dropping its later steps
    (a fresh run, ``start`` 0, drops them all): they were measured on a path this run does not take."""
    for kept in best.all_steps():
        if kept > start or start == 0:
            best.delete(kept)
    latest = best.latest_step()
    return None if latest is None else best.metadata(latest).get("evaluation")


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average of ``values``, bias-corrected so it starts at the first value
    (TensorBoard's smoothing).

    Example:
      >>> [round(v, 3) for v in smooth([1.0, 0.0, 0.0], weight=0.5)]
      [1.0, 0.333, 0.143]
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be in [0, 1), got {weight!r}")
    out, average = [], 0.0
    for k, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**k))
    return out


def plot_history(history: list[dict], path=None, smoothing: float = 0.9):
    """Draws the training loss, raw (thin) and smoothed (:func:`smooth`), and the validation loss
    (log perplexity) at the steps it was measured (markers only: nothing is drawn between them).

    Args:
      history: entries as :func:`fit` records them.
      path: the image to write; None returns the open matplotlib figure instead (for a caller to
        add to or inspect).
      smoothing: the weight of the moving average of the training loss.

    Raises:
      ImportError: matplotlib is not installed (``pip install 'jlora[plot]'``).
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'jlora[plot]'") from None
    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train_points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if train_points:
        steps, losses = zip(*train_points)
        raw = ax.plot(steps, losses, lw=0.6, alpha=0.4, label="train loss")[0]
        ax.plot(steps, smooth(list(losses), smoothing), lw=1.6, color=raw.get_color(),
                label=f"train loss (EMA {smoothing:g})")
    keys = sorted({k for h in history for k in h if k.startswith("valid_perplexity")})
    for key in keys:
        points = [(h["step"], math.log(h[key])) for h in history if key in h]
        label = "validation loss" + key[len("valid_perplexity"):].replace("/", " of ")
        ax.plot(*zip(*points), linestyle="none", marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None

"""Several datasets trained in one run, one adapter each: their data, batches and validation.

A run on one dataset is the same thing with one unnamed task (``Task("", train, valid)``) and one
adapter tree rather than a stack of them, so the loop, its batches and its validation never branch
on how many datasets there are.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jlora.core import multi
from jlora.training import data
from jlora.training.evaluate import perplexity


@dataclasses.dataclass(frozen=True)
class Task:
    """One dataset of a run: ``name`` ("" for a run on one dataset), its training and held-out rows."""

    name: str
    train: data.Dataset
    valid: data.Dataset | None = None


def stacked(tasks) -> bool:
    """Whether ``tasks`` train a stack of adapters, one per task (named tasks), or one adapter tree."""
    return any(task.name for task in tasks)


def load_tasks(tokenizer, seq_len: int, paths: dict, valid_fraction: float | None = None, seed: int = 0,
               batch_size: int | None = None) -> list[Task]:
    """Each task's rows from its file, ``valid_fraction`` of them held out.

    Args:
      tokenizer, seq_len, valid_fraction, seed: as for :func:`jlora.training.data.load_splits`.
      paths: task name -> its data file.
      batch_size: the rows of each step, all tasks together: a task with fewer training rows than its
        ``batch_size // len(paths)`` is refused by name.

    Returns:
      One :class:`Task` per entry of ``paths``, in order.
    """
    found = []
    for name, path in paths.items():
        train, valid = data.load_splits(tokenizer, seq_len, [path], None, valid_fraction, seed)
        per = batch_size // len(paths) if batch_size else 0
        if len(train) < per:
            raise ValueError(f"task {name} has {len(train)} training sequences of {seq_len} tokens, "
                             f"fewer than its {per} rows of each batch")
        found.append(Task(name, train, valid))
    return found


def batch_at(tasks, batch_size: int, seed: int, step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """The training batch at ``step`` (:func:`jlora.training.data.batch_at`): named tasks give
    ``batch_size // len(tasks)`` rows each, in task order, each task's shuffled as a run on it alone
    would be, with ``adapter_ids`` naming each row's task; ``rows`` picks this process's share."""
    if not stacked(tasks):
        return data.batch_at(tasks[0].train, batch_size, seed, step, rows=rows)
    per = batch_size // len(tasks)
    parts = [data.batch_at(task.train, per, seed, step) for task in tasks]
    whole = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    whole["adapter_ids"] = np.repeat(np.arange(len(tasks)), per)
    return {key: value[rows] for key, value in whole.items()}


def perplexities(evaluate, params, adapters, tasks, batch_size: int, mesh=None) -> dict[str, float]:
    """Each task's validation perplexity (:func:`jlora.training.perplexity`) with its own adapter:
    ``multi.take(adapters, i)`` of the stack for named tasks, ``adapters`` itself for one unnamed task.
    ``batch_size`` is the rows of each evaluation batch, per task."""
    if not stacked(tasks):
        return {"": perplexity(evaluate, params, adapters, tasks[0].valid, batch_size, mesh=mesh)}
    return {task.name: perplexity(evaluate, params, multi.take(adapters, i), task.valid, batch_size, mesh=mesh)
            for i, task in enumerate(tasks)}


def validation_metrics(found: dict[str, float]) -> dict[str, float]:
    """:func:`perplexities` as history entries: ``valid_perplexity/NAME`` and ``valid_loss/NAME``
    (without ``/NAME`` for an unnamed task)."""
    suffix = lambda name: f"/{name}" if name else ""
    return ({f"valid_perplexity{suffix(n)}": ppl for n, ppl in found.items()}
            | {f"valid_loss{suffix(n)}": math.log(ppl) for n, ppl in found.items()})

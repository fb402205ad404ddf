"""Held-out evaluation: a jitted loss sum of a batch, the validation sample ``jlora finetune`` and
``jlora eval`` share, and perplexity over a dataset on one or many processes."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jlora.core import paths
from jlora.core.transform import adapt
from jlora.training import data, distributed
from jlora.training.losses import lm_loss
from jlora.training.sharding import batch_sharding, shard_batch

def make_eval(apply_fn: Callable):
    """A jitted ``eval(params, adapters, batch) -> (loss sum, token count)``; adapters may be None."""
    adapted = adapt(apply_fn)

    def evaluate(params, adapters, batch):
        if adapters is None and not any(map(paths.is_packed, jax.tree.leaves(params, is_leaf=paths.is_packed))):
            logits = apply_fn(params, batch["tokens"])
        else:  # adapters, or a quantised base (dequantised per use)
            logits = adapted(params, {} if adapters is None else adapters, batch["tokens"])
        loss, count = lm_loss(logits, batch["targets"], batch["loss_mask"])
        return loss * count, count

    return jax.jit(evaluate)


EVAL_TOKENS = 8192  # the default validation sample of `jlora finetune` and `jlora eval`: 64 sequences of 128


def eval_sample(dataset: data.Dataset, tokens: int = EVAL_TOKENS) -> data.Dataset:
    """The validation sample both ``jlora finetune`` and ``jlora eval`` score by default:
    ``tokens // seq_len`` sequences (all of them if fewer) spread evenly over ``dataset``, in order,
    so a corpus of several documents is sampled across all of them, not only from the first.

    Args:
      dataset: the held-out rows (``jlora.data.load_splits``'s ``valid``).
      tokens: how many token positions to score; at least one sequence is taken.

    Returns:
      A :class:`jlora.data.Dataset` of the chosen rows.

    Example:
      >>> rows = np.arange(10, dtype=np.int32)[:, None].repeat(4, 1)  # 10 rows of 4 tokens
      >>> sample = eval_sample(data.Dataset(rows, rows, np.ones(rows.shape, np.float32)), tokens=12)
      >>> sample.tokens[:, 0].tolist()
      [0, 3, 6]
    """
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ValueError(f"tokens must be a positive number of token positions, got {tokens!r}")
    count = min(len(dataset), max(1, tokens // dataset.seq_len))
    return data.Dataset(**dataset.rows(np.arange(count) * len(dataset) // count))


def perplexity(evaluate, params, adapters, dataset, batch_size: int, max_batches: int | None = None,
               mesh: Mesh | None = None) -> float:
    """exp(mean loss) over every masked token of ``dataset`` (of its first ``max_batches`` batches),
    in order, with ``evaluate`` from :func:`make_eval`; ``adapters`` may be None (the base alone).
    With ``mesh``, each process feeds only its rows of each batch (:func:`shard_batch`) and the
    sums come back reduced over all of them."""
    total, count = 0.0, 0.0
    rows = distributed.process_rows(batch_size, batch_sharding(mesh)) if mesh is not None else slice(None)
    for index, batch in enumerate(data.eval_batches(dataset, batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        if mesh is not None:
            batch = shard_batch({k: v[rows] for k, v in batch.items()}, mesh)
        loss_sum, n = evaluate(params, adapters, batch)
        total, count = total + float(loss_sum), count + float(n)
    return math.exp(total / max(count, 1.0))

"""Causal-LM fine-tuning of adapters: the loss, the optimizer schedule and one jitted train step,
data-parallel over every local device through ``jax.sharding``.

One code path serves 1 and N devices: the batch is sharded along a ``data`` mesh axis, the frozen
base is replicated (or, with ``fsdp=True``, split along the same axis), and XLA inserts the gradient
all-reduce. On several hosts call ``jax.distributed.initialize()`` first; the mesh then spans
``jax.devices()`` of all of them and each host feeds its own slice of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import data

DATA = "data"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; PEFT and the paper's GPT-2 runs use AdamW, warmup and decay."""

    learning_rate: float = 2e-4
    warmup_steps: int = 10
    max_steps: int = 100
    schedule: str = "cosine"  # or "linear"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 8
    accumulate: int = 1  # micro-batches per step (gradient accumulation)
    dropout: float = 0.0  # LoRA dropout on the adapter path's input
    lora_plus_ratio: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        for name, low in (("max_steps", 1), ("batch_size", 1), ("accumulate", 1), ("warmup_steps", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, low, high in (("learning_rate", 0.0, math.inf), ("weight_decay", 0.0, math.inf),
                                ("grad_clip", 0.0, math.inf), ("dropout", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low <= value < high or (name == "learning_rate" and value == 0):
                shown = "> 0" if name == "learning_rate" else f"in [{low}, {high})"
                raise ValueError(f"{name} must be a finite number {shown}, got {value!r}")
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accumulate {self.accumulate}")


class TrainState(NamedTuple):
    step: jax.Array
    trainable: jlora.Trainable
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so checkpoints store a plain array


def schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine or linear decay to zero at ``max_steps``."""
    warmup = min(config.warmup_steps, config.max_steps - 1)
    decay_steps = max(config.max_steps - warmup, 1)
    decay = (
        optax.cosine_decay_schedule(config.learning_rate, decay_steps)
        if config.schedule == "cosine"
        else optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
    )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipped AdamW on the schedule, through ``jlora.optimizer`` so only what trains is updated."""
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.adamw(schedule(config), weight_decay=config.weight_decay),
    )
    return jlora.optimizer(tx, lora_plus_ratio=config.lora_plus_ratio)


def lm_loss(logits, targets, loss_mask):
    """Mean next-token cross entropy over the positions where ``loss_mask`` is 1, and their count."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    count = mask.sum()
    return (ce * mask).sum() / jnp.maximum(count, 1.0), count


def init_state(trainable, config: TrainConfig, tx=None) -> TrainState:
    """A fresh state. The step donates its state, so it gets its own copy of ``trainable``."""
    tx = tx or make_optimizer(config)
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(
        jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key_data(jax.random.key(config.seed))
    )


def make_step(apply_fn: Callable, config: TrainConfig, tx=None):
    """A jitted ``step(state, frozen, batch) -> (state, metrics)``.

    ``apply_fn(params, tokens) -> logits`` is the base model; it runs through the factored
    ``jlora.adapt``. The batch dict holds ``tokens``, ``targets`` and ``loss_mask`` of shape
    ``[batch_size, seq_len]``; with ``accumulate`` k it is split into k micro-batches whose
    gradients are averaged before one update.
    """
    tx = tx or make_optimizer(config)
    adapted = jlora.adapt(apply_fn, dropout=config.dropout)

    def loss_fn(trainable, frozen, batch, rng):
        params, adapters = jlora.combine(frozen, trainable)
        logits = adapted(params, adapters, batch["tokens"], lora_rng=rng if config.dropout else None)
        return lm_loss(logits, batch["targets"], batch["loss_mask"])[0]

    def step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        micro = jax.tree.map(lambda x: x.reshape(config.accumulate, -1, *x.shape[1:]), batch)

        def accumulate(total, index_and_batch):
            index, mb = index_and_batch
            loss, grads = jax.value_and_grad(loss_fn)(state.trainable, frozen, mb, jax.random.fold_in(step_rng, index))
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.trainable))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(config.accumulate), micro))
        loss, grads = jax.tree.map(lambda x: x / config.accumulate, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(config)(state.step)}
        return TrainState(state.step + 1, trainable, opt_state, jax.random.key_data(rng)), metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval(apply_fn: Callable):
    """A jitted ``eval(params, adapters, batch) -> (loss sum, token count)``; adapters may be None."""
    adapted = jlora.adapt(apply_fn)

    def evaluate(params, adapters, batch):
        if adapters is None and not any(map(jlora.paths.is_packed, jax.tree.leaves(params, is_leaf=jlora.paths.is_packed))):
            logits = apply_fn(params, batch["tokens"])
        else:  # adapters, or a quantised base (dequantised per use)
            logits = adapted(params, {} if adapters is None else adapters, batch["tokens"])
        loss, count = lm_loss(logits, batch["targets"], batch["loss_mask"])
        return loss * count, count

    return jax.jit(evaluate)


def perplexity(evaluate, params, adapters, dataset, batch_size: int, max_batches: int | None = None) -> float:
    """exp(mean loss) over every masked token of ``dataset`` (of its first ``max_batches`` batches),
    in order, with ``evaluate`` from :func:`make_eval`; ``adapters`` may be None (the base alone)."""
    total, count = 0.0, 0.0
    for index, batch in enumerate(data.eval_batches(dataset, batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        loss_sum, n = evaluate(params, adapters, batch)
        total, count = total + float(loss_sum), count + float(n)
    return math.exp(total / max(count, 1.0))


# ---- devices ----


def mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, with the batch axis ``data``."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA,))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_fsdp(tree, mesh: Mesh):
    """Splits each leaf along its largest axis divisible by the device count (else replicates)."""
    n = mesh.devices.size

    def place(x):
        if not hasattr(x, "shape"):
            return x
        axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % n == 0]
        spec = [None] * x.ndim
        if axes and n > 1:
            spec[axes[0]] = DATA
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(place, tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    n = mesh.devices.size
    rows = next(iter(batch.values())).shape[0]
    if rows % n:
        raise ValueError(f"batch of {rows} rows cannot be split over {n} devices; use a multiple of {n}")
    return jax.device_put(batch, NamedSharding(mesh, P(DATA)))

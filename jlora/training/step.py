"""One jitted train step for adapters: the optimisation settings, the schedule and the step itself,
data-parallel over every device of a mesh (``jlora.training.sharding``).

One code path serves 1 and N devices, on one or many processes: the batch is split over every
device of a ``(data, fsdp)`` mesh, the frozen base is replicated or split over the ``fsdp`` groups,
adapters follow their base weight, and XLA inserts the gradient all-reduce.
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

from jlora.core.optimizer import optimizer
from jlora.core.partition import Trainable, combine
from jlora.core.transform import adapt
from jlora.training.losses import make_loss, task_loss

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
    loss_chunk: int = 0  # positions per chunk of the cross entropy with a head_fn (0: the whole sequence)
    loss_vocab_block: int = 0  # vocabulary entries at a time in the chunked cross entropy (0: all at once)

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        for name, low in (("max_steps", 1), ("batch_size", 1), ("accumulate", 1), ("warmup_steps", 0), ("seed", 0),
                          ("loss_chunk", 0), ("loss_vocab_block", 0)):
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
    trainable: Trainable
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so checkpoints store a plain array


def schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine or linear decay to zero at ``max_steps``.

    Step ``k`` (0-based) of ``w`` warmup steps runs at ``learning_rate * (k + 1) / w``: the first
    step already trains (a warmup from 0 would spend it at rate 0), and step ``w - 1`` reaches the
    full rate, where the decay starts.

    Example:
      >>> lr = schedule(TrainConfig(learning_rate=1.0, warmup_steps=4, max_steps=8, schedule="linear"))
      >>> [round(float(lr(k)), 2) for k in range(8)]
      [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    warmup = min(config.warmup_steps, config.max_steps - 1)
    decay_steps = max(config.max_steps - warmup, 1)
    decay = (
        optax.cosine_decay_schedule(config.learning_rate, decay_steps)
        if config.schedule == "cosine"
        else optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
    )
    if warmup == 0:
        return decay
    rise = lambda k: config.learning_rate * jnp.minimum(k + 1, warmup) / warmup
    return optax.join_schedules([rise, decay], [warmup])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipped AdamW on the schedule, through ``jlora.optimizer`` so only what trains is updated."""
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.adamw(schedule(config), weight_decay=config.weight_decay),
    )
    return optimizer(tx, lora_plus_ratio=config.lora_plus_ratio)


def init_state(trainable, config: TrainConfig, tx=None) -> TrainState:
    """A fresh state. The step donates its state, so it gets its own copy of ``trainable``."""
    tx = tx or make_optimizer(config)
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(
        jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key_data(jax.random.key(config.seed))
    )


def make_step(apply_fn: Callable, config: TrainConfig, tx=None, head_fn: Callable | None = None, tasks: int = 0,
              vocab_size: int = 0):
    """A jitted ``step(state, frozen, batch) -> (state, metrics)``.

    ``apply_fn(params, tokens) -> logits`` is the base model; it runs through the factored
    ``jlora.adapt``. With ``head_fn``, ``apply_fn`` returns final hidden states instead (e.g.
    ``partial(model.apply, hidden=True)`` with ``head_fn=model.head``) and the loss applies the head
    ``config.loss_chunk`` positions at a time, so the full float32 logits never exist (see
    :func:`make_loss`; ``config.loss_vocab_block`` also splits the vocabulary, of ``vocab_size``
    entries). The batch dict holds ``tokens``, ``targets`` and ``loss_mask`` of shape
    ``[batch_size, seq_len]``; with ``accumulate`` k it is split into k micro-batches whose
    gradients are averaged before one update. Adapter gradients, the optimizer state and the loss
    are float32 whatever the base's dtype (adapters are made float32).

    With ``tasks`` n, the adapters are a stack of n (``jlora.stack``), the batch also holds
    ``adapter_ids`` ``[batch_size]`` (each row's task) and the loss is :func:`task_loss`: one step
    trains n adapters, each as if on its own rows alone, on one copy of the base (``grad_clip``
    still clips all of them by one global norm; 0 leaves every task's update its own).
    """
    if tasks and (head_fn is not None or config.accumulate > 1):
        raise ValueError(f"make_step with tasks={tasks} takes neither head_fn (loss_chunk) nor accumulate "
                         f"{config.accumulate} > 1: a micro-batch or chunk would mix the tasks' means")
    tx = tx or make_optimizer(config)
    if config.loss_vocab_block and (head_fn is None or not vocab_size):
        raise ValueError("loss_vocab_block needs make_step's head_fn and vocab_size (the head's width)")
    loss = make_loss(apply_fn, head_fn, config.loss_chunk, config.loss_vocab_block, vocab_size)
    adapted = adapt(loss, dropout=config.dropout)
    per_example = adapt(apply_fn, dropout=config.dropout)

    def loss_fn(trainable, frozen, batch, rng):
        params, adapters = combine(frozen, trainable)
        if tasks:
            logits = per_example(params, adapters, batch["tokens"], adapter_ids=batch["adapter_ids"],
                                 lora_rng=rng if config.dropout else None)
            return task_loss(logits, batch["targets"], batch["loss_mask"], batch["adapter_ids"], tasks)[0]
        return adapted(params, adapters, batch["tokens"], batch["targets"], batch["loss_mask"],
                       lora_rng=rng if config.dropout else None)[0]

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

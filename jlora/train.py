"""Causal-LM fine-tuning of adapters: the loss, the optimizer schedule and one jitted train step,
data-parallel over every local device through ``jax.sharding``.

One code path serves 1 and N devices, on one or many processes: the batch is split over every
device of a ``(data, fsdp)`` mesh, the frozen base is replicated (or split over the ``fsdp`` groups,
:func:`shard_fsdp`), adapters follow their base weight (:func:`shard_state`), and XLA inserts the
gradient all-reduce. On several hosts call :func:`jlora.distributed.initialize` first; the mesh
then spans ``jax.devices()`` of all of them and each host feeds only its own rows of the batch
(:func:`shard_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import data, distributed, paths

DATA, FSDP = "data", "fsdp"


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
    trainable: jlora.Trainable
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
    return jlora.optimizer(tx, lora_plus_ratio=config.lora_plus_ratio)


def lm_loss(logits, targets, loss_mask):
    """Mean next-token cross entropy over the positions where ``loss_mask`` is 1, and their count."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    count = mask.sum()
    return (ce * mask).sum() / jnp.maximum(count, 1.0), count


def chunked_lm_loss(head_fn, hidden, targets, loss_mask, chunk: int, vocab_block: int = 0, vocab_size: int = 0):
    """:func:`lm_loss` of ``head_fn(hidden)``, ``chunk`` positions at a time, never holding the
    ``[batch, seq, vocab]`` logits: each chunk's logits live inside a ``jax.checkpoint``ed scan step,
    so the backward pass recomputes them chunk by chunk too.

    Args:
      head_fn: ``hidden [B, t, C] -> logits [B, t, V]`` (the model's output head); with
        ``vocab_block``, ``head_fn(hidden, start, size)`` gives the logits of entries
        ``start .. start + size - 1`` only (``model.head``'s ``vocab`` slice).
      hidden: final hidden states ``[B, T, C]``.
      targets, loss_mask: ``[B, T]``.
      chunk: positions per chunk (> 0); T is padded up to a multiple with masked positions.
      vocab_block: if > 0, each chunk's cross entropy also goes ``vocab_block`` vocabulary entries
        at a time (:func:`blocked_cross_entropy`): neither the chunk's logits nor a whole copy of
        the head's weight (XLA's CPU backend converts a bf16 one to float32 for its dot) exists.
      vocab_size: V, needed with ``vocab_block``.

    Returns:
      ``(mean loss over masked positions, their count)``, equal to :func:`lm_loss` of the full logits.

    Example:
      >>> hidden, head = jnp.ones((1, 5, 4)), jnp.arange(12.0).reshape(4, 3) / 10
      >>> targets, mask = jnp.array([[0, 1, 2, 0, 1]]), jnp.ones((1, 5))
      >>> chunked, _ = chunked_lm_loss(lambda h: h @ head, hidden, targets, mask, chunk=2)
      >>> bool(jnp.allclose(chunked, lm_loss(hidden @ head, targets, mask)[0]))
      True
    """
    batch, length = targets.shape
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of positions, got {chunk!r}")
    if vocab_block and not 0 < vocab_block <= vocab_size:
        raise ValueError(f"vocab_block {vocab_block} must be in 1..vocab_size ({vocab_size})")
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    split = lambda x: widen(x).reshape(batch, chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
    mask = loss_mask.astype(jnp.float32)

    @jax.checkpoint
    def chunk_loss(total, xs):
        h, t, m = xs
        if vocab_block:
            ce = blocked_cross_entropy(functools.partial(head_fn, h), t, vocab_size, vocab_block)
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(head_fn(h).astype(jnp.float32), t)
        return total + (ce * m).sum(), None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(mask)))
    count = mask.sum()
    return total / jnp.maximum(count, 1.0), count


def blocked_cross_entropy(logits_of, targets, vocab_size: int, block: int):
    """Softmax cross entropy over ``vocab_size`` classes, ``block`` logits at a time (an online
    logsumexp), each block recomputed in the backward pass.

    Args:
      logits_of: ``logits_of(start, size) -> [..., size]``, the logits of classes ``start ..
        start + size - 1``; ``start`` is traced.
      targets: int ``[...]``.
      vocab_size, block: ``0 < block <= vocab_size``; the last block is shifted to end at
        ``vocab_size`` and its classes already seen are masked out.

    Returns:
      ``[...]`` float32, ``optax.softmax_cross_entropy_with_integer_labels`` of the full logits.

    Example:
      >>> logits = jnp.array([[2.0, -1.0, 0.5, 3.0, 0.0]])
      >>> blocked = blocked_cross_entropy(lambda s, n: jax.lax.dynamic_slice_in_dim(logits, s, n, 1), jnp.array([3]), 5, 2)
      >>> bool(jnp.allclose(blocked, optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([3]))))
      True
    """
    blocks = -(-vocab_size // block)

    @jax.checkpoint
    def step(carry, index):
        top, total, picked = carry
        first = index * block  # this block's first class not yet seen
        start = jnp.minimum(first, vocab_size - block)
        classes = start + jnp.arange(block)
        logits = jnp.where(classes >= first, logits_of(start, block).astype(jnp.float32), -jnp.inf)
        new_top = jax.lax.stop_gradient(jnp.maximum(top, logits.max(-1)))
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[..., None]).sum(-1)
        here = (targets >= first) & (targets < first + block)
        at = jnp.clip(targets - start, 0, block - 1)[..., None]
        picked = picked + jnp.where(here, jnp.take_along_axis(logits, at, axis=-1)[..., 0], 0.0)
        return (new_top, total, picked), None

    shape = targets.shape
    start = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape))
    (top, total, picked), _ = jax.lax.scan(step, start, jnp.arange(blocks))
    return top + jnp.log(total) - picked


def init_state(trainable, config: TrainConfig, tx=None) -> TrainState:
    """A fresh state. The step donates its state, so it gets its own copy of ``trainable``."""
    tx = tx or make_optimizer(config)
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(
        jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key_data(jax.random.key(config.seed))
    )


def make_loss(apply_fn: Callable, head_fn: Callable | None = None, loss_chunk: int = 0, vocab_block: int = 0,
              vocab_size: int = 0) -> Callable:
    """``loss(params, tokens, targets, loss_mask) -> (mean loss, count)`` of a base model, the
    function :func:`make_step` gives to ``jlora.adapt``, so adapters on the head train too.

    Without ``head_fn``, ``apply_fn(params, tokens)`` returns logits. With it, ``apply_fn`` returns
    the final hidden states and ``head_fn(params, hidden) -> logits`` is applied ``loss_chunk``
    positions at a time (:func:`chunked_lm_loss`; 0 means the whole sequence in one chunk), and with
    ``vocab_block`` (``vocab_size`` the head's width) that many vocabulary entries at a time:
    ``head_fn(params, hidden, vocab=(start, size))``.
    """
    if head_fn is None:
        return lambda params, tokens, targets, mask: lm_loss(apply_fn(params, tokens), targets, mask)

    def loss(params, tokens, targets, mask):
        hidden = apply_fn(params, tokens)
        head = (lambda h, start, size: head_fn(params, h, vocab=(start, size))) if vocab_block else (
            lambda h: head_fn(params, h))
        return chunked_lm_loss(head, hidden, targets, mask, loss_chunk or tokens.shape[1], vocab_block, vocab_size)

    return loss


def task_loss(logits, targets, loss_mask, adapter_ids, tasks: int):
    """The sum over ``tasks`` of each task's own masked mean cross entropy (rows with
    ``adapter_ids == i`` are task ``i``'s), and the token count: each task's adapter gets the
    gradient that a run on its rows alone gives it."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    sums = jax.ops.segment_sum((ce * mask).sum(-1), adapter_ids, tasks)
    counts = jax.ops.segment_sum(mask.sum(-1), adapter_ids, tasks)
    return (sums / jnp.maximum(counts, 1.0)).sum(), counts.sum()


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
    adapted = jlora.adapt(loss, dropout=config.dropout)
    per_example = jlora.adapt(apply_fn, dropout=config.dropout)

    def loss_fn(trainable, frozen, batch, rng):
        params, adapters = jlora.combine(frozen, trainable)
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


# ---- devices ----
#
# Every placement builds each process's own shards from its host copy (jax.make_array_from_callback,
# jax.make_array_from_process_local_data): no process sends another anything. jax.device_put of
# host data onto a mesh that spans processes would all-gather the whole value to check that every
# process passed the same one: the whole base at startup, the batch at every step.


def mesh(devices=None, *, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over all (or the given) devices, of every process.

    The batch is split over both axes. :func:`shard_fsdp` splits the base over the ``fsdp`` axis
    when it is longer than 1 (groups of ``fsdp`` devices, replicated across groups), else over
    every device.

    Args:
      devices: the devices, ordered by process (default ``jax.devices()``, through ``jax.make_mesh``).
      fsdp: devices per group that shares one copy of the base.

    Example:
      >>> dict(mesh(jax.devices()[:8], fsdp=2).shape)
      {'data': 4, 'fsdp': 2}
    """
    count = len(jax.devices()) if devices is None else len(devices)
    if isinstance(fsdp, bool) or not isinstance(fsdp, (int, np.integer)) or fsdp < 1 or count % fsdp:
        raise ValueError(f"fsdp must be a positive divisor of the {count} devices, got {fsdp!r}")
    shape, names = (count // fsdp, fsdp), (DATA, FSDP)
    if devices is None:
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * 2)
    return Mesh(np.asarray(devices).reshape(shape), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over every device of ``mesh``."""
    return NamedSharding(mesh, P(_axes(_split_axes(mesh))))


def place(x, sharding: NamedSharding):
    """``x`` (a host or single-process array) as a global array of ``sharding``; each process
    builds only its own devices' shards, so nothing crosses processes. An array already spread
    over processes is resharded by XLA."""
    if not hasattr(x, "shape"):
        return x
    if jax.process_count() == 1:  # nothing to check against: device to device, with no host copy
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding == sharding else jax.jit(lambda y: y, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` whole on every device of ``mesh``."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: place(x, sharding), tree)


def fsdp_spec(shape, mesh: Mesh) -> P:
    """Splits the largest axis divisible by the FSDP group (:func:`mesh`) over it; P() if none is."""
    axes = _fsdp_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    divisible = [a for a in np.argsort(shape, kind="stable")[::-1] if shape[a] % n == 0]
    spec = [None] * len(shape)
    if divisible and n > 1:
        spec[divisible[0]] = _axes(axes)
    return P(*spec)


def shard_fsdp(tree, mesh: Mesh):
    """Splits each leaf along its largest axis divisible by the FSDP group (else replicates)."""
    return jax.tree.map(lambda x: place(x, NamedSharding(mesh, fsdp_spec(x.shape, mesh))) if hasattr(x, "shape") else x,
                        tree)


def shard_state(state, frozen, mesh: Mesh):
    """``state`` on ``mesh``, each adapter array (and its optimizer moments) split like the base
    weight it adapts, along the axes it shares with it (LoRA's B along an output axis split in the
    base, A along an input axis); the rest replicated. With a replicated base that is all of it.

    Args:
      state: a :class:`TrainState` (or any tree whose leaf paths end in its trainable's paths).
      frozen: the base as placed on ``mesh`` (:func:`replicate` or :func:`shard_fsdp`).
      mesh: from :func:`mesh`.
    """
    base = {path: leaf for path, leaf in paths.leaves(frozen) if isinstance(leaf, jax.Array)}
    specs = {}
    for path, leaf in paths.leaves(getattr(state, "trainable", state)):
        kind, _, rest = path.partition("/")
        weight = base.get(rest.rsplit("/", 1)[0]) if kind == "adapters" else None
        specs[path] = (leaf.shape, P() if weight is None else _follow(leaf.shape, weight.shape, weight.sharding.spec))

    def place_leaf(path, x):
        parts = path.split("/")
        for i in range(len(parts)):
            shape, spec = specs.get("/".join(parts[i:]), (None, None))
            if shape == getattr(x, "shape", None):
                return place(x, NamedSharding(mesh, spec))
        return place(x, NamedSharding(mesh, P()))

    return paths.map_with_path(place_leaf, state)


def shard_batch(rows: dict, mesh: Mesh) -> dict:
    """This process's rows of a global batch (all of it on one process) as global arrays split
    over every device of ``mesh``; :func:`jlora.distributed.process_rows` says which rows to pass.

    Raises:
      ValueError: the rows do not split evenly over this process's devices of the mesh.
    """
    sharding = batch_sharding(mesh)
    local = len(sharding.addressable_devices)
    count = next(iter(rows.values())).shape[0]
    if count % local:
        where = "" if jax.process_count() == 1 else f"process {jax.process_index()}'s "
        raise ValueError(f"{where}batch of {count} rows cannot be split over {local} devices; use a multiple of {local}")
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in rows.items()}


def _follow(shape, weight_shape, weight_spec) -> P:
    """The spec of an adapter array of ``shape`` that follows a weight of ``weight_shape`` split by
    ``weight_spec``: a split weight axis carries over where the array has the same axes up to it
    (from the front: ``(*in, r)`` against ``(*in, *out)``) or from it on (from the back: ``(r, *out)``)."""
    spec = [None] * len(shape)
    for k, name in enumerate(tuple(weight_spec) + (None,) * (len(weight_shape) - len(weight_spec))):
        if name is None:
            continue
        j = k - len(weight_shape) + len(shape)
        if len(shape) > k and tuple(shape[: k + 1]) == tuple(weight_shape[: k + 1]):
            spec[k] = name
        elif j >= 0 and tuple(shape[j:]) == tuple(weight_shape[k:]):
            spec[j] = name
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _fsdp_axes(mesh: Mesh) -> tuple[str, ...]:
    return (FSDP,) if mesh.shape.get(FSDP, 1) > 1 else _split_axes(mesh)


def _split_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's axes longer than 1 (or its first): a spec naming a size-1 axis places the same,
    but differs from the one XLA gives the step's outputs, which would then compile again."""
    return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or tuple(mesh.axis_names[:1])


def _axes(names):
    return names[0] if len(names) == 1 else tuple(names)

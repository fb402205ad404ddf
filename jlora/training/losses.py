"""The next-token objective of causal-LM fine-tuning: cross entropy over the masked positions, in one
piece, a chunk of positions at a time (the full float32 logits never exist), or a block of the
vocabulary at a time; and the per-task sum that trains a stack of adapters in one step."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

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

"""Many adapters on one base: a stacked adapter tree, one adapter per example of a batch.

A stack of n adapter trees is one adapter tree of the same paths and kinds whose every array has a
leading adapter axis of n entries: ``a`` of a LoRA on a ``(d, k)`` weight is ``(n, d, r)``, and on
a weight of stacked layers ``(L, d, k)`` it is ``(n, L, d, r)``: the adapter axis always comes
first, before the layer axis, so taking adapter ``i`` is ``x[i]`` on every leaf. The leaves stay
the kinds' own dataclasses, so the optimizer (frozen fields, LoRA+) and checkpoints take a stack
as they take one adapter tree.

    stacked = jlora.stack([adapters_1, adapters_2, adapters_3])
    logits = jlora.adapt(model.apply)(params, stacked, tokens, adapter_ids=jnp.array([0, 2, -1, 1]))
    stacked = jlora.multi.put(stacked, 1, new_adapters)   # hot swap: same shapes, no recompilation

Ranks differ between adapters: each kind with a rank pads it with zeros to the largest (or to
``rank=``) by ``Adapter.with_rank``; for LoRA a zero column of A with a zero row of B adds exactly
zero to the output and gets exactly zero gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora.core import paths
from jlora.core.adapter import Adapter, fitted_table, table


def _static(adapter: Adapter) -> dict:
    arrays = {paths.key_name(kp[0]) for kp, _ in jax.tree_util.tree_flatten_with_path(adapter)[0]}
    return {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter) if f.name not in arrays}


def _fit(adapters: Sequence[Adapter], path: str, rank: int | None, capacity_of: str) -> list[Adapter]:
    """The adapters at one path at one rank (``rank``, or the largest given; ``Adapter.with_rank``),
    after checking they are one kind whose static fields then agree."""
    first = adapters[0]
    ranks = [a.rank for a in adapters]
    if rank is None and None not in ranks:
        rank = max(ranks)
    for r in ranks:
        if rank is not None and r is not None and r > rank:
            raise ValueError(f"adapter at {path!r} has rank {r}, more than the stack's rank {rank}")
    fitted = [a if rank is None else a.with_rank(rank) for a in adapters]
    for i, (adapter, one) in enumerate(zip(adapters, fitted)):
        if type(adapter) is not type(first) or _static(one) != _static(fitted[0]):
            raise ValueError(
                f"cannot stack the adapters at {path!r}: {capacity_of} {i} is {_shown(adapter)}, {capacity_of} 0 is "
                f"{_shown(first)}; a stack shares one kind and its static fields per weight"
                + (f" ({first.stack_hint})" if first.stack_hint else "")
            )
    shapes = [[x.shape for x in jax.tree.leaves(a)] for a in fitted]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"cannot stack the adapters at {path!r}: their arrays have shapes {shapes}, not one set of shapes")
    return fitted


def _shown(adapter: Adapter) -> str:
    rank = "" if adapter.rank is None else f" of rank {adapter.rank}"
    return f"{type(adapter).__name__}{rank} {_static(adapter)}"


def stack(adapter_trees: Sequence, *, capacity: int | None = None, rank: int | None = None) -> dict:
    """One adapter tree holding ``adapter_trees`` along a new leading axis, for per-example adapters.

    Args:
      adapter_trees: adapter trees with the same paths, each path one kind, ranks free to differ.
      capacity: the number of slots (default ``len(adapter_trees)``); the free ones hold zeros and
        take an adapter later with :func:`put`, without changing any shape.
      rank: pad ranks to this (default the largest given), to leave room for later ones; kinds
        without a rank ignore it.

    Returns:
      An adapter tree whose every array has a leading axis of ``capacity`` adapters.

    Raises:
      ValueError: the trees' paths differ, or a path's adapters differ in kind or static fields at the
        stack's rank (``Adapter.stack_hint`` says what a kind's adapters share); the path and both
        adapters are named.

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> stacked = stack([jlora.init(params, rank=4), jlora.init(params, rank=2)])
      >>> stacked['attn']['query']['kernel'].a.shape
      (2, 16, 4)
    """
    if not adapter_trees:
        raise ValueError("stack needs at least one adapter tree")
    tables = [table(t) for t in adapter_trees]
    for i, found in enumerate(tables):
        if set(found) != set(tables[0]):
            differ = set(found) ^ set(tables[0])
            raise ValueError(f"adapter tree {i} and tree 0 adapt different weights: {paths.fmt_paths(differ)}")
    capacity = len(adapter_trees) if capacity is None else capacity
    if capacity < len(adapter_trees):
        raise ValueError(f"capacity {capacity} is smaller than the {len(adapter_trees)} adapter trees given")
    out = {}
    for path in tables[0]:
        fitted = _fit([t[path] for t in tables], path, rank, "adapter tree")
        free = [jax.tree.map(jnp.zeros_like, fitted[0])] * (capacity - len(fitted))
        out[path] = jax.tree.map(lambda *xs: jnp.stack(xs), *fitted, *free)
    return paths.nest(out)


def size(stacked) -> int:
    """How many adapters (slots) ``stacked`` holds: the length of its leading axis."""
    lengths = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(lengths) != 1:
        raise ValueError(f"not a stack of adapters: leading axes of lengths {sorted(lengths)}; make one with jlora.stack")
    return lengths.pop()


def take(stacked, i: int) -> dict:
    """Adapter ``i`` of a stack, at the stack's (padded) shapes."""
    return jax.tree.map(lambda x: x[i], stacked)


def put(stacked, slot: int, adapters) -> dict:
    """``stacked`` with ``adapters`` in ``slot``, padded to the stack's shapes: every shape, so every
    compiled function of the stack, stays the same (a hot swap, or loading into a free slot).

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> stacked = stack([jlora.init(params, rank=4)], capacity=3)
      >>> put(stacked, 2, jlora.init(params, rank=2))['attn']['query']['kernel'].a.shape
      (3, 16, 4)
    """
    n = size(stacked)
    if not 0 <= slot < n:
        raise ValueError(f"slot {slot} is outside the stack's {n} slots 0..{n - 1}")
    held, given = table(stacked), table(adapters)
    if set(held) != set(given):
        raise ValueError(f"the adapters and the stack adapt different weights: {paths.fmt_paths(set(held) ^ set(given))}")
    out = {}
    for path, adapter in given.items():
        slot_now = take(held[path], slot)
        fitted = _fit([slot_now, adapter], path, slot_now.rank, "stack slot / new adapter")
        if [x.shape for x in jax.tree.leaves(fitted[1])] != [x.shape for x in jax.tree.leaves(slot_now)]:
            raise ValueError(
                f"adapter at {path!r} has shapes {[x.shape for x in jax.tree.leaves(adapter)]}, larger than "
                f"the stack's {[x.shape for x in jax.tree.leaves(slot_now)]}; make the stack with a larger rank="
            )
        out[path] = jax.tree.map(lambda s, x: s.at[slot].set(x.astype(s.dtype)), held[path], fitted[1])
    return paths.nest(out)


def unstack(stacked, like: Sequence | None = None) -> list:
    """The adapter trees of a stack; :func:`stack`'s inverse.

    Args:
      stacked: a stacked adapter tree.
      like: adapter trees (or their shapes) to cut each one back to, e.g. those given to
        :func:`stack`; default: every one at the stack's padded shapes (the same function: padded
        rank components are zero).

    Returns:
      A list of ``size(stacked)`` adapter trees (``len(like)`` when given).
    """
    n = size(stacked) if like is None else len(like)
    out = []
    for i in range(n):
        tree = take(stacked, i)
        if like is not None:
            # like's static fields too: an adapter padded to the stack's rank holds that rank's alpha
            cut = [x[tuple(slice(0, k) for k in ref.shape)] for x, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(like[i]))]
            tree = jax.tree.unflatten(jax.tree.structure(like[i]), cut)
        out.append(tree)
    return out


def stacked_table(params, stacked) -> tuple[dict[str, Adapter], int]:
    """``({path: stacked adapter}, n)`` after checking each holds n adapters that fit its weight."""
    found = table(stacked)
    n = None
    for path, adapter in found.items():
        lengths = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(adapter)}
        if len(lengths) != 1 or None in lengths or (n is not None and lengths != {n}):
            raise ValueError(
                f"adapters at {path!r} have leading axes {sorted(lengths, key=str)}, expected one adapter axis"
                f"{'' if n is None else f' of {n}'}: per-example adapters take a stack made by jlora.stack"
            )
        n = lengths.pop()
    fitted_table(params, take(stacked, 0))  # every adapter of the stack has the first one's shapes
    return found, n

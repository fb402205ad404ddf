"""Naming a weight's axes and contracting along them: the einsum bookkeeping the adapter kinds share.

A kind's factored use (``jlora.transform.Use``) names each axis of its weight by an integer id, so
a transpose or reshape only renames axes; these helpers turn ids into einsum words, find where a
weight's axes land in a ``dot_general``, and line a per-axis vector up against any array.
"""

from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp


class Letters:
    """einsum subscripts: one letter per axis id, and fresh ones for the other operand's axes."""

    def __init__(self):
        self._of: dict[int, str] = {}
        self._pool = iter(string.ascii_letters)

    def __getitem__(self, axis_id) -> str:
        if axis_id not in self._of:
            self._of[axis_id] = next(self._pool)
        return self._of[axis_id]

    def fresh(self) -> str:
        return next(self._pool)

    def word(self, ids) -> str:
        return "".join(self[i] for i in ids)


def contract(lhs, lhs_word: str, rhs, rhs_word: str, out_word: str, **opts):
    """``jnp.einsum(f"{lhs_word},{rhs_word}->{out_word}", lhs, rhs)`` as one 2-D matmul where no
    axis is batched: XLA's CPU dot is several times slower on the 3-D operands einsum hands it
    (``(batch, seq, d)`` activations), in the backward pass above all."""
    shared = [c for c in lhs_word if c in rhs_word]
    lhs_free = [c for c in lhs_word if c not in shared]
    rhs_free = [c for c in rhs_word if c not in shared]
    if any(c in out_word for c in shared) or sorted(lhs_free + rhs_free) != sorted(out_word):
        return jnp.einsum(f"{lhs_word},{rhs_word}->{out_word}", lhs, rhs, **opts)
    size = dict(zip(lhs_word, lhs.shape)) | dict(zip(rhs_word, rhs.shape))
    prod = lambda word: math.prod(size[c] for c in word)
    left = jnp.transpose(lhs, [lhs_word.index(c) for c in lhs_free + shared]).reshape(prod(lhs_free), prod(shared))
    right = jnp.transpose(rhs, [rhs_word.index(c) for c in shared + rhs_free]).reshape(prod(shared), prod(rhs_free))
    product = jnp.matmul(left, right, **opts).reshape([size[c] for c in lhs_free + rhs_free])
    return jnp.transpose(product, [(lhs_free + rhs_free).index(c) for c in out_word])


def reshape_groups(old: tuple, new: tuple):
    """Pairs runs of old axes with the runs of new axes they become, or None."""
    groups, i, j = [], 0, 0
    while i < len(old) and j < len(new):
        olds, news, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn and i < len(old):
                olds.append(i)
                po, i = po * old[i], i + 1
            elif pn < po and j < len(new):
                news.append(j)
                pn, j = pn * new[j], j + 1
            else:
                return None
        groups.append((olds, news))
    while groups and i < len(old) and old[i] == 1:
        groups[-1][0].append(i)
        i += 1
    while groups and j < len(new) and new[j] == 1:
        groups[-1][1].append(j)
        j += 1
    return groups if i == len(old) and j == len(new) else None


def dot_axes(view: tuple, x_ndim: int, x_is_lhs: bool, dimension_numbers) -> tuple[list, list]:
    """Where a weight's axes (named by ``view``) land in ``dot_general(x, W)``: the ids of x's axes
    and of the result's axes, ``None`` for an axis that belongs to x alone."""
    (lc, rc), (lb, rb) = dimension_numbers
    xc, wc, xb, wb = (lc, rc, lb, rb) if x_is_lhs else (rc, lc, rb, lb)
    x_ids = [None] * x_ndim
    for d, k in (*zip(xc, wc), *zip(xb, wb)):
        x_ids[d] = view[k]
    x_free = [None for d in range(x_ndim) if d not in xc and d not in xb]
    w_free = [view[k] for k in range(len(view)) if k not in wc and k not in wb]
    return x_ids, [view[k] for k in wb] + (x_free + w_free if x_is_lhs else w_free + x_free)


def align(values: jax.Array, ids: tuple, target_ids) -> jax.Array:
    """``values`` (axes named ``ids``) transposed and given unit axes so that it broadcasts against
    an array whose axes are named ``target_ids``; every id must be among them."""
    present = [t for t in target_ids if t is not None and t in ids]
    moved = jnp.transpose(values, [ids.index(t) for t in present])
    return moved.reshape([values.shape[ids.index(t)] if t is not None and t in ids else 1 for t in target_ids])


def scaled_dot(scale, scale_ids, view, base, x, x_is_lhs, base_out, params, dot):
    """A dot_general with a weight scaled along its axes ``scale_ids``, never scaling the weight.

    ``dot(x, base_out)`` is the unscaled use x·W given ``base_out`` = x·W0. The scale multiplies its
    result when the scaled axes are output axes, or x (and ``base_out`` is recomputed) when they
    are contracted. ``None`` when they are split between the two.
    """
    x_ids, out_ids = dot_axes(view, x.ndim, x_is_lhs, params["dimension_numbers"])
    if set(scale_ids) <= set(out_ids):
        out = dot(x, base_out)
        return None if out is None else out * align(scale, scale_ids, out_ids).astype(out.dtype)
    if set(scale_ids) <= set(x_ids):
        x = x * align(scale, scale_ids, x_ids).astype(x.dtype)
        base_out = jax.lax.dot_general_p.bind(*((x, base) if x_is_lhs else (base, x)), **params)
        return dot(x, base_out)
    return None

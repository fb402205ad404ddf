"""Leaves that hold one weight's worth of arrays (an adapter, a quantised weight) stacked over layers.

``nn.scan`` keeps a model's layers as one weight with a leading layer axis. A leaf that stands for
one weight and holds several arrays and static fields (a :class:`jlora.adapter.Adapter`, a
``jlora.quantize.Quantized``) stacks the same way: every array gets the layer axis first, and the
leaf says how its static fields change (:meth:`Stackable.stacked_meta`). :func:`stack` and
:func:`unstack` do that for every such leaf, so the layer stacking of ``jlora.models.layers`` needs
no branch per leaf type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


class Stackable:
    """Base of a dataclass pytree leaf that stacks over layers: its arrays get a leading layer axis."""

    #: What the leaves are called in errors ("adapters", "quantised weights").
    stacked_what: ClassVar[str] = "leaves"
    #: What must agree between layers to stack, for errors.
    stacked_agree: ClassVar[str] = "type, shape and static fields"
    #: How to get a stacked one, for the error of unstacking one without a layer axis.
    unstack_hint: ClassVar[str] = ""

    @property
    def stacked_layers(self) -> int:
        """How many leading axes of this leaf's weight are stacked layers."""
        raise NotImplementedError

    def stacked_meta(self, layers: int) -> dict:
        """Static fields after ``layers`` leaves like this one are stacked on a new leading axis
        (``layers=-1``: after that axis is removed)."""
        raise NotImplementedError


def is_stackable(x: Any) -> bool:
    return isinstance(x, Stackable)


def stack(leaves: list, path: str = ""):
    """One leaf holding ``leaves`` (one per layer, same type and static fields) along a new leading
    axis, as ``nn.scan`` stacks the layers' weights.

    Raises:
      ValueError: the leaves differ in type, static fields or shapes (the path and what differs are named).
    """
    first = leaves[0]
    what, agree = getattr(first, "stacked_what", "leaves"), getattr(first, "stacked_agree", "type")
    structure = jax.tree.structure(first)
    odd = next((x for x in leaves if not is_stackable(x) or jax.tree.structure(x) != structure), None)
    if odd is not None:
        raise ValueError(f"cannot stack the layers' {what} at {path!r}: they differ in {agree}: {first!r} and {odd!r}")
    try:
        arrays = jax.tree.map(lambda *xs: jnp.stack(xs), *leaves)
    except ValueError as error:
        raise ValueError(f"cannot stack the layers' {what} at {path!r}: they differ in {agree}: {error}") from None
    return dataclasses.replace(arrays, **first.stacked_meta(len(leaves)))


def unstack(leaf, path: str = "") -> list:
    """The per-layer leaves of one stacked along its leading axis (inverse of :func:`stack`)."""
    if leaf.stacked_layers < 1:
        raise ValueError(f"the {leaf.stacked_what} at {path!r} ({leaf!r}) has no stacked layer axis{leaf.unstack_hint}")
    meta = leaf.stacked_meta(-1)
    return [dataclasses.replace(jax.tree.map(lambda x: x[i], leaf), **meta) for i in range(layers(leaf))]


def layers(leaf) -> int:
    """The length of the leading (layer) axis of an array or of a stacked leaf."""
    return (jax.tree.leaves(leaf)[0] if is_stackable(leaf) else leaf).shape[0]

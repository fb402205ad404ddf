"""The protocol every adapter kind (LoRA, IA3, DoRA, ...) implements, and the adapter tree.

An adapter tree is a nested dict that mirrors the parameter tree's paths down to each targeted
weight, where it holds one :class:`Adapter` (a pytree whose array fields train). ``merge``,
``adapt``, the optimizer and checkpoints all go through this protocol, never through the kind.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

from jlora import paths


class Adapter(abc.ABC):
    """Base class of adapter kinds. Subclasses are frozen dataclasses registered as pytrees.

    A kind must say how it changes its weight W0 (``merge``/``unmerge``) and which weight shape it
    fits (``kernel_shape``). It may also give a factored form for uses of W0 that ``jlora.adapt``
    recognises (see ``jlora.transform``); without one, ``adapt`` uses the merged weight.
    """

    #: Array fields that travel with the adapter (checkpoints, ``unmerge``) but never train: the
    #: optimizer leaves them unchanged and ``count_params`` counts them as frozen.
    frozen_fields: tuple[str, ...] = ()

    @property
    @abc.abstractmethod
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the weight this adapter was made for."""

    @abc.abstractmethod
    def merge(self, w: jax.Array) -> jax.Array:
        """W0 -> the adapted weight, computed in float32 and cast back to W0's dtype."""

    @abc.abstractmethod
    def unmerge(self, w: jax.Array) -> jax.Array:
        """The adapted weight -> W0 (inverse of ``merge``)."""

    def use(self, w: jax.Array, path: str):
        """This adapter on weight ``w`` as a ``jlora.transform.Use``, for factored evaluation by
        ``jlora.adapt``; ``None`` (the default) makes ``adapt`` use the merged weight."""
        return None

    def check(self, path: str, w) -> None:
        """Raises ValueError when this adapter does not fit the weight ``w`` at ``path``."""
        if tuple(w.shape) != self.kernel_shape:
            raise ValueError(
                f"adapter at {path!r} is for a weight of shape {self.kernel_shape}, "
                f"but the params have shape {tuple(w.shape)} there"
            )


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def table(adapters) -> dict[str, Adapter]:
    """``{path: adapter}`` of an adapter tree."""
    out = {}
    for path, leaf in paths.leaves(adapters, is_leaf=is_adapter):
        if not is_adapter(leaf):
            raise TypeError(f"adapter tree holds {type(leaf).__name__} at {path!r}, not an Adapter")
        out[path] = leaf
    return out


def fitted_table(params, adapters) -> dict[str, Adapter]:
    """:func:`table`, after checking every adapter sits on a weight of the shape it was made for."""
    found = table(adapters)
    weights = dict(paths.leaves(params))
    missing = [p for p in found if p not in weights]
    if missing:
        raise ValueError(
            f"adapters for {paths.fmt_paths(missing)} have no weight at that path in the params; "
            f"params have e.g. {paths.fmt_paths(p for p, w in weights.items() if paths.is_floating_matrix(w))}"
        )
    for path, adapter in found.items():
        adapter.check(path, weights[path])
    return found


def as_f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)

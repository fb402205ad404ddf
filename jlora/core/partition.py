"""Splitting frozen base weights from the trainable tree, equinox-style, and putting them back."""

from __future__ import annotations

from typing import NamedTuple

from jlora.core import paths
from jlora.core.adapter import table

BIAS_MODES = ("none", "all", "lora_only")


class Trainable(NamedTuple):
    """What trains: the adapters, plus base leaves a bias mode unfreezes (nested by path)."""

    adapters: dict
    base: dict


def _is_bias(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "bias"


def trainable_base_paths(params, adapters, bias: str = "none") -> list[str]:
    """Paths of base leaves that train under ``bias`` (loralib's ``mark_only_lora_as_trainable``).

    ``'none'``: none. ``'all'``: every leaf named ``bias``. ``'lora_only'``: the biases of the
    modules that hold an adapted weight.
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if bias == "none":
        return []
    modules = {p.rsplit("/", 1)[0] for p in table(adapters)}
    return [
        p for p, _ in paths.leaves(params)
        if _is_bias(p) and (bias == "all" or p.rsplit("/", 1)[0] in modules)
    ]


def split(params, adapters, bias: str = "none"):
    """Returns ``(frozen, trainable)``.

    ``frozen`` is ``params`` with ``None`` where a leaf trains; ``trainable`` is a
    :class:`Trainable` of the adapters and those base leaves. Take gradients with respect to
    ``trainable`` only, and :func:`combine` the two inside the loss.

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32)), 'bias': jnp.zeros(32)}},
      ...           'mlp': {'kernel': jnp.ones((32, 16)), 'bias': jnp.zeros(16)}}
      >>> adapters = jlora.init(params, rank=4)  # on attn/query/kernel
      >>> frozen, trainable = jlora.split(params, adapters, bias="lora_only")
      >>> frozen['attn']['query']['bias'] is None, jax.tree.map(jnp.shape, trainable.base)
      (True, {'attn': {'query': {'bias': (32,)}}})
      >>> restored, _ = jlora.combine(frozen, trainable)
      >>> jax.tree.all(jax.tree.map(jnp.array_equal, restored, params))
      True
    """
    unfrozen = set(trainable_base_paths(params, adapters, bias))
    frozen = paths.map_with_path(lambda p, w: None if p in unfrozen else w, params)
    base = paths.nest({p: w for p, w in paths.leaves(params) if p in unfrozen})
    return frozen, Trainable(adapters, base)


def combine(frozen, trainable: Trainable):
    """Inverse of :func:`split`: returns ``(params, adapters)``."""
    base = dict(paths.leaves(trainable.base))
    params = paths.map_with_path(
        lambda p, w: base.pop(p) if p in base else w, frozen, is_leaf=lambda x: x is None
    )
    if base:
        raise ValueError(f"trainable base leaves {paths.fmt_paths(base)} have no place in the frozen tree")
    return params, trainable.adapters

"""An optimizer that updates only what trains: ``optax.multi_transform`` over labelled leaves."""

from __future__ import annotations

import jax
import optax

from jlora.core import paths
from jlora.core.adapter import is_adapter
from jlora.core.partition import Trainable

FROZEN, ADAPTER, ADAPTER_B, BASE = "frozen", "adapter", "adapter_b", "base"


def labels(tree):
    """Labels every leaf: adapter leaves ``'adapter'`` (a kind's ``lora_plus_fields``, LoRA's B,
    ``'adapter_b'``; its ``frozen_fields`` ``'frozen'``), the base leaves of a :class:`~jlora.partition.Trainable`
    ``'base'``, and everything else ``'frozen'``."""

    def label(node):
        if isinstance(node, Trainable):
            return Trainable(labels(node.adapters), jax.tree.map(lambda _: BASE, node.base))
        if is_adapter(node):
            return jax.tree_util.tree_map_with_path(lambda kp, _: _adapter_label(node, kp), node)
        return FROZEN

    return jax.tree.map(label, tree, is_leaf=lambda x: isinstance(x, Trainable) or is_adapter(x))


def _adapter_label(adapter, keypath) -> str:
    field = paths.key_name(keypath[0])
    if field in adapter.frozen_fields:
        return FROZEN
    return ADAPTER_B if field in adapter.lora_plus_fields else ADAPTER


def optimizer(tx: optax.GradientTransformation, *, lora_plus_ratio: float | None = None):
    """Wraps ``tx`` so that only adapters (and unfrozen base leaves) are updated.

    Works on the trainable tree from ``jlora.split``, on an adapter tree, or on any tree holding
    them beside frozen weights, e.g. ``(params, adapters)``: frozen leaves get an update of exactly
    zero and no optimizer state.

    Args:
      tx: the optimizer for trainable leaves, e.g. ``optax.adamw(1e-3)``.
      lora_plus_ratio: LoRA+ (Hayou et al., 2024): B's learning rate is this times A's (the
        paper suggests 16). ``None``: same rate.

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> tree = (params, jlora.init(params, rank=4))
      >>> tx = jlora.optimizer(optax.sgd(0.5))
      >>> opt_state = tx.init(tree)
      >>> updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, tree), opt_state)
      >>> frozen_update, adapter_update = updates
      >>> float(abs(frozen_update['attn']['query']['kernel']).max())  # frozen: exactly zero
      0.0
      >>> float(adapter_update['attn']['query']['kernel'].b[0, 0])  # adapters: -0.5 · gradient
      -0.5
    """
    if lora_plus_ratio is not None and not (isinstance(lora_plus_ratio, (int, float)) and 0 < lora_plus_ratio < float("inf")):
        raise ValueError(f"lora_plus_ratio must be a finite number > 0 (B's learning rate over A's), got {lora_plus_ratio!r}")
    b_tx = tx if lora_plus_ratio is None else optax.chain(tx, optax.scale(lora_plus_ratio))
    masked = optax.multi_transform({ADAPTER: tx, ADAPTER_B: b_tx, BASE: tx, FROZEN: optax.set_to_zero()}, labels)

    def init(tree):
        if all(label == FROZEN for label in jax.tree.leaves(labels(tree))):
            raise ValueError(
                "jlora.optimizer got a tree with no trainable leaves (no adapters, no unfrozen base leaves), so every "
                "update would be zero; pass the trainable tree of jlora.split, an adapter tree, or (params, adapters)"
            )
        return masked.init(tree)

    return masked._replace(init=init)

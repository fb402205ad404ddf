"""How much trains: parameter counts and bytes, trainable against total."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

from jlora.core import paths
from jlora.core.adapter import fitted_table, is_adapter
from jlora.core.partition import trainable_base_paths


class ParamCount(NamedTuple):
    trainable: int
    total: int
    trainable_bytes: int
    total_bytes: int

    def __str__(self):
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable params: {self.trainable:,} ({self.trainable_bytes:,} bytes) || "
            f"all params: {self.total:,} ({self.total_bytes:,} bytes) || trainable: {share:.4f}%"
        )


def _size(tree) -> tuple[int, int]:
    """Values and bytes; a quantised weight counts the values of its dense shape and the bytes it holds."""
    leaves = [x for x in jax.tree.leaves(tree, is_leaf=paths.is_packed) if hasattr(x, "shape")]
    packed = [x for x in leaves if paths.is_packed(x)]
    arrays = [x for x in leaves if not paths.is_packed(x)] + [a for x in packed for a in jax.tree.leaves(x)]
    count = sum(x.size for x in leaves if not paths.is_packed(x)) + sum(math.prod(x.shape) for x in packed)
    return count, sum(x.size * x.dtype.itemsize for x in arrays)


def count_params(params, adapters, bias: str = "none") -> ParamCount:
    """Trainable (adapters plus base leaves unfrozen by ``bias``) against all (base plus adapters).

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> print(jlora.count_params(params, jlora.init(params, rank=4)))  # A 16·4 + B 4·32, of 16·32 + 192
      trainable params: 192 (768 bytes) || all params: 704 (2,816 bytes) || trainable: 27.2727%
    """
    fitted_table(params, adapters)  # adapters of another model are refused, naming the path
    unfrozen = set(trainable_base_paths(params, adapters, bias))
    base_n, base_b = _size(params)
    ad_n, ad_b = _size(adapters)
    tb_n, tb_b = _size([w for p, w in paths.leaves(params) if p in unfrozen])
    # Fields an adapter carries but never trains (DoRA's base_norm) count in the total only.
    adapters_found = [a for a in jax.tree.leaves(adapters, is_leaf=is_adapter) if is_adapter(a)]
    held = [getattr(a, field) for a in adapters_found for field in a.frozen_fields]
    held_n, held_b = _size(held)
    return ParamCount(ad_n - held_n + tb_n, base_n + ad_n, ad_b - held_b + tb_b, base_b + ad_b)

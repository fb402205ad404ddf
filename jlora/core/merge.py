"""Merging adapters into their weights for export, and taking them out again to swap adapters."""

from __future__ import annotations

import jax
import numpy as np

from jlora.core import paths
from jlora.core.adapter import fitted_table


def refuse_non_finite(path: str, adapter, method: str = "merge") -> None:
    """Raises ValueError when an adapter holds NaN or infinite values (PEFT's ``safe_merge``): merged,
    they would silently corrupt the weight. Skipped under tracing, where values are not known."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(adapter)[0]:
        if isinstance(leaf, jax.core.Tracer):
            continue
        values = np.asarray(leaf)
        bad = int(values.size - np.isfinite(values).sum())
        if bad:
            raise ValueError(
                f"cannot {method} the adapter at {path!r}: its {paths.key_name(keypath[0])} holds {bad} non-finite "
                f"value(s) of {values.size} (NaN or inf, e.g. from a diverged run); the weight would be corrupted"
            )


def _apply(params, adapters, method: str):
    params = paths.dense(params)  # a quantised base merges into dense weights
    found = fitted_table(params, adapters)
    for path, adapter in found.items():
        refuse_non_finite(path, adapter, method)

    def one(path, w):
        if path not in found:
            return w
        try:
            return getattr(found[path], method)(w)
        except ValueError as error:  # a kind's refusal (e.g. a scale too small to divide out) names no path
            raise ValueError(f"{method} at {path!r}: {error}") from None

    return paths.map_with_path(one, params)


def merge(params, adapters):
    """Plain params with every adapted weight replaced by W0 + ΔW (any adapter kind).

    The result has the tree structure, shapes and dtypes of ``params``; the sum is computed in
    float32 and cast back, so the original model runs it with no added latency. A quantised base
    (``jlora.quantize``) gives dense weights, also where no adapter sits.

    Args:
      params: the base parameter pytree.
      adapters: an adapter tree from ``jlora.init`` (or another kind's ``init``) for these params.

    Returns:
      The merged parameter pytree.

    Raises:
      ValueError: an adapter's path is missing from ``params`` or its weight has another shape, or an
        adapter holds NaN or infinite values (as PEFT's ``safe_merge``).

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.zeros((16, 32)), 'bias': jnp.zeros(32)}}}
      >>> adapters = jax.tree.map(jnp.ones_like, jlora.init(params, rank=4))  # as if trained: A = B = 1
      >>> merged = jlora.merge(params, adapters)
      >>> jax.tree.map(jnp.shape, merged)
      {'attn': {'query': {'bias': (32,), 'kernel': (16, 32)}}}
      >>> float(merged['attn']['query']['kernel'][0, 0])  # 0 + scaling · (A·B)[0, 0] = 1 · 4
      4.0
    """
    return _apply(params, adapters, "merge")


def unmerge(merged, adapters):
    """Inverse of :func:`merge`: takes the adapters' updates out of ``merged`` again.

    Exact up to float rounding, so ``unmerge(merge(p, a), a)`` gives back ``p`` and another
    adapter can then be merged into the shared base.

    Raises:
      ValueError: a kind cannot invert its merge at some path (an (IA)³ entry near zero, a DoRA
        column whose update outgrew its base); the message names the path.
    """
    return _apply(merged, adapters, "unmerge")

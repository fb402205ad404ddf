"""One way to name a parameter: its '/'-joined path, the same for linen dicts, nnx.State and plain trees.

Every other module walks trees and matches targets through the functions here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# nnx.State leaves sit inside Variable nodes whose key path ends in `.value`; dropping that component
# gives the path users see (`lin/kernel`), identical to the linen spelling.
_VARIABLE_ATTRS = ("value", "raw_value")

Target = str | Sequence[str] | Callable[[str, Any], bool]

# Leaves a module-name target never selects: DenseGeneral's bias can be a matrix too.
NOT_WEIGHTS = ("bias", "scale")


def key_name(key) -> str:
    """The text of one key-path entry: dict key, sequence index, attribute or flattened index."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath) -> str:
    """Joins a JAX key path with '/', e.g. ``params/layers_0/attn/query/kernel``."""
    parts = [key_name(k) for k in keypath]
    if parts and parts[-1] in _VARIABLE_ATTRS and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts)


def leaves(tree, is_leaf=None) -> list[tuple[str, Any]]:
    """(path, leaf) pairs of ``tree`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(keypath), leaf) for keypath, leaf in flat]


def map_with_path(fn: Callable, tree, *rest, is_leaf=None):
    """``jax.tree.map`` where ``fn(path, leaf, *rest_leaves)`` also gets the leaf's path string."""
    return jax.tree_util.tree_map_with_path(
        lambda keypath, *xs: fn(path_str(keypath), *xs), tree, *rest, is_leaf=is_leaf
    )


def nest(flat: Mapping[str, Any]) -> dict:
    """Turns ``{'a/b/c': x}`` into ``{'a': {'b': {'c': x}}}``."""
    out: dict = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def is_floating_matrix(leaf) -> bool:
    # jnp.issubdtype, not np's: numpy does not count ml_dtypes' bfloat16 as floating.
    return hasattr(leaf, "shape") and len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def _contains_name(path: str, name: str) -> bool:
    return f"/{name}/" in f"/{path}/"


def matcher(targets: Target) -> tuple[Callable[[str, Any], bool], bool]:
    """Builds ``match(path, leaf) -> bool`` from a target spec.

    Returns the matcher and whether it selects modules by name (then only their floating matrices
    not named in :data:`NOT_WEIGHTS` are taken, so a bias next to a targeted kernel is skipped
    rather than rejected).

    - a ``str``: a regex, ``re.fullmatch``-ed against the whole path.
    - a sequence of ``str``: module names; a name matches a path component or a run of them
      (``'attn/c_proj'``).
    - a callable ``(path, leaf) -> bool``.
    """
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return (lambda path, leaf: pattern.fullmatch(path) is not None), False
    if callable(targets):
        return targets, False
    names = tuple(targets)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"targets must be a regex str, a list of names or a predicate, got {targets!r}")
    return (lambda path, leaf: any(_contains_name(path, n) for n in names)), True


def select(tree, targets: Target) -> dict[str, Any]:
    """The ``{path: leaf}`` of ``tree`` that ``targets`` selects, each a floating matrix.

    Raises:
      ValueError: nothing matches (a few candidate paths are listed), or an explicitly matched leaf
        is not a floating-point array of two or more dimensions.
    """
    match, by_name = matcher(targets)
    chosen = {}
    for path, leaf in leaves(tree):
        if not match(path, leaf):
            continue
        if by_name and path.rsplit("/", 1)[-1] in NOT_WEIGHTS:
            continue
        if not is_floating_matrix(leaf):
            if by_name:
                continue
            shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", type(leaf).__name__)
            raise ValueError(
                f"target {path!r} is not a floating-point matrix (shape {shape}, dtype {dtype}); "
                "LoRA adapts weights of two or more dimensions"
            )
        chosen[path] = leaf
    if not chosen:
        candidates = [p for p, leaf in leaves(tree) if is_floating_matrix(leaf)]
        shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(f"targets {targets!r} match no weight; candidate paths: {shown or 'none'}")
    return chosen


def per_path(value, path: str, default):
    """Resolves an option given as one value or as ``{regex: value}`` overrides for this path.

    A mapping's keys are tried in order (PEFT's ``rank_pattern`` style): a key matches when it
    ``re.fullmatch``-es the path or names a module in it; the first hit wins, else ``default``.
    """
    if isinstance(value, Mapping):
        for pattern, item in value.items():
            if re.fullmatch(pattern, path) or _contains_name(path, pattern):
                return item
        return default
    return default if value is None else value


def fmt_paths(paths: Iterable[str], most: int = 5) -> str:
    paths = list(paths)
    return ", ".join(paths[:most]) + (f", ... ({len(paths)} in all)" if len(paths) > most else "")

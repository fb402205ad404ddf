"""One way to name a parameter: its '/'-joined path, the same for linen dicts, nnx.State and plain trees.

Every other module walks trees and matches targets through the functions here.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jlora.core import stacking

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


class Packed(stacking.Stackable):
    """Base of a weight stored as several arrays that the tree walks here still take as one leaf at
    one path (a quantised weight, ``jlora.quantize``). It has the dense weight's ``shape`` and
    ``dtype``, and :meth:`dense` gives that weight."""

    shape: tuple
    dtype: Any
    #: Leading axes of ``shape`` that are stacked layers, each slice a weight of its own.
    lead: int = 0

    def dense(self) -> jax.Array:
        raise NotImplementedError

    @property
    def stacked_layers(self) -> int:
        return self.lead


def is_packed(x) -> bool:
    return isinstance(x, Packed)


def _or_packed(is_leaf):
    return is_packed if is_leaf is None else (lambda x: is_packed(x) or is_leaf(x))


def leaves(tree, is_leaf=None) -> list[tuple[str, Any]]:
    """(path, leaf) pairs of ``tree`` in flattening order; a :class:`Packed` weight is one leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_or_packed(is_leaf))
    return [(path_str(keypath), leaf) for keypath, leaf in flat]


def map_with_path(fn: Callable, tree, *rest, is_leaf=None):
    """``jax.tree.map`` where ``fn(path, leaf, *rest_leaves)`` also gets the leaf's path string
    (a :class:`Packed` weight is one leaf)."""
    return jax.tree_util.tree_map_with_path(
        lambda keypath, *xs: fn(path_str(keypath), *xs), tree, *rest, is_leaf=_or_packed(is_leaf)
    )


def nest(flat: Mapping[str, Any]) -> dict:
    """Turns ``{'a/b/c': x}`` into ``{'a': {'b': {'c': x}}}``: flax's ``unflatten_dict`` on '/'-joined paths."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def dense(tree):
    """``tree`` with every :class:`Packed` leaf replaced by its dense weight (other leaves as they are)."""
    return jax.tree.map(lambda x: x.dense() if is_packed(x) else x, tree, is_leaf=is_packed)


def is_floating_matrix(leaf) -> bool:
    # jnp.issubdtype, not np's: numpy does not count ml_dtypes' bfloat16 as floating.
    return hasattr(leaf, "shape") and len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def _dotted(path: str) -> str:
    """``params/layers_1/self_attn/k_proj/kernel`` as PEFT's module names read: ``params.layers.1.self_attn.k_proj.kernel``."""
    return ".".join(re.sub(r"^(.+)_(\d+)$", r"\1.\2", part) for part in path.split("/"))


def names_module(path: str, name: str) -> bool:
    """Whether ``name`` names a module on ``path``: a component or a run of them, in jlora's spelling
    (``attn/c_proj``, ``layers_1/self_attn``) or PEFT's dotted one (``attn.c_proj``, ``layers.1.self_attn``)."""
    if "." in name and "/" not in name:
        return f".{name}." in f".{_dotted(path)}."
    return f"/{name}/" in f"/{path}/"


def _regex(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {error}") from None


def matcher(targets: Target) -> tuple[Callable[[str, Any], bool], bool]:
    """Builds ``match(path, leaf) -> bool`` from a target spec.

    Returns the matcher and whether it selects modules by name (then only their floating matrices
    not named in :data:`NOT_WEIGHTS` are taken, so a bias next to a targeted kernel is skipped
    rather than rejected).

    - a ``str``: a regex, ``re.fullmatch``-ed against the whole path.
    - a sequence of entries, each a module name (:func:`names_module`: a path component or a run of
      them, ``'attn/c_proj'`` or PEFT's ``'attn.c_proj'``) or a regex fullmatched against the path:
      a ``str`` starting ``re:`` (``'re:.*/mlp/.*'``) or a compiled ``re.Pattern``.
    - a callable ``(path, leaf) -> bool``.

    Raises:
      ValueError: an invalid regex. TypeError: anything else than the three forms.
    """
    if isinstance(targets, str):
        pattern = _regex(targets, "targets")
        return (lambda path, leaf: pattern.fullmatch(path) is not None), False
    if callable(targets):
        return targets, False
    names = tuple(targets) if isinstance(targets, (list, tuple, set, frozenset)) else ()
    if not names or not all(isinstance(n, (str, re.Pattern)) for n in names):
        raise TypeError(
            f"targets must be a regex str, a non-empty list of module names (or 're:' regexes) or a predicate "
            f"(path, leaf) -> bool, got {targets!r}"
        )
    entries = [entry_matcher(n) for n in names]
    return (lambda path, leaf: any(entry(path) for entry in entries)), True


def entry_matcher(entry) -> Callable[[str], bool]:
    """Whether a path is selected by one entry of a targets list: a module name, ``'re:<regex>'`` or a ``re.Pattern``."""
    if isinstance(entry, re.Pattern):
        return lambda path: entry.fullmatch(path) is not None
    if entry.startswith("re:"):
        pattern = _regex(entry[3:], f"target {entry!r}: the regex")
        return lambda path: pattern.fullmatch(path) is not None
    return lambda path: names_module(path, entry)


def _is_regex_entry(entry) -> bool:
    return isinstance(entry, re.Pattern) or entry.startswith("re:")


def describe_leaf(leaf) -> str:
    """``shape (16, 32), dtype float32``: a leaf as error messages name it."""
    return f"shape {getattr(leaf, 'shape', None)}, dtype {getattr(leaf, 'dtype', type(leaf).__name__)}"


def close_names(name: str, paths_: Iterable[str], most: int = 3) -> list[str]:
    """Module names on ``paths_`` that look like ``name`` (a typo, another model's spelling)."""
    modules = set()
    for path in paths_:
        parts = path.split("/")[:-1]
        modules |= {"/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, min(i + 3, len(parts)) + 1)}
    return difflib.get_close_matches(name.replace(".", "/"), sorted(modules), n=most, cutoff=0.6)


def select(tree, targets: Target, *, every_name: bool = True) -> dict[str, Any]:
    """The ``{path: leaf}`` of ``tree`` that ``targets`` selects, each a floating matrix.

    Args:
      tree: a parameter pytree.
      targets: as :func:`matcher` takes them.
      every_name: with a list of names, each must select a weight (a typo is an error, not a name
        that quietly adapts nothing); ``False`` for defaults that cover several model families.

    Raises:
      ValueError: nothing matches, or (``every_name``) one name matches no weight: close module
        names or candidate paths are listed, and leaves a name matched that are not floating
        matrices (integer or 1-D weights) are named with their shape and dtype; or an explicitly
        matched leaf (regex, predicate) is not a floating-point array of two or more dimensions.
    """
    match, by_name = matcher(targets)
    regexes = [entry_matcher(n) for n in targets if _is_regex_entry(n)] if by_name else []
    chosen, refused, skipped = {}, {}, {}
    for path, leaf in leaves(tree):
        if not match(path, leaf):
            continue
        named = by_name and not any(regex(path) for regex in regexes)  # chosen by a module name, not a regex
        if named and path.rsplit("/", 1)[-1] in NOT_WEIGHTS:
            continue
        if not is_floating_matrix(leaf):
            if named:
                refused[path] = leaf
            elif callable(targets):  # a predicate chose this leaf itself
                raise ValueError(f"target {path!r} is not a floating-point matrix ({describe_leaf(leaf)}); "
                                 "LoRA adapts weights of two or more dimensions")
            else:  # a regex spans what can be adapted and what cannot: the latter is skipped, and said
                skipped[path] = leaf
            continue
        chosen[path] = leaf
    if skipped and not chosen:
        path, leaf = next(iter(skipped.items()))
        raise ValueError(f"target {path!r} is not a floating-point matrix ({describe_leaf(leaf)}); "
                         "LoRA adapts weights of two or more dimensions")
    names = list(targets) if by_name else []
    unmatched = [n for n in names if not any(entry_matcher(n)(p) for p in chosen)] if every_name else []
    if chosen and not unmatched:
        if skipped:
            warnings.warn(f"targets {targets!r}: skipped {len(skipped)} matched {'leaf' if len(skipped) == 1 else 'leaves'} that LoRA cannot adapt (not "
                          f"floating-point matrices): {fmt_paths([f'{p} ({describe_leaf(w)})' for p, w in skipped.items()], 3)}; "
                          "a narrower pattern (e.g. '.*/kernel') leaves them out", stacklevel=3)
        return chosen
    candidates = [p for p, leaf in leaves(tree) if is_floating_matrix(leaf)]
    details = []
    for name in unmatched or names:
        if _is_regex_entry(name):
            details.append(f"{name if isinstance(name, str) else name.pattern!r} is a regex fullmatched against whole "
                           "paths such as the candidates below")
            continue
        not_matrices = [f"{p} ({describe_leaf(w)})" for p, w in refused.items() if names_module(p, name)]
        close = close_names(name, candidates)
        if not_matrices:
            details.append(f"{name!r} names only weights that are not floating-point matrices: {fmt_paths(not_matrices, 3)}")
        elif re.search(r"[*+?\[\](){}|^$\\]", name):
            details.append(f"{name!r} looks like a regular expression, but a list's entries are module names; "
                           f"write 're:{name}' for a regex fullmatched against the path")
        elif close:
            details.append(f"{name!r}: did you mean {', '.join(map(repr, close))}?")
    head = f"targets {targets!r} match no weight" if not chosen else f"targets {', '.join(map(repr, unmatched))} match no weight"
    shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
    raise ValueError(head + "".join(f"; {d}" for d in details) + f"; candidate paths: {shown or 'none'}")


def per_path(value, path: str, default):
    """Resolves an option given as one value or as ``{regex or module name: value}`` overrides.

    A mapping's keys are tried in order (PEFT's ``rank_pattern`` style): a key matches when it
    ``re.fullmatch``-es the path or names a module on it (:func:`names_module`); the first hit
    wins, else ``default``.
    """
    if isinstance(value, Mapping):
        for pattern, item in value.items():
            if _key_matches(pattern, path):
                return item
        return default
    return default if value is None else value


def _key_matches(pattern: str, path: str) -> bool:
    return _regex(pattern, "pattern key").fullmatch(path) is not None or names_module(path, pattern)


def check_patterns(name: str, patterns, chosen: Iterable[str]) -> None:
    """Raises ValueError when a key of ``patterns`` (``rank_pattern``, ...) selects none of ``chosen``."""
    if not isinstance(patterns, Mapping):
        return
    chosen = list(chosen)
    unused = [key for key in patterns if not any(_key_matches(key, p) for p in chosen)]
    if unused:
        raise ValueError(
            f"{name} keys {unused} match none of the targeted weights ({fmt_paths(chosen)}); a key is a regex "
            "fullmatch-ed against the path or a module name on it"
        )


def fmt_paths(paths: Iterable[str], most: int = 5) -> str:
    paths = list(paths)
    return ", ".join(paths[:most]) + (f", ... ({len(paths)} in all)" if len(paths) > most else "")

"""Checked reading of the files users hand jlora: text and JSON, and the typed fields of a JSON
object, each error one line that names the file, the key and what was expected.

    config = read_json(directory / "config.json")                     # CheckpointError naming the file
    sizes = checked(config, {"vocab_size": int, "rope_theta": float}, source=path, required=["vocab_size"])
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from jlora.core.errors import CheckpointError


def reason(error: Exception) -> str:
    """An error's cause in a few words: an OSError's ``strerror`` (``No space left on device``), else
    the first line of its message, else its type's name."""
    text = str(error).strip()
    return getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)


def read_text(path, error: type[Exception] = CheckpointError) -> str:
    """The UTF-8 text of ``path``; ``error`` naming it when it is missing, unreadable or not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as cause:
        raise error(f"{path} is not UTF-8 text (byte {cause.start}: {cause.reason})") from None
    except OSError as cause:
        raise error(f"{path} cannot be read: {cause.strerror or cause}") from None


def read_json(path, error: type[Exception] = CheckpointError, *, kind: type | None = dict) -> Any:
    """The JSON value in ``path`` (an object unless ``kind`` says otherwise; None: any value);
    ``error`` naming the file when it is missing, not UTF-8, not JSON, or of another kind."""
    text = read_text(path, error)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as cause:
        raise error(f"{path} is not valid JSON ({cause.msg} at line {cause.lineno} column {cause.colno})") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON (nested too deeply)") from None
    if kind is not None and not isinstance(value, kind):
        raise error(f"{path} holds a JSON {_json_kind(value)}, not a JSON {_json_kind(kind())}")
    return value


def checked(values: dict, fields: dict[str, Any], source, error: type[Exception] = CheckpointError, *,
            required=(), positive=()) -> dict:
    """``values`` after checking each key of ``fields`` it holds against that type (``int``, ``float``,
    ``bool``, ``str``, ``list[str]``, ``dict``, unions with None, ``tuple[int, ...]``; a bool is no
    int, an int is a float), that each of ``required`` is there, and that each of ``positive`` there
    (and not None) is at least 1. Keys not in ``fields`` pass.

    Raises:
      ``error``: ``"<source>: <key> is <value>; expected <type>"``, or ``"<source> lacks <key>"``.
    """
    for key in required:
        if key not in values:
            raise error(f"{source} lacks {key!r}, which jlora needs")
    for key, hint in fields.items():
        if key in values and not fits(values[key], hint):
            raise error(f"{source}: {key!r} is {_shown(values[key])}; expected {_describe(hint)}")
    for key in positive:
        if values.get(key) is not None and values[key] < 1:
            raise error(f"{source}: {key!r} is {_shown(values[key])}; expected an integer >= 1")
    return values


def dataclass_fields(cls, skip=()) -> dict[str, Any]:
    """``{field: type}`` of a dataclass's annotated fields (for :func:`checked`), without ``skip``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in skip}


def fits(value, hint) -> bool:
    """Whether a JSON value is of the type ``hint`` (as :func:`checked` reads types)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple):  # JSON has lists only
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(fits(v, item) for v in value)
    if origin is dict or hint is dict:
        args = typing.get_args(hint)
        return isinstance(value, dict) and (not args or all(fits(v, args[1]) for v in value.values()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a type this does not check (a nested dataclass): its own reader checks it


def _describe(hint) -> str:
    if hint is None or hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if typing.get_origin(hint) is dict and typing.get_args(hint):
        return f"an object of {_describe(typing.get_args(hint)[1])} values"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}
    return names.get(typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


def _json_kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _shown(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

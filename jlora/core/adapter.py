"""The protocol every adapter kind (LoRA, IA3, DoRA, ...) implements, the kind registry, and the adapter tree.

An adapter tree is a nested dict that mirrors the parameter tree's paths down to each targeted
weight, where it holds one :class:`Adapter` (a pytree whose array fields train). ``merge``,
``adapt``, the optimizer and checkpoints all go through this protocol, never through the kind.

A kind registers itself by subclassing with a name, ``class LoRA(Adapter, name="lora")``; the CLI's
``--method`` choices, checkpoints and PEFT interop find it in :data:`KINDS` by that name once its
module is imported (``jlora.kinds`` imports the bundled kinds).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import paths, stacking

#: Every adapter kind by its name, filled by the kinds as their modules are imported (``jlora.kinds``
#: imports the bundled ones; the ``jlora`` face imports it before any public name).
KINDS: dict[str, type[Adapter]] = {}


class Adapter(stacking.Stackable, abc.ABC):
    """Base class of adapter kinds. Subclasses are frozen dataclasses registered as pytrees
    (``jax.tree_util.register_dataclass``), whose data fields are arrays and meta fields static.

    A kind must say how to make its adapters for a parameter tree (``create``), how it changes its
    weight W0 (``merge``/``unmerge``) and which weight shape it fits (``kernel_shape``). It may also
    give a factored form for uses of W0 that ``jlora.adapt`` recognises (see ``jlora.transform``);
    without one, ``adapt`` uses the merged weight.
    """

    #: The kind's name (``--method`` on the command line, ``kind`` in a checkpoint).
    name: ClassVar[str]
    #: Keywords of :meth:`create` a command line may set (``targets``, ``rank``, ...).
    init_options: ClassVar[tuple[str, ...]] = ("targets",)
    #: Array fields that travel with the adapter (checkpoints, ``unmerge``) but never train: the
    #: optimizer leaves them unchanged and ``count_params`` counts them as frozen.
    frozen_fields: ClassVar[tuple[str, ...]] = ()
    #: Array fields LoRA+ trains at ``lora_plus_ratio`` times the learning rate (LoRA's B).
    lora_plus_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, *, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        known = KINDS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"adapter kind name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        cls.name = name
        KINDS[name] = cls

    @classmethod
    @abc.abstractmethod
    def create(cls, params, **options) -> dict:
        """An adapter tree of this kind for ``params`` (the kind's ``init`` function)."""

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

    stacked_what = "adapters"
    stacked_agree = "kind, shape or static settings"

    @property
    def stacked_layers(self) -> int:
        return self.stack_axes

    def stacked_meta(self, layers: int) -> dict:
        """Static fields after ``layers`` adapters like this one are stacked on a new leading axis
        (``layers=-1``: after that axis is removed). A kind whose static fields hold the weight's
        shape overrides it."""
        return {"stack_axes": self.stack_axes + (1 if layers > 0 else -1)}

    @property
    def rank(self) -> int | None:
        """The rank of the update, for kinds that have one; ``None`` (the default) for those without."""
        return None

    def with_rank(self, rank: int) -> Adapter:
        """This adapter, its rank padded with zeros to ``rank`` and computing the same function: what
        ``jlora.stack`` holds so adapters of different ranks share one shape. Kinds without a rank
        (the default) return it unchanged."""
        return self

    def card_facts(self, use_rslora: bool | None = None) -> dict:
        """What a model card states of this adapter's settings (``rank``, ``alpha``, ``use_rslora`` for
        kinds with them; ``use_rslora`` given: alpha as that scaling rule states it); empty by default."""
        return {}

    #: For ``jlora.stack``'s error when adapters of one kind differ in static fields: what they must share.
    stack_hint: ClassVar[str] = ""

    @classmethod
    def upgrade(cls, static: dict, arrays: dict) -> dict:
        """The static fields of a description (:func:`describe`) written by an older jlora, as this
        version's fields: what a kind that renamed or replaced a field overrides. ``arrays`` gives each
        array field's ``[shape, dtype]``. The default returns ``static`` unchanged."""
        return static

    def identity(self, w: jax.Array) -> Adapter | None:
        """An adapter of this kind and shape that leaves ``w`` exactly unchanged: what an example with
        adapter id ``-1`` (base only) runs with in ``jlora.adapt(fn)(..., adapter_ids=ids)``;
        ``None`` (the default) makes such ids an error for this kind."""
        return None

    def check(self, path: str, w) -> None:
        """Raises ValueError when this adapter does not fit the weight ``w`` at ``path``."""
        if tuple(w.shape) != self.kernel_shape:
            raise ValueError(
                f"adapter at {path!r} is for a weight of shape {self.kernel_shape}, "
                f"but the params have shape {tuple(w.shape)} there"
            )


def kind(name: str) -> type[Adapter]:
    """The adapter kind registered as ``name``; ValueError naming the known ones otherwise."""
    if name not in KINDS:
        raise ValueError(f"unknown adapter kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


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


# ---- stacked layers (``nn.scan``) ----


def stack(adapters: list[Adapter], path: str = "") -> Adapter:
    """One adapter holding ``adapters`` (one per layer, same kind and settings) along a new leading
    axis, as ``nn.scan`` stacks the layers' weights (``jlora.core.stacking.stack``).

    Example:
      >>> layer = {'q_proj': {'kernel': jnp.ones((16, 32))}}
      >>> stacked = stack([jlora.init(layer, rank=4)['q_proj']['kernel']] * 3)
      >>> stacked.a.shape, stacked.stack_axes
      ((3, 16, 4), 1)
    """
    return stacking.stack(adapters, path)


#: The per-layer adapters of one stacked along its leading axis (inverse of :func:`stack`).
unstack = stacking.unstack


# ---- an adapter tree as plain data (checkpoint metadata) and back ----


def _arrays(adapter: Adapter) -> dict[str, Any]:
    """The adapter's array fields by name: what its pytree flattens to."""
    flat, _ = jax.tree_util.tree_flatten_with_path(adapter)
    return {paths.key_name(keypath[0]): leaf for keypath, leaf in flat}


def plain_static(value):
    """A static field's value as JSON holds it (tuples as lists, numpy scalars as numbers)."""
    if isinstance(value, (tuple, list)):
        return [plain_static(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def frozen_static(value):
    """JSON's lists back to the tuples static fields hold (they must hash)."""
    return tuple(frozen_static(v) for v in value) if isinstance(value, list) else value


def describe(adapters) -> dict[str, dict]:
    """``{path: {'kind', 'static', 'arrays'}}``: each adapter's kind name, static fields and array
    shapes and dtypes, as JSON-ready data from which :func:`abstract` rebuilds the tree's structure.

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> described = describe(jlora.init(params, rank=4))
      >>> described['attn/query/kernel']['kind'], described['attn/query/kernel']['arrays']['a']
      ('lora', [[16, 4], 'float32'])
    """
    out = {}
    for path, adapter in table(adapters).items():
        arrays = _arrays(adapter)
        static = {f.name: plain_static(getattr(adapter, f.name)) for f in dataclasses.fields(adapter) if f.name not in arrays}
        shapes = {field: [list(x.shape), str(x.dtype)] for field, x in arrays.items()}
        out[path] = {"kind": adapter.name, "static": static, "arrays": shapes}
    return out


def upgraded(description: dict[str, dict]) -> dict[str, dict]:
    """A :func:`describe` result written by an older jlora, with each kind's static fields as this
    version names them (``Adapter.upgrade``); entries of kinds not registered here are left as they are."""
    out = {}
    for path, entry in description.items():
        cls = KINDS.get(entry.get("kind"))
        out[path] = entry if cls is None else {**entry, "static": cls.upgrade(entry["static"], entry["arrays"])}
    return out


def abstract(description: dict[str, dict]) -> dict:
    """The adapter tree :func:`describe` described, with ``jax.ShapeDtypeStruct`` for its arrays:
    a template to restore saved adapters into.

    Raises:
      ValueError: a kind is not registered in this jlora (the path and known kinds are named).

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> template = abstract(describe(jlora.init(params, rank=4)))
      >>> template['attn']['query']['kernel'].b
      ShapeDtypeStruct(shape=(4, 32), dtype=float32)
    """
    adapters = {}
    for path, entry in description.items():
        try:
            cls = kind(entry["kind"])
        except ValueError as error:
            raise ValueError(f"adapter at {path!r}: {error}") from None
        arrays = {f: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for f, (shape, dtype) in entry["arrays"].items()}
        static = {f: frozen_static(v) for f, v in cls.upgrade(entry["static"], entry["arrays"]).items()}
        adapters[path] = cls(**static, **arrays)
    return paths.nest(adapters)


# ---- helpers the kinds share ----


def as_f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# Below this, dividing a factor out of a merged weight loses the weight (and 0 cannot be divided).
MIN_INVERTIBLE = 1e-6


def refuse_near_zero(values, what: str) -> None:
    """Raises ValueError naming the first entry of ``values`` with ``|v| < MIN_INVERTIBLE`` (skipped
    under tracing, where the values are not known)."""
    if isinstance(values, jax.core.Tracer):
        return
    magnitudes = np.abs(np.asarray(values, np.float64))
    if magnitudes.size and magnitudes.min() < MIN_INVERTIBLE:
        index = np.unravel_index(np.argmin(magnitudes), magnitudes.shape)
        value = float(np.asarray(values)[index])
        raise ValueError(
            f"cannot unmerge: {what} entry {tuple(int(i) for i in index)} is {value:.3g}; dividing by a "
            f"value with |v| < {MIN_INVERTIBLE:g} cannot recover the weight; keep the params from before the merge"
        )


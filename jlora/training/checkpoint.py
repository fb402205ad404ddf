"""Adapter-only checkpoints with orbax: adapters, optimizer state, step, rng and metadata.

The base model is never written: a checkpoint holds what trains, so its size follows the adapters.
Restoring means loading the base, then the adapters (the paper's workflow). A checkpoint describes
its own adapters (each path's kind, static fields, shapes and dtypes, ``jlora.adapter.describe``)
and its training settings, so it restores with no template and no options; the metadata also names
the base (a fingerprint of its weights), so a checkpoint from another base is refused. orbax writes
each step to a temporary directory and renames it when complete, so a crash or Ctrl-C mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora.core import adapter, paths
from jlora.core.errors import CheckpointError
from jlora import kinds  # noqa: F401 - registers the bundled kinds, which restoring a checkpoint looks up by name
from jlora.training import step as train
from jlora.core.partition import Trainable, trainable_base_paths
from jlora import __version__


class DamagedCheckpoint(CheckpointError):
    """A checkpoint step's files cannot be read (truncated, deleted, corrupted)."""


def base_fingerprint(params) -> str:
    """A short hash of the base's paths, shapes, dtypes and first values of every weight."""
    digest = hashlib.sha256()
    for path, leaf in paths.leaves(params):
        digest.update(f"{path}:{tuple(leaf.shape)}:{leaf.dtype};".encode())
        for array in jax.tree.leaves(leaf):  # a quantised weight: its codes and scales
            digest.update(np.asarray(jax.device_get(array.reshape(-1)[:8]), np.float32).tobytes())
    return digest.hexdigest()[:16]


def dir_bytes(directory) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def writable_dir(directory) -> Path:
    """Creates ``directory`` if needed; raises CheckpointError when it cannot be written."""
    directory = Path(directory).expanduser().resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create output directory {directory}: {error.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f"output directory {directory} is not writable")
    return directory


class Checkpointer:
    """Saves and restores :class:`jlora.train.TrainState` under ``directory/<step>``.

    Example:
      >>> import tempfile
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> frozen, trainable = jlora.split(params, jlora.init(params, rank=4))
      >>> state = train.init_state(trainable, train.TrainConfig())
      >>> ckpt = Checkpointer(Path(tempfile.mkdtemp()) / "checkpoints")
      >>> ckpt.save(state, {"base": base_fingerprint(params)}).name
      '0'
      >>> restored, metadata = ckpt.restore(expect={"base": base_fingerprint(params)})  # no template needed
      >>> metadata["step"], restored.trainable.adapters['attn']['query']['kernel'].a.shape
      (0, (16, 4))
    """

    def __init__(self, directory, *, max_to_keep: int = 3):
        self.directory = writable_dir(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
        # Each step holds each array once: all arrays in one atomic OCDBT transaction (one b-tree
        # version), one chunk per array. orbax's StandardSave caps the bytes in flight, which commits
        # every array as its own OCDBT version, each rewriting the whole b-tree node (so a slow host
        # kept dozens of dead copies in ocdbt.process_0/d), and its replica-parallel chunks of
        # <= 1 KiB were inlined in that node and copied again into the merged one in d/.
        arrays = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
            (np.ndarray, ocp.type_handlers.NumpyHandler()),
            (np.number, ocp.type_handlers.ScalarHandler()),
            (int, ocp.type_handlers.ScalarHandler()),
            (float, ocp.type_handlers.ScalarHandler()),
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler(
            handler_impl=ocp.BasePyTreeCheckpointHandler(type_handler_registry=arrays)))
        registry.add("state", ocp.args.StandardRestore)
        registry.add("meta", ocp.args.JsonSave)
        registry.add("meta", ocp.args.JsonRestore)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes the checkpoint of ``step`` (``jlora.fit`` drops a best checkpoint a fresh run replaces)."""
        self.manager.delete(step)

    def save(self, state, metadata: dict | None = None, *, step: int | None = None) -> Path:
        """Writes ``state`` (any tree :func:`describe_tree` describes: a :class:`jlora.train.TrainState`,
        adapters alone, a dict of adapters and an optax state...) as step ``step`` (default
        ``state.step``), with ``metadata`` plus what describes it: the step, jlora's version, the
        state's structure (:func:`describe_tree`, so it restores with no template) and, for a
        :class:`jlora.Trainable`, its adapters (:func:`describe_trainable`)."""
        if step is None:
            if not hasattr(state, "step"):
                raise ValueError(f"saving a {type(state).__name__} without a .step in {self.directory}: pass step=N")
            step = state.step
        step = int(step)
        metadata = {**(metadata or {}), "step": step, "jlora_version": __version__, "structure": describe_tree(state)}
        if isinstance(getattr(state, "trainable", None), Trainable):
            metadata["trainable"] = describe_trainable(state.trainable)
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(metadata)), force=True
        )
        self.manager.wait_until_finished()
        if step not in self.manager.all_steps():
            raise CheckpointError(f"saving step {step} in {self.directory} did not complete")
        return self.directory / str(step)

    def metadata(self, step: int | None = None) -> dict:
        step = self._step(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as error:  # orbax and tensorstore raise many types for missing or broken files
            raise DamagedCheckpoint(f"cannot read the metadata of {self.directory / str(step)}: {_reason(error)}") from None

    def restore(self, abstract_state=None, step: int | None = None, expect: dict | None = None, base=None):
        """Returns ``(state, metadata)`` of ``step`` (default: the latest complete one).

        Args:
          abstract_state: the state's structure, e.g. ``jax.eval_shape`` of a fresh one; its
            shardings, if any, place the restored arrays. ``None``: the structure the checkpoint
            describes (:func:`saved_structure`).
          expect: metadata entries the checkpoint must match (e.g. ``base``).
          base: the base params; needed only for a checkpoint of jlora 0.1, which did not describe
            its adapters (they are rebuilt from its options).

        Raises:
          CheckpointError: no such step, ``expect`` differs, or the template's adapters differ from
            the saved ones (each differing path named with both shapes).
          DamagedCheckpoint: the step's files cannot be read.
        """
        step = self._step(step)
        metadata = self.metadata(step)
        where = self.directory / str(step)
        for key, wanted in (expect or {}).items():
            found = metadata.get(key)
            if found != wanted:
                raise CheckpointError(f"checkpoint {where} was made with {key}={found}, but this run has {key}={wanted}")
        saved = abstract_tree(metadata["structure"], where) if "structure" in metadata else None
        if abstract_state is None:
            abstract_state = saved if saved is not None else saved_structure(metadata, base, where)
        elif "trainable" in metadata and isinstance(getattr(abstract_state, "trainable", None), Trainable):
            _refuse_other_adapters(describe_trainable(abstract_state.trainable)["adapters"],
                                   adapter.upgraded(metadata["trainable"]["adapters"]), where)
        if saved is not None:  # a template that does not fit is no damage: say where it differs
            _refuse_misfit(abstract_state, saved, where)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as error:
            raise DamagedCheckpoint(f"cannot restore {where}: {_reason(error)}") from None
        return restored["state"], metadata

    def newest_intact(self, abstract_state=None, expect: dict | None = None, base=None):
        """:meth:`restore` of the newest step that restores, touching no file: a damaged newer step is
        skipped and reported.

        Returns:
          ``(state, metadata, damaged)``, ``damaged`` ``{step: "<path>: <reason>"}`` of the steps skipped.

        Raises:
          CheckpointError: no step restores (every one's reason is listed), or one does not fit
            (``expect``, other adapters): that is no damage, so no older step is tried.
        """
        damaged = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, metadata = self.restore(abstract_state, step, expect, base)
            except DamagedCheckpoint as error:
                damaged[step] = str(error)
                continue
            return state, metadata, damaged
        raise CheckpointError(f"no checkpoint in {self.directory} restores" + "".join(f"\n  {d}" for d in damaged.values()))

    def set_aside(self, step: int) -> Path:
        """Moves a damaged step to ``<step>.damaged`` (its files kept), so a new save of that step can be made."""
        aside = self.directory / f"{step}.damaged"
        if jax.process_index() == 0:  # on shared storage one process moves it; the others skip it too
            (self.directory / str(step)).rename(aside)
        self.manager.reload()
        return aside

    def restore_intact(self, abstract_state=None, expect: dict | None = None, base=None):
        """:meth:`newest_intact`, each damaged newer step then moved aside (:meth:`set_aside`) and reported.

        Returns:
          ``(state, metadata, damaged)``, ``damaged`` a list of ``"<path>: <reason> (moved to <aside>)"``.
        """
        try:
            state, metadata, damaged = self.newest_intact(abstract_state, expect, base)
        finally:
            self.manager.reload()
        return state, metadata, [f"{reason} (moved to {self.set_aside(step)})" for step, reason in damaged.items()]

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"no complete checkpoint{'' if step is None else f' for step {step}'} in {self.directory}")
        return step


def describe_tree(tree):
    """The structure of a state to save, as JSON: dicts, lists, tuples, None, NamedTuples (optax's
    states: by class, ``"module:qualname"``), adapters (:func:`jlora.adapter.describe`) and arrays
    (``[shape, dtype]``), so that :func:`abstract_tree` rebuilds it with no template.

    Example:
      >>> import optax
      >>> described = describe_tree(optax.adam(1e-3).init({"w": jnp.ones(3)}))
      >>> described["tuple"][0]["namedtuple"], described["tuple"][0]["fields"]["mu"]
      ('optax._src.transform:ScaleByAdamState', {'dict': {'w': {'array': [[3], 'float32']}}})
    """
    if tree is None:
        return None
    if adapter.is_adapter(tree):  # its static fields, and its array fields as subtrees (an optax state holds masks there)
        children = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda node: node is not tree)[0]
        fields = {paths.key_name(keypath[0]): describe_tree(child) for keypath, child in children}
        static = {f.name: adapter.plain_static(getattr(tree, f.name)) for f in dataclasses.fields(tree) if f.name not in fields}
        return {"adapter": tree.name, "static": static, "fields": fields}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        cls = type(tree)
        return {"namedtuple": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {name: describe_tree(value) for name, value in zip(tree._fields, tree)}}
    if isinstance(tree, dict):
        if not all(isinstance(key, str) for key in tree):
            raise TypeError(f"a checkpoint's dicts need string keys; got {sorted(map(repr, tree))[:3]}")
        return {"dict": {key: describe_tree(value) for key, value in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"list" if isinstance(tree, list) else "tuple": [describe_tree(value) for value in tree]}
    if hasattr(tree, "shape") and hasattr(tree, "dtype") or isinstance(tree, (int, float, np.number)):
        array = np.asarray(tree) if not hasattr(tree, "dtype") else tree
        return {"array": [list(array.shape), str(array.dtype)]}
    raise TypeError(f"a checkpoint holds arrays, dicts, lists, tuples, NamedTuples and adapters; got a "
                    f"{type(tree).__name__}: register it as a NamedTuple or save its arrays in a dict")


def abstract_tree(described, where="the checkpoint"):
    """The state :func:`describe_tree` described, its arrays ``jax.ShapeDtypeStruct``: a template to
    restore into.

    Raises:
      CheckpointError: a class it names cannot be found (the class and what to import are named).
    """
    if described is None:
        return None
    form = next(key for key in ("array", "adapter", "dict", "list", "tuple", "namedtuple") if key in described)
    value = described[form]
    if form == "array":
        return jax.ShapeDtypeStruct(tuple(value[0]), jax.numpy.dtype(value[1]))
    if form == "adapter":
        try:
            cls = adapter.kind(value)
        except ValueError as error:
            raise CheckpointError(f"{where}: {error}") from None
        static = {name: adapter.frozen_static(v) for name, v in described["static"].items()}
        return cls(**static, **{name: abstract_tree(v, where) for name, v in described["fields"].items()})
    if form == "dict":
        return {key: abstract_tree(v, where) for key, v in value.items()}
    if form in ("list", "tuple"):
        items = [abstract_tree(v, where) for v in value]
        return items if form == "list" else tuple(items)
    cls = _named_class(value, where)
    return cls(**{name: abstract_tree(v, where) for name, v in described["fields"].items()})


def _named_class(name: str, where):
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)  # only a module already imported: restoring runs no import a file names
    found = module
    for part in qualname.split(".") if module is not None else ():
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, tuple) and hasattr(found, "_fields")):
        raise CheckpointError(f"{where} holds a {qualname} of module {module_name}, which this program has not "
                              f"imported; import {module_name} before restoring (or pass a template)")
    return found


def describe_trainable(trainable: Trainable) -> dict:
    """JSON-ready description of a :class:`jlora.Trainable`: its adapters (``jlora.adapter.describe``)
    and the shapes and dtypes of the base leaves that train."""
    base = {p: [list(x.shape), str(x.dtype)] for p, x in paths.leaves(trainable.base)}
    return {"adapters": adapter.describe(trainable.adapters), "base": base}


def saved_structure(metadata: dict, base=None, where="the checkpoint") -> train.TrainState:
    """The abstract :class:`jlora.train.TrainState` a checkpoint's metadata describes (arrays as
    ``jax.ShapeDtypeStruct``), to restore it into with no options.

    A checkpoint of jlora 0.1 names its adapter kind and ``init`` options instead; its adapters are
    rebuilt from them on ``base`` (the base params), which must then be given.
    """
    described = metadata.get("trainable") or _rebuilt(metadata, base, where)
    try:
        adapters = adapter.abstract(described["adapters"])
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
    trained_base = paths.nest({p: jax.ShapeDtypeStruct(tuple(shape), dtype) for p, (shape, dtype) in described["base"].items()})
    config = train.TrainConfig(**metadata.get("train", {}))
    return jax.eval_shape(lambda t: train.init_state(t, config), Trainable(adapters, trained_base))


def _rebuilt(metadata: dict, base, where) -> dict:
    """:func:`describe_trainable` of a jlora 0.1 checkpoint, from its adapter kind and ``init`` options."""
    saved = metadata.get("adapter") or {}
    if "method" not in saved or "options" not in saved:
        raise CheckpointError(f"{where} describes neither its adapters nor the options that made them; "
                              "it was not written by jlora's Checkpointer")
    if base is None:
        raise CheckpointError(f"{where} was written by jlora {metadata.get('jlora_version', '0.1')} and does not "
                              "describe its adapters; pass the base params (base=...) to rebuild them from its options")
    options = dict(saved["options"])
    if isinstance(options.get("targets"), str) and "," in options["targets"]:  # the 0.1 CLI's "q_proj,v_proj"
        options["targets"] = options["targets"].split(",")
    adapters = adapter.kind(saved["method"]).create(base, **options)
    unfrozen = set(trainable_base_paths(base, adapters, saved.get("bias", "none")))
    trained_base = paths.nest({p: w for p, w in paths.leaves(base) if p in unfrozen})
    return describe_trainable(Trainable(adapters, trained_base))


def _reason(error: Exception) -> str:
    """The first line of an orbax/tensorstore error, which can run to pages."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _refuse_other_adapters(template: dict, saved: dict, where) -> None:
    differing = [p for p in sorted(set(template) | set(saved)) if template.get(p) != saved.get(p)]
    if differing:
        shown = "; ".join(f"{p}: saved {_brief(saved.get(p))}, template {_brief(template.get(p))}" for p in differing[:3])
        raise CheckpointError(
            f"{where} holds other adapters than the template at {len(differing)} path(s): {shown}"
            + ("; ..." if len(differing) > 3 else "")
        )


def _refuse_misfit(template, saved, where) -> None:
    """CheckpointError naming the first leaves where ``template`` and the saved structure differ."""
    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}

    ours, theirs = shapes(template), shapes(saved)
    differing = [p for p in sorted(set(ours) | set(theirs)) if ours.get(p) != theirs.get(p)]
    if differing:
        shown = "; ".join(f"{p}: saved {theirs.get(p, 'nothing')}, template {ours.get(p, 'nothing')}" for p in differing[:3])
        raise CheckpointError(f"{where} does not fit the template at {len(differing)} leaf(s): {shown}"
                              + ("; ..." if len(differing) > 3 else ""))
    if jax.tree.structure(template) != jax.tree.structure(saved):
        raise CheckpointError(f"{where} holds the template's arrays in other containers: saved "
                              f"{str(jax.tree.structure(saved))[:200]}, template {str(jax.tree.structure(template))[:200]}")


def _brief(entry: dict | None) -> str:
    if entry is None:
        return "none"
    arrays = ", ".join(f"{f} {tuple(shape)}" for f, (shape, _) in entry["arrays"].items())
    return f"{entry['kind']} ({arrays})"

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

import hashlib
import os
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

    def save(self, state, metadata: dict | None = None) -> Path:
        """Writes ``state`` as step ``state.step``, with ``metadata`` plus what describes it: the
        step, jlora's version and, for a :class:`jlora.Trainable`, its structure (:func:`describe_trainable`)."""
        step = int(state.step)
        metadata = {**(metadata or {}), "step": step, "jlora_version": __version__}
        if isinstance(state.trainable, Trainable):
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
        if abstract_state is None:
            abstract_state = saved_structure(metadata, base, where)
        elif "trainable" in metadata and isinstance(getattr(abstract_state, "trainable", None), Trainable):
            _refuse_other_adapters(describe_trainable(abstract_state.trainable)["adapters"],
                                   adapter.upgraded(metadata["trainable"]["adapters"]), where)
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


def _brief(entry: dict | None) -> str:
    if entry is None:
        return "none"
    arrays = ", ".join(f"{f} {tuple(shape)}" for f, (shape, _) in entry["arrays"].items())
    return f"{entry['kind']} ({arrays})"

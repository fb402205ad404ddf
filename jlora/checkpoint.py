"""Adapter-only checkpoints with orbax: adapters, optimizer state, step, rng and metadata.

The base model is never written: a checkpoint holds what trains, so its size follows the adapters.
Restoring means loading the base, then the adapters (the paper's workflow); the metadata names the
base (a fingerprint of its weights), so a checkpoint from another base or rank is refused. orbax
writes each step to a temporary directory and renames it when complete, so a crash or Ctrl-C
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

import jlora
from jlora import paths


class CheckpointError(ValueError):
    """A checkpoint is missing, or does not fit the base model or settings it is restored into."""


def base_fingerprint(params) -> str:
    """A short hash of the base's paths, shapes, dtypes and first values of every weight."""
    digest = hashlib.sha256()
    for path, leaf in paths.leaves(params):
        head = np.asarray(jax.device_get(leaf.reshape(-1)[:8]), np.float32)
        digest.update(f"{path}:{tuple(leaf.shape)}:{leaf.dtype};".encode())
        digest.update(head.tobytes())
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
      >>> ckpt = Checkpointer(out / "checkpoints")
      >>> ckpt.save(state, metadata)
      >>> state, metadata = ckpt.restore(jax.eval_shape(lambda: state), expect=metadata)
    """

    def __init__(self, directory, *, max_to_keep: int = 3):
        self.directory = writable_dir(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, metadata: dict) -> Path:
        step = int(state.step)
        metadata = {**metadata, "step": step, "jlora_version": jlora.__version__}
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)), force=True
        )
        self.manager.wait_until_finished()
        return self.directory / str(step)

    def metadata(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state, step: int | None = None, expect: dict | None = None):
        """Returns ``(state, metadata)`` of ``step`` (default: the latest complete one).

        Args:
          abstract_state: the state's structure, e.g. ``jax.eval_shape`` of a fresh one; its
            shardings, if any, place the restored arrays.
          expect: metadata entries the checkpoint must match (e.g. ``base``, ``adapter``).
        """
        step = self._step(step)
        metadata = self.metadata(step)
        for key, wanted in (expect or {}).items():
            found = metadata.get(key)
            if found != wanted:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} was made with {key}={found}, "
                    f"but this run has {key}={wanted}"
                )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"], metadata

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"no complete checkpoint{'' if step is None else f' for step {step}'} in {self.directory}")
        return step

"""Where the step's arrays live: a ``(data, fsdp)`` mesh over every device of every process, the
batch split over it, the base replicated or split over the FSDP groups (:func:`shard_fsdp`), and
adapters split like the base weight they adapt (:func:`shard_state`). On several hosts call
:func:`jlora.training.distributed.initialize` first; the mesh then spans ``jax.devices()`` of all
of them and each host feeds only its own rows of the batch (:func:`shard_batch`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jlora.core import paths

DATA, FSDP = "data", "fsdp"

# ---- devices ----
#
# Every placement builds each process's own shards from its host copy (jax.make_array_from_callback,
# jax.make_array_from_process_local_data): no process sends another anything. jax.device_put of
# host data onto a mesh that spans processes would all-gather the whole value to check that every
# process passed the same one: the whole base at startup, the batch at every step.


def mesh(devices=None, *, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over all (or the given) devices, of every process.

    The batch is split over both axes. :func:`shard_fsdp` splits the base over the ``fsdp`` axis
    when it is longer than 1 (groups of ``fsdp`` devices, replicated across groups), else over
    every device.

    Args:
      devices: the devices, ordered by process (default ``jax.devices()``, through ``jax.make_mesh``).
      fsdp: devices per group that shares one copy of the base.

    Example:
      >>> dict(mesh(jax.devices()[:8], fsdp=2).shape)
      {'data': 4, 'fsdp': 2}
    """
    count = len(jax.devices()) if devices is None else len(devices)
    if isinstance(fsdp, bool) or not isinstance(fsdp, (int, np.integer)) or fsdp < 1 or count % fsdp:
        raise ValueError(f"fsdp must be a positive divisor of the {count} devices, got {fsdp!r}")
    shape, names = (count // fsdp, fsdp), (DATA, FSDP)
    if devices is None:
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * 2)
    return Mesh(np.asarray(devices).reshape(shape), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over every device of ``mesh``."""
    return NamedSharding(mesh, P(_axes(_split_axes(mesh))))


def place(x, sharding: NamedSharding):
    """``x`` (a host or single-process array) as a global array of ``sharding``; each process
    builds only its own devices' shards, so nothing crosses processes. An array already spread
    over processes is resharded by XLA."""
    if not hasattr(x, "shape"):
        return x
    if jax.process_count() == 1:  # nothing to check against: device to device, with no host copy
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding == sharding else jax.jit(lambda y: y, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` whole on every device of ``mesh``."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: place(x, sharding), tree)


def fsdp_spec(shape, mesh: Mesh) -> P:
    """Splits the largest axis divisible by the FSDP group (:func:`mesh`) over it; P() if none is."""
    axes = _fsdp_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    divisible = [a for a in np.argsort(shape, kind="stable")[::-1] if shape[a] % n == 0]
    spec = [None] * len(shape)
    if divisible and n > 1:
        spec[divisible[0]] = _axes(axes)
    return P(*spec)


def shard_fsdp(tree, mesh: Mesh):
    """Splits each leaf along its largest axis divisible by the FSDP group (else replicates)."""
    return jax.tree.map(lambda x: place(x, NamedSharding(mesh, fsdp_spec(x.shape, mesh))) if hasattr(x, "shape") else x,
                        tree)


def shard_state(state, frozen, mesh: Mesh):
    """``state`` on ``mesh``, each adapter array (and its optimizer moments) split like the base
    weight it adapts, along the axes it shares with it (LoRA's B along an output axis split in the
    base, A along an input axis); the rest replicated. With a replicated base that is all of it.

    Args:
      state: a :class:`TrainState` (or any tree whose leaf paths end in its trainable's paths).
      frozen: the base as placed on ``mesh`` (:func:`replicate` or :func:`shard_fsdp`).
      mesh: from :func:`mesh`.
    """
    base = {path: leaf for path, leaf in paths.leaves(frozen) if isinstance(leaf, jax.Array)}
    specs = {}
    for path, leaf in paths.leaves(getattr(state, "trainable", state)):
        # "adapters" is the Trainable field that holds the adapter tree (its other field, "base", holds
        # trained base leaves), not a kind: an adapter array at adapters/<weight path>/<field> follows <weight path>.
        field, _, rest = path.partition("/")
        weight = base.get(rest.rsplit("/", 1)[0]) if field == "adapters" else None
        specs[path] = (leaf.shape, P() if weight is None else _follow(leaf.shape, weight.shape, weight.sharding.spec))

    def place_leaf(path, x):
        parts = path.split("/")
        for i in range(len(parts)):
            shape, spec = specs.get("/".join(parts[i:]), (None, None))
            if shape == getattr(x, "shape", None):
                return place(x, NamedSharding(mesh, spec))
        return place(x, NamedSharding(mesh, P()))

    return paths.map_with_path(place_leaf, state)


def shard_batch(rows: dict, mesh: Mesh) -> dict:
    """This process's rows of a global batch (all of it on one process) as global arrays split
    over every device of ``mesh``; :func:`jlora.distributed.process_rows` says which rows to pass.

    Raises:
      ValueError: the rows do not split evenly over this process's devices of the mesh.
    """
    sharding = batch_sharding(mesh)
    local = len(sharding.addressable_devices)
    count = next(iter(rows.values())).shape[0]
    if count % local:
        where = "" if jax.process_count() == 1 else f"process {jax.process_index()}'s "
        raise ValueError(f"{where}batch of {count} rows cannot be split over {local} devices; use a multiple of {local}")
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in rows.items()}


def _follow(shape, weight_shape, weight_spec) -> P:
    """The spec of an adapter array of ``shape`` that follows a weight of ``weight_shape`` split by
    ``weight_spec``: a split weight axis carries over where the array has the same axes up to it
    (from the front: ``(*in, r)`` against ``(*in, *out)``) or from it on (from the back: ``(r, *out)``)."""
    spec = [None] * len(shape)
    for k, name in enumerate(tuple(weight_spec) + (None,) * (len(weight_shape) - len(weight_spec))):
        if name is None:
            continue
        j = k - len(weight_shape) + len(shape)
        if len(shape) > k and tuple(shape[: k + 1]) == tuple(weight_shape[: k + 1]):
            spec[k] = name
        elif j >= 0 and tuple(shape[j:]) == tuple(weight_shape[k:]):
            spec[j] = name
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _fsdp_axes(mesh: Mesh) -> tuple[str, ...]:
    return (FSDP,) if mesh.shape.get(FSDP, 1) > 1 else _split_axes(mesh)


def _split_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's axes longer than 1 (or its first): a spec naming a size-1 axis places the same,
    but differs from the one XLA gives the step's outputs, which would then compile again."""
    return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or tuple(mesh.axis_names[:1])


def _axes(names):
    return names[0] if len(names) == 1 else tuple(names)

"""Several processes, one job: joining JAX's multi-controller runtime, and what each process feeds.

On a TPU pod slice or a GPU cluster every host runs the same program. After
:func:`initialize`, ``jax.devices()`` lists the devices of all hosts, one mesh spans them, and a
global ``jax.Array`` holds on each host only the shards of that host's devices. Each host then
reads only its rows of every global batch (:func:`process_rows`), only process 0 writes what
there is one of (:func:`is_writer`: logs, plots, exports), and all take part in every jitted
step and every orbax save.

    jlora.distributed.initialize()           # from the environment, or a no-op on one host
    mesh = jlora.train.mesh()                # all devices of all hosts
    rows = jlora.distributed.process_rows(batch_size, jlora.train.batch_sharding(mesh))
    batch = jlora.train.shard_batch(jlora.data.batch_at(dataset, batch_size, seed, k, rows=rows), mesh)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Sharding

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def _cluster_types() -> list:
    """JAX's cluster environments, in the order its auto-detection tries them; empty if a JAX release
    moved them. The one private JAX name jlora reads: JAX has no public list of its cluster
    environments (``tests/test_distributed.py`` checks that this still finds them)."""
    try:
        from jax._src import clusters
    except ImportError:
        return []
    return list(getattr(clusters.ClusterEnv, "_cluster_types", []))


def detected_cluster() -> str | None:
    """The cluster JAX's auto-detection finds (``"SlurmCluster"``, ``"OmpiCluster"``,
    ``"K8sCluster"``, ``"GceTpuCluster"``, ...), or None; opt-in methods (mpi4py) are not tried."""
    for env in _cluster_types():
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.__name__
        except Exception:  # a detector that cannot run here (no metadata server, no kubernetes package)
            continue
    return None


def settings(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
             environ: Mapping[str, str] | None = None) -> dict:
    """The ``jax.distributed.initialize`` arguments: those given, else ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; the ones still None are left to auto-detection.

    Raises:
      ValueError: a variable is not a non-negative integer, or the process id is not below the count.

    Example:
      >>> settings(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
      {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
    """
    environ = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    found = {}
    for name, value in given.items():
        if value is None and environ.get(ENV[name]):
            value = environ[ENV[name]]
            if name != "coordinator":
                if not value.strip().isdigit():
                    raise ValueError(f"{ENV[name]}={value!r} is not a non-negative integer")
                value = int(value)
        found[name] = value
    count, index = found["num_processes"], found["process_id"]
    if count is not None and count < 1:
        raise ValueError(f"the number of processes must be >= 1, got {count}")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"process id {index} is out of range for {count} processes (0 to {count - 1})")
    return {"coordinator_address": found["coordinator"], "num_processes": count, "process_id": index}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, join: bool | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Joins the multi-process job when one is asked for: ``join``, any argument given,
    ``JAX_COORDINATOR_ADDRESS`` set, or a cluster JAX detects (:func:`detected_cluster`). Call it
    before any other JAX call; a second call is a no-op.

    Args:
      coordinator: ``host:port`` of process 0's coordinator service.
      num_processes: the number of processes (hosts, or one per GPU).
      process_id: this process's index, ``0 <= process_id < num_processes``.
      join: True: join even if nothing else asks for it (JAX's auto-detection must then find the
        job); False: stay a lone process whatever the environment says; None: decide as above.
      environ: where the ``JAX_*`` variables are read (default ``os.environ``).

    Returns:
      True when this process is (now) part of a multi-process job runtime, False on a lone host.

    Raises:
      RuntimeError: JAX already ran a computation in this process, or the join failed (named with
        its settings).
    """
    if jax.distributed.is_initialized():
        return True
    if join is False:
        return False
    environ = os.environ if environ is None else environ
    options = settings(coordinator, num_processes, process_id, environ)
    asked = join or any(v is not None for v in (coordinator, num_processes, process_id))
    if not (asked or options["coordinator_address"] or detected_cluster()):
        return False
    shown = ", ".join(f"{k}={v}" for k, v in options.items() if v is not None) or "auto-detection"
    try:
        jax.distributed.initialize(**options)
    except Exception as error:
        if "must be called before" in str(error):  # JAX's own refusal once its backends are up
            raise RuntimeError("jlora.distributed.initialize() must run before any other JAX call "
                               "(a computation already started JAX on this process alone)") from error
        raise RuntimeError(f"joining the multi-process job ({shown}) failed: {error}") from error
    return True


def is_writer() -> bool:
    """Whether this process writes what a job has one of (progress, history, plots, exports): process 0."""
    return jax.process_index() == 0


def process_rows(global_rows: int, sharding: Sharding) -> slice:
    """The rows of a ``[global_rows, ...]`` batch placed with ``sharding`` that this process's
    devices hold: the rows it reads and passes to :func:`jlora.train.shard_batch`.

    Raises:
      ValueError: this process's rows are not one contiguous run (a mesh whose device order
        interleaves processes).

    Example:
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> process_rows(16, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))  # one process
      slice(0, 16, None)
    """
    indices = sharding.addressable_devices_indices_map((global_rows,)).values()
    starts = sorted({index[0].indices(global_rows)[:2] for index in indices})
    for (_, stop), (start, _) in zip(starts, starts[1:]):
        if start != stop:
            raise ValueError(f"process {jax.process_index()} holds rows {starts} of the batch, not one contiguous run; "
                             "order the mesh's devices by process (jax.make_mesh does)")
    return slice(starts[0][0], starts[-1][1])


def fetch(tree):
    """Every leaf of ``tree`` as a whole numpy array on every process. Leaves sharded across
    processes are all-gathered, a collective: every process must call it with the same tree.

    Example:
      >>> fetch({"b": jnp.arange(3.0)})
      {'b': array([0., 1., 2.], dtype=float32)}
    """
    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x

    return jax.tree.map(whole, tree)

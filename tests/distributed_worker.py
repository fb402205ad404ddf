"""One process of a training job that tests/test_distributed.py runs as 1 process of 4 devices or
2 processes of 2: a tiny GPT-2 with LoRA, data-parallel, FSDP over every device and FSDP in groups
of 2, each 4 steps with a save after step 2 and a restore that the last 2 steps continue from.

    python tests/distributed_worker.py OUT PROCESS_ID NUM_PROCESSES PORT

Process 0 writes OUT/result_<NUM_PROCESSES>.json: per mode the losses, the validation perplexity,
the adapters (as lists), the cross-process gathers counted during setup and during the steps, and
the collective ops in the compiled step.
"""

import json
import re
import sys
from pathlib import Path

import jax

out, process_id, num_processes, port = Path(sys.argv[1]), *map(int, sys.argv[2:])

import jlora  # noqa: E402  (after jax, before any computation)
from jlora.training import checkpoint, data, distributed  # noqa: E402
from jlora.core import paths
from jlora import training as train

if num_processes > 1:
    distributed.initialize(f"localhost:{port}", num_processes, process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from jlora.models.gpt2 import GPT2, GPT2Config  # noqa: E402

gathers = {"count": 0}
allgather = multihost_utils.process_allgather


def counted(*args, **kwargs):  # jax.device_put of host data onto a cross-process sharding calls this
    gathers["count"] += 1
    return allgather(*args, **kwargs)


multihost_utils.process_allgather = counted

MODES = {"data_parallel": dict(fsdp=None), "fsdp": dict(fsdp=1), "fsdp_groups_of_2": dict(fsdp=2)}
BATCH, SEQ, STEPS, SAVE_AT = 8, 16, 4, 2

model = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
rng = np.random.default_rng(0)
stream = rng.integers(0, 64, (44, SEQ + 1)).astype(np.int32)
rows = lambda s: data.Dataset(s[:, :-1], s[:, 1:], np.ones((len(s), SEQ), np.float32))
train_set, valid_set = rows(stream[:32]), rows(stream[32:])  # 12 validation rows: the last batch is padded
params = model.init(jax.random.key(0), train_set.tokens[:1])
config = train.TrainConfig(max_steps=STEPS, warmup_steps=0, batch_size=BATCH, learning_rate=1e-2)


def collectives(compiled_text: str) -> dict:
    ops = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
    return {op: len(re.findall(rf"= \S+ {op}(-start)?\(", compiled_text)) for op in ops}


def run(name, fsdp):
    mesh = train.mesh(fsdp=fsdp or 1)
    gathers["count"] = 0
    frozen, trainable = jlora.split(params, jlora.init(params, rank=4, targets=["c_attn", "c_fc"]))
    frozen = train.replicate(frozen, mesh) if fsdp is None else train.shard_fsdp(frozen, mesh)
    state = train.shard_state(train.init_state(trainable, config), frozen, mesh)
    feed = distributed.process_rows(BATCH, train.batch_sharding(mesh))
    batch_at = lambda k: train.shard_batch(data.batch_at(train_set, BATCH, config.seed, k, rows=feed), mesh)
    setup_gathers = gathers["count"]
    step = train.make_step(model.apply, config)
    first = step.lower(state, frozen, batch_at(0)).compile()  # step 0 runs it: one compile, and its HLO
    hlo = collectives(first.as_text())
    ckpt = checkpoint.Checkpointer(out / f"{name}_{num_processes}", max_to_keep=2)
    losses, step_gathers = [], 0
    for k in range(STEPS):
        if k == SAVE_AT:
            saved = distributed.fetch(state.trainable)
            ckpt.save(state)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            del state
            state, _ = ckpt.restore(abstract)
            restored = distributed.fetch(state.trainable)
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)))
        before = gathers["count"]
        state, metrics = (first if k == 0 else step)(state, frozen, batch_at(k))
        losses.append(float(metrics["loss"]))
        step_gathers += gathers["count"] - before
    params_now, adapters = jlora.combine(frozen, state.trainable)
    perplexity = train.perplexity(train.make_eval(model.apply), params_now, adapters, valid_set, BATCH, mesh=mesh)
    placed = {path: str(x.sharding.spec) for path, x in paths.leaves(state.trainable.adapters)
              if isinstance(x.sharding, NamedSharding)}
    trained = {path: np.asarray(x).tolist() for path, x in paths.leaves(distributed.fetch(state.trainable.adapters))}
    return {"losses": losses, "valid_perplexity": perplexity, "adapters": trained, "setup_gathers": setup_gathers,
            "step_gathers": step_gathers, "step_collectives": hlo, "adapter_specs": placed,
            "base_spec": str(frozen["params"]["h_0"]["mlp"]["c_fc"]["kernel"].sharding.spec)}


result = {"processes": jax.process_count(), "devices": jax.device_count(), "local_devices": jax.local_device_count()}
gathers["count"] = 0  # the control: jax.device_put of host data onto a sharding across processes checks it by a gather
jax.device_put(np.zeros((4, 2)), train.batch_sharding(train.mesh()))
result["device_put_gathers"] = gathers["count"]
result |= {name: run(name, **options) for name, options in MODES.items()}
if distributed.is_writer():
    (out / f"result_{num_processes}.json").write_text(json.dumps(result))

"""Several processes as one job: joining it, each process's rows, placement that follows the base,
and 2 local processes (gloo CPU collectives, 2 devices each) training like 1 process of 4 devices."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora.training import data, distributed
from jlora.core import paths
from jlora import training as train
from jlora.models.gpt2 import GPT2, GPT2Config
from helpers import tiny_llama_dir

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 900  # seconds for a whole job (ample on a loaded 2-core host): a hung collective fails, CI goes on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def job_env(devices: int, **extra) -> dict:
    """The environment of one process of a job: CPU only, ``devices`` simulated devices, this jlora."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra}
    return env


def launch(*jobs):
    """Starts every ``(argv, env)`` at once and waits for all; on a timeout or a failure kills the
    rest and fails with each process's last output lines."""
    procs = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv, env in jobs]
    outputs, deadline = [], time.monotonic() + TIMEOUT
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a process ran past {TIMEOUT} s (a hung collective?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [(p.returncode, out) for p, out in zip(procs, outputs) if p.returncode != 0]
    assert not failed, "\n\n".join(f"exit {rc}:\n" + "\n".join(out.splitlines()[-25:]) for rc, out in failed)
    return outputs


# ---- joining a job ----


def test_settings_come_from_arguments_then_environment():
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(environ=environ) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                     "process_id": 3}
    assert distributed.settings("h:1", 2, 0, environ=environ) == {"coordinator_address": "h:1", "num_processes": 2,
                                                                  "process_id": 0}
    assert distributed.settings(environ={}) == {"coordinator_address": None, "num_processes": None, "process_id": None}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not a non-negative integer"):
        distributed.settings(environ={"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match=r"process id 2 is out of range for 2 processes \(0 to 1\)"):
        distributed.settings(environ={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="the number of processes must be >= 1, got 0"):
        distributed.settings(num_processes=0, environ={})


def test_jaxs_cluster_environments_are_still_found():
    # The one private JAX name jlora reads (jax._src.clusters): a JAX release that moves it fails here.
    names = [env.__name__ for env in distributed._cluster_types()]
    assert {"SlurmCluster", "OmpiCluster", "K8sCluster", "GceTpuCluster"} <= set(names)


def test_a_lone_process_does_not_join_and_a_late_join_is_refused():
    assert distributed.initialize(environ={}) is (distributed.detected_cluster() is not None)
    jax.devices()  # JAX is running in this process
    with pytest.raises(RuntimeError, match=r"must run before any other JAX call"):
        distributed.initialize("localhost:1", 2, 0, environ={})


def test_the_finetune_flags_reach_the_join_and_bad_ones_are_one_line_errors(tmp_path, capsys):
    from jlora import cli

    args = cli.parser().parse_args(["finetune", "--distributed", "--coordinator", "h:1", "--num-processes", "2",
                                    "--process-id", "1", "--fsdp", "2"])
    assert (args.distributed, args.coordinator, args.num_processes, args.process_id, args.fsdp) == (True, "h:1", 2, 1, 2)
    assert cli.parser().parse_args(["finetune", "--fsdp"]).fsdp == 0  # every device
    assert cli.parser().parse_args(["finetune", "--no-distributed"]).distributed is False
    assert distributed.initialize(join=False, environ={"JAX_COORDINATOR_ADDRESS": "h:1"}) is False
    out = str(tmp_path / "run")
    assert cli.main(["finetune", "--num-processes", "2", "--process-id", "2", "--out", out]) == 2
    assert "jlora finetune: error: process id 2 is out of range for 2 processes (0 to 1)" in capsys.readouterr().err
    jax.devices()
    assert cli.main(["finetune", "--distributed", "--coordinator", "localhost:1", "--num-processes", "2",
                     "--process-id", "0", "--out", out]) == 2
    assert "must run before any other JAX call" in capsys.readouterr().err


# ---- rows and placement ----


def test_each_process_reads_its_rows_of_the_same_batch():
    dataset = data.Dataset(*(np.arange(40, dtype=np.int32).reshape(10, 4),) * 2, np.ones((10, 4), np.float32))
    whole = data.batch_at(dataset, 4, seed=3, step=5)
    part = data.batch_at(dataset, 4, seed=3, step=5, rows=slice(2, 4))
    np.testing.assert_array_equal(part["tokens"], whole["tokens"][2:4])
    assert distributed.process_rows(16, train.batch_sharding(train.mesh())) == slice(0, 16)  # one process: all


@pytest.mark.devices(8)
def test_adapters_and_their_moments_follow_the_base_weight():
    model = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))
    params = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), params)
    frozen, trainable = jlora.split(params, jlora.init(params, rank=4, targets=["c_attn", "c_fc"]))
    mesh = train.mesh(fsdp=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    frozen = train.shard_fsdp(frozen, mesh)
    state = train.shard_state(train.init_state(trainable, train.TrainConfig()), frozen, mesh)
    kernel = frozen["params"]["h_0"]["mlp"]["c_fc"]["kernel"]  # (32, 128): the output axis is split
    assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (32, 64)
    lora = state.trainable.adapters["params"]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert lora.a.sharding.spec == P() and lora.b.sharding.spec == P(None, "fsdp")
    specs = {path: leaf.sharding.spec for path, leaf in paths.leaves(state.opt_state)}
    moments = [spec for path, spec in specs.items() if path.endswith("mlp/c_fc/kernel/b")]
    assert moments == [P(None, "fsdp")] * 2  # Adam's mu and nu
    assert state.step.sharding == NamedSharding(mesh, P())
    tokens = np.arange(8 * 9).reshape(8, 9) % 64
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 8), np.float32)}
    step = train.make_step(model.apply, train.TrainConfig(batch_size=8))
    for _ in range(2):  # the step gives its state back placed as it came: it compiles once
        state, _ = step(state, frozen, train.shard_batch(batch, mesh))
    assert step._cache_size() == 1
    assert state.trainable.adapters["params"]["h_0"]["mlp"]["c_fc"]["kernel"].b.sharding.spec == P(None, "fsdp")
    with pytest.raises(ValueError, match="fsdp must be a positive divisor of the 8 devices, got 3"):
        train.mesh(fsdp=3)


# ---- 2 processes train like 1 ----


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """The worker as 1 process of 4 devices and as 2 processes of 2, at once; their results."""
    out = tmp_path_factory.mktemp("jobs")
    port = free_port()
    launch(([sys.executable, str(WORKER), str(out), "0", "1", "0"], job_env(4)),
           *(([sys.executable, str(WORKER), str(out), str(i), "2", str(port)], job_env(2)) for i in range(2)))
    return [json.loads((out / f"result_{n}.json").read_text()) for n in (1, 2)]


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["data_parallel", "fsdp", "fsdp_groups_of_2"])
def test_two_processes_train_and_restore_like_one(two_jobs, mode):
    one, two = two_jobs
    assert (one["processes"], one["devices"], two["processes"], two["devices"], two["local_devices"]) == (1, 4, 2, 4, 2)
    one, two = one[mode], two[mode]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-5)  # steps 3-4 run from a restore
    assert set(two["adapters"]) == set(one["adapters"]) and len(one["adapters"]) == 8
    for path in one["adapters"]:
        np.testing.assert_allclose(two["adapters"][path], one["adapters"][path], rtol=0, atol=1e-5, err_msg=path)
    assert any(np.any(b) for p, b in one["adapters"].items() if p.endswith("/b"))  # training moved B off zero
    np.testing.assert_allclose(np.log(two["valid_perplexity"]), np.log(one["valid_perplexity"]), rtol=0, atol=1e-5)
    assert two["base_spec"] == one["base_spec"] == {"data_parallel": "P()", "fsdp": "P(None, 'data')",
                                                    "fsdp_groups_of_2": "P(None, 'fsdp')"}[mode]


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["data_parallel", "fsdp", "fsdp_groups_of_2"])
def test_no_process_gathers_from_another_beyond_the_steps_collectives(two_jobs, mode):
    two = two_jobs[1]
    assert two["device_put_gathers"] == 1  # the counter sees jax.device_put's check of host data
    assert (two[mode]["setup_gathers"], two[mode]["step_gathers"]) == (0, 0)
    collectives = two[mode]["step_collectives"]
    assert collectives["reduce-scatter"] == collectives["collective-permute"] == collectives["all-to-all"] == 0
    assert collectives["all-reduce"] >= 1  # the gradients
    if mode == "data_parallel":
        assert collectives["all-gather"] == 0
    else:  # FSDP gathers the split weights in the step, the same on 1 process as on 2
        assert collectives["all-gather"] == two_jobs[0][mode]["step_collectives"]["all-gather"] > 0


# ---- the command as 2 processes ----


@pytest.mark.subprocess
def test_finetune_as_two_processes_is_one_job_with_one_set_of_outputs(tmp_path):
    base = tiny_llama_dir(tmp_path / "base")
    text = tmp_path / "play.txt"
    text.write_text("".join(f"ROMEO {i}: what light through yonder window breaks? It is the east.\n" for i in range(60)))
    argv = [sys.executable, "-m", "jlora.cli", "finetune", "--base", base, "--data", text, "--valid-fraction", "0.1",
            "--seq-len", "16", "--batch-size", "8", "--max-steps", "3", "--save-every", "2", "--warmup", "1",
            "--eval-batches", "2", "--sample-tokens", "0", "--fsdp", "--lr", "1e-2", "--merged", "float32"]
    port = free_port()
    job = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    one, *two = launch(([*map(str, argv), "--out", str(tmp_path / "one")], job_env(4)),
                       *(([*map(str, argv), "--out", str(tmp_path / "two")], job_env(2, **job, JAX_PROCESS_ID=str(i)))
                         for i in range(2)))
    report = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (report["processes"], report["devices"]) == (2, 4)
    assert json.loads((tmp_path / "one" / "run.json").read_text())["processes"] == 1
    # One writer: process 0 reports; process 1 trains silently (no progress, no evaluation, no summary).
    assert "step 3/3" in two[0] and "merged export:" in two[0] and "validation perplexity after" in two[0]
    assert not any(word in two[1] for word in ("step 3/3", "merged export:", "trainable params", "validation perplexity"))
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2, 3, 3]  # once each: evaluation, 3 steps, evaluation
    expected = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    for got, want in zip(history, expected):
        for key in ("loss", "valid_perplexity"):
            if key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"step {want['step']} {key}")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    from jlora import models

    merged = {n: models.load(str(tmp_path / n / "merged"))[1] for n in ("one", "two")}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), merged["two"], merged["one"])
    base_params = models.load(str(base))[1]
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(merged["two"]), jax.tree.leaves(base_params))]
    assert sum(changed) == 4  # the default LoRA targets, q_proj and v_proj of 2 layers, merged in

"""experiments/bench_peft.py at --quick size: every configuration of both models timed and measured in both
frameworks, beside the host's facts and a same-run matmul to measure efficiency against."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = [pytest.mark.interop, pytest.mark.subprocess]

SCRIPT = Path(__file__).parent.parent / "experiments" / "bench_peft.py"
CONFIGS = ["lora_c_attn", "lora_all", "full_finetune", "forward"]
SMOLLM2_CONFIGS = ["lora_qv", "lora_all", "forward"]


def run(*flags):
    # One CPU device, as the benchmark runs outside pytest (conftest asks XLA for eight).
    xla_flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = {**os.environ, "XLA_FLAGS": xla_flags}
    return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, env=env, timeout=300)


def check_efficiency(report):
    """Every step carries its FLOPs, GFLOP/s and fraction of its framework's same-run matmul."""
    assert report["host"]["cpu"] and report["host"]["usable_cores"] >= 1 and "jax" in report["host"]
    assert isinstance(report["host"]["isa"], list)
    peak = report["matmul_peak"]
    for side in ("xla", "torch"):
        assert peak[side]["gflops_per_s"] > 0 and len(peak[side]["times_s"]) == 1
    for result in report["results"].values():
        for framework, side in (("jlora", "xla"), ("peft", "torch")):
            r = result[framework]
            assert r["gflop"] == result["jlora"]["gflops"] > 0
            assert r["gflops_per_s"] == pytest.approx(r["gflop"] / r["median_s"])
            assert r["matmul_fraction"] == pytest.approx(r["gflops_per_s"] / peak[side]["gflops_per_s"])


def test_quick_run_reports_every_configuration_for_both_frameworks(tmp_path):
    # One torch thread: on a busy machine two OpenMP threads on two shared cores crawl.
    out = run("--quick", "--model=gpt2", "--reps=1", "--torch-threads=1", f"--json={tmp_path / 'bench.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["config"]["layers"] == 2 and report["config"]["d"] == 128 and report["config"]["vocab"] == 1000
    assert list(report["results"]) == CONFIGS
    for name, result in report["results"].items():
        jlora, peft = result["jlora"], result["peft"]
        for side in (jlora, peft):
            assert len(side["times_s"]) == 1 and side["median_s"] > 0 and side["memory_mb"] > 0
        assert jlora["trainable_params"] == peft["trainable_params"]
        assert result["ratio_jlora_over_peft"] == pytest.approx(jlora["median_s"] / peft["median_s"])
    assert report["environment"]["torch_threads"] == 1
    # r=8 on c_attn (128 -> 384) in 2 layers: 2 * 8 * (128 + 384); all four linear layers add
    # c_proj (128 -> 128), c_fc (128 -> 512) and mlp.c_proj (512 -> 128).
    assert report["results"]["lora_c_attn"]["peft"]["trainable_params"] == 2 * 8 * (128 + 384)
    assert report["results"]["lora_all"]["peft"]["trainable_params"] == 2 * 8 * (128 + 384 + 256 + 640 + 640)
    assert report["target"]["met"] == {"lora_c_attn": None, "lora_all": None}  # no verdict off the size
    check_efficiency(report)
    assert not (tmp_path / "bench_smollm2.json").exists()


def test_quick_smollm2_run_reports_llama_shapes_with_peft_on_the_same_projections(tmp_path):
    out = run("--quick", "--model=smollm2", "--reps=1", "--torch-threads=1", f"--json={tmp_path / 'bench.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SmolLM2 (Llama)" in out.stdout and "of mm" in out.stdout
    report = json.loads((tmp_path / "bench_smollm2.json").read_text())
    assert report["model"] == "smollm2" and list(report["results"]) == SMOLLM2_CONFIGS
    assert report["config"]["kv_heads"] == 2 and report["config"]["ffn"] == 256
    for result in report["results"].values():
        assert result["jlora"]["trainable_params"] == result["peft"]["trainable_params"]
    # r=8 on q_proj (128 -> 128) and v_proj (128 -> 2 kv heads of 32 = 64) in 2 layers.
    assert report["results"]["lora_qv"]["peft"]["trainable_params"] == 2 * 8 * ((128 + 128) + (128 + 64))
    check_efficiency(report)


def test_gpu_mode_without_cuda_says_so_and_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run("--gpu", f"--json={tmp_path / 'bench.json'}")
    assert out.returncode == 2
    assert "--gpu:" in out.stderr and "CUDA" in out.stderr
    assert not (tmp_path / "bench.json").exists()

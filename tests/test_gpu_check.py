"""experiments/gpu_check.sh --dry-run: the GPU check's throughput script runs on CPU at tiny sizes, so it cannot rot."""

import json
import math
import os
import subprocess
import sys

import pytest
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "experiments" / "gpu_check.sh"


@pytest.mark.subprocess
def test_dry_run_reports_tokens_per_second_and_mfu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}  # the interpreter running the tests
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("gpu_check dry run: ok")
    throughput = json.loads((tmp_path / "gpu_throughput_dry.json").read_text())
    assert throughput["dry_run"] and [r["model"] for r in throughput["rows"]] == ["smollm2-135m", "llama-1b-shape"]
    for row in throughput["rows"]:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and math.isfinite(row["loss"])
        assert (row["batch"], row["seq"]) == (2, 32)
    assert not (tmp_path / "bench_peft_dry.json").exists()  # tests/test_bench_peft.py runs that path

#!/usr/bin/env bash
# One check of jlora on one NVIDIA GPU, under 8 minutes: tokens/s and MFU of LoRA on SmolLM2-135M
# and a 1B-shaped Llama (random weights; bf16, scanned layers, full remat, chunked loss), then
# jlora against PyTorch + PEFT on the same GPU (experiments/bench_peft.py --gpu).
#
#   experiments/gpu_check.sh              # on the GPU machine; results in experiments/results/
#   experiments/gpu_check.sh --dry-run    # the throughput script on CPU at tiny sizes, in seconds (CI)
#   experiments/gpu_check.sh --dry-run --with-peft   # and bench_peft at a tiny size (minutes: torch subprocesses)
#
# OUT (default experiments/results) is where the JSON files go; PYTHON (default python) runs the scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/results}"
python="${PYTHON:-python}"
mkdir -p "$out"

if [[ "${1:-}" == "--dry-run" ]]; then
  export JAX_PLATFORMS=cpu
  # One CPU device, as outside pytest.
  flags="${XLA_FLAGS:-}"
  export XLA_FLAGS="${flags//--xla_force_host_platform_device_count=8/}"
  "$python" experiments/gpu_throughput.py --dry-run --json "$out/gpu_throughput_dry.json"
  # bench_peft's CPU path is already run by tests/test_bench_peft.py; --with-peft runs it here too.
  if [[ "${2:-}" == "--with-peft" ]]; then
    "$python" experiments/bench_peft.py --quick --reps=1 --layers=1 --d=32 --heads=2 --vocab=100 --seq=16 \
      --torch-threads=1 --json "$out/bench_peft_dry.json" | tail -n 8
  fi
  echo "gpu_check dry run: ok"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 300 "$python" experiments/gpu_throughput.py --json "$out/gpu_throughput.json"
timeout 200 "$python" experiments/bench_peft.py --gpu --reps=5 --json "$out/bench_peft_gpu.json"

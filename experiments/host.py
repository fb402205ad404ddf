"""What a benchmark figure depends on: the host's facts and the dense-matmul speed measured in the same run.

A step's seconds mean little on another machine; its achieved GFLOP/s as a fraction of what a plain
dense matmul reaches on the same host, in the same run, travels. `facts()` is the host (CPU model, the
ISA flags XLA's and oneDNN's kernels depend on, cores, versions); `matmul_peak()` times jitted f32
matmuls (XLA) and `torch.matmul` (torch, at the benchmark's thread count) at model-like shapes.

    python experiments/host.py          # print both
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# The flags that choose the matmul kernels: AVX2/FMA (Zen 3, Haswell on), AVX-512 (Zen 4, Skylake-SP on),
# bf16 and AMX (Sapphire Rapids on).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
# [tokens, d] x [d, ffn] of SmolLM2-135M at batch 4x128, GPT-2 small's c_fc, and a big square one.
MATMUL_SHAPES = ((512, 576, 1536), (512, 768, 3072), (2048, 2048, 2048))


def cpu_count() -> int:
    """The cores this process may run on: what XLA's CPU thread pool is sized to."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_info() -> dict:
    """The CPU's model name and which of ISA_FLAGS it has, from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"cpu": name, "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def jlora_commit() -> str | None:
    """The jlora checkout's commit, with ``+dirty`` when jlora/ has uncommitted changes."""
    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jlora"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def versions() -> dict:
    """Versions of what the figures depend on; a package that is not installed is left out."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "torch", "transformers", "peft"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def facts() -> dict:
    """The host as a JSON-ready dict: CPU, ISA flags, cores (machine and usable), load, versions, commit."""
    return {**cpu_info(), "cores": os.cpu_count(), "usable_cores": cpu_count(), "load_average": os.getloadavg(),
            "platform": platform.platform(), **versions(), "jlora_commit": jlora_commit()}


def describe(host: dict) -> str:
    """One line for a benchmark's printout."""
    isa = "+".join(host["isa"]) or "no AVX2"
    return (f"{host['cpu']} ({isa}), {host['usable_cores']} of {host['cores']} cores, load {host['load_average'][0]:.2f}; "
            f"JAX {host.get('jax')}, torch {host.get('torch', '-')}, jlora {host['jlora_commit']}")


def _best_seconds(run, reps: int, min_seconds: float) -> float:
    """The fastest of `reps` timed calls (and at least `min_seconds` of calls): the matmul's speed when the
    host lets it run, so other processes' noise lowers the peak less than it lowers a long step."""
    run()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < reps or spent < min_seconds:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best


def matmul_peak(shapes=MATMUL_SHAPES, torch_threads: int | None = None, reps: int = 10,
                min_seconds: float = 0.5) -> dict:
    """GFLOP/s of a float32 dense matmul [m, k] x [k, n], best of `reps`, in XLA (jitted) and torch.

    Returns `{"xla": {"512x576x1536": GFLOP/s, ...}, "torch": {...}, "xla_best": max, "torch_best": max}`;
    torch is left out when it is not installed. `torch_threads`: torch.set_num_threads for the run
    (restored after), default whatever torch uses now.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    out: dict = {"xla": {}}
    inputs = {s: (rng.standard_normal(s[:2], np.float32), rng.standard_normal(s[1:], np.float32)) for s in shapes}
    matmul = jax.jit(jnp.matmul)
    for (m, k, n), (a, b) in inputs.items():
        a, b = jnp.asarray(a), jnp.asarray(b)
        seconds = _best_seconds(lambda: matmul(a, b).block_until_ready(), reps, min_seconds)
        out["xla"][f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
    out["xla_best"] = max(out["xla"].values())
    try:
        import torch
    except ImportError:
        return out
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads or before)
    out["torch_threads"] = torch.get_num_threads()
    out["torch"] = {}
    try:
        for (m, k, n), (a, b) in inputs.items():
            a, b = torch.from_numpy(a), torch.from_numpy(b)
            seconds = _best_seconds(lambda: torch.matmul(a, b), reps, min_seconds)
            out["torch"][f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
    finally:
        torch.set_num_threads(before)
    out["torch_best"] = max(out["torch"].values())
    return out


def describe_peak(peak: dict) -> str:
    sides = [f"{side} " + ", ".join(f"{shape} {gflops:.0f}" for shape, gflops in peak[side].items())
             for side in ("xla", "torch") if side in peak]
    return "dense f32 matmul GFLOP/s in this run: " + "; ".join(sides)


if __name__ == "__main__":
    import jax

    jax.config.update("jax_platforms", "cpu")
    host, peak = facts(), matmul_peak()
    print(describe(host))
    print(describe_peak(peak))
    if "--json" in sys.argv:
        print(json.dumps({"host": host, "matmul_peak": peak}, indent=2))

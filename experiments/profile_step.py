"""Where the SmolLM2 LoRA step's time goes: XLA's CPU ops from a jax.profiler trace, grouped by kind.

Builds bench_peft's SmolLM2-135M shapes (random weights; LoRA r=8 on q_proj, v_proj; batch 4x128;
AdamW), traces `--steps` steps and sums each compiled op's time (both threads: CPU time) into
groups: the layers' weight matmuls, the tied head's two matmuls, attention's batched dots, the
rank-8 adapter dots, and each kind of elementwise fusion (norms, RoPE, softmax, layout copies, loss).
A group's share of the time beside its share of the FLOPs (from the shapes printed) says which part
runs below the matmul speed. Shares are ratios within one run, so they travel better than the
seconds; a busy host still skews them.

    python experiments/profile_step.py               # 30 layers
    python experiments/profile_step.py --layers 4    # the head's share grows
    python experiments/profile_step.py --reps 7      # then bench_peft's matmul_fraction, without PEFT
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from bench_adapt import call_args, compile_runner, make_steps, time_alternating  # noqa: E402
from bench_peft import MATMUL_REPEAT  # noqa: E402
import host  # noqa: E402

import jlora  # noqa: E402
from jlora.models.llama import Llama, LlamaConfig  # noqa: E402


def op_groups(hlo: str) -> dict:
    """`{op name: group}` for the top-level ops of a compiled module's text."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
    shapes = {}
    for body in bodies.values():
        shapes.update(re.findall(r"%?([\w.\-]+) = (\w+\[[\d,]*\])", body))
    groups = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* (\w[\w-]*)\((.*)$", hlo, re.M):
        name, out, kind, rest = m.groups()
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        dot = re.search(r"= (\w+\[[\d,]*\])\S* (?:dot|convolution)\((.*?)\)", body) or (
            (out, rest) if kind == "dot" else None)
        if dot:
            out_shape, operands = dot if isinstance(dot, tuple) else dot.groups()
            ins = [shapes.get(o, "?") for o in re.findall(r"%?([\w.\-]+)", operands)]
            groups[name] = "dot " + out_shape + " <- " + ", ".join(ins)
        else:
            groups[name] = "elementwise " + name.rstrip("0123456789.")
    return groups


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--reps", type=int, default=0,
                        help="then time this many rounds of the step alternating with bench_peft's yardstick "
                             "(XLA float32 matmuls 512x576x1536) and print its matmul_fraction (default: none)")
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    model = Llama(config)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 49152, (4, 128), dtype=np.int32))
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    adapters = jlora.init(params, rank=8, alpha=8, targets=["q_proj", "v_proj"])
    fn, state, n_state = make_steps(model, params, adapters, optax.adamw(1e-4))["lora_factored"]
    extra = call_args("lora_factored", params, tokens)
    groups = op_groups(fn.lower(*state(), *extra).compile().as_text())
    stats, run = compile_runner(fn, state, n_state, extra)
    run()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                run()
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
        seconds, calls = collections.Counter(), collections.Counter()
        for plane in profile.planes:
            for line in plane.lines:
                if "XLAEigen" not in line.name:  # XLA's CPU worker threads
                    continue
                for event in line.events:
                    if event.name in groups:
                        seconds[groups[event.name]] += event.duration_ns / 1e9 / args.steps
                        calls[groups[event.name]] += 1

    total = sum(seconds.values())
    print(f"SmolLM2 shapes, {args.layers} layers, LoRA r=8 q_proj/v_proj, batch 4x128: {stats['gflops']:.1f} GFLOP "
          f"(XLA); op time summed over threads {total:.2f} s a step")
    print("host: " + host.describe(host.facts()))
    kinds = collections.Counter()
    for group, s in seconds.items():
        kinds[group.split(" ")[0] if not group.startswith("dot") else
              "dot: head" if "49152" in group else
              "dot: adapter (r=8)" if re.search(r"\[(\d+,)*8\]|,8\]", group) else
              "dot: attention (batched)" if group.count(",") > 6 else "dot: layer weights"] += s
    for kind, s in kinds.most_common():
        print(f"  {kind:28s} {s:7.2f} s {s / total:6.1%}")
    print(f"top {args.top} groups (per step; calls over {args.steps} steps):")
    for group, s in seconds.most_common(args.top):
        print(f"  {s * 1e3:8.1f} ms {s / total:6.1%} x{calls[group]:<4d} {group}")

    if args.reps:
        matmul_fraction(stats, run, args.reps)


def matmul_fraction(stats, run, reps):
    """bench_peft's jlora figure for this step, timed the same way, without building PEFT's side."""
    m, k, n = 4 * 128, 576, 1536  # [batch*seq, d] x [d, ffn], as bench_peft's matmul_runs
    rng = np.random.default_rng(0)
    a, b = jnp.asarray(rng.standard_normal((m, k), np.float32)), jnp.asarray(rng.standard_normal((k, n), np.float32))
    matmul = jax.jit(jnp.matmul)

    def matmuls():
        for _ in range(MATMUL_REPEAT):
            matmul(a, b).block_until_ready()

    matmuls()
    load = os.getloadavg()[0]
    times = time_alternating({"step": run, "matmul": matmuls}, reps)
    step_s = statistics.median(times["step"])
    peak = 2 * m * k * n * MATMUL_REPEAT / statistics.median(times["matmul"]) / 1e9
    print(f"{reps} alternating rounds (load average {load:.2f} before, {os.getloadavg()[0]:.2f} after): step median "
          f"{step_s:.3f} s, {stats['gflops'] / step_s:.1f} GFLOP/s; XLA matmul {m}x{k}x{n} {peak:.1f} GFLOP/s; "
          f"matmul_fraction {stats['gflops'] / step_s / peak:.2f}")


if __name__ == "__main__":
    main()

"""Factored LoRA against merged LoRA and full fine-tuning on GPT-2-small shapes, side by side.

For each training step (loss, gradients, AdamW update) it prints XLA's FLOP count, the compiled
memory (arguments + outputs + temporaries - aliased), and the median wall time over alternating
repetitions, plus one forward pass for scale, and each step's GFLOP/s as a fraction of a float32
dense matmul [batch*seq, d] x [d, 4d] timed in the same alternating rounds (figures that travel
between hosts; experiments/host.py). Random weights: only shapes matter here.

    python experiments/bench_adapt.py                 # GPT-2 small, batch 4x128, r=8, all linear layers
    python experiments/bench_adapt.py --targets c_attn
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora.models.gpt2 import GPT2, GPT2Config

import host  # experiments/host.py: this script's directory is on sys.path

TARGETS = {"all": ["c_attn", "c_proj", "c_fc"], "c_attn": ["c_attn"]}


def loss_fn(logits, tokens):
    """Mean next-token cross-entropy over the first T - 1 positions (what PEFT's `labels=` loss is).

    The targets shift rather than the logits: `logits[:, :-1]` copied the [B, T - 1, V] logits,
    and padded their gradient back, every step. The last position's target wraps around to the first
    token and its loss is dropped.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(tokens, -1, axis=1))
    return losses[:, :-1].mean()


def make_steps(model, params, adapters, tx):
    """The four jitted programs, each with the arguments it is called with."""
    lora_tx = jlora.optimizer(tx)
    adapted = jlora.adapt(model.apply)

    def full_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply(p, tokens), tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def lora_step(apply):
        def step(adapters, opt_state, params, tokens):
            loss, grads = jax.value_and_grad(lambda a: loss_fn(apply(params, a, tokens), tokens))(adapters)
            updates, opt_state = lora_tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, loss

        return step

    merged_apply = lambda p, a, t: model.apply(jlora.merge(p, a), t)
    forward = lambda params, tokens: loss_fn(model.apply(params, tokens), tokens)
    lora_state = lora_tx.init(adapters)
    return {
        "lora_factored": (jax.jit(lora_step(adapted), donate_argnums=(0, 1)), lambda: (adapters, lora_state), 2),
        "lora_merged": (jax.jit(lora_step(merged_apply), donate_argnums=(0, 1)), lambda: (adapters, lora_state), 2),
        "full_finetune": (jax.jit(full_step, donate_argnums=(0, 1)), lambda: (params, tx.init(params)), 2),
        "forward": (jax.jit(forward), lambda: (), 0),
    }


def compiled_stats(compiled) -> dict:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    )
    return {"gflops": cost["flops"] / 1e9, "memory_mb": total / 2**20}


def call_args(name, params, tokens) -> tuple:
    """The arguments after the state that program `name` of `make_steps` takes."""
    return (tokens,) if name == "full_finetune" else (params, tokens)


def compile_runner(fn, state, n_state, extra):
    """Compiles `fn` for `(*state(), *extra)`: its `compiled_stats` plus `compile_s`, and a
    zero-argument function that runs one step to completion and keeps the state it returns."""
    start = time.perf_counter()
    compiled = fn.lower(*state(), *extra).compile()
    stats = {**compiled_stats(compiled), "compile_s": time.perf_counter() - start}
    live = list(jax.tree.map(jnp.copy, state()))  # a fresh copy: the steps donate their state

    def run():
        nonlocal live
        out = jax.block_until_ready(compiled(*live, *extra))
        if n_state:
            live = list(out[:n_state])

    return stats, run


def time_alternating(runs, reps, warmup=1) -> dict:
    """`{name: [seconds] * reps}` for zero-argument `runs`, after `warmup` untimed rounds.

    Each round calls every run once, odd rounds in reverse order, so drifts in machine load hit
    all alike and no run always follows the same neighbour.
    """
    times = {name: [] for name in runs}
    for round_ in range(warmup + reps):
        order = list(runs.items())[:: -1 if round_ % 2 else 1]
        for name, run in order:
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_adapt.json")
    args = parser.parse_args(argv)

    config = GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.d, n_layer=args.layers, n_head=args.heads)
    model = GPT2(config)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    adapters = jlora.init(params, rank=args.rank, targets=TARGETS[args.targets])
    print(jlora.count_params(params, adapters))
    steps = make_steps(model, params, adapters, optax.adamw(1e-4))

    results, runs = {}, {}
    for name, (fn, state, n_state) in steps.items():
        results[name], runs[name] = compile_runner(fn, state, n_state, call_args(name, params, tokens))
    m, k, n = args.batch * args.seq, args.d, 4 * args.d
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    matmul = jax.jit(jnp.matmul)
    repeat = 10

    def matmuls():
        for _ in range(repeat):
            matmul(a, b).block_until_ready()

    matmuls()
    host_facts = host.facts()
    for name, times in time_alternating({**runs, "matmul": matmuls}, args.reps).items():
        if name != "matmul":
            results[name]["times_s"] = times
        else:
            matmul_times = times
    peak = {"shape": f"{m}x{k}x{n}", "repeat": repeat, "times_s": matmul_times,
            "gflops_per_s": 2 * m * k * n * repeat / statistics.median(matmul_times) / 1e9}

    full, fwd = results["full_finetune"], results["forward"]
    full["median_s"] = statistics.median(full["times_s"])
    fwd["median_s"] = statistics.median(fwd["times_s"])
    print(f"\nGPT-2 shapes: {args.layers} layers, d={args.d}, vocab {args.vocab}, batch {args.batch}x{args.seq}, "
          f"r={args.rank}, targets {TARGETS[args.targets]}; {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print("host: " + host.describe(host_facts))
    print(f"same-run dense f32 matmul {peak['shape']}: {peak['gflops_per_s']:.1f} GFLOP/s (median); "
          "'of mm' = the step's GFLOP/s over it")
    print(f"{'step':<15}{'GFLOP':>9}{'xFull':>8}{'memory MB':>11}{'xFull':>8}{'median s':>10}{'xFull':>8}{'xFwd':>7}"
          f"{'GFLOP/s':>9}{'of mm':>7}")
    for name, r in results.items():
        r["median_s"] = statistics.median(r["times_s"])
        r["gflops_per_s"] = r["gflops"] / r["median_s"]
        r["matmul_fraction"] = r["gflops_per_s"] / peak["gflops_per_s"]
        print(f"{name:<15}{r['gflops']:>9.1f}{r['gflops'] / full['gflops']:>8.3f}{r['memory_mb']:>11.0f}"
              f"{r['memory_mb'] / full['memory_mb']:>8.3f}{r['median_s']:>10.3f}{r['median_s'] / full['median_s']:>8.3f}"
              f"{r['median_s'] / fwd['median_s']:>7.2f}{r['gflops_per_s']:>9.1f}{r['matmul_fraction']:>7.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "host": host_facts,
                                          "matmul_peak": peak, "results": results}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

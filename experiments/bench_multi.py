"""Many LoRA adapters in one batch against one adapter for the batch and against adapters one after another.

On SmolLM2-135M shapes (30 layers, d=576, random weights: only shapes matter), a batch of 64
sequences runs the forward pass and greedy generation (KV cache) with:

- ``one adapter``: every sequence with the same adapter (plain ``jlora.adapt``), the reference;
- ``stack, k distinct``: a stack of 64 adapters, sequences spread over k of them (``adapter_ids``),
  k = 1, 8, 64; one compiled program serves all three;
- ``one after another, k``: k runs of ``64 / k`` sequences, each with its own adapter (what a
  system without per-example adapters does).

Wall times are medians over alternating repetitions, measured side by side in one run; the ratios
are to ``one adapter``. Memory: the compiled forward's argument and temporary bytes for stacks of
1 and 64 adapters, per extra adapter, against one adapter's own bytes.

    python experiments/bench_multi.py                     # LoRA r=8 on q_proj, v_proj; 64 x 32 tokens
    python experiments/bench_multi.py --seq 16 --reps 2 --gen-prompt 4 --gen-new 4 --sequential 8 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jlora
from jlora.models import generate
from jlora.models.llama import Llama, LlamaConfig

import host  # experiments/host.py: this script's directory is on sys.path

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def random_adapters(params, n, rank, targets):
    """n LoRA adapter trees as after training (B != 0), each from its own key."""
    trees = []
    for i in range(n):
        tree = jlora.init(params, rank=rank, targets=targets, key=jax.random.key(i))
        trees.append(jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(1000 + i), x.shape), tree))
    return trees


def block(tree):
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
    return tree


def median_times(runs: dict, reps: int) -> dict:
    """Each zero-argument run, once to warm up, then ``reps`` times in alternation; median seconds."""
    if not runs:
        return {"one adapter": float("nan")}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compiled_bytes(fn, *args) -> dict:
    memory = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {"argument": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes}


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence in the forward pass")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gen-prompt", type=int, default=8)
    parser.add_argument("--gen-new", type=int, default=8)
    parser.add_argument("--sequential", type=int, nargs="+", default=[64], help="adapter counts run one after another")
    parser.add_argument("--memory-only", action="store_true", help="only the compiled memory per extra adapter")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    B, n = args.batch, args.batch

    model = Llama(SMOLLM2_135M)
    tokens = jax.random.randint(jax.random.key(0), (B, args.seq), 0, SMOLLM2_135M.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens[:1, :4])
    params = jax.tree.map(lambda x: x * 0.1 if x.ndim == 2 else x, params)  # keep activations tame
    trees = random_adapters(params, n, args.rank, args.targets)
    stacked = jlora.stack(trees)
    adapted = jlora.adapt(model.apply)
    spread = {k: jnp.arange(B) % k for k in (1, 8, 64) if k <= n}

    single = jax.jit(adapted)
    mixed = jax.jit(lambda p, s, x, ids: adapted(p, s, x, adapter_ids=ids))

    def one_after_another(k):
        rows = B // k
        return lambda: [block(single(params, trees[i], tokens[i * rows : (i + 1) * rows])) for i in range(k)]

    runs = {"one adapter": lambda: block(single(params, trees[0], tokens))} if not args.memory_only else {}
    runs |= {f"stack, {k} distinct": (lambda ids: lambda: block(mixed(params, stacked, tokens, ids)))(ids)
             for k, ids in spread.items() if not args.memory_only}
    runs |= {} if args.memory_only else {f"one after another, {k}": one_after_another(k) for k in args.sequential if k <= n}
    print("forward", flush=True)
    forward = median_times(runs, args.reps)
    tokens_per_run = B * args.seq

    # Generation: prompt + greedy new tokens over a KV cache, every sequence the same length.
    prompt = tokens[:, : args.gen_prompt]
    length = args.gen_prompt + args.gen_new

    def apply_one(v, t, cache):
        return adapted(v["params"], v["adapters"], t, cache)

    def apply_mixed(v, t, cache):
        return adapted(v["params"], v["adapters"], t, cache, adapter_ids=v["ids"])

    def gen_one(adapters, rows):
        return lambda: generate(apply_one, dict(params=params, adapters=adapters), prompt[rows],
                                model.init_cache(rows.stop - rows.start, length), max_new_tokens=args.gen_new)

    def gen_mixed(ids):
        return lambda: generate(apply_mixed, dict(params=params, adapters=stacked, ids=ids), prompt,
                                model.init_cache(B, length), max_new_tokens=args.gen_new)

    def gen_after_another(k):
        rows = B // k
        return lambda: [gen_one(trees[i], slice(i * rows, (i + 1) * rows))() for i in range(k)]

    gen_runs = {} if args.memory_only else {"one adapter": gen_one(trees[0], slice(0, B))}
    gen_runs |= {f"stack, {k} distinct": gen_mixed(ids) for k, ids in spread.items() if not args.memory_only}
    gen_runs |= {} if args.memory_only else {f"one after another, {k}": gen_after_another(k) for k in args.sequential if k <= n}
    print("generation", flush=True)
    generation = median_times(gen_runs, args.reps)
    new_tokens = B * args.gen_new

    # Memory: what a stack of n adapters costs over a stack of one, per extra adapter.
    stack_fn = lambda p, s, x, ids: adapted(p, s, x, adapter_ids=ids)
    ids0 = jnp.zeros(B, jnp.int32)
    small, large = (compiled_bytes(stack_fn, params, jlora.stack(trees[:k]), tokens, ids0) for k in (1, n))
    per_adapter = {key: (large[key] - small[key]) / (n - 1) for key in small}

    host_facts = host.facts()
    devices = f"{jax.devices()[0].platform}, {jax.device_count()} device(s)"
    print(f"SmolLM2-135M shapes, LoRA r={args.rank} on {', '.join(args.targets)}, batch {B}; {devices}; "
          f"{host.describe(host_facts)}")
    print(f"\nforward, {B} x {args.seq} tokens (median of {args.reps})")
    for name, seconds in forward.items():  # ratios to the first row, "one adapter"
        print(f"  {name:24s} {seconds:8.3f} s  {tokens_per_run / seconds:9.0f} tok/s  "
              f"{forward['one adapter'] / seconds:5.2f}x one adapter")
    print(f"\ngeneration, {B} sequences, prompt {args.gen_prompt} + {args.gen_new} new tokens (median of {args.reps})")
    for name, seconds in generation.items():
        print(f"  {name:24s} {seconds:8.3f} s  {new_tokens / seconds:9.1f} new tok/s  "
              f"{generation['one adapter'] / seconds:5.2f}x one adapter")
    print(f"\nmemory per extra adapter in the stack (compiled forward): arguments {per_adapter['argument'] / 1e6:.3f} MB, "
          f"temporaries {per_adapter['temp'] / 1e6:.3f} MB; one adapter's own bytes {tree_bytes(trees[0]) / 1e6:.3f} MB; "
          f"the base {tree_bytes(params) / 1e6:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(dict(forward=forward, generation=generation, per_adapter=per_adapter,
                                             adapter_bytes=tree_bytes(trees[0]), base_bytes=tree_bytes(params),
                                             settings=vars(args) | {"json": str(args.json)}, host=host_facts),
                                        indent=1))


if __name__ == "__main__":
    main()

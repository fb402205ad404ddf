"""Memory, FLOPs and compile time of a LoRA train step at the sizes people fine-tune, on abstract shapes.

For Llama-3.2-1B, Llama-3.1-8B and Qwen2.5-7B shapes at batch 2x2048, bf16 base, LoRA r=16 on every
linear layer, AdamW in float32 and the chunked cross entropy, it lowers and compiles the jitted train
step from `jax.ShapeDtypeStruct`s (no weight is ever allocated) and reports XLA's compiled memory
(arguments + outputs + temporaries - aliased: what the step needs resident), `cost_analysis` FLOPs and
the compile time, for remat none/dots/full with layers scanned or unrolled, beside full fine-tuning
(float32 master weights and AdamW, bf16 compute) and published figures. Then GPT-2 small in
bench_adapt's setting: LoRA with remat against full fine-tuning without, and the step-time cost of
remat measured on this machine.

    python experiments/bench_scale.py                       # PLAN's rows, depth, GPT-2 (about 20 min on 2 shared cores)
    python experiments/bench_scale.py --models llama-3.2-1b --skip-depth --skip-gpt2
    python experiments/bench_scale.py --skip-gpt2
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora import training as train
from jlora.models import layers
from jlora.models.gpt2 import GPT2, GPT2Config
from jlora.models.llama import Llama, LlamaConfig

from host import describe as describe_host, facts as host_facts  # experiments/host.py

# Sizes from each model's config.json on the Hugging Face hub, written out. Rope scaling (Llama 3)
# changes neither memory nor FLOPs, so the plain rotary embedding stands in for it.
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    # Qwen2.5 has q/k/v biases; LlamaConfig's attention_bias also gives o_proj one (3584 more per layer).
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                       attention_bias=True, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PUBLISHED = {
    "torchtune Llama 3.1 8B LoRA, one 24 GB GPU, batch 2, packed 2048 (peak)": 16.2,
    "torchtune Llama 3.1 8B QLoRA, same setting (peak)": 7.4,
}
GIB = 2**30
# Positions of the head applied at a time in the loss: [batch x 128, vocab] float32 logits, 125 MiB
# for 128k vocabularies at batch 2 (512 positions: 501 MiB, with the softmax and its gradient 1.5 GiB).
LOSS_CHUNK = 128
# Vocabulary entries at a time in each chunk's cross entropy: the head's weight is read 16k rows at a
# time, so the CPU's float32 conversion of a bf16 head is 128 MiB (at 2048 wide), not the whole 1 GiB.
VOCAB_BLOCK = 16384


def compiled_stats(compiled) -> dict:
    """Bytes the compiled program needs resident (arguments + outputs + temporaries - aliased) and its FLOPs."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
             - memory.alias_size_in_bytes)
    return {"memory_gib": total / GIB, "argument_gib": memory.argument_size_in_bytes / GIB,
            "temp_gib": memory.temp_size_in_bytes / GIB, "tflops": cost["flops"] / 1e12}


def abstract_lora_step(model, batch, seq, rank=16, targets=LINEAR, loss_chunk=None, variables=None, alpha=None):
    """`(step, args)`: the jitted LoRA train step and abstract `(state, frozen, batch)` to lower it for.
    `variables`: the base's abstract params (default: the model's own, from `model.init`'s shapes)."""
    config = train.TrainConfig(batch_size=batch, loss_chunk=loss_chunk or LOSS_CHUNK, loss_vocab_block=VOCAB_BLOCK)
    if variables is None:
        variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    stack_axes = 1 if model.scan else 0
    adapters = jax.eval_shape(lambda v: jlora.init(v, rank, alpha=alpha, targets=targets, stack_axes=stack_axes,
                                                   key=jax.random.key(1)), variables)
    frozen, trainable = jlora.split(variables, adapters)
    state = jax.eval_shape(lambda t: train.init_state(t, config), trainable)
    step = train.make_step(functools.partial(model.apply, hidden=True), config, head_fn=model.head,
                           vocab_size=model.config.vocab_size)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"tokens": tokens, "targets": tokens, "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    return step, (state, frozen, data)


def abstract_full_step(model, batch, seq, loss_chunk=None):
    """The full fine-tuning step (every weight trains, AdamW state in the params' dtype) and its abstract args."""
    tx = optax.adamw(1e-5)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    opt_state = jax.eval_shape(tx.init, params)
    loss = train.make_loss(functools.partial(model.apply, hidden=True), model.head, loss_chunk or LOSS_CHUNK,
                           VOCAB_BLOCK, model.config.vocab_size)

    def step(params, opt_state, data):
        value, grads = jax.value_and_grad(
            lambda p: loss(p, data["tokens"], data["targets"], data["loss_mask"])[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"tokens": tokens, "targets": tokens, "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    return jax.jit(step, donate_argnums=(0, 1)), (params, opt_state, data)


# XLA's CPU backend has no bf16 matmul: it converts each bf16 weight to float32 before its dot, and
# loop-invariant code motion then hoists the conversion of the whole stacked weight out of the layer
# scan, a float32 copy of the base that a GPU, with native bf16 dots, never makes. Compiling once more
# without that hoisting measures what the step itself needs (the per-dot conversion remains).
NO_HOIST = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"}


def measure(step, args) -> dict:
    """Compiled memory, FLOPs and compile time of `step(*args)`; memory also without the CPU's hoisted copies."""
    start = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile()
    stats = {**compiled_stats(compiled), "compile_s": time.perf_counter() - start}
    unhoisted = compiled_stats(lowered.compile(compiler_options=NO_HOIST))
    return stats | {"memory_gib_no_hoist": unhoisted["memory_gib"], "temp_gib_no_hoist": unhoisted["temp_gib"]}


def step_tflops(name, remat, batch, seq, attention_block=None):
    """TFLOPs of one LoRA step of the whole model. `cost_analysis` counts a scan's body once, so this
    compiles the unrolled model at 1 and 2 layers and extrapolates linearly (every layer is the same)."""
    flops = []
    for layers in (1, 2):
        step, args = abstract_lora_step(llama(name, False, remat, layers, attention_block=attention_block), batch, seq)
        flops.append(compiled_stats(step.lower(*args).compile())["tflops"])
    return flops[0] + (SHAPES[name]["num_hidden_layers"] - 1) * (flops[1] - flops[0])


def llama(name, scan, remat, layers=None, param_dtype=jnp.bfloat16, attention_block=None, mlp_block=None):
    sizes = SHAPES[name] | ({"num_hidden_layers": layers} if layers else {})
    return Llama(LlamaConfig(**sizes), dtype=jnp.bfloat16, param_dtype=param_dtype, scan=scan, remat=remat,
                 attention_block=attention_block, mlp_block=mlp_block)


# The combinations compiled by default (about 20 min on a shared 2-core CPU); --all compiles every
# remat x scan combination (the unrolled 7B/8B steps take several minutes each to compile here).
# The fourth field is the attention block (queries at a time; None: all at once), the fifth the MLP
# block (tokens at a time; None: all at once).
PLAN = [("llama-3.2-1b", True, "none", None, None), ("llama-3.2-1b", True, "dots", None, None),
        ("llama-3.2-1b", True, "full", None, None), ("llama-3.2-1b", False, "full", None, None),
        ("llama-3.2-1b", True, "full", 128, None), ("llama-3.2-1b", True, "full", 128, 256),
        ("llama-3.1-8b", True, "dots", None, None), ("llama-3.1-8b", True, "full", None, None),
        ("llama-3.1-8b", True, "full", 128, None), ("llama-3.1-8b", True, "full", 128, 256),
        ("qwen2.5-7b", True, "full", None, None), ("qwen2.5-7b", True, "full", 128, None)]
FULL_FINETUNE = ["llama-3.2-1b", "llama-3.1-8b"]


def scale_rows(plan, full_finetune, batch, seq):
    """One dict per LoRA row of `plan` and per full fine-tuning model, yielded as each is measured."""
    tflops = {}
    for name, scan, remat, block, mlp_block in plan:
        # Counted without the MLP block: cost_analysis would count its loop's body (one block) once.
        # Each block's recomputation in the backward pass adds one MLP forward that this leaves out.
        if (name, remat, block) not in tflops:
            tflops[name, remat, block] = step_tflops(name, remat, batch, seq, block)
        model = llama(name, scan, remat, attention_block=block, mlp_block=mlp_block)
        row = {"model": name, "kind": "lora", "scan": scan, "remat": remat, "attention_block": block,
               "mlp_block": mlp_block, **measure(*abstract_lora_step(model, batch, seq)),
               "step_tflops": tflops[name, remat, block]}
        print(json.dumps(row), flush=True)
        yield row
    for name in full_finetune:
        row = {"model": name, "kind": "full", "scan": True, "remat": "full",
               **measure(*abstract_full_step(llama(name, True, "full", param_dtype=jnp.float32), batch, seq))}
        print(json.dumps(row), flush=True)
        yield row


def depth_rows(batch, seq):
    """Compile time of the scanned 8B LoRA step at 16 and 32 layers (everything else equal)."""
    rows = []
    for layers in (16, 32):
        row = {"model": "llama-3.1-8b", "layers": layers, "kind": "lora", "scan": True, "remat": "full",
               **measure(*abstract_lora_step(llama("llama-3.1-8b", True, "full", layers), batch, seq))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gpt2_rows(reps):
    """bench_adapt's setting (GPT-2 small, batch 4x128, r=8 on c_attn/c_proj/c_fc, float32, AdamW):
    LoRA with each remat policy against full fine-tuning without remat, compiled memory and step time.
    The remat rows scan the layers: unrolled, XLA's CPU compiler undoes the recomputation (the
    compiled memory of an unrolled step is the same with remat none, dots or full; row `unrolled`)."""
    config = GPT2Config(n_positions=1024)
    batch, seq = 4, 128
    targets = ["c_attn", "c_proj", "c_fc"]
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
    data = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": jnp.ones((batch, seq), jnp.float32)}
    params = jax.jit(GPT2(config).init)(jax.random.key(0), tokens[:, :1])
    rows, runs = [], {}
    for remat, scan in (("none", False), ("full", False), ("none", True), ("dots", True), ("full", True)):
        model = GPT2(config, remat=remat, scan=scan)
        tconfig = train.TrainConfig(batch_size=batch)
        adapters = jlora.init(params, 8, targets=targets)
        stacked = (layers.stack_layers(params, "h"), layers.stack_layers(adapters, "h")) if scan else (params, adapters)
        frozen, trainable = jlora.split(*stacked)
        step = train.make_step(model.apply, tconfig)
        state = train.init_state(trainable, tconfig)
        start = time.perf_counter()
        compiled = step.lower(state, frozen, data).compile()
        rows.append({"model": "gpt2-small", "kind": "lora", "remat": remat, "scan": scan, **compiled_stats(compiled),
                     "compile_s": time.perf_counter() - start})
        live = {"state": state}

        def run(compiled=compiled, live=live, frozen=frozen):
            live["state"], metrics = compiled(live["state"], frozen, data)
            jax.block_until_ready(metrics)

        runs[f"lora_{remat}_{scan}"] = run
    tx = optax.adamw(1e-4)
    full = jax.jit(functools.partial(full_step_unchunked, GPT2(config), tx), donate_argnums=(0, 1))
    opt_state = tx.init(params)
    start = time.perf_counter()
    compiled = full.lower(params, opt_state, data).compile()
    rows.append({"model": "gpt2-small", "kind": "full", "remat": "none", "scan": False, **compiled_stats(compiled),
                 "compile_s": time.perf_counter() - start})
    live_full = {"args": (jax.tree.map(jnp.copy, params), opt_state)}

    def run_full():
        *live_full["args"], value = compiled(*live_full["args"], data)
        jax.block_until_ready(value)

    runs["full_none_False"] = run_full
    times = time_alternating(runs, reps)
    for row in rows:
        row["median_s"] = statistics.median(times[f"{row['kind']}_{row['remat']}_{row['scan']}"])
        print(json.dumps(row), flush=True)
    return rows


def full_step_unchunked(model, tx, params, opt_state, data):
    loss = train.make_loss(model.apply)
    value, grads = jax.value_and_grad(lambda p: loss(p, data["tokens"], data["targets"], data["loss_mask"])[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def time_alternating(runs, reps, warmup=1):
    """`{name: [seconds] * reps}`, every run once per round, odd rounds in reverse order."""
    times = {name: [] for name in runs}
    for round_ in range(warmup + reps):
        for name, run in list(runs.items())[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), help="only these models")
    parser.add_argument("--all", action="store_true", help="every remat x scan combination, not just PLAN")
    parser.add_argument("--rows", nargs="*", metavar="MODEL:SCAN:REMAT[:BLOCK[:MLP_BLOCK]]",
                        help="these LoRA rows instead of PLAN, e.g. llama-3.1-8b:on:full:512 (attention block) "
                             "or llama-3.1-8b:on:full:128:256 (and MLP block)")
    parser.add_argument("--full-finetune", nargs="*", choices=sorted(SHAPES), help=f"default {FULL_FINETUNE}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--skip-depth", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_scale.json")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --json")
    args = parser.parse_args(argv)

    host = {**host_facts(), "backend": jax.devices()[0].platform}
    print("host: " + describe_host(host))
    if args.rows is not None:
        plan = []
        for row in args.rows:
            m, scan, r, *blocks = row.split(":")
            blocks = [int(b) if b not in ("", "none") else None for b in blocks]
            plan.append((m, scan == "on", r, *blocks, *[None] * (2 - len(blocks))))
    else:
        plan = [(m, scan, r, None, None) for m in SHAPES for scan in (True, False) for r in ("none", "dots", "full")] if args.all else PLAN
    models = args.models or list(SHAPES)
    full = FULL_FINETUNE if args.full_finetune is None else args.full_finetune
    saved = json.loads(args.json.read_text()) if args.append and args.json.exists() else {}
    results = {"config": vars(args) | {"json": str(args.json)}, "host": host, "published_gib": PUBLISHED,
               "scale": saved.get("scale", []), "depth": saved.get("depth", []), "gpt2": saved.get("gpt2", [])}

    def write():  # after every part, so a long run interrupted keeps what it measured
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))

    for part in scale_rows([p for p in plan if p[0] in models], [m for m in full if m in models], args.batch, args.seq):
        results["scale"].append(part)
        write()
    if not args.skip_depth:
        results["depth"] = depth_rows(args.batch, args.seq)
        write()
    if not args.skip_gpt2:
        results["gpt2"] = gpt2_rows(args.reps)
        write()
    report(results["scale"], results["depth"], results["gpt2"])
    print(f"\nwrote {args.json}")


def report(rows, depth, gpt2):
    print(f"\n{'model':<14}{'step':<6}{'scan':<6}{'remat':<7}{'block':>6}{'mlp':>6}{'GiB':>8}{'GiB*':>8}{'TFLOP':>9}{'compile s':>11}"
          "   (GiB*: without the CPU's hoisted float32 weight copies)")
    for r in rows:
        print(f"{r['model']:<14}{r['kind']:<6}{str(r['scan']):<6}{r['remat']:<7}{str(r.get('attention_block') or '-'):>6}"
              f"{str(r.get('mlp_block') or '-'):>6}{r['memory_gib']:>8.2f}"
              f"{r['memory_gib_no_hoist']:>8.2f}{r.get('step_tflops', float('nan')):>9.1f}{r['compile_s']:>11.1f}")
    for text, gib in PUBLISHED.items():
        print(f"published: {text}: {gib} GiB")
    if depth:
        print(f"scanned 8B compile time 32 / 16 layers: {depth[1]['compile_s']:.1f} / {depth[0]['compile_s']:.1f} s = "
              f"{depth[1]['compile_s'] / depth[0]['compile_s']:.2f}x")
    if gpt2:
        full = next(r for r in gpt2 if r["kind"] == "full")
        for r in gpt2:
            print(f"gpt2-small {r['kind']:<5}remat {r['remat']:<5}{'scan' if r['scan'] else 'unrolled':<9}{r['memory_gib'] * 1024:>8.0f} MiB "
                  f"{r['memory_gib'] / full['memory_gib']:>6.3f}x full  {r['median_s']:.3f} s/step "
                  f"{r['median_s'] / full['median_s']:.2f}x full")


if __name__ == "__main__":
    main()

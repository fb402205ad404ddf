"""QLoRA on SmolLM2-135M + the bundled Shakespeare: float32 LoRA, bf16 LoRA and a 4-bit base side by side.

    python experiments/qlora.py                      # the three rows of the table, 100 steps each
    python experiments/qlora.py --only nf4_qlora --steps 10 --eval-tokens 1024   # one row in a few minutes
    python experiments/qlora.py --targets all-linear     # LoRA on every linear layer (QLoRA's recipe)
    python experiments/qlora.py --scale-8b           # only the Llama-3.1-8B-shape compiled memory

Every row trains the CLI's default adapters (LoRA r=8 on q_proj and v_proj; `--targets all-linear`
for all seven) with the CLI's default settings (100 steps, batch 4 x 128 tokens, lr 1e-3, 10 warmup
steps, cosine, seed 0) and reports validation perplexity before and after training on the CLI's
validation sample (`jlora.train.eval_sample`: 8,192 tokens spread over the held-out plays), the bytes
the frozen base holds, the compiled step's memory and the median step time. The rows run one after another in one process,
so their step times compare on the same host. Results go to experiments/results/qlora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jlora
from jlora import models
from jlora.training import data, loop
from jlora import training as train
from jlora.models import layers
from jlora.quant.quantize import nbytes

import bench_scale  # experiments/: this script's directory is on sys.path
import host

RESULTS = Path(__file__).parent / "results"
GiB = 2**30

# name: (dtype the base is stored and computed in, quantisation format or None)
ROWS = {
    "float32_lora": (jnp.float32, None),
    "bf16_lora": (jnp.bfloat16, None),
    "nf4_qlora": (jnp.bfloat16, "nf4"),
    "int8_qlora": (jnp.bfloat16, "int8"),
    "gguf_qlora": (jnp.bfloat16, "gguf"),  # the GGUF's own Q4_1/Q8_0 blocks, as shipped
}
TARGETS = {"all-linear": bench_scale.LINEAR}


def memory_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def setup(name, args, train_set):
    """The row's model, frozen base, fresh state, jitted step, batches and compiled step."""
    dtype, fmt = ROWS[name]
    model, params, _, model_config = models.load(args.base, param_dtype=dtype, dtype=dtype)
    if fmt is not None:
        params = models.quantize_base(args.base, params, model_config, fmt, dtype=dtype)
    config = train.TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, max_steps=args.steps,
                               weight_decay=0.0, batch_size=args.batch_size, seed=args.seed)
    adapters = jlora.init(params, rank=args.rank, targets=TARGETS.get(args.targets, args.targets.split(",")))
    frozen, trainable = jlora.split(params, adapters)
    state = train.init_state(trainable, config)
    step = train.make_step(model.apply, config)
    batch_at = lambda k: data.batch_at(train_set, args.batch_size, args.seed, k)
    compiled = step.lower(state, frozen, batch_at(0)).compile()
    return model, params, frozen, state, step, batch_at, compiled


def run_row(name, args, train_set, valid_set) -> dict:
    dtype, fmt = ROWS[name]
    model, params, frozen, state, step, batch_at, compiled = setup(name, args, train_set)
    fitted = loop.fit(lambda s, b: step(s, frozen, b), state, batch_at, max_steps=args.steps, start=0)
    times = [entry["seconds"] for entry in fitted.history]
    evaluate = train.make_eval(model.apply)
    sample = train.eval_sample(valid_set, args.eval_tokens)
    before = train.perplexity(evaluate, params, None, sample, args.batch_size)
    ppl = train.perplexity(evaluate, *jlora.combine(frozen, fitted.state.trainable), sample, args.batch_size)
    return {
        "name": name, "dtype": jnp.dtype(dtype).name, "quantize": fmt, "base_perplexity": before,
        "valid_perplexity": ppl,
        "base_bytes": nbytes(params), "compiled_step_bytes": memory_bytes(compiled),
        "median_step_s": statistics.median(times[1:]), "losses": [entry["loss"] for entry in fitted.history],
        "load_average": os.getloadavg(),
    }


# ---- Llama-3.1-8B shape: compiled memory only (nothing is allocated) ----

# What is quantised, as torchtune's and bitsandbytes' QLoRA do it: the transformer blocks' linear
# weights in NF4. The token embedding and the untied lm_head stay bf16: quantised, each use would
# dequantise a 128256 x 4096 table (2 GiB as float32) where bf16 reads it as it is (the head 16k rows
# at a time in the vocabulary-blocked loss).
QUANTIZED = {"blocks": bench_scale.LINEAR, "blocks+embeddings": None}  # None: every matrix (jlora.quantize's default)
# The 8B step's MLP 256 tokens at a time: its [4096, 14336] intermediates (float32 where XLA's CPU
# backend computes bf16 dots) dominate the temporaries otherwise.
MLP_BLOCK = 256


def scale_8b(batch=2, seq_len=2048, rank=16, fmt="nf4", quantized="blocks", mlp_block=MLP_BLOCK) -> dict:
    """The compiled memory of one LoRA step (r=16, alpha 32, all 7 linear modules) on an abstract NF4
    Llama-3.1-8B base in bench_scale's setting: layers scanned and fully rematerialised, attention 128
    queries at a time, the MLP `mlp_block` tokens at a time, the loss 128 positions and 16k vocabulary
    entries at a time. Lowered and compiled from shapes (`jax.eval_shape`: nothing is allocated), never run.

    The base is quantised unrolled, as the CLI does (each layer its own scales), then stacked for the
    scan (`layers.stack_layers`), so each scan iteration dequantises its own layer only. Memory is
    read from `memory_analysis()` of the step compiled with bench_scale's NO_HOIST (XLA's CPU backend
    would otherwise hoist loop-invariant conversions of the stacked base out of the scan, a copy a
    GPU never makes); the default compilation's total is reported beside it."""
    model = bench_scale.llama("llama-3.1-8b", True, "full", attention_block=128, mlp_block=mlp_block)
    shapes = jax.eval_shape(model.clone(scan=False).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    targets = QUANTIZED[quantized]
    qshapes = jax.eval_shape(lambda p: layers.stack_layers(jlora.quantize(p, fmt, targets=targets)), shapes)
    step, args = bench_scale.abstract_lora_step(model, batch, seq_len, rank, variables=qshapes, alpha=2 * rank)
    began = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile(compiler_options=bench_scale.NO_HOIST)
    compile_s = time.perf_counter() - began
    m = compiled.memory_analysis()
    hoisted = lowered.compile()
    return {
        "shape": "Llama-3.1-8B", "batch": f"{batch}x{seq_len}", "rank": rank, "alpha": 2 * rank,
        "targets": bench_scale.LINEAR, "quantize": fmt,
        "quantized": "the 7 linear weights of every block" + (", embedding and lm_head too" if targets is None else
                                                             "; embed_tokens and lm_head stay bf16 (as torchtune)"),
        "setting": {"scan": True, "remat": "full", "attention_block": 128, "mlp_block": mlp_block,
                    "loss_chunk": bench_scale.LOSS_CHUNK,
                    "loss_vocab_block": bench_scale.VOCAB_BLOCK, "compiler_options": bench_scale.NO_HOIST},
        "base_bytes": nbytes(qshapes), "argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
        "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
        "compiled_step_gib": memory_bytes(compiled) / GiB, "compile_s": compile_s,
        "compiled_step_gib_hoisted": memory_bytes(hoisted) / GiB,
        # Full remat keeps each layer's bf16 input for the backward pass: a floor of the temporaries.
        "layer_inputs_kept_bytes": model.config.num_hidden_layers * batch * seq_len * model.config.hidden_size * 2,
        "torchtune_qlora_peak_gib": bench_scale.PUBLISHED["torchtune Llama 3.1 8B QLoRA, same setting (peak)"],
    }


def bf16_row() -> dict | None:
    """bench_scale's bf16 LoRA row in the same setting (results/bench_scale.json), for comparison."""
    path = RESULTS / "bench_scale.json"
    rows = json.loads(path.read_text())["scale"] if path.is_file() else []
    found = [r for r in rows if (r.get("model"), r.get("kind"), r.get("scan"), r.get("remat"), r.get("attention_block"),
                                 r.get("mlp_block")) == ("llama-3.1-8b", "lora", True, "full", 128, MLP_BLOCK)]
    return found[0] if found else None


def interleaved_step_times(names, args, train_set, rounds) -> dict:
    """Median step seconds of each row, timed in turns (one step of each per round), so that load from
    other processes falls on all rows alike."""
    rows = {name: setup(name, args, train_set) for name in names}
    states = {name: rows[name][3] for name in names}
    times = {name: [] for name in names}
    for k in range(rounds + 1):
        for name in names:
            _, _, frozen, _, step, batch_at, _ = rows[name]
            batch = batch_at(k)
            began = time.perf_counter()
            states[name], metrics = step(states[name], frozen, batch)
            jax.block_until_ready(metrics)
            if k:  # round 0 compiles
                times[name].append(time.perf_counter() - began)
    return {name: {"median_step_s": statistics.median(t), "step_s": t} for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), default=["nf4_qlora", "bf16_lora", "float32_lora"])
    parser.add_argument("--timing-rounds", type=int, help="only time the rows' steps in turns, this many rounds")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=train.EVAL_TOKENS, help="validation sample size")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-8b", action="store_true", help="only the 8B-shape compiled memory")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.scale_8b:
        report = {"results": [], "bf16_lora_same_setting": bf16_row()}
        for quantized in QUANTIZED:
            report["results"].append(scale_8b(quantized=quantized))
            print(json.dumps(report["results"][-1], indent=2), flush=True)
        out = args.out or RESULTS / "qlora_8b.json"
    else:
        _, _, tokenizer, _ = models.load(args.base)
        train_set, valid_set = data.load_splits(tokenizer, args.seq_len)
        settings = {k: str(v) for k, v in vars(args).items()}
        if args.timing_rounds:
            report = {"settings": settings, "step_times": interleaved_step_times(args.only, args, train_set, args.timing_rounds)}
            print(json.dumps({k: v["median_step_s"] for k, v in report["step_times"].items()}))
            out = args.out or RESULTS / "qlora_step_times.json"
        else:
            out = args.out or RESULTS / "qlora.json"
            report = {"settings": settings, "results": []}
            for name in args.only:
                result = run_row(name, args, train_set, valid_set)
                report["results"].append(result)
                print(f"{name:<14} ppl {result['base_perplexity']:8.3f} -> {result['valid_perplexity']:8.3f}  base {result['base_bytes'] / 2**20:7.1f} MiB  "
                      f"step memory {result['compiled_step_bytes'] / 2**20:7.1f} MiB  step {result['median_step_s']:6.3f}s",
                      flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=2))  # each row as it finishes
    report["host"] = host.facts()
    print("host: " + host.describe(report["host"]))
    report["total_seconds"] = time.perf_counter() - began
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} in {report['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()

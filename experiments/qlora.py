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
from jlora import data, loop, models, train
from jlora.quantize import nbytes

import host  # experiments/host.py: this script's directory is on sys.path

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
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"all-linear": ALL_LINEAR}


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

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)


def scale_8b(batch=2, seq_len=2048, rank=16, fmt="nf4") -> dict:
    """The compiled memory of one LoRA step (r=16, all linear) on an abstract NF4 Llama-3.1-8B base,
    every layer rematerialised (``nn.remat``): lowered and compiled from shapes, never run."""
    import flax.linen as nn

    from jlora.models import llama

    config = llama.LlamaConfig(**LLAMA_8B)
    original = llama.DecoderLayer
    llama.DecoderLayer = nn.remat(original)  # jax.checkpoint around each layer
    try:
        model = llama.Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        qshapes = jax.eval_shape(lambda p: jlora.quantize(p, fmt), shapes)
        adapters = jax.eval_shape(lambda p: jlora.init(p, rank=rank, targets=ALL_LINEAR, alpha=2 * rank), qshapes)
        config_train = train.TrainConfig(batch_size=batch, max_steps=100)
        frozen, trainable = jlora.split(qshapes, adapters)
        state = jax.eval_shape(lambda t: train.init_state(t, config_train), trainable)
        tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
        step = train.make_step(model.apply, config_train)
        compiled = step.lower(state, frozen, {"tokens": tokens, "targets": tokens, "loss_mask": tokens}).compile()
    finally:
        llama.DecoderLayer = original
    m = compiled.memory_analysis()
    return {
        "shape": "Llama-3.1-8B", "batch": f"{batch}x{seq_len}", "rank": rank, "quantize": fmt,
        "base_bytes": nbytes(qshapes), "argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
        "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
        "compiled_step_gib": memory_bytes(compiled) / GiB,
    }


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
        report = scale_8b()
        print(json.dumps(report, indent=2))
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

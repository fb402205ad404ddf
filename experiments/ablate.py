"""The LoRA paper's ablations on a real pretrained model: SmolLM2-135M on held-out Shakespeare.

    python experiments/ablate.py --table 5        # which weights to adapt under a fixed budget
    python experiments/ablate.py --table 6        # how small the rank can be
    python experiments/ablate.py --table methods  # base, LoRA (q,v), LoRA (all), (IA)3, full fine-tuning
    python experiments/ablate.py --table 6 --quick --only q_r8   # one row in a few minutes

Every configuration starts from the same base and seed, trains on the bundled training plays and
reports validation perplexity on the held-out plays, trainable parameters, adapter bytes, median
step time and compiled memory. Results go to experiments/results/<table>.json; `plot` draws them.
Llama names: Wq=q_proj, Wk=k_proj, Wv=v_proj, Wo=o_proj.
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
from jlora import models
from jlora.core import adapter
from jlora.training import data, loop
from jlora import training as train

import host  # experiments/host.py: this script's directory is on sys.path

RESULTS = Path(__file__).parent / "results"
ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(weights: str, rank: int, alpha: float = 8.0) -> dict:
    """A LoRA row: `weights` like 'qv'; alpha fixed (scaling alpha/r), as the paper keeps it."""
    return {"method": "lora", "targets": [ATTENTION[w] for w in weights], "rank": rank, "alpha": alpha}


TABLES = {
    # Table 5: the same budget of trainable parameters (r·#weights = 8) spread differently.
    "5": {
        "base": {"method": "base"},
        "Wq_r8": lora("q", 8), "Wk_r8": lora("k", 8), "Wv_r8": lora("v", 8), "Wo_r8": lora("o", 8),
        "Wq,Wk_r4": lora("qk", 4), "Wq,Wv_r4": lora("qv", 4), "Wq,Wk,Wv,Wo_r2": lora("qkvo", 2),
    },
    # Table 6: rank for Wq, Wq+Wv and all four.
    "6": {"base": {"method": "base"}} | {
        f"{name}_r{r}": lora(weights, r)
        for name, weights in (("Wq", "q"), ("Wq,Wv", "qv"), ("Wq,Wk,Wv,Wo", "qkvo"))
        for r in (1, 2, 4, 8, 64)
    },
    "methods": {
        "base": {"method": "base"},
        "lora_qv_r8": lora("qv", 8),
        "lora_all_r8": {"method": "lora", "targets": ALL_LINEAR, "rank": 8, "alpha": 8.0},
        "ia3": {"method": "ia3"},
        "full_finetune": {"method": "full", "learning_rate": 5e-5},
    },
}


def make_adapters(params, row):
    """The row's adapters: its method is an adapter kind, its other keys (but the learning rate) options."""
    options = {k: v for k, v in row.items() if k not in ("method", "learning_rate")}
    return adapter.kind(row["method"]).create(params, **options)


def memory_mb(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


def full_finetune_step(apply_fn, config: train.TrainConfig):
    """Every weight trains: the baseline LoRA is measured against."""
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adamw(train.schedule(config)))

    def step(state, batch):
        params, opt_state = state

        def loss_fn(params):
            return train.lm_loss(apply_fn(params, batch["tokens"]), batch["targets"], batch["loss_mask"])[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    return jax.jit(step, donate_argnums=(0,)), tx


def run_row(name, row, model, params, train_set, valid_set, args) -> dict:
    evaluate = train.make_eval(model.apply)
    valid = lambda p, a: train.perplexity(evaluate, p, a, valid_set, args.batch_size, args.eval_batches)
    result = {"name": name, **row}
    if row["method"] == "base":
        return result | {"valid_perplexity": valid(params, None), "trainable_params": 0, "adapter_bytes": 0}

    config = train.TrainConfig(
        learning_rate=row.get("learning_rate", args.lr), warmup_steps=args.warmup, max_steps=args.steps,
        batch_size=args.batch_size, seed=args.seed,
    )
    batch_at = lambda k: data.batch_at(train_set, args.batch_size, args.seed, k)
    if row["method"] == "full":
        step, tx = full_finetune_step(model.apply, config)
        weights = jax.tree.map(jnp.copy, params)
        state = (weights, tx.init(weights))
        compiled = step.lower(state, batch_at(0)).compile()
        trainable = sum(x.size for x in jax.tree.leaves(params))
        adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    else:
        adapters = make_adapters(params, row)
        frozen, trainables = jlora.split(params, adapters)
        state = train.init_state(trainables, config)
        lora_step = train.make_step(model.apply, config)
        compiled = lora_step.lower(state, frozen, batch_at(0)).compile()
        step = lambda state, batch: lora_step(state, frozen, batch)
        counts = jlora.count_params(params, adapters)
        trainable, adapter_bytes = counts.trainable, counts.trainable_bytes

    fitted = loop.fit(step, state, batch_at, max_steps=args.steps, start=0)
    times = [entry["seconds"] for entry in fitted.history]
    if row["method"] == "full":
        ppl = valid(fitted.state[0], None)
    else:
        ppl = valid(*jlora.combine(frozen, fitted.state.trainable))
    return result | {
        "valid_perplexity": ppl, "trainable_params": int(trainable), "adapter_bytes": int(adapter_bytes),
        "median_step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "compiled_memory_mb": memory_mb(compiled), "losses": [entry["loss"] for entry in fitted.history],
    }


def inference_latency(model, params, adapters, args) -> dict:
    """Forward-pass time of the base, the merged model and the unmerged (factored) adapters."""
    tokens = jnp.zeros((args.batch_size, args.seq_len), jnp.int32)
    merged = jlora.merge(params, adapters)
    programs = {
        "base": (jax.jit(model.apply), (params, tokens)),
        "merged": (jax.jit(model.apply), (merged, tokens)),
        "unmerged_adapt": (jax.jit(jlora.adapt(model.apply)), (params, adapters, tokens)),
    }
    times = {name: [] for name in programs}
    for fn, a in programs.values():
        jax.block_until_ready(fn(*a))
    for _ in range(args.latency_reps):
        for name, (fn, a) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), required=True)
    parser.add_argument("--only", nargs="+", help="run only these rows")
    parser.add_argument("--quick", action="store_true", help="fewer steps and eval batches (a row in minutes)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--latency-reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_batches, args.latency_reps = 10, 4, 3
    out = args.out or RESULTS / f"table{args.table}{'_quick' if args.quick else ''}.json"

    began = time.perf_counter()
    model, params, tokenizer, _ = models.load(args.base)
    train_set, valid_set = data.load_splits(tokenizer, args.seq_len)
    rows = {k: v for k, v in TABLES[args.table].items() if not args.only or k in args.only}
    results = []
    for name, row in rows.items():
        result = run_row(name, row, model, params, train_set, valid_set, args)
        results.append(result)
        print(f"{name:<18} ppl {result['valid_perplexity']:8.3f}  trainable {result['trainable_params']:>11,}  "
              f"step {result.get('median_step_s', 0):6.2f}s  memory {result.get('compiled_memory_mb', 0):7.0f} MB", flush=True)
    report = {"table": args.table, "settings": {k: str(v) for k, v in vars(args).items()}, "host": host.facts(),
              "results": results}
    print("host: " + host.describe(report["host"]))
    if args.table == "methods":
        report["inference_latency_s"] = inference_latency(model, params, jlora.init(params, rank=8), args)
        print("inference latency (s):", report["inference_latency_s"])
    report["total_seconds"] = time.perf_counter() - began
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} in {report['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()

"""Tokens/s and MFU of a jlora LoRA train step: bf16 base, scanned layers, full remat, chunked loss.

Two Llama shapes with random weights (throughput depends on shapes only, and the GPU machine may
have no network to fetch real ones): SmolLM2-135M and Llama-3.2-1B. LoRA r=16 on every linear
layer, AdamW in float32. MFU counts model FLOPs per token, 4·N + 12·L·T·H·D: forward and the
input-gradient half of the backward through the N matmul weights (frozen weights need no weight
gradient; LoRA's own FLOPs are under 1%), plus attention, and not the remat recomputation.

    python experiments/gpu_throughput.py                # on one NVIDIA GPU (used by gpu_check.sh)
    python experiments/gpu_throughput.py --dry-run      # tiny shapes on CPU, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jlora
from jlora import training as train
from jlora.models.llama import Llama, LlamaConfig

import host  # experiments/host.py: this script's directory is on sys.path

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    "smollm2-135m": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                          max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5), (16, 2048)),
    "llama-1b-shape": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                            max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5), (4, 2048)),
}
DRY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)


def flops_per_token(config: LlamaConfig, seq: int) -> float:
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_hidden_layers * (attn + mlp) + c.vocab_size * c.hidden_size
    return 4 * matmul + 12 * c.num_hidden_layers * seq * c.num_attention_heads * c.head_dim


def throughput(name, sizes, batch, seq, steps, loss_chunk, peak_tflops):
    config = LlamaConfig(**sizes)
    model = Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan=True, remat="full")
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
    data = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": jnp.ones((batch, seq), jnp.float32)}
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :1])
    adapters = jlora.init(params, 16, targets=LINEAR, stack_axes=1)
    frozen, trainable = jlora.split(params, adapters)
    tconfig = train.TrainConfig(batch_size=batch, loss_chunk=loss_chunk, max_steps=steps + 2)
    state = train.init_state(trainable, tconfig)
    step = train.make_step(functools.partial(model.apply, hidden=True), tconfig, head_fn=model.head)
    start = time.perf_counter()
    state, metrics = step(state, frozen, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    state, metrics = step(state, frozen, data)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, frozen, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq / seconds
    mfu = tokens_per_s * flops_per_token(config, seq) / (peak_tflops * 1e12)
    row = {"model": name, "batch": batch, "seq": seq, "step_s": seconds, "tokens_per_s": tokens_per_s, "mfu": mfu,
           "compile_s": compile_s, "loss": float(metrics["loss"]), "device": str(jax.devices()[0].device_kind)}
    print(f"{name:<16} batch {batch}x{seq}: {tokens_per_s:>10.0f} tokens/s  MFU {100 * mfu:5.1f}%  "
          f"({seconds * 1e3:.1f} ms/step, first step {compile_s:.1f} s, loss {row['loss']:.3f})", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 steps, any backend")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOP/s of the device for MFU (default: H100/H200 SXM, 989)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gpu_throughput.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        plan = {name: (DRY, (2, 32)) for name in MODELS}
        steps, chunk = 2, 16
    else:
        plan, steps, chunk = MODELS, args.steps, 512
    rows = [throughput(name, sizes, *shape, steps, chunk, args.peak_tflops) for name, (sizes, shape) in plan.items()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"dry_run": args.dry_run, "peak_tflops": args.peak_tflops, "host": host.facts(),
                                      "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

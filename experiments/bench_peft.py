"""jlora against PyTorch + PEFT on the same model, the same token batch and the same machine, in one run.

Two models, random weights (only shapes matter): GPT-2 small and the quickstart's SmolLM2-135M
(Llama: 30 layers, d=576, 9 heads, 3 key/value heads, ffn 1536, vocab 49152, tied embeddings, RoPE
theta 100000). Configurations, each a median over alternating timed repetitions after warm-up:

    gpt2     lora_c_attn    LoRA r=8 on attn.c_attn: loss, gradients, AdamW update
             lora_all       LoRA r=8 on c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
             full_finetune  every weight trains
             forward        the loss alone, no gradients (base model)
    smollm2  lora_qv        LoRA r=8 on q_proj, v_proj (the quickstart's step)
             lora_all       LoRA r=8 on every linear layer of the decoder
             forward        the loss alone

Efficiency. Seconds depend on the host; so beside them each step's achieved GFLOP/s (XLA's
cost_analysis FLOPs of jlora's program, the same work PEFT does) is given as a fraction of a float32
dense matmul at the model's shape ([batch*seq, d] x [d, ffn]) timed in the same rounds: jlora against
XLA's matmul, PEFT against torch's. The host (CPU model, AVX2/AVX-512/AMX flags, cores, versions) is
printed and stored with every result (experiments/host.py).

jlora runs the programs of bench_adapt.make_steps (factored `jlora.adapt`); PEFT runs
`get_peft_model(GPT2LMHeadModel(...), LoraConfig(...))` with `torch.optim.AdamW`. Random weights:
only shapes matter. Both use AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), alpha = r,
no dropout anywhere (GPT-2's own dropout is set to 0, as jlora's GPT-2 has none).

Memory. jlora: XLA's compiled memory, arguments + outputs + temporaries - aliased (the buffers of
one step, weights and optimizer state included). PEFT on CPU: the peak RSS (VmHWM) of a fresh
subprocess (one thread) that builds the configuration and runs three steps, minus its RSS before
building (after imports and a tiny warm-up model), so each configuration is measured alone. On CUDA:
torch.cuda.max_memory_allocated during the configuration's build and warm-up, minus what was
allocated before.

Time. Median wall time per step. Runs alternate between the frameworks, so slow drifts in machine
load hit both; but torch's OpenMP threads slow down far more than XLA's thread pool when another
process takes a core, so rounds in which other processes kept a core busy are left out when enough
quiet rounds remain (see QUIET_CORES; every time is in the JSON, with the load during its run).

    python experiments/bench_peft.py                  # both models, batch 4x128, r=8, CPU
    python experiments/bench_peft.py --model smollm2  # one of them (results/bench_peft_smollm2.json)
    python experiments/bench_peft.py --quick          # 2 layers, d=128, vocab 1000, 2 reps
    python experiments/bench_peft.py --gpu      # CUDA, bf16 autocast, batch 16x512, tokens/s and MFU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Torch and JAX share the GPU in --gpu mode: JAX must not take 75% of it at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from bench_adapt import call_args, compile_runner, make_steps, time_alternating  # noqa: E402
import host  # noqa: E402

import jlora  # noqa: E402
from jlora.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from jlora.models.llama import Llama, LlamaConfig  # noqa: E402

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_CONFIGS = {
    "gpt2": {
        "lora_c_attn": ["c_attn"],
        "lora_all": ["c_attn", "c_proj", "c_fc"],  # c_proj names both attn.c_proj and mlp.c_proj
        "full_finetune": None,
        "forward": None,
    },
    "smollm2": {"lora_qv": ["q_proj", "v_proj"], "lora_all": LLAMA_LINEAR, "forward": None},
}
MODELS = tuple(MODEL_CONFIGS)
# Shapes per model: SmolLM2-135M's config.json (rms_norm_eps 1e-5, rope_theta 100000, tied embeddings).
MODEL_SHAPES = {
    "gpt2": dict(layers=12, d=768, heads=12, kv_heads=12, ffn=3072, vocab=50257),
    "smollm2": dict(layers=30, d=576, heads=9, kv_heads=3, ffn=1536, vocab=49152),
}
QUICK_SHAPES = {"gpt2": dict(layers=2, d=128, heads=4, kv_heads=4, ffn=512, vocab=1000),
                "smollm2": dict(layers=2, d=128, heads=4, kv_heads=2, ffn=256, vocab=1000)}
SHAPE_FLAGS = ("layers", "d", "heads", "kv_heads", "ffn", "vocab")
FRAMEWORKS = ("jlora", "peft")
LORA_TARGET_RATIO = 0.75  # issue #9: jlora's LoRA step at most 0.75x PEFT's median on CPU
ADAMW = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
DEFAULTS = dict(batch=4, seq=128, rank=8, reps=7, warmup=1)
QUICK = dict(reps=2)
GPU = dict(batch=16, seq=512)
# A round is quiet when other processes kept fewer than this many cores busy during each of its
# runs. Torch's OpenMP threads slow down far more than XLA's thread pool when another process
# takes a core (measured: 6x against 2x), so medians come from quiet rounds when there are enough.
QUIET_CORES, MIN_QUIET_ROUNDS = 0.2, 3
MATMUL_REPEAT = 10  # matmuls per timed run of the same-run yardstick: long enough to time, short beside a step


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)} (default both); each writes its own JSON")
    for name in SHAPE_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None, help="default: the model's ("
                            + ", ".join(f"{m} {shape[name]}" for m, shape in MODEL_SHAPES.items()) + ")")
    for name in DEFAULTS:
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {DEFAULTS[name]}"
                            + (f", --quick {QUICK[name]}" if name in QUICK else "")
                            + (f", --gpu {GPU[name]}" if name in GPU else ""))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="CPU threads for torch; default: the cores XLA's thread pool uses")
    parser.add_argument("--quick", action="store_true", help="a smoke-test size: " + str(QUICK_SHAPES) + " " + str(QUICK))
    parser.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 autocast; exits with 2 without one")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's peak dense bf16 TFLOP/s for MFU (default: H100 SXM, 989)")
    parser.add_argument("--json", type=Path, default=None,
                        help="default experiments/results/bench_peft[_gpu][_quick].json; models other than gpt2 "
                             "add _MODEL to its name")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # one PEFT config's RSS
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--model {args.model!r}: choose from {', '.join(MODELS)}")
    for name, default in DEFAULTS.items():  # an explicit flag beats --quick, which beats --gpu
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name) if args.quick and name in QUICK
                    else GPU.get(name) if args.gpu and name in GPU else default)
    if args.torch_threads is None:
        args.torch_threads = host.cpu_count()
    if args.json is None:
        suffix = "_gpu" * args.gpu + "_quick" * args.quick
        args.json = Path(__file__).parent / "results" / f"bench_peft{suffix}.json"
    return args


def for_model(args, model: str):
    """`args` for one model: its shapes where no flag set them, its JSON path, its configurations."""
    shapes = (QUICK_SHAPES if args.quick else MODEL_SHAPES)[model]
    one = argparse.Namespace(**vars(args))
    one.model = model
    for name in SHAPE_FLAGS:
        if getattr(one, name) is None:
            setattr(one, name, shapes[name])
    if model != MODELS[0]:
        one.json = args.json.with_name(f"{args.json.stem}_{model}{args.json.suffix}")
    one.configs = MODEL_CONFIGS[model]
    return one


def shape_argv(args) -> list[str]:
    """The flags that rebuild the same configuration in a subprocess."""
    return ([f"--model={args.model}"] + [f"--{name}={getattr(args, name)}" for name in (*SHAPE_FLAGS, *DEFAULTS)]
            + [f"--lr={args.lr}", f"--torch-threads={args.torch_threads}"])


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, from /proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def watched(run, others: list):
    """`run`, appending to `others` how many cores other processes kept busy while it ran."""

    def call():
        busy, own, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        run()
        others.append(((busy_cpu_seconds() - busy) - (time.process_time() - own)) / (time.perf_counter() - start))

    return call


def make_tokens(args) -> np.ndarray:
    return np.random.default_rng(1).integers(0, args.vocab, (args.batch, args.seq), dtype=np.int32)


def flops_per_token(args, n_params, n_trainable, config) -> float:
    """Model FLOPs per token (Chowdhery et al. 2022, App. B; nanoGPT's estimate_mfu).

    N = all parameters except the position table (the token table is also the output head).
    Training: 6N + 12·L·d·T (forward 2N + attention 4·L·d·T, backward twice that). LoRA computes
    no gradients for frozen weights: forward and input gradients, 4N + 8·L·d·T, plus 6 per adapter
    parameter. Forward only: 2N + 4·L·d·T.
    """
    attention = 4 * args.layers * args.d * args.seq
    if config == "full_finetune":
        return 3 * (2 * n_params + attention)
    if config == "forward":
        return 2 * n_params + attention
    return 2 * (2 * n_params + attention) + 6 * n_trainable


# ---- jlora ----

def jlora_model(args, dtype):
    if args.model == "smollm2":
        return Llama(LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.ffn,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
                                 rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True), dtype=dtype)
    return GPT2(GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.d,
                           n_layer=args.layers, n_head=args.heads), dtype=dtype)


def jlora_programs(args, tokens):
    """`{config: (stats, run)}`, and `{config: trainable count}` plus the base parameter count."""
    dtype = jnp.bfloat16 if args.gpu else jnp.float32  # bf16 compute, f32 weights: like torch.autocast
    model = jlora_model(args, dtype)
    tokens = jnp.asarray(tokens)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    tx = optax.adamw(args.lr, **ADAMW)
    programs, trainable = {}, {}
    for name, targets in args.configs.items():
        if targets is None:
            continue
        adapters = jlora.init(params, rank=args.rank, alpha=args.rank, targets=targets)
        steps = make_steps(model, params, adapters, tx)
        programs[name] = compile_runner(*steps["lora_factored"], call_args("lora_factored", params, tokens))
        trainable[name] = jlora.count_params(params, adapters).trainable
    n_params = sum(x.size for x in jax.tree.leaves(params))
    for name in ("full_finetune", "forward"):
        if name in args.configs:
            programs[name] = compile_runner(*steps[name], call_args(name, params, tokens))
            trainable[name] = n_params if name == "full_finetune" else 0
    return programs, trainable, n_params


# ---- PyTorch + PEFT ----

def peft_program(args, name, tokens, device):
    """`(run, trainable count)` for configuration `name`: a zero-argument function that runs one
    step (or forward pass) to completion."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    if args.model == "smollm2":
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.ffn, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True, attention_dropout=0.0,
        )
        model = transformers.LlamaForCausalLM(config).to(device)
    else:
        config = transformers.GPT2Config(
            vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.d, n_layer=args.layers,
            n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(config).to(device)
    if MODEL_CONFIGS[args.model][name]:
        lora = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=MODEL_CONFIGS[args.model][name],
                               lora_dropout=0.0, fan_in_fan_out=args.model == "gpt2")  # GPT-2's Conv1D is (in, out)
        model = peft.get_peft_model(model, lora)
    ids = torch.from_numpy(tokens).long().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    trainable = [p for p in model.parameters() if p.requires_grad]

    if name == "forward":
        model.eval()

        def run():
            with torch.no_grad(), autocast:
                model(input_ids=ids, labels=ids).loss
            sync()

        return run, 0

    model.train()
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])

    def run():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    return run, sum(p.numel() for p in trainable)


def rss_bytes(field="VmRSS") -> int:
    """This process's resident memory now (``VmRSS``) or at its peak (``VmHWM``), from /proc.

    Not ``ru_maxrss``: Linux carries that over from the parent across fork and exec.
    """
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def probe(args):
    """In a fresh process: the RSS one PEFT configuration adds at its peak (three steps), as JSON."""
    import torch

    # One thread: the probes run side by side, and memory does not depend on the thread count.
    torch.set_num_threads(1)
    # A tiny model of the same kind first, so lazy imports and one-time set-up fall before `before`.
    tiny = argparse.Namespace(**{**vars(args), **dict(layers=1, d=16, heads=2, kv_heads=2, ffn=32, vocab=64,
                                                       batch=1, seq=8)})
    warm, _ = peft_program(tiny, args.probe, make_tokens(tiny), torch.device("cpu"))
    warm()
    del warm
    gc.collect()
    tokens = make_tokens(args)
    before = rss_bytes()
    run, _ = peft_program(args, args.probe, tokens, torch.device("cpu"))
    for _ in range(3):
        run()
    peak = rss_bytes("VmHWM")
    print(json.dumps({"peak_rss_mb": peak / 2**20, "memory_mb": (peak - before) / 2**20}))


def start_probes(args) -> dict:
    """One `probe` subprocess per configuration, started together: each measures only itself, and
    all are done before any timing starts."""
    return {name: subprocess.Popen([sys.executable, __file__, *shape_argv(args), f"--probe={name}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in args.configs}


def probe_result(name, process) -> dict:
    stdout, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(f"the memory probe for {name} failed with status {process.returncode}:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


# ---- the run ----

def gpu_or_exit():
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append(f"torch {torch.__version__} sees no CUDA device")
    try:
        jax.devices("gpu")
    except RuntimeError:
        missing.append(f"JAX {jax.__version__} has no GPU backend (install jax[cuda12])")
    if missing:
        print("--gpu: " + "; ".join(missing) + ".", file=sys.stderr)
        sys.exit(2)


def matmul_runs(args):
    """Zero-argument runs of MATMUL_REPEAT float32 matmuls [batch*seq, d] x [d, ffn] in XLA and in
    torch, and the FLOPs of one run: the same-run yardstick of each framework's dense matmul speed."""
    import torch

    m, k, n = args.batch * args.seq, args.d, args.ffn
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    xla_a, xla_b, matmul = jnp.asarray(a), jnp.asarray(b), jax.jit(jnp.matmul)
    torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)

    def xla():
        for _ in range(MATMUL_REPEAT):
            matmul(xla_a, xla_b).block_until_ready()

    def torch_run():
        for _ in range(MATMUL_REPEAT):
            torch.matmul(torch_a, torch_b)

    xla()
    torch_run()
    return {"xla": xla, "torch": torch_run}, 2 * m * k * n * MATMUL_REPEAT, f"{m}x{k}x{n}"


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        return probe(for_model(args, args.models[0]))
    if args.gpu:
        gpu_or_exit()
    else:
        jax.config.update("jax_platforms", "cpu")  # the same CPU as torch, even on a GPU machine
    import torch

    if not args.gpu:
        torch.set_num_threads(args.torch_threads)
    for model in args.models:
        run_model(for_model(args, model))


def run_model(args):
    import peft
    import torch
    import transformers

    threads = host.cpu_count()
    configs = args.configs
    device = torch.device("cuda" if args.gpu else "cpu")
    tokens = make_tokens(args)

    probes = {} if args.gpu else start_probes(args)
    results = {name: {} for name in configs}
    runs = {}
    programs, jlora_trainable, n_params = jlora_programs(args, tokens)
    for name, (stats, run) in programs.items():
        results[name]["jlora"] = {**stats, "trainable_params": jlora_trainable[name]}
        runs[name, "jlora"] = run
    for name in configs:
        if args.gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        run, trainable = peft_program(args, name, tokens, device)
        run()
        run()  # AdamW's state exists from the first step on
        memory = ({"memory_mb": (torch.cuda.max_memory_allocated() - before) / 2**20} if args.gpu
                  else probe_result(name, probes[name]))
        results[name]["peft"] = {**memory, "trainable_params": trainable}
        runs[name, "peft"] = run
        if trainable != jlora_trainable[name]:
            raise RuntimeError(f"{name}: jlora trains {jlora_trainable[name]:,} parameters, PEFT {trainable:,}")

    host_facts = host.facts()
    timed = {f"{c}/{f}": (c, f) for c in configs for f in FRAMEWORKS}
    if not args.gpu:
        matmuls, matmul_flops, matmul_shape = matmul_runs(args)
        matmul_best = host.matmul_peak(shapes=((args.batch * args.seq, args.d, args.ffn),),
                                       torch_threads=args.torch_threads, reps=5, min_seconds=0.2)
        for side, run in matmuls.items():
            runs["matmul", side] = run
            timed[f"matmul/{side}"] = ("matmul", side)
    load_before = os.getloadavg()
    others = {key: [] for key in runs}
    times = time_alternating({label: watched(runs[key], others[key]) for label, key in timed.items()},
                             args.reps, args.warmup)
    load_after = os.getloadavg()
    round_others = [max(o[args.warmup + i] for o in others.values()) for i in range(args.reps)]
    quiet = [i for i, o in enumerate(round_others) if o < QUIET_CORES]
    counted = quiet if len(quiet) >= MIN_QUIET_ROUNDS else list(range(args.reps))

    tokens_per_step = args.batch * args.seq
    peak = {}
    if not args.gpu:
        for side in matmuls:
            seconds = statistics.median(times[f"matmul/{side}"][i] for i in counted)
            peak[side] = {"shape": matmul_shape, "gflops_per_s": matmul_flops / seconds / 1e9,
                          "times_s": times[f"matmul/{side}"], "repeat": MATMUL_REPEAT,
                          "best_of_5_gflops_per_s": matmul_best[side][matmul_shape]}
    for name in configs:
        for framework in FRAMEWORKS:
            r = results[name][framework]
            r["times_s"] = times[f"{name}/{framework}"]
            r["others_cores"] = others[name, framework][args.warmup:]
            r["median_s"] = statistics.median(r["times_s"][i] for i in counted)
            r["median_all_rounds_s"] = statistics.median(r["times_s"])
            r["min_s"] = min(r["times_s"])
            r["tokens_per_s"] = tokens_per_step / r["median_s"]
            # The same work on both sides: XLA's count of jlora's program (PEFT computes the same step).
            r["gflop"] = results[name]["jlora"]["gflops"]
            r["gflops_per_s"] = r["gflop"] / r["median_s"]
            if peak:
                side = "xla" if framework == "jlora" else "torch"
                r["matmul_fraction"] = r["gflops_per_s"] / peak[side]["gflops_per_s"]
            if args.gpu:
                positions = max(1024, args.seq) * args.d if args.model == "gpt2" else 0  # Llama has no position table
                model_flops = flops_per_token(args, n_params - positions,
                                              jlora_trainable[name], name)
                r["mfu"] = model_flops * r["tokens_per_s"] / (args.peak_tflops * 1e12)
        j, p = results[name]["jlora"], results[name]["peft"]
        results[name]["ratio_jlora_over_peft"] = j["median_s"] / p["median_s"]
        results[name]["ratio_all_rounds"] = j["median_all_rounds_s"] / p["median_all_rounds_s"]
        results[name]["memory_ratio_jlora_over_peft"] = j["memory_mb"] / p["memory_mb"]

    device_name = torch.cuda.get_device_name() if args.gpu else f"{host_facts['cpu']} CPU"
    label = {"gpt2": "GPT-2", "smollm2": "SmolLM2 (Llama)"}[args.model]
    print(f"\n{label}: {args.layers} layers, d={args.d}, {args.heads} heads ({args.kv_heads} kv), ffn {args.ffn}, "
          f"vocab {args.vocab}, batch {args.batch}x{args.seq}, r={args.rank}, {n_params:,} params; {device_name}"
          + ("" if args.gpu else f", {threads} cores: XLA's thread pool, torch.set_num_threads({args.torch_threads})"))
    mean_others = statistics.mean(round_others)
    print(f"{args.reps} alternating rounds after {args.warmup} warm-up; other processes kept {mean_others:.2f} of "
          f"{os.cpu_count()} cores busy on average (load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after)")
    if counted is quiet:
        print(f"medians over the {len(quiet)} quiet rounds (others < {QUIET_CORES} cores in every run)")
    else:
        print(f"medians over all rounds: only {len(quiet)} were quiet (others < {QUIET_CORES} cores); "
              "under load torch's OpenMP threads slow down far more than XLA's, so jlora/PEFT is flattering")
    print("host: " + host.describe(host_facts))
    if peak:
        print(f"same-run dense f32 matmul {matmul_shape} (median over the counted rounds): XLA "
              f"{peak['xla']['gflops_per_s']:.1f} GFLOP/s, torch {peak['torch']['gflops_per_s']:.1f} GFLOP/s; "
              "'of matmul' = the step's GFLOP/s over its own framework's")
    header = (f"{'config':<15}{'GFLOP':>7}{'jlora s':>9}{'PEFT s':>9}{'jlora/PEFT':>12}{'all rounds':>12}"
              f"{'jlora MB':>10}{'PEFT MB':>9}{'jlora tok/s':>13}{'PEFT tok/s':>12}")
    print(header + (f"{'jlora MFU':>11}{'PEFT MFU':>10}" if args.gpu else f"{'jlora of mm':>13}{'PEFT of mm':>12}"))
    for name, r in results.items():
        j, p = r["jlora"], r["peft"]
        print(f"{name:<15}{j['gflop']:>7.1f}{j['median_s']:>9.3f}{p['median_s']:>9.3f}{r['ratio_jlora_over_peft']:>12.3f}"
              f"{r['ratio_all_rounds']:>12.3f}{j['memory_mb']:>10.0f}{p['memory_mb']:>9.0f}"
              f"{j['tokens_per_s']:>13.0f}{p['tokens_per_s']:>12.0f}"
              + (f"{j['mfu']:>11.1%}{p['mfu']:>10.1%}" if args.gpu
                 else f"{j['matmul_fraction']:>13.2f}{p['matmul_fraction']:>12.2f}"))
    print("memory: jlora = XLA compiled args+outputs+temps-aliased; PEFT = "
          + ("cuda max_memory_allocated delta" if args.gpu else "peak RSS delta of a subprocess per config"))
    # The target is for its own configuration on CPU; other sizes get no verdict.
    at_target_size = (not args.gpu and args.model == "gpt2" and not args.quick
                      and all(getattr(args, k) == DEFAULTS[k] for k in DEFAULTS if k not in ("reps", "warmup"))
                      and all(getattr(args, k) == MODEL_SHAPES["gpt2"][k] for k in SHAPE_FLAGS))
    targets = {name: results[name]["ratio_jlora_over_peft"] <= LORA_TARGET_RATIO if at_target_size else None
               for name in configs if name.startswith("lora")}
    if at_target_size:
        print(f"target jlora/PEFT <= {LORA_TARGET_RATIO} for LoRA steps: "
              + ", ".join(f"{n} {'met' if ok else 'MISSED'}" for n, ok in targets.items()))

    environment = {
        "device": device_name, "platform": jax.devices()[0].platform, "cores": threads,
        "torch_threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": load_after,
        "jlora_commit": host_facts["jlora_commit"], "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
    }
    method = {
        "time": "median wall time of one step (loss, gradients, AdamW update; forward: loss only), "
                "alternating jlora and PEFT runs, odd rounds reversed, after warm-up; over the quiet rounds "
                f"(other processes < {QUIET_CORES} cores busy during every run of the round, from /proc/stat) "
                f"when there are at least {MIN_QUIET_ROUNDS}, else over all rounds",
        "jlora_memory": "XLA compiled memory_analysis: arguments + outputs + temporaries - aliased",
        "peft_memory": ("torch.cuda.max_memory_allocated during build and two steps, minus allocated before" if args.gpu
                        else "peak RSS (VmHWM) of a fresh subprocess (one torch thread) over build and three steps, "
                             "minus its RSS after imports and a tiny warm-up model"),
        "precision": "bf16 compute, f32 weights (torch.autocast / Flax dtype=bfloat16)" if args.gpu else "float32",
        "optimizer": f"AdamW lr={args.lr} {ADAMW}",
        "mfu": flops_per_token.__doc__.split("\n\n")[1].strip() if args.gpu else None,
        "efficiency": None if args.gpu else (
            "gflop: XLA cost_analysis FLOPs of jlora's program, used for both frameworks (the same step); "
            f"matmul_fraction: the step's GFLOP/s over a float32 matmul {matmul_shape} timed in the same "
            f"alternating rounds ({MATMUL_REPEAT} calls a run, median over the counted rounds): XLA's for jlora, "
            "torch's (same thread count) for PEFT"),
    }
    rounds = {"others_cores": round_others, "quiet": quiet, "medians_over": "quiet" if counted is quiet else "all"}
    payload = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "probe", "configs", "models")}
               | {"json": str(args.json)},
               "model": args.model, "host": host_facts, "matmul_peak": peak or None,
               "environment": environment, "method": method, "rounds": rounds, "results": results,
               "target": {"lora_ratio_max": LORA_TARGET_RATIO, "met": targets}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

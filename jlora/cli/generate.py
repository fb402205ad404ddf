"""``jlora generate`` and ``jlora eval``: a base, or base + a run's adapters, continuing a prompt or scoring text."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from jlora import training
from jlora.training import checkpoint, data
from jlora.training.runinfo import RunInfo
from jlora.cli import DEFAULT_BASE, UsageError, common
from jlora.core.merge import merge
from jlora.core.multi import stack
from jlora.core.transform import adapt
from jlora.quant.quantize import dequantize


def generate_many(args) -> int:
    """The prompt continued by each checkpoint's adapters, all in one batch (one sequence per
    checkpoint) on one copy of the base: ``jlora.stack`` and per-example ``adapter_ids``."""
    from jlora.models import generate

    checkpoints = [checkpoint.Checkpointer(common.run_dir_checkpoints(path)) for path in args.checkpoint]
    infos = [RunInfo.from_json(ckpt.metadata()) for ckpt in checkpoints]
    bases = {info.base_name for info in infos}
    if args.base is None and len(bases) > 1:
        raise UsageError(f"the checkpoints were trained on different bases ({', '.join(sorted(bases))}); "
                         "one batch runs on one base")
    name = args.base or bases.pop()
    model, params, tokenizer, _ = common.load_base(name, args.dtype)
    trees = []
    for path, ckpt, info in zip(args.checkpoint, checkpoints, infos):
        state, saved = ckpt.restore(expect={"base": common.base_identity(info.base_name, params)}, base=params)
        if jax.tree.leaves(state.trainable.base):
            raise UsageError(f"{path} also trains base weights (--bias), which one shared base cannot hold per "
                             "sequence; generate with it alone")
        trees.append(common.pick_task(state.trainable.adapters, RunInfo.from_json(saved), args.task, path))
    try:
        stacked = stack(trees)
    except ValueError as error:
        raise UsageError(f"these checkpoints cannot share one batch: {error}") from None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = tokenizer.encode(prompt)
    if not ids or len(ids) >= model.max_length:
        raise UsageError(f"the prompt is {len(ids)} tokens; it needs 1 to {model.max_length - 1}")
    new = min(args.max_new_tokens, model.max_length - len(ids))
    adapted = adapt(model.apply)
    n = len(trees)
    out = generate(lambda v, tokens, cache: adapted(v["params"], v["adapters"], tokens, cache, adapter_ids=v["ids"]),
                   dict(params=params, adapters=stacked, ids=jnp.arange(n)), jnp.tile(jnp.array([ids]), (n, 1)),
                   model.init_cache(n, len(ids) + new), max_new_tokens=new, eos_id=tokenizer.eos_id,
                   rng=jax.random.key(args.seed), **sampling(args))
    for path, row in zip(args.checkpoint, out):
        print(f"==> {path} <==\n{prompt}{tokenizer.decode(row[len(ids):].tolist(), skip_special_tokens=True)}")
    return 0


def sampling(args) -> dict:
    """The sampling flags as keywords of `jlora.models.generate` (and `complete`, `chat` with ``seed``)."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty)


def load_merged(args, checkpoint_path):
    """``(model, params, tokenizer)``: the base with a run's adapters merged in once (no extra latency
    per token), or the base alone, dequantised (generation runs on the dequantised weights)."""
    if checkpoint_path:
        model, params, tokenizer, _, adapters, _ = common.load_run(checkpoint_path, args.base, args.dtype, args.quantize,
                                                                   task=args.task)
        return model, merge(params, adapters), tokenizer
    model, params, tokenizer, _ = common.load_base(args.base or DEFAULT_BASE, args.dtype, args.quantize)
    return model, dequantize(params), tokenizer


def generate_cmd(args) -> int:
    if args.checkpoint and len(args.checkpoint) > 1:
        return generate_many(args)
    model, params, tokenizer = load_merged(args, args.checkpoint and args.checkpoint[0])
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    from jlora.models import complete

    print(prompt + complete(model, params, tokenizer, prompt, args.max_new_tokens, seed=args.seed, **sampling(args)))
    return 0


def chat_cmd(args) -> int:
    """Replies to each line of stdin in turn, the model loaded, merged and compiled once."""
    from jlora.models import chat

    model, params, tokenizer = load_merged(args, args.checkpoint)
    template = tokenizer.chat_template is not None if args.template is None else args.template
    if template and tokenizer.chat_template is None:
        raise UsageError(f"{args.base or 'this base'} has no chat template; pass --no-template to continue plain text")
    interactive = sys.stdin.isatty()

    def lines():
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            if line.strip():
                yield line.rstrip("\n")

    for reply in chat(model, params, tokenizer, lines(), args.max_new_tokens, template=template, context=args.context,
                      seed=args.seed, **sampling(args)):
        print(reply, flush=True)
    return 0


def eval_cmd(args) -> int:
    info = None
    if args.checkpoint:
        model, params, tokenizer, _, adapters, info = common.load_run(args.checkpoint, args.base, args.dtype, args.quantize, task=args.task)
    else:
        (model, params, tokenizer, _), adapters = common.load_base(args.base or DEFAULT_BASE, args.dtype, args.quantize), None
    # By default the sample the run validated on (`jlora finetune`'s final perplexity), else the library's.
    recorded = info.eval or {} if info else {}
    seq_len = args.seq_len or (info.seq_len if info else None) or 128
    tokens = args.eval_tokens or recorded.get("tokens") or training.EVAL_TOKENS
    dataset = data.load(args.data, tokenizer, seq_len) if args.data else data.load_splits(tokenizer, seq_len)[1]
    sample = training.eval_sample(dataset, tokens)
    ppl = training.perplexity(training.make_eval(model.apply), params, adapters, sample, args.batch_size, args.max_batches)
    sequences = min(len(sample), args.batch_size * (args.max_batches or len(sample)))
    print(json.dumps({"perplexity": ppl, "sequences": sequences, "seq_len": seq_len}))
    return 0

"""``jlora merge``, ``export-peft`` and ``import-peft``: a run's adapters out as a merged model or a PEFT adapter, and back.

Both exports stand alone: the tokenizer files, a generation config (merge) and a README.md model card are
written with the weights, so transformers and PEFT load them with nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from jlora.core import adapter
from jlora import training
from jlora.training import checkpoint
from jlora.training.runinfo import RunInfo
from jlora.cli import DEFAULT_BASE, UsageError, common
from jlora.core.merge import merge
from jlora.core.partition import split
from jlora.interop import card, hf, peft
from jlora.quant.quantize import dequantize


def run_report(checkpoint_path) -> dict:
    """The run.json `jlora finetune` left beside the checkpoints (perplexities, command line), or {}."""
    checkpoints = common.run_dir_checkpoints(checkpoint_path)
    path = checkpoints.parent / "run.json"
    if checkpoints.name != "checkpoints" or not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a card without those facts beats a refused export
    return report if isinstance(report, dict) else {}


def card_facts(info: RunInfo, report, task=None) -> dict:
    """The :func:`jlora.interop.card.model_card` arguments a run's :class:`RunInfo` and run.json give."""
    options = info.options
    data = (info.data or {}).get("train")
    key = "valid_perplexity" + (f"/{task}" if task else "")
    if isinstance(data, dict):  # a --task run: NAME -> PATH
        data = data.get(task)
    before, after = report.get(f"{key}_before"), report.get(f"{key}_after")
    return {"use_rslora": bool(options.get("use_rslora")), "quantize": info.quantize,
            "data": data, "steps": info.step, "command": report.get("command"),
            "perplexity": (before, after) if before is not None or after is not None else None}


def save_merged(out, merged, adapters, config, tokenizer, base, dtype, facts) -> Path:
    """``merged`` (``jlora.merge(params, adapters)``) written to ``out`` in ``dtype`` with tokenizer,
    generation config and a model card describing ``adapters``."""
    hf.save_hf(out, merged, config, dtype=dtype, tokenizer=tokenizer)
    text = card.model_card(kind="merged", base=card.base_source(base), where=out, adapters=adapters,
                             dtype=hf.SAVE_DTYPES[dtype], **facts)
    card.save_model_card(out, text)
    return Path(out)


def merge_cmd(args) -> int:
    model, params, tokenizer, config, adapters, info = common.load_run(args.checkpoint, args.base, args.dtype,
                                                                       task=args.task, text=False)
    base = args.base or info.base_name
    out = common.prepare_out(args.out, args.overwrite, base)
    save_merged(out, merge(params, adapters), adapters, config, tokenizer, base, args.save_dtype,
                card_facts(info, run_report(args.checkpoint), args.task))
    with_tokenizer = "with tokenizer" if tokenizer is not None else "no tokenizer: the base has none"
    print(f"merged model ({args.save_dtype}, {with_tokenizer}) written to {args.out}", file=sys.stderr)
    return 0


def export_peft_cmd(args) -> int:
    model, params, tokenizer, config, adapters, info = common.load_run(args.checkpoint, args.base, args.dtype,
                                                                       task=args.task, text=False)
    base = args.base or info.base_name
    out = common.prepare_out(args.out, args.overwrite, base)
    source = card.base_source(base)
    facts = card_facts(info, run_report(args.checkpoint), args.task)
    reference, base_copy = source.reference, None
    if args.with_base is not None:
        # Absolute: PEFT reads a relative base_model_name_or_path from the working directory, not the adapter's.
        base_copy = (Path(args.with_base).expanduser() if args.with_base else out / "base").resolve()
        if base_copy.is_dir() and any(base_copy.iterdir()) and not args.overwrite:
            raise UsageError(f"--with-base: {base_copy} already holds files; pass --overwrite to replace them")
        hf.save_hf(base_copy, dequantize(params), config, dtype="float32", tokenizer=tokenizer)
        card.save_model_card(base_copy, f"# {source.name}, as jlora trained on it\n\nThe base weights of the "
                               f"adapter in {out.resolve()}, dequantised to float32 in Hugging Face's layout.\n")
        reference = str(base_copy)
    out = peft.export_peft(adapters, config, out, base_model_name_or_path=reference,
                                 use_rslora=facts["use_rslora"])
    if tokenizer is not None:
        hf.save_tokenizer(out, tokenizer, model_max_length=hf.context_length(config))
    card.save_model_card(out, card.model_card(kind="peft", base=source, where=out, adapters=adapters,
                                                  base_copy=base_copy, **facts))
    print(f"PEFT adapter written to {out} (base_model_name_or_path: {reference})", file=sys.stderr)
    return 0


def import_peft_cmd(args) -> int:
    base = args.base or DEFAULT_BASE
    model, params, _, config = common.load_base(base, args.dtype, text=False)  # converting encodes no text
    adapters = peft.import_peft(args.peft_dir, params, config)
    ckpt = checkpoint.Checkpointer(args.out)
    if ckpt.latest_step() is not None:
        raise UsageError(f"{ckpt.directory} already holds checkpoints; choose an empty directory")
    kinds = sorted({a.name for a in adapter.table(adapters).values()})
    frozen, trainable = split(params, adapters)
    state = training.init_state(trainable, training.TrainConfig())
    info = RunInfo(base=common.base_identity(base, params),
                   adapter={"method": "+".join(kinds), "options": {}, "bias": "none"},
                   train=dataclasses.asdict(training.TrainConfig()), data={"imported_from": str(args.peft_dir)})
    path = ckpt.save(state, info.to_json())
    print(f"jlora checkpoint written to {path}", file=sys.stderr)
    return 0

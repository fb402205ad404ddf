"""``jlora merge``, ``export-peft`` and ``import-peft``: a run's adapters out as a merged model or a PEFT adapter, and back."""

from __future__ import annotations

import dataclasses
import sys

import jlora
from jlora import adapter, checkpoint, train
from jlora.cli import DEFAULT_BASE, UsageError, common


def merge_cmd(args) -> int:
    from jlora.models.export import save_hf

    model, params, _, config, adapters, metadata = common.load_run(args.checkpoint, args.base, args.dtype, task=args.task)
    out = common.prepare_out(args.out, args.overwrite, args.base or metadata["base"]["name"])
    save_hf(out, jlora.merge(params, adapters), config)
    print(f"merged weights written to {args.out}", file=sys.stderr)
    return 0


def export_peft_cmd(args) -> int:
    import jlora.peft

    model, params, _, config, adapters, metadata = common.load_run(args.checkpoint, args.base, args.dtype, task=args.task)
    options = (metadata.get("adapter") or {}).get("options") or {}
    out = common.prepare_out(args.out, args.overwrite, args.base or metadata["base"]["name"])
    out = jlora.peft.export_peft(adapters, config, out, base_model_name_or_path=metadata["base"]["name"],
                                 use_rslora=bool(options.get("use_rslora")))
    print(f"PEFT adapter written to {out}", file=sys.stderr)
    return 0


def import_peft_cmd(args) -> int:
    import jlora.peft

    base = args.base or DEFAULT_BASE
    model, params, _, config = common.load_base(base, args.dtype)
    adapters = jlora.peft.import_peft(args.peft_dir, params, config)
    ckpt = checkpoint.Checkpointer(args.out)
    if ckpt.latest_step() is not None:
        raise UsageError(f"{ckpt.directory} already holds checkpoints; choose an empty directory")
    kinds = sorted({a.name for a in adapter.table(adapters).values()})
    frozen, trainable = jlora.split(params, adapters)
    state = train.init_state(trainable, train.TrainConfig())
    metadata = {"base": common.base_identity(base, params),
                "adapter": {"method": "+".join(kinds), "options": {}, "bias": "none"},
                "train": dataclasses.asdict(train.TrainConfig()), "data": {"imported_from": str(args.peft_dir)}}
    path = ckpt.save(state, metadata)
    print(f"jlora checkpoint written to {path}", file=sys.stderr)
    return 0

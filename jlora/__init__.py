"""jlora: LoRA for any JAX function of a parameter pytree.

    adapters = jlora.init(params, rank=8)              # trainable A/B tree
    frozen, trainable = jlora.split(params, adapters)  # what trains, what does not
    logits = jlora.adapt(model.apply)(params, adapters, tokens)
    merged = jlora.merge(params, adapters)             # plain params for export
    qparams = jlora.quantize(params, "nf4")            # QLoRA: a 4-bit frozen base, for all of the above
    result = jlora.fit(step, state, batch_at, max_steps=100, checkpointer=ckpt)  # the training loop
    stacked = jlora.stack([adapters_1, adapters_2])   # many adapters, one base: one per example
    logits = jlora.adapt(model.apply)(params, stacked, tokens, adapter_ids=ids)

The package's folders are its layers, each importing only those before it:

    core/      paths, the adapter protocol, axes, the interpreter, packed weights, adapt, per-example adapters, merge, partition, optimizer, count, multi
    kinds/     one module per adapter kind: lora, dora, ia3, pissa
    quant/     quantised bases: the formats, GGUF's blocks and files
    models/    Flax models, their checkpoints' key maps, tokenizer, generation
    training/  data, chat, losses, the step, evaluation, sharding, the loop, checkpoints, distributed, metrics
    interop/   PEFT adapters, Hugging Face exports, model cards
    cli/       the `jlora` command, which only wires the layers together

This module is the users' face, and only theirs: nothing inside the package imports through it.
Its names load on first use (PEP 562), so that `jlora --help` does not pay for importing JAX.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Public names and the module that defines each.
_NAMES = {
    "Use": "core.interpret", "adapt": "core.transform", "Adapter": "core.adapter", "ParamCount": "core.count",
    "count_params": "core.count", "merge": "core.merge", "unmerge": "core.merge", "stack": "core.multi",
    "unstack": "core.multi", "optimizer": "core.optimizer", "Trainable": "core.partition",
    "combine": "core.partition", "split": "core.partition", "LoRA": "kinds.lora", "init": "kinds.lora",
    "DoRA": "kinds.dora", "IA3": "kinds.ia3", "Quantized": "quant.quantize", "dequantize": "quant.quantize",
    "quantize": "quant.quantize", "fit": "training.loop",
}
# The modules as `jlora.<name>` (their paths before the layers became folders), and where they live now.
MODULES = {
    "paths": "core.paths", "adapter": "core.adapter", "axes": "core.axes", "transform": "core.transform",
    "partition": "core.partition", "count": "core.count", "multi": "core.multi", "lora": "kinds.lora",
    "dora": "kinds.dora", "ia3": "kinds.ia3", "pissa": "kinds.pissa", "train": "training",
    "data": "training.data", "chat": "training.chat", "loop": "training.loop", "checkpoint": "training.checkpoint",
    "distributed": "training.distributed", "metrics": "training.metrics", "peft": "interop.peft",
    "models.export": "interop.hf",
}

__all__ = sorted(_NAMES) + sorted(name for name in MODULES if "." not in name)


def __getattr__(name):
    if name in _NAMES:
        _load("kinds")  # the bundled kinds registered, for checkpoints and `describe`/`abstract`
        value = getattr(_load(_NAMES[name]), name)
    elif name in MODULES:
        _load("kinds")
        value = _load(MODULES[name])
    elif importlib.util.find_spec(f"jlora.{name}") is not None:  # a layer's package: jlora.models, jlora.core, ...
        value = _load(name)
    else:
        raise AttributeError(f"module 'jlora' has no attribute {name!r}")
    globals()[name] = value
    return value


def _load(module):
    return importlib.import_module(f"jlora.{module}")


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import jlora.train` (and the other names of MODULES) gives the module at its new place, the
    same module object, so code written against the flat layout keeps working."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("jlora.")
        if fullname.startswith("jlora.") and old in MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return _load(MODULES[spec.name.removeprefix("jlora.")])

    def exec_module(self, module):
        pass


sys.meta_path.append(_OldPaths())


def __dir__():
    return sorted(set(globals()) | set(__all__))

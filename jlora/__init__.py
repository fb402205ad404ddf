"""jlora: LoRA for any JAX function of a parameter pytree.

    adapters = jlora.init(params, rank=8)              # trainable A/B tree
    frozen, trainable = jlora.split(params, adapters)  # what trains, what does not
    logits = jlora.adapt(model.apply)(params, adapters, tokens)
    merged = jlora.merge(params, adapters)             # plain params for export
    qparams = jlora.quantize(params, "nf4")            # QLoRA: a 4-bit frozen base, for all of the above
    result = jlora.fit(step, state, batch_at, max_steps=100, checkpointer=ckpt)  # the training loop
    stacked = jlora.stack([adapters_1, adapters_2])   # many adapters, one base: one per example
    logits = jlora.adapt(model.apply)(params, stacked, tokens, adapter_ids=ids)
"""

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

# Public names and the module that defines each. They load on first use (PEP 562), so that
# `jlora --help` and `import jlora.cli` do not pay for importing JAX.
_NAMES = {
    "Use": "transform", "adapt": "transform", "Adapter": "adapter", "ParamCount": "count", "count_params": "count",
    "LoRA": "lora", "init": "lora", "fit": "loop", "DoRA": "dora", "IA3": "ia3", "merge": "merge", "unmerge": "merge",
    "stack": "multi", "unstack": "multi", "optimizer": "optimizer", "Trainable": "partition", "combine": "partition",
    "split": "partition", "Quantized": "quantize", "dequantize": "quantize", "quantize": "quantize",
}
_MODULES = {"dora", "ia3", "multi", "pissa"}

__all__ = sorted(_NAMES) + sorted(_MODULES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"jlora.{_NAMES[name]}"), name)
    elif name in _MODULES or importlib.util.find_spec(f"jlora.{name}") is not None:  # any submodule, as eagerly
        value = importlib.import_module(f"jlora.{name}")
    else:
        raise AttributeError(f"module 'jlora' has no attribute {name!r}")
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    # Importing jlora.merge (or .quantize, .optimizer) binds the package attribute of that name to
    # the submodule; the public name is the function, so keep the function.
    def __setattr__(self, name, value):
        if not (name in _NAMES and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(__all__))

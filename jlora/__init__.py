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

from jlora.transform import Use, adapt
from jlora.adapter import Adapter
from jlora.count import ParamCount, count_params
from jlora.lora import LoRA, init
from jlora.loop import fit
from jlora import dora, ia3, multi, pissa
from jlora.dora import DoRA
from jlora.ia3 import IA3
from jlora.merge import merge, unmerge
from jlora.multi import stack, unstack
from jlora.optimizer import optimizer
from jlora.partition import Trainable, combine, split
from jlora.quantize import Quantized, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "Adapter", "DoRA", "IA3", "LoRA", "ParamCount", "Quantized", "Trainable", "Use", "adapt", "combine", "count_params",
    "dequantize", "fit", "init", "merge", "optimizer", "quantize", "split", "stack", "unmerge", "unstack", "dora", "ia3",
    "multi", "pissa",
]

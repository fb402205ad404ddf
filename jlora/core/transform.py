"""``jlora.adapt``: factored adapters for any JAX function, by a jaxpr interpreter that rewrites each use of a weight.

``fn`` is traced once per input signature with ``jax.make_jaxpr`` and evaluated by the interpreter
(``jlora.core.interpret``), which carries every targeted weight as a :class:`Use` (its base value
W0 plus what its adapter adds) instead of a merged array; a quantised weight is made dense only
inside the equations that use it (``jlora.core.packed``); with ``adapter_ids``, each example of the
batch runs with its own adapter of a stack (``jlora.core.per_example``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jlora.core import paths, per_example
from jlora.core.adapter import fitted_table
from jlora.core.interpret import Context, Use, eval_materialized, is_dynamic
from jlora.core.packed import Deferred

__all__ = ["Use", "adapt"]  # Use: where the kinds and users have always found it


def _traceable(x):
    """A packed weight is traced as the dense array it stands for."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if paths.is_packed(x) else x


def _signature(x):
    return (tuple(x.shape), jnp.result_type(x), getattr(x, "weak_type", False))


def adapt(fn: Callable, *, dropout: float = 0.0, strict: bool = False) -> Callable:
    """Turns ``fn(params, *args, **kw)`` into ``g(params, adapters, *args, lora_rng=None, **kw)``.

    ``g`` equals ``fn(jlora.merge(params, adapters), *args, **kw)`` but never forms W0 + ΔW: every
    use of an adapted weight is rewritten into factored form (``x·W0 + s·(x·A)·B`` for LoRA), so
    gradients never take the size of W0 and no merged copy is made. Works on any JAX function:
    linen ``apply``, an NNX model through ``nnx.split``/``nnx.merge``, plain jnp code; and under
    ``jax.jit``, ``jax.grad``, ``jax.vmap`` and ``jax.checkpoint``.

    ``params`` may hold quantised weights (``jlora.quantize``): each is dequantised only inside the
    equations that use it, and recomputed for the backward pass (see :class:`~jlora.core.packed.Deferred`).

    Arrays among ``args``/``kw`` are traced; everything else (Python numbers, flags, strings) is
    static, and ``fn`` is traced again when it changes.

    **Many adapters in one batch.** ``g(params, stacked, *args, adapter_ids=ids)`` takes a stack of
    adapter trees (``jlora.stack``) and int ids ``[B]``: example ``i`` runs with adapter ``ids[i]``,
    ``-1`` with the base alone, in values and gradients (each adapter's gradient is the one its own
    examples give it). One copy of the base serves every example; each use of a weight takes each
    example's factors (``x_i·A[ids[i]]``), so no merged or per-adapter copy of a weight is made
    (DoRA forms each adapter's ΔW for its column norms, once per call, as it does for one adapter).
    The batch axis is read from the inputs: an array argument is split into examples along axis
    ``batch_axis`` (default 0) when that axis has ``B`` entries; every other argument (scalars, a
    cache index, arrays of other lengths there) is shared by all examples. Where that is ambiguous
    (a shared array whose axis happens to have ``B`` entries), ``batch_axis`` may instead be a tuple
    with one entry per positional argument, an axis or ``None`` (shared), as ``jax.vmap``'s
    ``in_axes``. ``fn`` must keep examples apart (a model's ``apply``; a loss averaged over the batch
    is computed outside): an output is split back along the one axis that has ``B`` entries for the
    batch and one for a single example, or is shared when its shape does not depend on the batch.

    Args:
      fn: a function whose first argument is the parameter pytree.
      dropout: LoRA dropout on the adapter path's input (the paper's GPT-2 runs use 0.1); applied
        only when ``g`` gets ``lora_rng``.
      strict: raise instead of warning when a weight has a use with no factored rule.

    Returns:
      The adapted function.

    Example:
      >>> from jlora.models.gpt2 import GPT2, GPT2Config
      >>> model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
      >>> tokens = jnp.array([[1, 2, 3, 4]])
      >>> params = model.init(jax.random.key(0), tokens)
      >>> adapters = jax.tree.map(lambda x: x + 0.1, jlora.init(params, rank=4))  # B ≠ 0, as after training
      >>> logits = jlora.adapt(model.apply)(params, adapters, tokens)
      >>> logits.shape
      (1, 4, 64)
      >>> bool(jnp.allclose(logits, model.apply(jlora.merge(params, adapters), tokens), atol=1e-5))
      True
      >>> stacked = jlora.stack([adapters, jlora.init(params, rank=2)])  # the second leaves the base as it is
      >>> mixed = jlora.adapt(model.apply)(params, stacked, jnp.tile(tokens, (3, 1)), adapter_ids=jnp.array([0, 1, -1]))
      >>> bool(jnp.allclose(mixed[0], logits[0], atol=1e-5)), bool(jnp.allclose(mixed[2], model.apply(params, tokens)[0], atol=1e-5))
      (True, True)
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    traces: dict = {}

    def cached(signature, make):
        try:
            trace = traces.get(signature)
        except TypeError:  # an unhashable static argument: trace every call
            signature, trace = None, None
        if trace is None:
            trace = make()
            if signature is not None:
                traces[signature] = trace
        return trace

    @functools.wraps(fn)
    def adapted(params, adapters, *args, lora_rng=None, adapter_ids=None, batch_axis=0, **kwargs):
        flat, params_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=paths.is_packed)
        names = [paths.path_str(kp) for kp, _ in flat]
        weights = [w for _, w in flat]
        arg_leaves, args_def = jax.tree.flatten((args, kwargs))
        dynamic = [x for x in arg_leaves if is_dynamic(x)]
        static = tuple(None if is_dynamic(x) else x for x in arg_leaves)

        def traced(weights, dynamic):
            it = iter(dynamic)
            leaves = [next(it) if is_dynamic(x) else x for x in arg_leaves]
            a, kw = jax.tree.unflatten(args_def, leaves)
            return fn(jax.tree.unflatten(params_def, weights), *a, **kw)

        signature = (params_def, args_def, tuple(_signature(_traceable(w)) for w in weights),
                     tuple(map(_signature, dynamic)), static)
        ctx = Context(strict, dropout, lora_rng)
        if adapter_ids is not None:
            packed = [name for name, w in zip(names, weights) if paths.is_packed(w)]
            if packed:
                raise ValueError(f"adapter_ids with a quantised base is not supported yet ({packed[0]} is quantised); "
                                 "run per-example adapters on jlora.dequantize(params)")
            return per_example.evaluate(
                cached, signature, traced, params, adapters, names, weights, dynamic, args, arg_leaves,
                adapter_ids, batch_axis, ctx,
            )

        def make():
            closed, shapes = jax.make_jaxpr(traced, return_shape=True)(list(map(_traceable, weights)), dynamic)
            return closed, jax.tree.structure(shapes)

        found = fitted_table(params, adapters)
        closed, out_def = cached(signature, make)
        inputs = []
        for name, w in zip(names, weights):
            adapter = found.get(name)
            if paths.is_packed(w):
                inputs.append(Deferred(w, adapter, name))
                continue
            use = adapter.use(w, name) if adapter is not None else None
            inputs.append(w if adapter is None else use if use is not None else adapter.merge(w))
        outs = eval_materialized(closed.jaxpr, closed.consts, [*inputs, *dynamic], ctx)
        return jax.tree.unflatten(out_def, outs)

    return adapted

"""Factored adapters for any JAX function: a jaxpr interpreter that rewrites each use of a weight.

``fn`` is traced once per input signature with ``jax.make_jaxpr`` and evaluated by :func:`_eval`,
which carries every targeted weight as a :class:`Use` (its base value W0 plus what its adapter
adds) instead of a merged array. Each equation that consumes a :class:`Use` asks it for a rule:

- ``dot_general`` (Dense, DenseGeneral, einsum, a tied head's ``x·Wᵀ``): ``x·W0 + s·((x·A)·B)``;
- ``gather`` of rows (embedding lookup), ``conv_general_dilated``;
- ``transpose``, ``reshape``, ``squeeze``, ``convert_element_type`` keep the weight factored;
- nested jaxprs (``jit``, custom_jvp/vjp calls, ``checkpoint``, ``cond``, ``scan``, ``while``) are
  evaluated by the same interpreter, with stacked layers sliced together with their factors.

Any other use gets the merged weight, for that use only, with a warning (an error if ``strict``).

With ``adapter_ids`` (many adapters, one batch), ``fn`` is traced for one example and evaluated under
``jax.vmap`` over the batch, each example's :class:`Use` built from its own adapter of the stack;
the base weights are shared by every example, so XLA sees one batched matmul with W0 per use.
This is the documented route for function transformations (a jaxpr interpreter), so it does not
depend on tracer internals.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from jlora.core import paths
from jlora.core.adapter import fitted_table


class Use(abc.ABC):
    """A targeted weight inside the interpreter: ``base`` is W0 as this use sees it (transposed,
    reshaped, cast, ...); the adapter's part is kept apart so each use can be rewritten.

    Each method returns a new :class:`Use`, the op's result, or ``None`` when the kind has no
    factored form for that use (the interpreter then uses :meth:`merged`).
    """

    base: jax.Array
    path: str

    @abc.abstractmethod
    def merged(self) -> jax.Array:
        """W0 + ΔW as this use sees it."""

    def transpose(self, permutation) -> Use | None:
        return None

    def reshape(self, new_sizes) -> Use | None:
        return None

    def squeeze(self, dimensions) -> Use | None:
        return None

    def convert(self, new_dtype) -> Use | None:
        return None

    def dot_general(self, x, x_is_lhs: bool, base_out, params, ctx) -> jax.Array | None:
        return None

    def gather(self, indices, base_out, params) -> jax.Array | None:
        return None

    def conv(self, x, base_out, params, ctx) -> jax.Array | None:
        return None

    def unstack(self) -> tuple[Any, Callable[[Any], Use]] | None:
        """For ``scan`` over stacked layers: arrays with the layer axis first, and a function that
        rebuilds the per-layer :class:`Use` from their slices."""
        return None


@dataclasses.dataclass
class Context:
    """What one evaluation of an adapted function shares: options and a key stream (dropout)."""

    strict: bool
    dropout: float
    rng: jax.Array | None
    counter: int = 0

    def next_key(self) -> jax.Array | None:
        """A fresh key of this evaluation's stream (for a kind's dropout); None without an rng."""
        if self.rng is None:
            return None
        self.counter += 1
        return jax.random.fold_in(self.rng, self.counter)

    def fold(self, data):
        """A child context whose keys also depend on ``data`` (a scan's iteration index)."""
        if self.rng is None:
            return self
        self.counter += 1
        return Context(self.strict, self.dropout, jax.random.fold_in(jax.random.fold_in(self.rng, self.counter), data))


def _bind(eqn, invals):
    bound = eqn.primitive.get_bind_params(eqn.params)
    # JAX < 0.8 returns (subfuns, params); later versions return params alone.
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _materialize(x):
    if isinstance(x, Deferred):
        x = x.value(None)
    return x.merged() if isinstance(x, Use) else x


def _fallback(ctx: Context, eqn, invals):
    used = paths.fmt_paths(v.path for v in invals if isinstance(v, Use))
    _warn_or_raise(ctx, used, f"`{eqn.primitive.name}`, which has no factored rule")
    return _bind(eqn, [_materialize(v) for v in invals])


def _eval_eqn(ctx: Context, eqn, invals) -> list:
    if any(isinstance(v, Use) for v in invals):
        rule = _RULES.get(eqn.primitive.name)
        outs = rule(ctx, eqn, invals) if rule else None
        return _fallback(ctx, eqn, invals) if outs is None else outs
    return _bind(eqn, invals)


def _eval(jaxpr: core.Jaxpr, consts: Sequence, args: Sequence, ctx: Context) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, Deferred) for v in invals):
            outs = _deferred(ctx, eqn, invals)
        else:
            outs = _eval_eqn(ctx, eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            if not isinstance(var, core.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


# ---- rules: each returns the list of outputs, or None for "no factored form here" ----


def _view_rule(method: str, param: str):
    def rule(ctx, eqn, invals):
        if len(invals) != 1 or (method == "reshape" and eqn.params.get("dimensions") is not None):
            return None
        out = getattr(invals[0], method)(eqn.params[param])
        return None if out is None else [out]

    return rule


def _dot_general(ctx, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, Use) == isinstance(rhs, Use):
        return None
    use, x, x_is_lhs = (rhs, lhs, True) if isinstance(rhs, Use) else (lhs, rhs, False)
    base_out = _bind(eqn, [x, use.base] if x_is_lhs else [use.base, x])[0]
    out = use.dot_general(x, x_is_lhs, base_out, eqn.params, ctx)
    return None if out is None else [out]


def _gather(ctx, eqn, invals):
    operand, indices = invals
    if not isinstance(operand, Use) or isinstance(indices, Use):
        return None
    base_out = _bind(eqn, [operand.base, indices])[0]
    out = operand.gather(indices, base_out, eqn.params)
    return None if out is None else [out]


def _conv(ctx, eqn, invals):
    x, kernel = invals
    if isinstance(x, Use) or not isinstance(kernel, Use):
        return None
    base_out = _bind(eqn, [x, kernel.base])[0]
    out = kernel.conv(x, base_out, eqn.params, ctx)
    return None if out is None else [out]


def _inline(param: str):
    """Calls that only wrap a jaxpr (jit, custom_jvp/vjp): evaluate the body in place. For custom
    derivatives this differentiates the body itself, which is the same function."""

    def rule(ctx, eqn, invals):
        closed = eqn.params[param]
        return _eval(closed.jaxpr, closed.consts, invals, ctx)

    return rule


def _checkpoint(ctx, eqn, invals):
    body = functools.partial(_eval_materialized, eqn.params["jaxpr"], (), ctx=ctx)
    return jax.checkpoint(
        lambda *xs: body(xs), prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"]
    )(*invals)


def _eval_materialized(jaxpr, consts, args, ctx):
    return [_materialize(v) for v in _eval(jaxpr, consts, args, ctx)]


def _cond(ctx, eqn, invals):
    index, *operands = invals
    branches = [
        functools.partial(lambda br, *ops: _eval_materialized(br.jaxpr, br.consts, ops, ctx), br)
        for br in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *operands)


def _scan(ctx, eqn, invals):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    carry = [_materialize(v) for v in carry]
    stacked, rebuilders = [], []
    for i, x in enumerate(xs):
        unstacked = x.unstack() if isinstance(x, (Use, Deferred)) else None
        if unstacked is None:
            stacked.append(_materialize(x) if isinstance(x, Use) else x)
            rebuilders.append(None)
            if isinstance(x, Use):
                _warn_or_raise(ctx, repr(x.path), "scan (weight not stacked along its layer axis)")
        else:
            stacked.append(unstacked[0])
            rebuilders.append(unstacked[1])

    def body(c, step):
        xs_i, index = step
        xs_i = [r(x) if r else x for r, x in zip(rebuilders, xs_i)]
        outs = _eval_materialized(p["jaxpr"].jaxpr, p["jaxpr"].consts, [*consts, *c, *xs_i], ctx.fold(index))
        return outs[:n_carry], outs[n_carry:]

    carry_out, ys = lax.scan(
        body, carry, (stacked, jnp.arange(p["length"])), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry_out, *ys]


def _while(ctx, eqn, invals):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    carry = [_materialize(v) for v in carry]
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
    return lax.while_loop(
        lambda c: _eval_materialized(cj.jaxpr, cj.consts, [*cond_consts, *c], ctx)[0],
        lambda c: _eval_materialized(bj.jaxpr, bj.consts, [*body_consts, *c], ctx),
        carry,
    )


def _warn_or_raise(ctx, names: str, what: str):
    """The one place a use without a factored rule is reported: a warning, or an error if strict."""
    message = f"jlora.adapt: {names} used by {what}; that use gets the merged weight W0 + ΔW"
    if ctx.strict:
        raise ValueError(message + " (strict=True)")
    warnings.warn(message, stacklevel=3)


_RULES: dict[str, Callable] = {
    "transpose": _view_rule("transpose", "permutation"),
    "reshape": _view_rule("reshape", "new_sizes"),
    "squeeze": _view_rule("squeeze", "dimensions"),
    "convert_element_type": _view_rule("convert", "new_dtype"),
    "dot_general": _dot_general,
    "gather": _gather,
    "conv_general_dilated": _conv,
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "custom_jvp_call": _inline("call_jaxpr"),
    "custom_vjp_call": _inline("call_jaxpr"),
    "checkpoint": _checkpoint,
    "remat2": _checkpoint,
    "cond": _cond,
    "scan": _scan,
    "while": _while,
}


# ---- packed weights (a quantised base): dense only inside the equation that uses them ----


class _Eqn:
    """An equation as a pytree meta field: compared and hashed by identity."""

    __slots__ = ("eqn",)

    def __init__(self, eqn):
        self.eqn = eqn


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "adapter"], meta_fields=["path", "views"])
@dataclasses.dataclass(frozen=True)
class Deferred:
    """A :class:`~jlora.paths.Packed` weight (``jlora.quantize``) on its way to its uses.

    Views of it (transpose, reshape, squeeze, a cast) are only recorded; jit, checkpoint and cond
    pass it on as a pytree of its packed arrays; a scan over stacked layers slices it with its
    adapter, one layer per iteration (:meth:`unstack`); any other equation that reads it runs under
    ``jax.checkpoint`` with the weight made dense, its adapter applied and the views replayed
    inside, so a dense copy lives for one use only and the backward pass recomputes it.
    """

    packed: Any
    adapter: Any
    path: str
    views: tuple = ()

    def unstack(self) -> tuple[Any, Callable[[Any], Deferred]] | None:
        """For ``scan`` over stacked layers, as :meth:`Use.unstack`: the weight's packed arrays and
        its adapter's, sliced by the scan along their layer axis, so each iteration dequantises its
        own layer only; None when the packed weight has no stacked axis or a view was taken."""
        if self.views or self.packed.lead < 1 or (self.adapter is not None and self.adapter.stack_axes < 1):
            return None
        packed_meta = self.packed.stacked_meta(-1)
        adapter_meta = None if self.adapter is None else self.adapter.stacked_meta(-1)

        def layer(sliced: Deferred) -> Deferred:  # the slices still carry the stack's static fields
            adapter = None if sliced.adapter is None else dataclasses.replace(sliced.adapter, **adapter_meta)
            return Deferred(dataclasses.replace(sliced.packed, **packed_meta), adapter, self.path)

        return self, layer

    def value(self, ctx: Context | None):
        w = self.packed.dense()
        use = None if self.adapter is None else self.adapter.use(w, self.path)
        x = w if self.adapter is None else use if use is not None else self.adapter.merge(w)
        for view in self.views:
            eqn = view.eqn
            if not isinstance(x, Use):
                x = _bind(eqn, [x])[0]
                continue
            outs = _RULES[eqn.primitive.name](ctx, eqn, [x])
            if outs is None:  # no factored view: the merged weight, reported as anywhere else
                outs = _bind(eqn, [x.merged()]) if ctx is None else _fallback(ctx, eqn, [x])
            x = outs[0]
        return x


_DEFERRED_VIEWS = ("transpose", "reshape", "squeeze", "convert_element_type")
_DEFERRED_PASS = ("jit", "pjit", "closed_call", "custom_jvp_call", "custom_vjp_call", "checkpoint", "remat2", "cond")


def _scan_slices(eqn, invals) -> bool:
    """Whether a scan can take its packed weights layer by layer: each is a stacked ``xs`` (or a
    constant, dequantised at its uses in the body), none is carried."""
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    carry, xs = invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    return not any(isinstance(x, Deferred) for x in carry) and all(
        x.unstack() is not None for x in xs if isinstance(x, Deferred))


def _deferred(ctx, eqn, invals):
    name = eqn.primitive.name
    if name in _DEFERRED_VIEWS and len(invals) == 1:
        return [dataclasses.replace(invals[0], views=invals[0].views + (_Eqn(eqn),))]
    if name in _DEFERRED_PASS:
        return _RULES[name](ctx, eqn, invals)
    if name == "scan" and _scan_slices(eqn, invals):
        return _scan(ctx, eqn, invals)

    def use(invals):
        dense = [v.value(ctx) if isinstance(v, Deferred) else v for v in invals]
        return [_materialize(v) for v in _eval_eqn(ctx, eqn, dense)]

    return jax.checkpoint(use)(invals)


# ---- the public transformation ----


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


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
    equations that use it, and recomputed for the backward pass (see :class:`Deferred`).

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
        dynamic = [x for x in arg_leaves if _is_dynamic(x)]
        static = tuple(None if _is_dynamic(x) else x for x in arg_leaves)

        def traced(weights, dynamic):
            it = iter(dynamic)
            leaves = [next(it) if _is_dynamic(x) else x for x in arg_leaves]
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
            return _per_example(
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
        outs = _eval_materialized(closed.jaxpr, closed.consts, [*inputs, *dynamic], ctx)
        return jax.tree.unflatten(out_def, outs)

    return adapted


# ---- many adapters, one batch: each example with its own adapter of a stack ----


def _example_axes(args, arg_leaves, batch_axis, n_examples: int) -> list:
    """The axis each array leaf of ``(args, kwargs)`` is split into examples along, or None (shared)."""
    if isinstance(batch_axis, (tuple, list)):
        if len(batch_axis) != len(args):
            raise ValueError(f"batch_axis={batch_axis!r} has {len(batch_axis)} entries for {len(args)} positional arguments")
        given = [ax for ax, arg in zip(batch_axis, args) for _ in jax.tree.leaves(arg)]
        given += [None] * (len(arg_leaves) - len(given))  # keyword arguments: shared
    else:
        given = None
    out = []
    for k, x in enumerate(arg_leaves):
        if not _is_dynamic(x):
            continue
        ax = batch_axis if given is None else given[k]
        if ax is not None and not -x.ndim <= ax < x.ndim:
            if given is not None:
                raise ValueError(f"batch_axis {ax} is outside an argument of shape {tuple(x.shape)}")
            ax = None
        ax = None if ax is None else ax % x.ndim
        if ax is not None and x.shape[ax] != n_examples:
            if given is not None:
                raise ValueError(
                    f"an argument of shape {tuple(x.shape)} has {x.shape[ax]} entries along batch_axis {ax}, "
                    f"but adapter_ids has {n_examples}"
                )
            ax = None
        out.append(ax)
    if all(ax is None for ax in out):
        raise ValueError(
            f"no array argument has {n_examples} entries (len(adapter_ids)) along batch_axis={batch_axis!r}: "
            "nothing to split into examples"
        )
    return out


def _output_axes(one, full, n_examples: int) -> list:
    """Where each output is split into examples: the axis with 1 entry for one example and ``n_examples``
    for the batch; None for an output whose shape is the same for both (shared)."""
    out = []
    for k, (s1, sb) in enumerate(zip(one, full)):
        s1, sb = tuple(s1.shape), tuple(sb.shape)
        if s1 == sb:
            out.append(None)
            continue
        changed = [d for d in range(len(s1)) if len(s1) == len(sb) and s1[d] != sb[d]]
        if len(s1) != len(sb) or len(changed) != 1 or (s1[changed[0]], sb[changed[0]]) != (1, n_examples):
            raise ValueError(
                f"output {k} has shape {sb} for the batch but {s1} for one example: per-example adapters need "
                f"fn to keep examples apart along one axis of {n_examples} entries"
            )
        out.append(changed[0])
    return out


def _stacked_use(adapter, w, path: str):
    """A kind's :class:`Use` for each of a stack's adapters, without copying ``w``:
    ``(select, n)`` where ``select(i, valid)`` is the Use of adapter ``i`` (the base alone where not
    ``valid``), or a merged weight for a kind without a factored form."""
    first = jax.tree.map(lambda x: x[0], adapter)
    neutral = first.identity(w)
    probe = first.use(w, path)
    if probe is None:

        def merged(i, valid):
            chosen = jax.tree.map(lambda x: x[i], adapter).merge(w)
            return chosen if neutral is None else jnp.where(valid, chosen, w)

        return merged, neutral is not None
    leaves, treedef = jax.tree.flatten(probe)
    shared = [leaf is w for leaf in leaves]  # W0 itself: one copy for every adapter and example

    def own(one):
        return [leaf for leaf, s in zip(jax.tree.leaves(one.use(w, path)), shared) if not s]

    per_adapter = jax.vmap(own)(adapter)
    fallback = None if neutral is None else [lax.stop_gradient(x) for x in own(neutral)]

    def select(i, valid):
        chosen = [x[i] for x in per_adapter]
        if fallback is not None:
            chosen = [jnp.where(valid, x, f) for x, f in zip(chosen, fallback)]
        it = iter(chosen)
        return jax.tree.unflatten(treedef, [w if s else next(it) for s in shared])

    return select, neutral is not None


def _per_example(cached, signature, traced, params, stacked, names, weights, dynamic, args, arg_leaves,
                 adapter_ids, batch_axis, ctx):
    from jlora.core import multi  # the stack's checks; multi builds on this module

    found, n = multi.fitted_table(params, stacked)
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be a 1-D int array (one id per example), got {ids.dtype} {ids.shape}")
    n_examples = ids.shape[0]
    if not isinstance(adapter_ids, jax.core.Tracer):
        bad = np.asarray(adapter_ids)[(np.asarray(adapter_ids) < -1) | (np.asarray(adapter_ids) >= n)]
        if bad.size:
            raise ValueError(f"adapter id {int(bad[0])} is outside -1..{n - 1} (-1: base only; the stack holds {n})")
    axes_in = _example_axes(args, arg_leaves, batch_axis, n_examples)

    def make():
        one = [
            x if ax is None else jax.ShapeDtypeStruct(x.shape[:ax] + (1,) + x.shape[ax + 1 :], x.dtype,
                                                     weak_type=getattr(x, "weak_type", False))
            for x, ax in zip(dynamic, axes_in)
        ]
        closed, shapes = jax.make_jaxpr(traced, return_shape=True)(weights, one)
        full = jax.eval_shape(traced, weights, dynamic)
        ones, out_def = jax.tree.flatten(shapes)
        axes_out = [0] * len(ones) if n_examples == 1 else _output_axes(ones, jax.tree.leaves(full), n_examples)
        return closed, out_def, axes_out

    closed, out_def, axes_out = cached((signature, "per-example", tuple(axes_in), n_examples), make)
    selects = {name: _stacked_use(found[name], w, name) for name, w in zip(names, weights) if name in found}
    if not isinstance(adapter_ids, jax.core.Tracer) and np.any(np.asarray(adapter_ids) < 0):
        lacking = [name for name, (_, has_identity) in selects.items() if not has_identity]
        if lacking:
            raise ValueError(f"adapter id -1 (base only) needs an identity adapter, which the kinds at "
                             f"{paths.fmt_paths(lacking)} do not define")

    def example(dynamic_one, adapter_id, index):
        valid, at = adapter_id >= 0, jnp.maximum(adapter_id, 0)
        inputs = [selects[name][0](at, valid) if name in selects else w for name, w in zip(names, weights)]
        dynamic_one = [x if ax is None else jnp.expand_dims(x, ax) for x, ax in zip(dynamic_one, axes_in)]
        outs = _eval_materialized(closed.jaxpr, closed.consts, [*inputs, *dynamic_one], ctx.fold(index))
        if n_examples == 1:
            return outs
        return [o if ax is None else jnp.squeeze(o, ax) for o, ax in zip(outs, axes_out)]

    try:
        outs = jax.vmap(example, in_axes=(axes_in, 0, 0), out_axes=axes_out)(dynamic, ids, jnp.arange(n_examples))
    except ValueError as error:
        if "out_axes" not in str(error):
            raise
        shared = [k for k, ax in enumerate(axes_out) if ax is None]
        raise ValueError(
            f"outputs {shared} have the same shape for one example as for the batch but depend on the example "
            "(a mean over the batch?): per-example adapters need fn to keep examples apart; reduce outside adapt"
        ) from None
    if n_examples == 1:
        outs = [o[0] for o in outs]
    return jax.tree.unflatten(out_def, outs)

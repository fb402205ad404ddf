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

from jlora import paths
from jlora.adapter import fitted_table


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
        unstacked = x.unstack() if isinstance(x, Use) else None
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
    pass it on as a pytree of its packed arrays; any other equation that reads it runs under
    ``jax.checkpoint`` with the weight made dense, its adapter applied and the views replayed
    inside, so a dense copy lives for one use only and the backward pass recomputes it.
    """

    packed: Any
    adapter: Any
    path: str
    views: tuple = ()

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


def _deferred(ctx, eqn, invals):
    name = eqn.primitive.name
    if name in _DEFERRED_VIEWS and len(invals) == 1:
        return [dataclasses.replace(invals[0], views=invals[0].views + (_Eqn(eqn),))]
    if name in _DEFERRED_PASS:
        return _RULES[name](ctx, eqn, invals)

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
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    traces: dict = {}

    @functools.wraps(fn)
    def adapted(params, adapters, *args, lora_rng=None, **kwargs):
        found = fitted_table(params, adapters)
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

        signature = (params_def, args_def, tuple(_signature(_traceable(w)) for w in weights), tuple(map(_signature, dynamic)), static)
        try:
            trace = traces.get(signature)
        except TypeError:  # an unhashable static argument: trace every call
            signature, trace = None, None
        if trace is None:
            closed, shapes = jax.make_jaxpr(traced, return_shape=True)(list(map(_traceable, weights)), dynamic)
            trace = (closed, jax.tree.structure(shapes))
            if signature is not None:
                traces[signature] = trace
        closed, out_def = trace

        inputs = []
        for name, w in zip(names, weights):
            adapter = found.get(name)
            if paths.is_packed(w):
                inputs.append(Deferred(w, adapter, name))
                continue
            use = adapter.use(w, name) if adapter is not None else None
            inputs.append(w if adapter is None else use if use is not None else adapter.merge(w))
        ctx = Context(strict, dropout, lora_rng)
        outs = _eval_materialized(closed.jaxpr, closed.consts, [*inputs, *dynamic], ctx)
        return jax.tree.unflatten(out_def, outs)

    return adapted

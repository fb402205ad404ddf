"""The jaxpr interpreter behind ``jlora.adapt``: it evaluates a traced function equation by equation,
carrying every targeted weight as a :class:`Use` (its base value W0 plus what its adapter adds)
instead of a merged array. Each equation that consumes a :class:`Use` asks it for a rule (:data:`RULES`):

- ``dot_general`` (Dense, DenseGeneral, einsum, a tied head's ``x·Wᵀ``): ``x·W0 + s·((x·A)·B)``;
- ``gather`` of rows (embedding lookup), ``conv_general_dilated``;
- ``transpose``, ``reshape``, ``squeeze``, ``convert_element_type`` keep the weight factored;
- nested jaxprs (``jit``, custom_jvp/vjp calls, ``checkpoint``, ``cond``, ``scan``, ``while``) are
  evaluated by the same interpreter, with stacked layers sliced together with their factors.

Any other use gets the merged weight, for that use only, with a warning (an error if ``strict``).
A weight the interpreter must not make dense up front (a quantised base, ``jlora.core.packed``) is
a :class:`Pending`: it evaluates the equations that read it itself. This is the documented route
for function transformations (a jaxpr interpreter), so it does not depend on tracer internals.
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



class Pending(abc.ABC):
    """A weight carried through the interpreter unevaluated (a packed weight, ``jlora.core.packed``):
    every equation that reads one is handed to its :meth:`evaluate`, not to :data:`RULES`."""

    @abc.abstractmethod
    def value(self, ctx: Context | None):
        """The weight for one use: an array, or a :class:`Use` when an adapter sits on it."""

    @abc.abstractmethod
    def evaluate(self, ctx: Context, eqn, invals) -> list:
        """The outputs of ``eqn``, one of whose inputs ``invals`` is this weight."""

    def unstack(self) -> tuple[Any, Callable[[Any], Pending]] | None:
        """As :meth:`Use.unstack`, for ``scan`` over stacked layers."""
        return None


def bind(eqn, invals):
    """``eqn``'s primitive applied to plain values: its outputs, as a list."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    # JAX < 0.8 returns (subfuns, params); later versions return params alone.
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def materialize(x):
    """A value as a plain array: a :class:`Use` merged, a :class:`Pending` made dense."""
    if isinstance(x, Pending):
        x = x.value(None)
    return x.merged() if isinstance(x, Use) else x


def fallback(ctx: Context, eqn, invals):
    """``eqn`` on merged weights, for a use with no factored rule (reported by :func:`warn_or_raise`)."""
    used = paths.fmt_paths(v.path for v in invals if isinstance(v, Use))
    warn_or_raise(ctx, used, f"`{eqn.primitive.name}`, which has no factored rule")
    return bind(eqn, [materialize(v) for v in invals])


def eval_eqn(ctx: Context, eqn, invals) -> list:
    """One equation: by its rule where it reads a :class:`Use`, as it stands otherwise."""
    if any(isinstance(v, Use) for v in invals):
        rule = RULES.get(eqn.primitive.name)
        outs = rule(ctx, eqn, invals) if rule else None
        return fallback(ctx, eqn, invals) if outs is None else outs
    return bind(eqn, invals)


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
        pending = next((v for v in invals if isinstance(v, Pending)), None)
        outs = eval_eqn(ctx, eqn, invals) if pending is None else pending.evaluate(ctx, eqn, invals)
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
    base_out = bind(eqn, [x, use.base] if x_is_lhs else [use.base, x])[0]
    out = use.dot_general(x, x_is_lhs, base_out, eqn.params, ctx)
    return None if out is None else [out]


def _gather(ctx, eqn, invals):
    operand, indices = invals
    if not isinstance(operand, Use) or isinstance(indices, Use):
        return None
    base_out = bind(eqn, [operand.base, indices])[0]
    out = operand.gather(indices, base_out, eqn.params)
    return None if out is None else [out]


def _conv(ctx, eqn, invals):
    x, kernel = invals
    if isinstance(x, Use) or not isinstance(kernel, Use):
        return None
    base_out = bind(eqn, [x, kernel.base])[0]
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
    body = functools.partial(eval_materialized, eqn.params["jaxpr"], (), ctx=ctx)
    return jax.checkpoint(
        lambda *xs: body(xs), prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"]
    )(*invals)


def eval_materialized(jaxpr, consts, args, ctx):
    """``jaxpr`` evaluated by the interpreter, its outputs plain arrays."""
    return [materialize(v) for v in _eval(jaxpr, consts, args, ctx)]


def _cond(ctx, eqn, invals):
    index, *operands = invals
    branches = [
        functools.partial(lambda br, *ops: eval_materialized(br.jaxpr, br.consts, ops, ctx), br)
        for br in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *operands)


def _scan(ctx, eqn, invals):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    carry = [materialize(v) for v in carry]
    stacked, rebuilders = [], []
    for i, x in enumerate(xs):
        unstacked = x.unstack() if isinstance(x, (Use, Pending)) else None
        if unstacked is None:
            stacked.append(materialize(x) if isinstance(x, Use) else x)
            rebuilders.append(None)
            if isinstance(x, Use):
                warn_or_raise(ctx, repr(x.path), "scan (weight not stacked along its layer axis)")
        else:
            stacked.append(unstacked[0])
            rebuilders.append(unstacked[1])

    def body(c, step):
        xs_i, index = step
        xs_i = [r(x) if r else x for r, x in zip(rebuilders, xs_i)]
        outs = eval_materialized(p["jaxpr"].jaxpr, p["jaxpr"].consts, [*consts, *c, *xs_i], ctx.fold(index))
        return outs[:n_carry], outs[n_carry:]

    carry_out, ys = lax.scan(
        body, carry, (stacked, jnp.arange(p["length"])), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry_out, *ys]


def _while(ctx, eqn, invals):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    carry = [materialize(v) for v in carry]
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
    return lax.while_loop(
        lambda c: eval_materialized(cj.jaxpr, cj.consts, [*cond_consts, *c], ctx)[0],
        lambda c: eval_materialized(bj.jaxpr, bj.consts, [*body_consts, *c], ctx),
        carry,
    )


def warn_or_raise(ctx, names: str, what: str):
    """The one place a use without a factored rule is reported: a warning, or an error if strict."""
    message = f"jlora.adapt: {names} used by {what}; that use gets the merged weight W0 + ΔW"
    if ctx.strict:
        raise ValueError(message + " (strict=True): the result is still equal to the merged model's, only that use "
                         "is not factored; pass strict=False to accept it, or use the weight through a matmul "
                         "(x @ W, jnp.einsum, lax.dot_general), a convolution or an indexing gather, which adapt "
                         "factors. jax.make_jaxpr(fn)(params, *args) shows where the weight meets that operation.")
    warnings.warn(message, stacklevel=3)


RULES: dict[str, Callable] = {
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


def is_dynamic(x) -> bool:
    """Whether an argument of the adapted function is traced (an array) rather than static."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))

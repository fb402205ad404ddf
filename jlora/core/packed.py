"""Packed weights (a quantised base, ``jlora.quantize``) in the interpreter: dense only inside the
equation that uses them.

``jlora.adapt`` hands each :class:`~jlora.core.paths.Packed` leaf to the interpreter as a
:class:`Deferred`, which the interpreter carries as any :class:`~jlora.core.interpret.Pending` weight.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from jlora.core.interpret import RULES, Context, Pending, Use, bind, eval_eqn, fallback, materialize


class _Eqn:
    """An equation as a pytree meta field: compared and hashed by identity."""

    __slots__ = ("eqn",)

    def __init__(self, eqn):
        self.eqn = eqn


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "adapter"], meta_fields=["path", "views"])
@dataclasses.dataclass(frozen=True)
class Deferred(Pending):
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
        """The dense weight, its adapter's :class:`Use` on it (or the merged weight), its views replayed."""
        w = self.packed.dense()
        use = None if self.adapter is None else self.adapter.use(w, self.path)
        x = w if self.adapter is None else use if use is not None else self.adapter.merge(w)
        for view in self.views:
            eqn = view.eqn
            if not isinstance(x, Use):
                x = bind(eqn, [x])[0]
                continue
            outs = RULES[eqn.primitive.name](ctx, eqn, [x])
            if outs is None:  # no factored view: the merged weight, reported as anywhere else
                outs = bind(eqn, [x.merged()]) if ctx is None else fallback(ctx, eqn, [x])
            x = outs[0]
        return x

    def evaluate(self, ctx, eqn, invals):
        """Views are recorded, calls pass the weight on, a scan slices it; any other use is dense, under checkpoint."""
        name = eqn.primitive.name
        if name in _VIEWS and len(invals) == 1:
            return [dataclasses.replace(self, views=self.views + (_Eqn(eqn),))]
        if name in _PASS:
            return RULES[name](ctx, eqn, invals)
        if name == "scan" and _scan_slices(eqn, invals):
            return RULES["scan"](ctx, eqn, invals)

        def use(invals):
            dense = [v.value(ctx) if isinstance(v, Pending) else v for v in invals]
            return [materialize(v) for v in eval_eqn(ctx, eqn, dense)]

        return jax.checkpoint(use)(invals)


_VIEWS = ("transpose", "reshape", "squeeze", "convert_element_type")
_PASS = ("jit", "pjit", "closed_call", "custom_jvp_call", "custom_vjp_call", "checkpoint", "remat2", "cond")


def _scan_slices(eqn, invals) -> bool:
    """Whether a scan can take its packed weights layer by layer: each is a stacked ``xs`` (or a
    constant, dequantised at its uses in the body), none is carried."""
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    carry, xs = invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    return not any(isinstance(x, Pending) for x in carry) and all(
        x.unstack() is not None for x in xs if isinstance(x, Pending))

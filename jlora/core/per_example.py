"""Many adapters in one batch: ``jlora.adapt``'s ``adapter_ids``, each example with its own adapter of a stack.

``fn`` is traced for one example and evaluated under ``jax.vmap`` over the batch, each example's
:class:`~jlora.core.interpret.Use` built from its own adapter of the stack (``jlora.stack``); the
base weights are shared by every example, so XLA sees one batched matmul with W0 per use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core import paths
from jlora.core.interpret import eval_materialized, is_dynamic
from jlora.core.multi import stacked_table

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
        if not is_dynamic(x):
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


def evaluate(cached, signature, traced, params, stacked, names, weights, dynamic, args, arg_leaves,
             adapter_ids, batch_axis, ctx):
    """``adapt``'s function with example ``i`` of the batch under adapter ``adapter_ids[i]`` of ``stacked``.

    ``cached(signature, make)`` is ``adapt``'s trace cache, ``traced(weights, dynamic)`` the function to
    trace, ``names``/``weights`` the params' paths and leaves, ``dynamic`` the array leaves of
    ``(args, kwargs)`` (``arg_leaves``), as ``adapt`` reads them.
    """
    found, n = stacked_table(params, stacked)
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
        outs = eval_materialized(closed.jaxpr, closed.consts, [*inputs, *dynamic_one], ctx.fold(index))
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

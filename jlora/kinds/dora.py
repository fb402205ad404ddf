"""DoRA (Liu et al., 2024): LoRA on the direction of each output column, a trained magnitude m on its length.

    W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_c,        ΔW = scaling · A·B (LoRA)

The column norm ‖·‖_c is taken over the input axes, one per output feature (PEFT's norm over
``dim=1`` of a torch ``[out, in]`` weight), and m starts at ‖W0‖_c, so the model is unchanged until
B moves. As in the paper (section 4.3) and PEFT, the norm is treated as a constant: it follows ΔW in
the forward pass but gets no gradient. ``merge`` and ``jlora.adapt`` both detach it, so the two
agree in values and gradients, and the gradients are PEFT's; full-gradient DoRA is not offered.

Unmerging needs one number per column that the merged weight does not hold: it keeps only the
direction of W0 + ΔW (each column of the merge has norm |m|), and ``c·u − ΔW`` re-merges to the
same weight for every length c. So a DoRA also carries ``base_norm`` = ‖W0‖_c, a frozen field that
never trains, and ``unmerge`` takes the c for which ‖c·u − ΔW‖ = ‖W0‖. That c is unique while
‖ΔW‖_c < ‖W0‖_c; beyond that two weights fit and ``unmerge`` refuses, naming the column.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import axes, paths
from jlora.kinds import lora
from jlora.core.adapter import Adapter, as_f32, refuse_near_zero, table
from jlora.core.transform import Use


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b", "m", "base_norm"],
    meta_fields=["alpha", "stack_axes", "use_rslora"],
)
@dataclasses.dataclass(frozen=True)
class DoRA(Adapter, name="dora"):
    """The DoRA factors and magnitude of one weight.

    Attributes:
      a, b, alpha, stack_axes, use_rslora: the LoRA update, as in :class:`jlora.LoRA`.
      m: ``(*stack, *out)``: the magnitude of each output column.
      base_norm: ``(*stack, *out)``: ‖W0‖_c, frozen (never trained); only ``unmerge`` reads it,
        and ``None`` makes ``unmerge`` refuse.
    """

    a: jax.Array
    b: jax.Array
    m: jax.Array
    base_norm: jax.Array | None
    alpha: float
    stack_axes: int = 0
    use_rslora: bool = dataclasses.field(default=False, kw_only=True)

    init_options = lora.LoRA.init_options
    frozen_fields = ("base_norm",)
    lora_plus_fields = ("b",)
    stacked_agree = lora.LoRA.stacked_agree
    stack_hint = lora.STACK_HINT

    @classmethod
    def create(cls, params, **options):
        return init(params, **options)

    @classmethod
    def upgrade(cls, static, arrays):
        return lora.upgrade(static, arrays)

    @property
    def lora(self) -> lora.LoRA:
        return lora.LoRA(self.a, self.b, self.alpha, self.stack_axes, use_rslora=self.use_rslora)

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def scaling(self) -> float:
        return self.lora.scaling

    def card_facts(self, use_rslora=None):
        return self.lora.card_facts(use_rslora)

    def with_rank(self, rank):
        padded = self.lora.with_rank(rank)
        return dataclasses.replace(self, a=padded.a, b=padded.b, alpha=padded.alpha)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.lora.kernel_shape

    def _in_axes(self) -> tuple[int, ...]:
        return tuple(range(self.stack_axes, self.stack_axes + len(self.lora.in_shape)))

    def column_norm(self, w) -> jax.Array:
        """‖w‖_c in float32: the norm over the input axes, shape ``(*stack, *out)``."""
        return jnp.sqrt(jnp.sum(jnp.square(as_f32(w)), axis=self._in_axes()))

    def _against_weight(self, per_column) -> jax.Array:
        return jnp.expand_dims(per_column, self._in_axes())

    def magnitude_scale(self, w) -> jax.Array:
        """m / ‖W0 + ΔW‖_c in float32, the norm detached from the gradient."""
        norm = jax.lax.stop_gradient(self.column_norm(as_f32(w) + self.lora.delta()))
        return as_f32(self.m) / norm

    def merge(self, w):
        adapted = as_f32(w) + self.lora.delta()
        norm = jax.lax.stop_gradient(self.column_norm(adapted))
        return (adapted * self._against_weight(as_f32(self.m) / norm)).astype(w.dtype)

    def unmerge(self, w):
        if self.base_norm is None:
            raise ValueError(
                "cannot unmerge a DoRA without base_norm (‖W0‖ per column, set by jlora.dora.init): "
                "the merged weight keeps only the direction of W0 + ΔW"
            )
        refuse_near_zero(self.m, "DoRA magnitude m")
        delta = self.lora.delta()
        u = as_f32(w) / self._against_weight(as_f32(self.m))  # the direction of W0 + ΔW, norm 1
        dot = lambda x, y: jnp.sum(x * y, axis=self._in_axes())
        uu, ud, excess = dot(u, u), dot(u, delta), jnp.square(as_f32(self.base_norm)) - dot(delta, delta)
        _refuse_ambiguous(excess)
        # The larger root of uu·c² − 2·ud·c − excess = 0, in the form that does not cancel.
        root = jnp.sqrt(ud * ud + uu * excess)
        length = jnp.where(ud >= 0, (ud + root) / uu, excess / (root - ud))
        return (u * self._against_weight(length) - delta).astype(w.dtype)

    def identity(self, w):
        # ΔW = 0 and m = ‖W0‖_c, so m / ‖W0 + ΔW‖_c is m / m: exactly one.
        zeros = jnp.zeros_like
        return dataclasses.replace(self, a=zeros(self.a), b=zeros(self.b), m=self.column_norm(w).astype(self.m.dtype))

    def use(self, w, path):
        inner = self.lora.use(w, path)
        n_out = len(self.lora.out_shape)
        ids = tuple(range(self.stack_axes)) + tuple(range(w.ndim - n_out, w.ndim))
        return DoRAUse(inner, self.magnitude_scale(w), ids, path)


def _refuse_ambiguous(excess) -> None:
    if isinstance(excess, jax.core.Tracer):
        return
    excess = np.asarray(excess)
    if excess.size and excess.min() <= 0:
        column = tuple(int(i) for i in np.unravel_index(np.argmin(excess), excess.shape))
        raise ValueError(
            f"cannot unmerge: DoRA column {column} has ‖ΔW‖ >= ‖W0‖ there, so two base weights merge to "
            "the same result (unmerge is exact while each column's update is smaller than its base)"
        )


def init(params, rank: int = 8, **options):
    """Makes DoRA adapters for ``params``: LoRA factors as ``jlora.init`` makes them, and m = ‖W0‖_c.

    Args:
      params: any parameter pytree.
      rank: r, the rank of every LoRA update.
      **options: as ``jlora.init``: ``alpha``, ``targets``, ``key``, ``init``, ``use_rslora``,
        ``rank_pattern``, ``alpha_pattern``, ``in_axes``, ``stack_axes``, ``dtype`` (of A, B and m).

    Returns:
      A nested dict mirroring the targeted paths of ``params``, with a :class:`DoRA` at each.

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> dora = init(params, rank=4)['attn']['query']['kernel']
      >>> dora.m.shape, float(dora.m[0])
      ((32,), 4.0)
    """
    weights = dict(paths.leaves(params))
    adapters = {}
    for path, factors in table(lora.init(params, rank, **options)).items():
        shell = DoRA(factors.a, factors.b, None, None, factors.alpha, factors.stack_axes, use_rslora=factors.use_rslora)
        norm = shell.column_norm(weights[path])
        adapters[path] = dataclasses.replace(shell, m=norm.astype(factors.a.dtype), base_norm=norm)
    return paths.nest(adapters)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["inner", "scale"],
    meta_fields=["scale_ids", "path"],
)
@dataclasses.dataclass(frozen=True)
class DoRAUse(Use):
    """A DoRA weight inside ``jlora.adapt``: the LoRA use ``inner`` (W0 + ΔW) times ``scale`` =
    m / ‖W0 + ΔW‖_c (detached norm) along the weight's output axes ``scale_ids``:

        x·W = (x·W0 + scaling·(x·A)·B) ⊙ m / ‖W0 + ΔW‖_c

    The norm needs ΔW's columns, formed once per call as PEFT does; the products with x stay factored.
    """

    inner: lora.LoRAUse
    scale: jax.Array
    scale_ids: tuple
    path: str

    @property
    def base(self):
        return self.inner.base

    def merged(self):
        scale = axes.align(self.scale, self.scale_ids, self.inner.view)
        return (as_f32(self.inner.merged()) * scale).astype(self.base.dtype)

    def transpose(self, permutation):
        return dataclasses.replace(self, inner=self.inner.transpose(permutation))

    def convert(self, new_dtype):
        return dataclasses.replace(self, inner=self.inner.convert(new_dtype))

    def dot_general(self, x, x_is_lhs, base_out, params, ctx):
        return axes.scaled_dot(
            self.scale, self.scale_ids, self.inner.view, self.base, x, x_is_lhs, base_out, params,
            lambda x, out: self.inner.dot_general(x, x_is_lhs, out, params, ctx),
        )

    def unstack(self):
        layer, unstacked = self.inner.view[0], self.inner.unstack()
        if unstacked is None or self.scale_ids[:1] != (layer,):
            return None
        arrays, rebuild = unstacked
        ids, path = self.scale_ids[1:], self.path
        return (arrays, self.scale), lambda parts: DoRAUse(rebuild(parts[0]), parts[1], ids, path)

"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations instead of adding to weights.

l_k and l_v rescale the key and value projections' outputs, l_ff the feed-forward network's inner
activation, which is the input of its second (down) projection:

    k = (x·W_k) ⊙ l_k        v = (x·W_v) ⊙ l_v        y = (h ⊙ l_ff)·W_down

so each vector folds into its weight: an output-scaled one multiplies W's output columns, an
input-scaled one its input rows. Every vector starts at ones (the model is unchanged until they
train), and a model of L layers trains L·(d_k + d_v + d_ff) values.

Only the weight is scaled, as in the paper's ``l ⊙ (W x)``. PEFT also scales the bias of an
output-scaled layer, ``(x·W + b) ⊙ l``; on models without those biases (Llama, T5) the two agree,
and on GPT-2's ``c_attn`` PEFT's result equals jlora's with the base bias multiplied by l.

A fused query/key/value projection (GPT-2's ``c_attn``, output ``[q | k | v]``) trains only the k and
v thirds: its :class:`IA3` holds a vector of 2·d entries and ``offset = d``, and the q third is a
fixed one that is neither stored nor trained.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jlora.core import axes, paths
from jlora.core.adapter import Adapter, as_f32, refuse_near_zero
from jlora.core.transform import Use

OUTPUT, INPUT = "output", "input"

# Llama (k_proj, v_proj, down_proj), GPT-2 (c_attn, mlp/c_proj), and the Flax examples (attention's
# key/value DenseGeneral, the second Dense of an ``MlpBlock``); PEFT's defaults for Llama and GPT-2.
DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj", "c_attn", "mlp/c_proj", "key", "value", "MlpBlock_0/Dense_1")
DEFAULT_FEEDFORWARD = ("down_proj", "mlp/c_proj", "MlpBlock_0/Dense_1")
DEFAULT_FUSED_QKV = ("c_attn",)

@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["scale"],
    meta_fields=["shape", "side", "in_axes", "stack_axes", "offset"],
)
@dataclasses.dataclass(frozen=True)
class IA3(Adapter, name="ia3"):
    """The (IA)³ vector of one weight.

    Attributes:
      scale: ``(*stack, n)``: the trained entries of the flattened scaled side.
      shape: the weight's shape ``(*stack, *in, *out)``.
      side: ``'output'`` (scales the outputs: columns of W) or ``'input'`` (scales the inputs: rows).
      in_axes: how many axes of the weight (after the stacked ones) are inputs.
      stack_axes: how many leading axes are stacked layers.
      offset: where ``scale`` starts along the flattened side; entries outside
        ``[offset, offset + n)`` are fixed at one (the q third of a fused qkv projection).
    """

    scale: jax.Array
    shape: tuple[int, ...]
    side: str
    in_axes: int = 1
    stack_axes: int = 0
    offset: int = 0

    @classmethod
    def create(cls, params, **options):
        return init(params, **options)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    def stacked_meta(self, layers):
        shape = (layers, *self.shape) if layers > 0 else self.shape[1:]
        return {**super().stacked_meta(layers), "shape": tuple(shape)}

    @property
    def side_shape(self) -> tuple[int, ...]:
        """The shape of the axes this vector scales."""
        cut = self.stack_axes + self.in_axes
        return tuple(self.shape[self.stack_axes : cut] if self.side == INPUT else self.shape[cut:])

    def vector(self) -> jax.Array:
        """The whole scaling in float32, shape ``(*stack, *side)``: ``scale`` placed at ``offset``, ones elsewhere."""
        stack, size, n = tuple(self.shape[: self.stack_axes]), math.prod(self.side_shape), self.scale.shape[-1]
        ones = lambda k: jnp.ones(stack + (k,), jnp.float32)
        full = jnp.concatenate([ones(self.offset), as_f32(self.scale), ones(size - self.offset - n)], axis=-1)
        return full.reshape(stack + self.side_shape)

    def _against_weight(self) -> jax.Array:
        """:meth:`vector` with unit axes, so it broadcasts against the weight."""
        n_stack, n_in = self.stack_axes, self.in_axes
        n_out = len(self.shape) - n_stack - n_in
        unit = (1,) * (n_out if self.side == INPUT else n_in)
        stack = tuple(self.shape[:n_stack])
        if self.side == INPUT:
            return self.vector().reshape(stack + self.side_shape + unit)
        return self.vector().reshape(stack + unit + self.side_shape)

    def merge(self, w):
        return (as_f32(w) * self._against_weight()).astype(w.dtype)

    def unmerge(self, w):
        refuse_near_zero(self.scale, "(IA)³ scale")
        return (as_f32(w) / self._against_weight()).astype(w.dtype)

    def identity(self, w):
        return dataclasses.replace(self, scale=jnp.ones_like(self.scale))

    def check(self, path, w):
        super().check(path, w)
        stack, size = tuple(self.shape[: self.stack_axes]), math.prod(self.side_shape)
        shape = tuple(self.scale.shape)
        if self.side not in (OUTPUT, INPUT) or shape[:-1] != stack or not 0 <= self.offset <= size - shape[-1]:
            raise ValueError(
                f"(IA)³ adapter at {path!r} has side={self.side!r}, scale of shape {shape} at offset "
                f"{self.offset}; a {self.side} side of the weight {self.kernel_shape} needs side 'output' "
                f"or 'input' and a scale of shape {stack + ('n',)} with offset + n <= {size}"
            )

    def use(self, w, path):
        ids = tuple(range(w.ndim))
        cut = self.stack_axes + self.in_axes
        side = ids[self.stack_axes : cut] if self.side == INPUT else ids[cut:]
        return IA3Use(w, self.vector(), ids[: self.stack_axes] + side, ids, path)


def init(
    params,
    *,
    targets: paths.Target | None = None,
    feedforward: paths.Target | None = None,
    fused_qkv: paths.Target | None = None,
    in_axes: int | dict[str, int] = 1,
    stack_axes: int | dict[str, int] = 0,
    dtype=jnp.float32,
):
    """Makes (IA)³ vectors (all ones) for ``params``: the model is unchanged until they train.

    Args:
      params: any parameter pytree (linen ``variables``, an ``nnx.State``, nested dicts).
      targets: which weights get a vector (PEFT's ``target_modules``), in any form
        ``jlora.paths.select`` takes. ``None``: :data:`DEFAULT_TARGETS` (Llama's k/v/down
        projections, GPT-2's ``c_attn`` and ``mlp/c_proj``, Flax examples' ``key``, ``value`` and
        ``MlpBlock_0/Dense_1``).
      feedforward: which of the targets are input-scaled (PEFT's ``feedforward_modules``); the rest
        are output-scaled. ``None``: :data:`DEFAULT_FEEDFORWARD`. Must select only targets.
      fused_qkv: output-scaled targets whose output is a fused ``[q | k | v]`` in equal thirds:
        only the k and v thirds train. ``None``: :data:`DEFAULT_FUSED_QKV` (GPT-2's ``c_attn``);
        ``()`` for none.
      in_axes, stack_axes: as in ``jlora.init``: the weight's axes are ``(*stack, *in, *out)``.
      dtype: dtype of the vectors.

    Returns:
      A nested dict mirroring the targeted paths of ``params``, with an :class:`IA3` at each.

    Example:
      >>> params = {'k_proj': {'kernel': jnp.ones((16, 8))}, 'down_proj': {'kernel': jnp.ones((64, 16))}}
      >>> adapters = init(params)
      >>> adapters['k_proj']['kernel'].scale.shape, adapters['down_proj']['kernel'].side
      ((8,), 'input')
    """
    chosen = paths.select(params, DEFAULT_TARGETS if targets is None else targets, every_name=targets is not None)
    for name, option in (("in_axes", in_axes), ("stack_axes", stack_axes)):
        paths.check_patterns(name, option, chosen)
    is_feedforward = _matcher(DEFAULT_FEEDFORWARD if feedforward is None else feedforward)
    is_fused = _matcher(DEFAULT_FUSED_QKV if fused_qkv is None else fused_qkv)
    if feedforward is not None:
        stray = [
            p for p, w in paths.leaves(params)
            if p not in chosen and paths.is_floating_matrix(w) and p.rsplit("/", 1)[-1] not in paths.NOT_WEIGHTS
            and is_feedforward(p, w)
        ]
        if stray:
            raise ValueError(
                f"feedforward selects {paths.fmt_paths(stray)}, which targets does not; feedforward must "
                f"name a subset of the targets (targets select {paths.fmt_paths(chosen)})"
            )
    adapters = {}
    for path, w in chosen.items():
        n_stack, n_in = paths.per_path(stack_axes, path, 0), paths.per_path(in_axes, path, 1)
        shape = tuple(w.shape)
        if n_stack < 0 or n_in < 1 or n_stack + n_in >= len(shape):
            raise ValueError(f"{path!r} has shape {shape}: stack_axes={n_stack}, in_axes={n_in} leave no output axis")
        side = INPUT if is_feedforward(path, w) else OUTPUT
        cut = n_stack + n_in
        size, offset = math.prod(shape[n_stack:cut] if side == INPUT else shape[cut:]), 0
        if is_fused(path, w):
            if side == INPUT or size % 3:
                raise ValueError(
                    f"fused_qkv selects {path!r} (shape {shape}), whose {side} side of {size} is not an "
                    "output split in three equal q, k, v parts"
                )
            offset = size // 3
        adapters[path] = IA3(jnp.ones(shape[:n_stack] + (size - offset,), dtype), shape, side, n_in, n_stack, offset)
    return paths.nest(adapters)


def _matcher(target: paths.Target):
    if isinstance(target, (list, tuple)) and not target:
        return lambda path, leaf: False
    return paths.matcher(target)[0]


# ---- the factored form used by jlora.adapt (DoRA's magnitude uses it too) ----


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "scale"],
    meta_fields=["scale_ids", "view", "path"],
)
@dataclasses.dataclass(frozen=True)
class IA3Use(Use):
    """An (IA)³-scaled weight inside ``jlora.adapt``: ``base`` times ``scale`` along its axes
    ``scale_ids`` (ids of the weight's own axes, which ``view`` names as this use sees them)."""

    base: jax.Array
    scale: jax.Array
    scale_ids: tuple
    view: tuple
    path: str

    def merged(self):
        return (as_f32(self.base) * axes.align(self.scale, self.scale_ids, self.view)).astype(self.base.dtype)

    def transpose(self, permutation):
        return dataclasses.replace(
            self, base=jax.lax.transpose(self.base, permutation), view=tuple(self.view[p] for p in permutation)
        )

    def convert(self, new_dtype):
        return dataclasses.replace(self, base=jax.lax.convert_element_type(self.base, new_dtype))

    def dot_general(self, x, x_is_lhs, base_out, params, ctx):
        # Output side: (x·W0) ⊙ l, from base_out as it is. Input side: (x ⊙ l)·W0.
        return axes.scaled_dot(
            self.scale, self.scale_ids, self.view, self.base, x, x_is_lhs, base_out, params, lambda x, out: out
        )

    def unstack(self):
        layer = self.view[0]
        if self.scale_ids[:1] != (layer,):
            return None
        meta = dict(scale_ids=self.scale_ids[1:], view=self.view[1:], path=self.path)
        return (self.base, self.scale), lambda arrays: IA3Use(*arrays, **meta)

"""LoRA (Hu et al., 2021): ΔW = scaling · A·B with A: in×r random and B: r×out zero.

A weight's axes are read as ``(*stack, *in, *out)``: optional leading stacked-layer axes (``nn.scan``
keeps layers as ``(L, in, out)``), then the input axes its users contract, then the output axes.
A 2-D Flax kernel is ``(in, out)``; a DenseGeneral kernel ``(in, heads, head_dim)`` has one input
axis; a conv kernel ``(h, w, c_in, c_out)`` has three; an embedding table ``(vocab, d)`` one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.adapter import Adapter, as_f32

HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b"],
    meta_fields=["scaling", "stack_axes"],
)
@dataclasses.dataclass(frozen=True)
class LoRA(Adapter):
    """The LoRA factors of one weight.

    Attributes:
      a: ``(*stack, *in, r)``.
      b: ``(*stack, r, *out)``.
      scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
      stack_axes: how many leading axes of the weight are stacked layers.
    """

    a: jax.Array
    b: jax.Array
    scaling: float
    stack_axes: int = 0

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[self.stack_axes : -1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.b.shape[self.stack_axes + 1 :])

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[: self.stack_axes])

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.stack_shape + self.in_shape + self.out_shape

    def delta(self) -> jax.Array:
        """scaling · A·B in float32, in the weight's shape."""
        s, i, o = self.stack_shape, self.in_shape, self.out_shape
        a = as_f32(self.a).reshape(s + (math.prod(i), self.rank))
        b = as_f32(self.b).reshape(s + (self.rank, math.prod(o)))
        return (self.scaling * jnp.matmul(a, b, precision=HIGHEST)).reshape(s + i + o)

    def merge(self, w):
        return (as_f32(w) + self.delta()).astype(w.dtype)

    def unmerge(self, w):
        return (as_f32(w) - self.delta()).astype(w.dtype)


def scaling_for(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski, 2023)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def init(
    params,
    rank: int = 8,
    *,
    alpha: float | None = None,
    targets: paths.Target | None = None,
    key: jax.Array | None = None,
    init: str = "gaussian",
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    in_axes: int | dict[str, int] = 1,
    stack_axes: int | dict[str, int] = 0,
    dtype=jnp.float32,
):
    """Makes the trainable LoRA adapters for ``params``; the model is unchanged until they train.

    Args:
      params: any parameter pytree: linen ``variables``/``params``, an ``nnx.State``, nested dicts.
      rank: r, the rank of every update (PEFT's ``r``).
      alpha: PEFT's ``lora_alpha``; scaling = alpha / r. Default: alpha = r (scaling 1), as the
        paper sets alpha to the first r tried.
      targets: which weights to adapt: ``None`` for the attention query and value projections
        (names in ``jlora.paths.DEFAULT_TARGETS``), a regex ``re.fullmatch``-ed against the
        '/'-joined path, a list of module names, or a predicate ``(path, leaf) -> bool``.
      key: PRNG key for A. Default ``jax.random.key(0)``.
      init: ``'gaussian'`` (A ~ N(0, 1/r²), PEFT's gaussian init) or ``'kaiming'`` (A ~ U(±1/√fan_in),
        loralib's and PEFT's default kaiming-uniform with a=√5).
      use_rslora: scaling = alpha / √r.
      rank_pattern, alpha_pattern: per-target overrides ``{regex or module name: value}``.
      in_axes: how many axes of a weight (after the stacked ones) are inputs; 1 for Dense,
        DenseGeneral and embeddings, 3 for a 2-D conv kernel. An int or per-target mapping.
      stack_axes: how many leading axes are stacked layers (1 for ``nn.scan``). Int or mapping.
      dtype: dtype of A and B (float32 by default, also for a bfloat16 base).

    Returns:
      A nested dict that mirrors the targeted paths of ``params``, with a :class:`LoRA` at each.

    Example:
      >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 32))}}}
      >>> adapters = init(params, rank=4)
      >>> adapters['attn']['query']['kernel'].a.shape, adapters['attn']['query']['kernel'].b.shape
      ((16, 4), (4, 32))
    """
    if init not in ("gaussian", "kaiming"):
        raise ValueError(f"init must be 'gaussian' or 'kaiming', got {init!r}")
    key = jax.random.key(0) if key is None else key
    chosen = paths.select(params, targets)
    keys = jax.random.split(key, len(chosen))
    adapters = {}
    for k, (path, w) in zip(keys, chosen.items()):
        r = paths.per_path(rank_pattern, path, rank)
        n_stack = paths.per_path(stack_axes, path, 0)
        n_in = paths.per_path(in_axes, path, 1)
        shape = tuple(w.shape)
        if n_stack < 0 or n_in < 1 or n_stack + n_in >= len(shape):
            raise ValueError(
                f"{path!r} has shape {shape}: stack_axes={n_stack}, in_axes={n_in} leave no output axis"
            )
        s, i, o = shape[:n_stack], shape[n_stack : n_stack + n_in], shape[n_stack + n_in :]
        fan_in, fan_out = math.prod(i), math.prod(o)
        if not isinstance(r, (int, np.integer)) or not 0 < r <= min(fan_in, fan_out):
            raise ValueError(
                f"rank {r!r} for {path!r} (shape {shape}, in {fan_in}, out {fan_out}) must be an "
                f"integer in 1..{min(fan_in, fan_out)}"
            )
        a_alpha = paths.per_path(alpha_pattern, path, r if alpha is None else alpha)
        if init == "gaussian":
            a = jax.random.normal(k, s + i + (r,), jnp.float32) / r
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, s + i + (r,), jnp.float32, -bound, bound)
        b = jnp.zeros(s + (r,) + o, dtype)
        adapters[path] = LoRA(a.astype(dtype), b, scaling_for(a_alpha, r, use_rslora), n_stack)
    return paths.nest(adapters)

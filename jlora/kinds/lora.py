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

from jlora.core import axes, paths
from jlora.core.adapter import Adapter, as_f32
from jlora.core.transform import Use

HIGHEST = jax.lax.Precision.HIGHEST

# The paper adapts W_q and W_v; these are the names common models give those projections.
DEFAULT_TARGETS = ("query", "value", "q_proj", "v_proj", "c_attn")

#: What LoRA and DoRA adapters of one weight share to be stacked per example (``jlora.stack``).
STACK_HINT = ("LoRA and DoRA adapters stack when their scaling = alpha / r (alpha / sqrt(r) with rsLoRA) and "
              "use_rslora agree: give adapters of different ranks alpha proportional to r, e.g. alpha = r")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b"],
    meta_fields=["alpha", "stack_axes", "use_rslora"],
)
@dataclasses.dataclass(frozen=True)
class LoRA(Adapter, name="lora"):
    """The LoRA factors of one weight.

    Attributes:
      a: ``(*stack, *in, r)``.
      b: ``(*stack, r, *out)``.
      alpha: PEFT's ``lora_alpha``; the update is scaled by :attr:`scaling`.
      stack_axes: how many leading axes of the weight are stacked layers.
      use_rslora: rsLoRA's scaling ``alpha / sqrt(r)`` instead of ``alpha / r`` (keyword only).
    """

    a: jax.Array
    b: jax.Array
    alpha: float
    stack_axes: int = 0
    use_rslora: bool = dataclasses.field(default=False, kw_only=True)

    init_options = ("targets", "rank", "alpha", "use_rslora")
    lora_plus_fields = ("b",)
    stacked_agree = "kind, shape or static settings (rank_pattern/alpha_pattern per layer cannot be stacked)"
    stack_hint = STACK_HINT

    @classmethod
    def create(cls, params, **options):
        return init(params, **options)

    @classmethod
    def upgrade(cls, static, arrays):
        return upgrade(static, arrays)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return scaling_for(self.alpha, self.rank, self.use_rslora)

    def with_rslora(self, use_rslora: bool) -> LoRA:
        """This adapter with ``use_rslora`` set and alpha re-expressed to keep the scaling (to within
        an ulp: ``scaling · √r`` or ``scaling · r`` need not divide back exactly)."""
        if bool(use_rslora) == self.use_rslora:
            return self
        return dataclasses.replace(self, alpha=self.scaling * _divisor(self.rank, use_rslora), use_rslora=bool(use_rslora))

    def card_facts(self, use_rslora=None):
        lora = self if use_rslora is None else self.with_rslora(use_rslora)
        return {"rank": lora.rank, "alpha": lora.alpha, "use_rslora": lora.use_rslora}

    def with_rank(self, rank):
        if rank < self.rank:
            raise ValueError(f"cannot pad a LoRA of rank {self.rank} to the smaller rank {rank}")
        pad = rank - self.rank
        a = jnp.pad(self.a, [(0, 0)] * (self.a.ndim - 1) + [(0, pad)])
        b = jnp.pad(self.b, [(0, pad) if k == self.stack_axes else (0, 0) for k in range(self.b.ndim)])
        # Zero columns of A and rows of B add nothing; the alpha that keeps the scaling at the new rank.
        return dataclasses.replace(self, a=a, b=b, alpha=self.scaling * _divisor(rank, self.use_rslora))

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

    def use(self, w, path):
        n_stack, n_in = self.stack_axes, len(self.in_shape)
        ids = tuple(range(w.ndim))
        stack, inputs, outputs = ids[:n_stack], ids[n_stack : n_stack + n_in], ids[n_stack + n_in :]
        return LoRAUse(w, self.a, self.b, (*stack, *inputs, RANK), (*stack, RANK, *outputs), ids, self.scaling, path)

    def unmerge(self, w):
        return (as_f32(w) - self.delta()).astype(w.dtype)

    def identity(self, w):
        return dataclasses.replace(self, a=jnp.zeros_like(self.a), b=jnp.zeros_like(self.b))


def _divisor(rank: int, use_rslora: bool) -> float:
    return math.sqrt(rank) if use_rslora else rank


def scaling_for(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski, 2023)."""
    return float(alpha) / _divisor(rank, use_rslora)


def upgrade(static: dict, arrays: dict) -> dict:
    """Static fields of a LoRA (or DoRA) described by an earlier jlora (up to commit de3a17f), which held
    only ``scaling`` (``Adapter.upgrade``): ``alpha = scaling · r`` with ``use_rslora`` False when that
    divides back to the scaling exactly, as every ``alpha / r`` does; else ``alpha = scaling · √r`` with
    ``use_rslora`` when that does, as every rsLoRA ``alpha / √r`` does; else the first, to within an ulp."""
    if "scaling" not in static or "alpha" in static:
        return static
    static = dict(static)
    scaling, rank = static.pop("scaling"), arrays["a"][0][-1]
    for use_rslora in (False, True):
        alpha = scaling * _divisor(rank, use_rslora)
        if scaling_for(alpha, rank, use_rslora) == scaling:
            return {**static, "alpha": alpha, "use_rslora": use_rslora}
    return {**static, "alpha": scaling * rank, "use_rslora": False}


def refuse_misread_axes(path: str, shape: tuple, n_stack: int, n_in: int, bias) -> None:
    """Refuses a reading of a weight's axes that the bias beside it contradicts: a bias has the
    weight's stacked and output axes (``stack + out``), so a stacked ``(layers, in, out)`` kernel read
    without ``stack_axes``, an output projection ``(heads, head_dim, d)`` without ``in_axes=2``, or a
    PyTorch/Equinox ``(out, in)`` weight would give an update that is low rank over other axes than
    the layer's. The error names the path, both shapes, the axes it would factor over and the option
    that fits."""
    if bias is None or not hasattr(bias, "shape"):
        return
    stack, inputs, outputs = shape[:n_stack], shape[n_stack:n_stack + n_in], shape[n_stack + n_in:]
    if tuple(bias.shape) == stack + outputs:
        return
    fits = [(s, i) for s in range(len(shape) - 1) for i in range(1, len(shape) - s)
            if shape[:s] + shape[s + i:] == tuple(bias.shape)]
    module = path.rsplit("/", 1)[0]
    hint = (f"pass stack_axes={{{module!r}: {fits[0][0]}}}, in_axes={{{module!r}: {fits[0][1]}}} (or as ints for every target)"
            if fits else "a weight laid out (out, in), as PyTorch and Equinox store them, must be transposed to (in, out) "
                         "first (and back after merge)")
    raise ValueError(f"{path!r} has shape {shape}: read with stack_axes={n_stack}, in_axes={n_in}, its update would be "
                     f"low rank from inputs {inputs} to outputs {outputs} (stacked over {stack}), but "
                     f"{module + '/bias'!r} has shape {tuple(bias.shape)}, so the outputs are other axes; {hint}")


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
        (names in :data:`DEFAULT_TARGETS`), a regex ``re.fullmatch``-ed against the
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
    chosen = paths.select(params, DEFAULT_TARGETS if targets is None else targets, every_name=targets is not None)
    for name, option in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern), ("in_axes", in_axes),
                         ("stack_axes", stack_axes)):
        paths.check_patterns(name, option, chosen)
    keys = jax.random.split(key, len(chosen))
    adapters = {}
    leaves = dict(paths.leaves(params))
    for k, (path, w) in zip(keys, chosen.items()):
        r = paths.per_path(rank_pattern, path, rank)
        n_stack = paths.per_path(stack_axes, path, 0)
        n_in = paths.per_path(in_axes, path, 1)
        shape = tuple(w.shape)
        if n_stack < 0 or n_in < 1 or n_stack + n_in >= len(shape):
            raise ValueError(
                f"{path!r} has shape {shape}: stack_axes={n_stack}, in_axes={n_in} leave no output axis"
            )
        refuse_misread_axes(path, shape, n_stack, n_in, leaves.get(path.rsplit("/", 1)[0] + "/bias"))
        s, i, o = shape[:n_stack], shape[n_stack : n_stack + n_in], shape[n_stack + n_in :]
        fan_in, fan_out = math.prod(i), math.prod(o)
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 < r <= min(fan_in, fan_out):
            raise ValueError(
                f"rank {r!r} for {path!r} (shape {shape}, in {fan_in}, out {fan_out}) must be an "
                f"integer in 1..{min(fan_in, fan_out)}"
            )
        a_alpha = paths.per_path(alpha_pattern, path, r if alpha is None else alpha)
        a_alpha = a_alpha.item() if isinstance(a_alpha, np.generic) else a_alpha  # a static field: plain, for JSON
        if isinstance(a_alpha, bool) or not isinstance(a_alpha, (int, float, np.integer, np.floating)) \
                or not math.isfinite(a_alpha) or a_alpha <= 0:
            raise ValueError(f"alpha {a_alpha!r} for {path!r} must be a finite number > 0 (scaling = alpha / r)")
        if init == "gaussian":
            a = jax.random.normal(k, s + i + (r,), jnp.float32) / r
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, s + i + (r,), jnp.float32, -bound, bound)
        b = jnp.zeros(s + (r,) + o, dtype)
        adapters[path] = LoRA(a.astype(dtype), b, a_alpha, n_stack, use_rslora=bool(use_rslora))
    return paths.nest(adapters)


# ---- the factored form used by jlora.adapt ----

RANK = -1  # the id of the rank axis r in LoRAUse's factor axes


def _dropout(ctx, x):
    """LoRA dropout on the adapter path's input, at ``jlora.adapt``'s rate; off without an rng."""
    key = ctx.next_key() if ctx.dropout else None
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - ctx.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - ctx.dropout), jnp.zeros((), x.dtype)).astype(x.dtype)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "a", "b"],
    meta_fields=["a_ids", "b_ids", "view", "scaling", "path"],
)
@dataclasses.dataclass(frozen=True)
class LoRAUse(Use):
    """A LoRA-adapted weight inside ``jlora.adapt``: ``base`` plus ``scaling · a ⊗_r b``.

    Axes are named by ids: ``view`` names the axes of ``base`` as this use sees them, ``a_ids`` and
    ``b_ids`` those of the factors (stacked-layer ids appear in both, ``RANK`` is r), so transposes
    and reshapes only rename axes and every use becomes one einsum pair.
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    a_ids: tuple
    b_ids: tuple
    view: tuple
    scaling: float
    path: str

    def _only(self, side: str) -> set:
        a, b = set(self.a_ids), set(self.b_ids)
        return (a - b) if side == "a" else (b - a)

    def merged(self):
        letters = axes.Letters()
        delta = jnp.einsum(
            f"{letters.word(self.a_ids)},{letters.word(self.b_ids)}->{letters.word(self.view)}",
            as_f32(self.a), as_f32(self.b), precision=HIGHEST,
        )
        return (as_f32(self.base) + self.scaling * delta).astype(self.base.dtype)

    def transpose(self, permutation):
        return dataclasses.replace(
            self, base=jax.lax.transpose(self.base, permutation), view=tuple(self.view[p] for p in permutation)
        )

    def convert(self, new_dtype):
        return dataclasses.replace(self, base=jax.lax.convert_element_type(self.base, new_dtype))

    def squeeze(self, dimensions):
        gone = {self.view[d] for d in dimensions}
        a_axes = tuple(k for k, i in enumerate(self.a_ids) if i in gone)
        b_axes = tuple(k for k, i in enumerate(self.b_ids) if i in gone)
        return dataclasses.replace(
            self,
            base=jax.lax.squeeze(self.base, dimensions),
            a=jnp.squeeze(self.a, a_axes),
            b=jnp.squeeze(self.b, b_axes),
            a_ids=tuple(i for i in self.a_ids if i not in gone),
            b_ids=tuple(i for i in self.b_ids if i not in gone),
            view=tuple(i for i in self.view if i not in gone),
        )

    def reshape(self, new_sizes):
        new_sizes = tuple(new_sizes)
        groups = axes.reshape_groups(tuple(self.base.shape), new_sizes)
        if groups is None:
            return None
        factors = {"a": [self.a, list(self.a_ids)], "b": [self.b, list(self.b_ids)]}
        next_id = max(max(self.a_ids), max(self.b_ids)) + 1
        view = []
        for olds, news in groups:
            ids = [self.view[k] for k in olds]
            if len(olds) == 1 and len(news) == 1:
                view.append(ids[0])
                continue
            side = next((s for s in "ab" if set(ids) <= self._only(s)), None)
            if side is None:  # merges a factor's axes with the other's, or a stacked axis
                return None
            factor, fids = factors[side]
            at = [fids.index(i) for i in ids]
            if at != list(range(at[0], at[0] + len(at))):
                return None
            new_ids = list(range(next_id, next_id + len(news)))
            next_id += len(news)
            factor = factor.reshape(factor.shape[: at[0]] + tuple(new_sizes[k] for k in news) + factor.shape[at[-1] + 1 :])
            fids[at[0] : at[-1] + 1] = new_ids
            factors[side] = [factor, fids]
            view.extend(new_ids)
        (a, a_ids), (b, b_ids) = factors["a"], factors["b"]
        return dataclasses.replace(
            self, base=self.base.reshape(new_sizes), a=a, b=b, a_ids=tuple(a_ids), b_ids=tuple(b_ids), view=tuple(view)
        )

    def dot_general(self, x, x_is_lhs, base_out, params, ctx):
        x_ids, out_ids = axes.dot_axes(self.view, x.ndim, x_is_lhs, params["dimension_numbers"])
        letters = axes.Letters()
        x_word = [letters.fresh() if i is None else letters[i] for i in x_ids]
        x_only = iter(c for c, i in zip(x_word, x_ids) if i is None)
        out = [next(x_only) if i is None else letters[i] for i in out_ids]
        # Contract x with the factor that holds the contracted axes first: x·A then ·B for a
        # Dense use, x·Bᵀ then ·Aᵀ for a tied head's x·Wᵀ. Either order is exact.
        contracted = {i for i in x_ids if i is not None} - set(out_ids)
        a_first = bool(contracted & self._only("a")) or not contracted & self._only("b")
        (f, f_ids), (g, g_ids) = ((self.a, self.a_ids), (self.b, self.b_ids))[:: 1 if a_first else -1]
        f_word, g_word = letters.word(f_ids), letters.word(g_ids)
        keep = set(g_word) | set(out)
        t_word = "".join(c for c in dict.fromkeys(x_word + list(f_word)) if c in keep)
        opts = dict(precision=params["precision"], preferred_element_type=params["preferred_element_type"])
        t = axes.contract(_dropout(ctx, x), "".join(x_word), f.astype(self.base.dtype), f_word, t_word, **opts)
        t = t * jnp.asarray(self.scaling, t.dtype)
        delta = axes.contract(t, t_word, g.astype(self.base.dtype), g_word, "".join(out), **opts)
        return base_out + delta.astype(base_out.dtype)

    def _factor_product(self, partial, partial_rank_axis: int, base_out):
        """``base_out`` plus ``partial`` (whose axis ``partial_rank_axis`` is r) contracted with b."""
        letters = axes.Letters()
        b_word = letters.word(self.b_ids)
        word = [letters.fresh() for _ in range(partial.ndim)]
        word[partial_rank_axis] = letters[RANK]
        out = list(word)
        out[partial_rank_axis] = b_word.replace(letters[RANK], "")
        delta = axes.contract(partial, "".join(word), self.b.astype(partial.dtype), b_word, "".join(out))
        return base_out + (self.scaling * delta).astype(base_out.dtype)

    def gather(self, indices, base_out, params):
        dn = params["dimension_numbers"]
        if (
            self.base.ndim != 2
            or self.a_ids != (self.view[0], RANK)
            or self.b_ids != (RANK, self.view[1])
            or tuple(dn.collapsed_slice_dims) != (0,)
            or tuple(dn.start_index_map) != (0,)
            or dn.operand_batching_dims
            or tuple(params["slice_sizes"]) != (1, self.base.shape[1])
        ):
            return None
        rows = jax.lax.gather(
            self.a.astype(self.base.dtype), indices, dn, (1, self.a.shape[1]),
            indices_are_sorted=params["indices_are_sorted"], unique_indices=params["unique_indices"],
            mode=params["mode"], fill_value=params["fill_value"],
        )
        return self._factor_product(rows, dn.offset_dims[0], base_out)

    def conv(self, x, base_out, params, ctx):
        dn = params["dimension_numbers"]
        o_axis = dn.rhs_spec[0]
        if (
            params["feature_group_count"] != 1
            or params["batch_group_count"] != 1
            or self.b_ids != (RANK, self.view[o_axis])
            or set(self.a_ids) != set(self.view) - {self.view[o_axis]} | {RANK}
        ):
            return None
        # A is the kernel of an r-channel conv; B then maps r channels to the outputs (1×1).
        kernel_ids = [RANK if k == o_axis else i for k, i in enumerate(self.view)]
        kernel = jnp.transpose(self.a, [self.a_ids.index(i) for i in kernel_ids]).astype(self.base.dtype)
        partial = jax.lax.conv_general_dilated(
            _dropout(ctx, x), kernel, params["window_strides"], params["padding"],
            lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"], dimension_numbers=dn,
            precision=params["precision"], preferred_element_type=params["preferred_element_type"],
        )
        return self._factor_product(partial, dn.out_spec[1], base_out)

    def unstack(self):
        layer = self.view[0]
        if layer not in self.a_ids or layer not in self.b_ids:
            return None
        a = jnp.moveaxis(self.a, self.a_ids.index(layer), 0)
        b = jnp.moveaxis(self.b, self.b_ids.index(layer), 0)
        meta = dict(
            a_ids=tuple(i for i in self.a_ids if i != layer),
            b_ids=tuple(i for i in self.b_ids if i != layer),
            view=self.view[1:], scaling=self.scaling, path=self.path,
        )
        return (self.base, a, b), lambda arrays: LoRAUse(*arrays, **meta)

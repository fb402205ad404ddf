"""Llama-family models from llama.cpp's GGUF files (architectures llama, qwen2, qwen3, gemma).

What a GGUF's metadata and tensor names mean for `jlora.models.llama`: the config its `{arch}.*` keys
describe, the key map from `blk.{i}.attn_q.weight` to `layers_{i}/self_attn/q_proj/kernel`, and the two
things llama.cpp's converter changes that are undone here (the q/k row permutation of its rotary layout,
Gemma's norm weights stored plus one). Reading the file itself is `jlora.quant.gguf`.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import files
from jlora.core.errors import CheckpointError
from jlora.models.checkpoint import assign, param_shapes, transpose
from jlora.models.llama import VARIANTS, Llama, LlamaConfig
from jlora.quant import gguf as gguf_file

# llama.cpp's general.architecture -> model_type. It writes Mistral as "llama" and has no Mistral window.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}


def config_from_gguf(metadata, tensor_names, rope_freqs=None, *, source="the GGUF file"):
    """The `LlamaConfig` a GGUF file's `{arch}.*` metadata describes; tied when the file has no `output.weight`.

    Args:
      metadata: `{key: value}` as `jlora.quant.gguf.read` gives it.
      tensor_names: the file's tensor names.
      rope_freqs: the file's `rope_freqs.weight` (llama.cpp's form of Llama 3.x's rope scaling), if any.
      source: the file, as error messages name it.

    Raises:
      CheckpointError: a key this reads is missing or not a number (the message names the file and key).
      NotImplementedError: an architecture or rotary variant `jlora.models.llama` does not implement.
    """
    files.checked(metadata, {"general.architecture": str | None}, f"{source}: GGUF metadata")
    arch = metadata.get("general.architecture")
    sizes = [f"{arch}.{key}" for key in ("attention.head_count", "embedding_length", "feed_forward_length", "block_count",
                                         "context_length", "attention.head_count_kv", "attention.key_length", "vocab_size")]
    files.checked(metadata, {**dict.fromkeys(sizes, int | None), f"{arch}.rope.dimension_count": int | None,
                             f"{arch}.attention.layer_norm_rms_epsilon": float | None, f"{arch}.rope.freq_base": float | None,
                             f"{arch}.rope.scaling.type": str | None, "tokenizer.ggml.tokens": list | None,
                             "tokenizer.ggml.bos_token_id": int | None, "tokenizer.ggml.eos_token_id": int | None},
                  f"{source}: GGUF metadata", positive=sizes)
    if arch not in ARCHITECTURES:
        raise NotImplementedError(f"{source}: GGUF architecture is {arch!r}; jlora.models.gguf reads "
                                  f"{sorted(ARCHITECTURES)}.")
    model_type = ARCHITECTURES[arch]
    get = lambda key, default=None: metadata.get(f"{arch}.{key}", default)

    def number(key, kind=int, default=None):
        value = get(key, default)
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata lacks {arch}.{key}, which the model's shape needs; "
                                  "the file may be incomplete or written by an old converter.")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise CheckpointError(f"{source}: GGUF metadata {arch}.{key} is {value!r}, not a number.") from None

    heads = number("attention.head_count")
    head_dim = get("attention.key_length") or number("embedding_length") // heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError(f"{source}: GGUF rope.dimension_count={get('rope.dimension_count')} differs from "
                                  f"head_dim={head_dim}; partial rotary embeddings are not implemented.")
    if get("rope.scaling.type", "none") not in ("none", None):
        raise NotImplementedError(f"{source}: GGUF uses rope scaling {get('rope.scaling.type')!r}; only the default "
                                  "rotary embedding and Llama 3's rope_freqs are implemented.")
    if get("attention.sliding_window") is not None:
        raise NotImplementedError(f"{source}: GGUF has {arch}.attention.sliding_window; sliding windows are read "
                                  "from Hugging Face directories only.")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{source}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens, "
                              "so the vocabulary size is unknown.")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=number("embedding_length"),
        intermediate_size=number("feed_forward_length"),
        num_hidden_layers=number("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=number("attention.head_count_kv", default=heads),
        head_dim=int(head_dim),
        max_position_embeddings=number("context_length"),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", float),
        rope_theta=number("rope.freq_base", float, default=10000.0),
        rope_freq_factors=None if rope_freqs is None else tuple(float(f) for f in rope_freqs),
        attention_bias="blk.0.attn_output.bias" in tensor_names,
        hidden_act="gelu_pytorch_tanh" if model_type == "gemma" else "silu",
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        model_type=model_type,
        **VARIANTS[model_type][1],
    )


def unpermute_rope(weight, num_heads):
    """Undo the row permutation llama.cpp's converter applies to q/k weights (and biases).

    The converter turns HF's rotate_half layout into interleaved pairs with
    `w.reshape(n, 2, d // n // 2, *rest).swapaxes(1, 2)`; this is its inverse.
    """
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def key_map(config):
    """`{gguf_name: (param_path, transform)}` for a llama.cpp GGUF (tensors dequantized, in torch layout).

    llama.cpp's converter permutes q/k rows for the Llama architecture only, and stores Gemma's norm weights
    plus one (its (1 + w) folded in); both are undone here.
    """
    c = config
    permuted = c.model_type in ("llama", "mistral")
    q = (lambda w: unpermute_rope(w, c.num_attention_heads)) if permuted else None
    k = (lambda w: unpermute_rope(w, c.num_key_value_heads)) if permuted else None
    norm = (lambda w: w - 1.0) if c.norm_unit_offset else None
    t = lambda f: transpose if f is None else (lambda w: f(w).T)
    names = {
        "token_embd.weight": ("embed_tokens/embedding", None),
        "output_norm.weight": ("norm/weight", norm),
    }
    if not c.tie_word_embeddings:
        names["output.weight"] = ("lm_head/kernel", transpose)
    for i in range(c.num_hidden_layers):
        gg, ours = f"blk.{i}", f"layers_{i}"
        names.update({
            f"{gg}.attn_norm.weight": (f"{ours}/input_layernorm/weight", norm),
            f"{gg}.ffn_norm.weight": (f"{ours}/post_attention_layernorm/weight", norm),
            f"{gg}.attn_q.weight": (f"{ours}/self_attn/q_proj/kernel", t(q)),
            f"{gg}.attn_k.weight": (f"{ours}/self_attn/k_proj/kernel", t(k)),
            f"{gg}.attn_v.weight": (f"{ours}/self_attn/v_proj/kernel", transpose),
            f"{gg}.attn_output.weight": (f"{ours}/self_attn/o_proj/kernel", transpose),
            f"{gg}.ffn_gate.weight": (f"{ours}/mlp/gate_proj/kernel", transpose),
            f"{gg}.ffn_up.weight": (f"{ours}/mlp/up_proj/kernel", transpose),
            f"{gg}.ffn_down.weight": (f"{ours}/mlp/down_proj/kernel", transpose),
        })
        if c.qk_norm:
            names[f"{gg}.attn_q_norm.weight"] = (f"{ours}/self_attn/q_norm/weight", None)
            names[f"{gg}.attn_k_norm.weight"] = (f"{ours}/self_attn/k_norm/weight", None)
        if c.attention_bias or c.qkv_bias:
            names.update({
                f"{gg}.attn_q.bias": (f"{ours}/self_attn/q_proj/bias", q),
                f"{gg}.attn_k.bias": (f"{ours}/self_attn/k_proj/bias", k),
                f"{gg}.attn_v.bias": (f"{ours}/self_attn/v_proj/bias", None),
            })
        if c.attention_bias:
            names[f"{gg}.attn_output.bias"] = (f"{ours}/self_attn/o_proj/bias", None)
    return names


def keep_blocks(path, variables, config, *, dtype=jnp.float32):
    """`variables` with every weight the GGUF file ships in Q4_0, Q4_1 or Q8_0 replaced by those blocks as
    shipped (`jlora.Quantized` leaves), rather than dequantized; other weights stay as they are.

    llama.cpp permutes the rows of attn_q/attn_k for its rotary layout; blocks run along a row (the input
    dimension), so the permutation is undone by moving whole rows with their scales.
    """
    names = key_map(config)
    rows = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    flat = {}
    for name, (kind, raw, shape) in gguf_file.quantized_tensors(path).items():
        if name not in names:
            continue
        target, transform = names[name]
        heads = rows.get(name.split(".")[-2])
        order = None if heads is None else unpermute_rope(np.arange(shape[0]), heads)
        flat[target] = gguf_file.blocks(raw, kind, shape, dtype, order, transposed=transform is not None)
    nested = jax.tree_util.tree_map_with_path(
        lambda keypath, leaf: flat.get("/".join(k.key for k in keypath), leaf), dict(variables["params"]))
    return {**variables, "params": nested}


def from_gguf(path, *, dtype=jnp.float32, param_dtype=jnp.float32, contents=None):
    """Load a llama.cpp GGUF file, dequantizing every tensor to float32 first.

    Args:
      path: the .gguf file.
      dtype: compute dtype. param_dtype: dtype the weights are stored in.
      contents: `(metadata, tensors)` from `jlora.quant.gguf.read(path)`, to avoid reading the file twice.

    Returns:
      `(model, variables, config)`.
    """
    metadata, tensors = contents if contents is not None else gguf_file.read(path)
    config = config_from_gguf(metadata, tensors.keys(), tensors.get("rope_freqs.weight"), source=Path(path))
    model = Llama(config, dtype=dtype, param_dtype=param_dtype)
    expected = param_shapes(model, jnp.zeros((1, 1), jnp.int32))
    variables = assign(tensors, key_map(config), expected, source=path, param_dtype=param_dtype,
                       ignore=lambda name: name == "rope_freqs.weight")
    return model, variables, config

"""Llama-family models (Llama, SmolLM2, TinyLlama, ...) in Flax, loading Hugging Face safetensors or GGUF.

RMSNorm, rotary embeddings (Hugging Face's rotate_half layout), SwiGLU MLP, grouped-query attention,
tied or untied output head. Param paths follow Hugging Face's names:

    embed_tokens/embedding [V, C]
    layers_{i}/input_layernorm/weight            layers_{i}/post_attention_layernorm/weight
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel   (in, out): the transpose of the torch weight
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/weight
    lm_head/kernel [C, V]                        absent when tie_word_embeddings
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import attention
from jlora.models.checkpoint import (assign, check_tied, param_shapes, read_config, read_gguf, read_safetensors,
                                     transpose)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None means num_attention_heads (no grouping)
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @classmethod
    def from_hf(cls, hf):
        """The config of a Hugging Face Llama `config.json` dict; refuses what this model does not implement."""
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"Llama config has hidden_act={hf['hidden_act']!r}; only 'silu' is implemented.")
        # transformers 5 writes rope_parameters={'rope_theta', 'rope_type'}; older versions rope_theta and rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = hf.get("rope_scaling")
        if rope_type != "default" or scaling:
            raise NotImplementedError(f"Llama config uses rope scaling ({rope or scaling}); only the default "
                                      "rotary embedding is implemented.")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        values["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", cls.rope_theta))
        return cls(**values)

    @classmethod
    def from_gguf(cls, metadata, tensor_names):
        """The config a GGUF file's `llama.*` metadata describes; tied when the file has no `output.weight`."""
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise NotImplementedError(f"GGUF architecture is {arch!r}; jlora.models.llama reads only 'llama'.")
        get = lambda key, default=None: metadata.get(f"llama.{key}", default)
        heads = get("attention.head_count")
        head_dim = get("attention.key_length") or get("embedding_length") // heads
        if get("rope.dimension_count", head_dim) != head_dim:
            raise NotImplementedError(f"GGUF rope.dimension_count={get('rope.dimension_count')} differs from "
                                      f"head_dim={head_dim}; partial rotary embeddings are not implemented.")
        if "rope_freqs.weight" in tensor_names or get("rope.scaling.type", "none") not in ("none", None):
            raise NotImplementedError("GGUF uses rope scaling; only the default rotary embedding is implemented.")
        return cls(
            vocab_size=get("vocab_size") or len(metadata["tokenizer.ggml.tokens"]),
            hidden_size=get("embedding_length"),
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            max_position_embeddings=get("context_length"),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        )


init = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * x32.astype(self.dtype)


def rope(x, positions, theta):
    """Rotary embedding of x [B, T, H, D] at int positions [T], halves rotated as in HF's rotate_half."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


class Attention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        c = self.config
        batch, length, _ = x.shape
        dense = partial(nn.Dense, use_bias=c.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=init)
        query = dense(c.num_attention_heads * c.head_dim, name="q_proj")(x)
        key = dense(c.num_key_value_heads * c.head_dim, name="k_proj")(x)
        value = dense(c.num_key_value_heads * c.head_dim, name="v_proj")(x)
        query = rope(query.reshape(batch, length, c.num_attention_heads, c.head_dim), positions, c.rope_theta)
        key = rope(key.reshape(batch, length, c.num_key_value_heads, c.head_dim), positions, c.rope_theta)
        value = value.reshape(batch, length, c.num_key_value_heads, c.head_dim)
        keys, values, key_positions, layer_cache = attention.extend(layer_cache, key, value, positions)
        y = attention.causal_attention(query, keys, values, positions, key_positions)
        return dense(c.hidden_size, name="o_proj")(y), layer_cache


class MLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = partial(nn.Dense, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init)
        gate = dense(c.intermediate_size, name="gate_proj")(x)
        up = dense(c.intermediate_size, name="up_proj")(x)
        return dense(c.hidden_size, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(RMSNorm, self.config.rms_norm_eps, **kw)
        h, layer_cache = Attention(self.config, name="self_attn", **kw)(
            norm(name="input_layernorm")(x), positions, layer_cache)
        x = x + h
        x = x + MLP(self.config, name="mlp", **kw)(norm(name="post_attention_layernorm")(x))
        return x, layer_cache


class Llama(nn.Module):
    """Llama-family language model.

    `model.apply(variables, tokens)` returns float32 logits [B, T, V];
    `model.apply(variables, tokens, cache)` returns `(logits, cache)` and continues from `cache["index"]`
    (see `init_cache` and `jlora.models.generate`).
    """
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, cache=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        start = 0 if cache is None else cache["index"]
        positions = start + jnp.arange(tokens.shape[1])
        embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="embed_tokens", **kw)
        x = embed(tokens)
        new_cache = {}
        for i in range(c.num_hidden_layers):
            name = f"layers_{i}"
            x, new_cache[name] = DecoderLayer(c, name=name, **kw)(x, positions, None if cache is None else cache[name])
        x = RMSNorm(c.rms_norm_eps, name="norm", **kw)(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, kernel_init=init, name="lm_head", **kw)(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {**new_cache, "index": start + tokens.shape[1]}

    def init_cache(self, batch_size, max_length):
        """An empty cache for `batch_size` rows of at most `max_length` positions (prompt + new tokens)."""
        c = self.config
        if max_length > c.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds max_position_embeddings={c.max_position_embeddings}.")
        names = [f"layers_{i}" for i in range(c.num_hidden_layers)]
        return attention.init_cache(names, batch_size, max_length, c.num_key_value_heads, c.head_dim, self.dtype)

    @property
    def max_length(self):
        return self.config.max_position_embeddings


def hf_key_map(config):
    """`{hf_name: (param_path, transform)}` for a `LlamaForCausalLM` checkpoint (torch weights are (out, in))."""
    c = config
    key_map = {
        "model.embed_tokens.weight": ("embed_tokens/embedding", None),
        "model.norm.weight": ("norm/weight", None),
    }
    if not c.tie_word_embeddings:
        key_map["lm_head.weight"] = ("lm_head/kernel", transpose)
    for i in range(c.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        key_map[f"{hf}.input_layernorm.weight"] = (f"{ours}/input_layernorm/weight", None)
        key_map[f"{hf}.post_attention_layernorm.weight"] = (f"{ours}/post_attention_layernorm/weight", None)
        for proj, has_bias in [("self_attn.q_proj", c.attention_bias), ("self_attn.k_proj", c.attention_bias),
                               ("self_attn.v_proj", c.attention_bias), ("self_attn.o_proj", c.attention_bias),
                               ("mlp.gate_proj", c.mlp_bias), ("mlp.up_proj", c.mlp_bias),
                               ("mlp.down_proj", c.mlp_bias)]:
            path = f"{ours}/{proj.replace('.', '/')}"
            key_map[f"{hf}.{proj}.weight"] = (f"{path}/kernel", transpose)
            if has_bias:
                key_map[f"{hf}.{proj}.bias"] = (f"{path}/bias", None)
    return key_map


def unpermute_rope(weight, num_heads):
    """Undo the row permutation llama.cpp's converter applies to q/k weights (and biases).

    The converter turns HF's rotate_half layout into interleaved pairs with
    `w.reshape(n, 2, d // n // 2, *rest).swapaxes(1, 2)`; this is its inverse.
    """
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def gguf_key_map(config):
    """`{gguf_name: (param_path, transform)}` for a llama.cpp GGUF (tensors dequantized, in torch layout)."""
    c = config
    q = lambda w: unpermute_rope(w, c.num_attention_heads)
    k = lambda w: unpermute_rope(w, c.num_key_value_heads)
    key_map = {
        "token_embd.weight": ("embed_tokens/embedding", None),
        "output_norm.weight": ("norm/weight", None),
    }
    if not c.tie_word_embeddings:
        key_map["output.weight"] = ("lm_head/kernel", transpose)
    for i in range(c.num_hidden_layers):
        gg, ours = f"blk.{i}", f"layers_{i}"
        key_map.update({
            f"{gg}.attn_norm.weight": (f"{ours}/input_layernorm/weight", None),
            f"{gg}.ffn_norm.weight": (f"{ours}/post_attention_layernorm/weight", None),
            f"{gg}.attn_q.weight": (f"{ours}/self_attn/q_proj/kernel", lambda w: q(w).T),
            f"{gg}.attn_k.weight": (f"{ours}/self_attn/k_proj/kernel", lambda w: k(w).T),
            f"{gg}.attn_v.weight": (f"{ours}/self_attn/v_proj/kernel", transpose),
            f"{gg}.attn_output.weight": (f"{ours}/self_attn/o_proj/kernel", transpose),
            f"{gg}.ffn_gate.weight": (f"{ours}/mlp/gate_proj/kernel", transpose),
            f"{gg}.ffn_up.weight": (f"{ours}/mlp/up_proj/kernel", transpose),
            f"{gg}.ffn_down.weight": (f"{ours}/mlp/down_proj/kernel", transpose),
        })
        if c.attention_bias:
            key_map.update({
                f"{gg}.attn_q.bias": (f"{ours}/self_attn/q_proj/bias", q),
                f"{gg}.attn_k.bias": (f"{ours}/self_attn/k_proj/bias", k),
                f"{gg}.attn_v.bias": (f"{ours}/self_attn/v_proj/bias", None),
                f"{gg}.attn_output.bias": (f"{ours}/self_attn/o_proj/bias", None),
            })
    return key_map


def keep_gguf_blocks(path, variables, config, *, dtype=jnp.float32):
    """`variables` with every weight the GGUF file ships in Q4_0, Q4_1 or Q8_0 replaced by those blocks as
    shipped (`jlora.Quantized` leaves), rather than dequantized; other weights stay as they are.

    llama.cpp permutes the rows of attn_q/attn_k for its rotary layout; blocks run along a row (the input
    dimension), so the permutation is undone by moving whole rows with their scales.
    """
    import gguf

    from jlora.quantize import from_gguf_blocks

    key_map = gguf_key_map(config)
    rows = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    params = dict(variables["params"])
    flat = {}
    for tensor in gguf.GGUFReader(path).tensors:
        kind = tensor.tensor_type.name.lower()
        if kind not in ("q4_0", "q4_1", "q8_0") or tensor.name not in key_map:
            continue
        target, transform = key_map[tensor.name]
        shape = tuple(int(n) for n in reversed(tensor.shape))  # torch (out, in)
        heads = rows.get(tensor.name.split(".")[-2])
        order = None if heads is None else unpermute_rope(np.arange(shape[0]), heads)
        flat[target] = from_gguf_blocks(tensor.data, kind, shape, dtype, order, transposed=transform is not None)
    nested = jax.tree_util.tree_map_with_path(
        lambda keypath, leaf: flat.get("/".join(k.key for k in keypath), leaf), params)
    return {**variables, "params": nested}


def from_pretrained(directory, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """Load a Hugging Face Llama directory (config.json + safetensors).

    Args:
      directory: a directory written by `LlamaForCausalLM.save_pretrained`.
      dtype: compute dtype. param_dtype: dtype the weights are stored in.

    Returns:
      `(model, variables, config)`.
    """
    config = LlamaConfig.from_hf(read_config(directory))
    model = Llama(config, dtype=dtype, param_dtype=param_dtype)
    expected = param_shapes(model, jnp.zeros((1, 1), jnp.int32))
    # A tied checkpoint may still store lm_head.weight; rotary inv_freq buffers are recomputed.
    tied_copy = "lm_head.weight" if config.tie_word_embeddings else None
    ignore = lambda name: name.endswith("rotary_emb.inv_freq") or name == tied_copy
    tensors = read_safetensors(directory)
    if config.tie_word_embeddings:
        check_tied(tensors, "lm_head.weight", "model.embed_tokens.weight", directory)
    variables = assign(tensors, hf_key_map(config), expected, source=directory, param_dtype=param_dtype, ignore=ignore)
    return model, variables, config


def from_gguf(path, *, dtype=jnp.float32, param_dtype=jnp.float32, contents=None):
    """Load a llama.cpp GGUF file, dequantizing every tensor to float32 first.

    Args:
      path: the .gguf file.
      dtype: compute dtype. param_dtype: dtype the weights are stored in.
      contents: `(metadata, tensors)` from `checkpoint.read_gguf(path)`, to avoid reading the file twice.

    Returns:
      `(model, variables, config)`.
    """
    metadata, tensors = contents if contents is not None else read_gguf(path)
    config = LlamaConfig.from_gguf(metadata, tensors.keys())
    model = Llama(config, dtype=dtype, param_dtype=param_dtype)
    expected = param_shapes(model, jnp.zeros((1, 1), jnp.int32))
    variables = assign(tensors, gguf_key_map(config), expected, source=path, param_dtype=param_dtype)
    return model, variables, config

"""Llama-family models (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3, Gemma) in Flax, from Hugging Face.

GGUF files of these families load through `jlora.models.gguf`.

RMSNorm, rotary embeddings (Hugging Face's rotate_half layout), gated MLP, grouped-query attention,
tied or untied output head. The families differ in a few small switches, all in `LlamaConfig`; what a
Hugging Face `model_type` fixes in its modeling code (rather than in config.json) is in `VARIANTS`:

    llama    Llama 1-3 (llama3 rope scaling), SmolLM2, TinyLlama
    mistral  sliding_window: a query sees only the last `sliding_window` positions
    qwen2    bias on q/k/v but not o (qkv_bias)
    qwen3    per-head RMSNorm of queries and keys before the rotary embedding (qk_norm)
    gemma    RMSNorm scaled by (1 + weight), embeddings times sqrt(hidden_size), GeGLU (gelu tanh)

Param paths follow Hugging Face's names:

    embed_tokens/embedding [V, C]
    layers_{i}/input_layernorm/weight            layers_{i}/post_attention_layernorm/weight
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel   (in, out): the transpose of the torch weight
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    layers_{i}/self_attn/{q,k}_norm/weight       [head_dim], qk_norm only
    norm/weight
    lm_head/kernel [C, V]                        absent when tie_word_embeddings
"""

import dataclasses
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.core import files
from jlora.core.errors import CheckpointError
from jlora.models import attention, layers
from jlora.models.checkpoint import (assign, check_tied, param_shapes, read_config, read_safetensors,
                                     transpose)


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.x's `rope_type: llama3`: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.

    The defaults are Llama 3.1's; Llama 3.2 uses factor 32.
    """
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# What each Hugging Face model_type fixes in its modeling code rather than in config.json: (architecture, fields).
VARIANTS = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"qkv_bias": True}),
    "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True}),
    "gemma": ("GemmaForCausalLM", {"norm_unit_offset": True, "scale_embeddings": True}),
}
FIXED_BY_MODEL_TYPE = ("model_type", "qkv_bias", "qk_norm", "norm_unit_offset", "scale_embeddings")
ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": partial(nn.gelu, approximate=True),
               "gelu": partial(nn.gelu, approximate=False)}


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
    hidden_act: str = "silu"  # the MLP's gate activation, a key of ACTIVATIONS
    rope_scaling: Llama3RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs (head_dim // 2): inverse frequencies / these
    sliding_window: int | None = None  # a query sees keys at most sliding_window - 1 positions back (Mistral)
    # Fixed by the model_type (VARIANTS), never read from config.json:
    model_type: str = "llama"
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2); attention_bias puts one on o too
    qk_norm: bool = False  # RMSNorm of each query/key head before rope (Qwen3)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) in the compute dtype (Gemma)

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
        if self.model_type not in VARIANTS:
            raise ValueError(f"model_type={self.model_type!r}; known: {sorted(VARIANTS)}.")
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"hidden_act={self.hidden_act!r}; implemented: {sorted(ACTIVATIONS)}.")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} values; head_dim={self.head_dim} "
                             f"needs {self.head_dim // 2}.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be at least 1 (or None for no window).")

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """The config of a Hugging Face `config.json` dict (model_type a key of VARIANTS); refuses what is not implemented.

        Args:
          hf: the parsed config.json.
          source: the file, as errors name it.

        Raises:
          CheckpointError: a size is missing, or a field jlora reads is of the wrong type (file and key named).
          NotImplementedError: a family or option jlora does not implement.

        Returns:
          A LlamaConfig; what the model_type fixes in code (VARIANTS) is set from it, not read.

        Example:
          >>> config = LlamaConfig.from_hf({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
          ...                               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})
          >>> config.qkv_bias, config.attention_bias, config.head_dim, config.to_hf()["use_sliding_window"]
          (True, False, 16, False)
        """
        files.checked(hf, HF_FIELDS, source, positive=SIZES + ("num_key_value_heads", "head_dim"))  # missing: the defaults, as in transformers
        model_type = hf.get("model_type", "llama")
        if model_type not in VARIANTS:
            raise NotImplementedError(f"{source}: model_type={model_type!r} is not a Llama-style family jlora implements; "
                                      f"known: {sorted(VARIANTS)}.")
        _, fixed = VARIANTS[model_type]
        # Some Gemma config.json files name the gelu Gemma uses in hidden_activation, beside a generic hidden_act.
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise NotImplementedError(f"{source}: {model_type} config has hidden_act={act!r}; implemented: {sorted(ACTIVATIONS)}.")
        sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
        if hf.get("use_sliding_window") or sliding:
            raise NotImplementedError(f"{source}: {model_type} config uses sliding-window layers (use_sliding_window="
                                      f"{hf.get('use_sliding_window')}, layer_types {sorted(set(sliding))}); only "
                                      "Mistral's window on every layer is implemented.")
        if hf.get("use_bidirectional_attention"):
            raise NotImplementedError(f"{source}: {model_type} config has use_bidirectional_attention=true; only causal "
                                      "attention is implemented.")
        read = {f.name for f in dataclasses.fields(cls)} - set(FIXED_BY_MODEL_TYPE) - {
            "rope_scaling", "rope_freq_factors", "hidden_act", "sliding_window"}
        values = {k: v for k, v in hf.items() if k in read}
        values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, source)
        # Only Mistral's modeling code reads sliding_window; Qwen's configs carry one that is off.
        window = hf.get("sliding_window") if model_type == "mistral" else None
        try:
            return cls(**values, **fixed, model_type=model_type, hidden_act=act, sliding_window=window)
        except ValueError as error:  # sizes that do not fit together
            raise CheckpointError(f"{source}: {error}") from None

    def to_hf(self):
        """The config.json fields transformers reads for this config (besides model_type and architectures)."""
        if self.rope_freq_factors is not None:
            raise NotImplementedError("this config's rope scaling came from a GGUF's rope_freqs, which config.json "
                                      "cannot express; set rope_scaling=Llama3RopeScaling(...) from the model card.")
        skip = {*FIXED_BY_MODEL_TYPE, "rope_scaling", "rope_freq_factors", "sliding_window"}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**rope, "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        # transformers >= 5 reads rope_parameters, older versions rope_theta (and rope_scaling); both say the same.
        fields["rope_parameters"] = rope
        if self.model_type == "mistral":
            fields["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            fields["use_sliding_window"] = False
        return fields


init = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    unit_offset: bool = False  # Gemma: scale by (1 + weight), weight initialised to zeros

    @nn.compact
    def __call__(self, x):
        init_weight = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        weight = self.param("weight", init_weight, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:  # as Gemma's RMSNorm: the scale applied in float32, then cast
            return (x32 * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)
        return weight.astype(self.dtype) * x32.astype(self.dtype)


# What from_hf checks in a config.json: its sizes are >= 1, and every field it reads has its type.
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
HF_FIELDS = {**files.dataclass_fields(LlamaConfig, skip=(*FIXED_BY_MODEL_TYPE, "rope_scaling", "rope_freq_factors")),
             "model_type": str, "hidden_activation": str | None, "rope_scaling": dict | None, "rope_parameters": dict | None,
             "layer_types": list[str] | None, "use_sliding_window": bool | None, "use_bidirectional_attention": bool | None}


def rope_from_hf(hf, source="config.json"):
    """`(rope_theta, Llama3RopeScaling or None)` of a config.json; refuses rope types other than default and llama3."""
    # transformers 5 writes rope_parameters={'rope_theta', 'rope_type', ...}; older versions rope_theta and rope_scaling.
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    files.checked(rope, {"rope_theta": float, "rope_type": str, "type": str,
                         **files.dataclass_fields(Llama3RopeScaling)}, f"{source} (rope)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", LlamaConfig.rope_theta))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        names = [f.name for f in dataclasses.fields(Llama3RopeScaling)]
        missing = [name for name in names if name not in rope]
        if missing:
            raise CheckpointError(f"{source}: rope_type 'llama3' needs {names}; the config lacks {missing} ({rope}).")
        return theta, Llama3RopeScaling(**{name: rope[name] for name in names})
    raise NotImplementedError(f"{source}: config uses rope scaling {rope_type!r} ({rope}); only the default rotary "
                              "embedding and rope_type 'llama3' are implemented.")


def inv_frequencies(dim, theta, scaling=None, factors=None):
    """The rotary embedding's float32 inverse frequencies [dim // 2], as transformers computes them.

    Args:
      dim: head_dim. theta: rope_theta.
      scaling: a Llama3RopeScaling, how config.json says Llama 3's scaling, or None.
      factors: how llama.cpp's GGUF says it (rope_freqs): each frequency divided by its factor, or None.

    Returns:
      float32 [dim // 2].

    Example:
      >>> [round(float(f), 4) for f in inv_frequencies(8, 10000.0)]
      [1.0, 0.1, 0.01, 0.001]
      >>> llama3 = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      ...                            original_max_position_embeddings=128)
      >>> [round(float(f), 4) for f in inv_frequencies(8, 10000.0, llama3)]  # wavelength 6.3 kept, 63 ramped, longer / 8
      [1.0, 0.0428, 0.0012, 0.0001]
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    if factors is not None:
        return inv_freq / jnp.asarray(factors, jnp.float32)
    if scaling is None:
        return inv_freq
    s = scaling
    wavelength = 2 * jnp.pi / inv_freq
    low_freq_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    scaled = jnp.where(wavelength > low_freq_wavelength, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return jnp.where(medium, smoothed, scaled)


def rotary(positions, dim, theta, scaling=None, factors=None, dtype=jnp.float32):
    """The rotary embedding's `(cos, sin)` [T, 1, dim // 2] at int positions [T], in `dtype`."""
    # Positions known at trace time (no cache) make the table a constant, computed here by the same
    # XLA ops. Traced, cos and sin get fused into each use of the table and evaluated once per element
    # of the queries and keys, forward and backward, in every layer: ten times the rotation's cost.
    with jax.ensure_compile_time_eval():
        inv_freq = inv_frequencies(dim, theta, scaling, factors)
        angles = (positions.astype(jnp.float32)[:, None] * inv_freq[None, :])[:, None, :]
        return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x, cos, sin):
    """x [B, T, H, D] rotated by `rotary`'s table, halves rotated as in HF's rotate_half."""
    # HF's x * cat(cos, cos) + cat(-second, first) * cat(sin, sin), one half at a time: the same
    # products and sums (adding -b is subtracting b), with one concatenate where XLA made two passes.
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def rope(x, positions, theta, scaling=None, factors=None):
    """Rotary embedding of x [B, T, H, D] at int positions [T], halves rotated as in HF's rotate_half."""
    return apply_rotary(x, *rotary(positions, x.shape[-1], theta, scaling, factors, x.dtype))


class Attention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_block: int | None = None

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        c = self.config
        batch, length, _ = x.shape
        dense = partial(nn.Dense, use_bias=c.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=init)
        qkv = partial(dense, use_bias=c.attention_bias or c.qkv_bias)
        query = qkv(c.num_attention_heads * c.head_dim, name="q_proj")(x)
        key = qkv(c.num_key_value_heads * c.head_dim, name="k_proj")(x)
        value = qkv(c.num_key_value_heads * c.head_dim, name="v_proj")(x)
        query = query.reshape(batch, length, c.num_attention_heads, c.head_dim)
        key = key.reshape(batch, length, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            norm = partial(RMSNorm, c.rms_norm_eps, self.dtype, self.param_dtype)
            query, key = norm(name="q_norm")(query), norm(name="k_norm")(key)
        cos, sin = rotary(positions, c.head_dim, c.rope_theta, c.rope_scaling, c.rope_freq_factors, self.dtype)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        value = value.reshape(batch, length, c.num_key_value_heads, c.head_dim)
        keys, values, key_positions, layer_cache = attention.extend(layer_cache, key, value, positions)
        y = attention.causal_attention(query, keys, values, positions, key_positions, window=c.sliding_window,
                                         block=self.attention_block)
        return dense(c.hidden_size, name="o_proj")(y), layer_cache


class MLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    mlp_block: int | None = None

    def setup(self):
        c = self.config
        dense = partial(nn.Dense, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init)
        self.gate_proj = dense(c.intermediate_size)
        self.up_proj = dense(c.intermediate_size)
        self.down_proj = dense(c.hidden_size)

    def __call__(self, x):
        return layers.token_blocks(MLP.gated, self, x, self.mlp_block)

    def gated(self, x):
        return self.down_proj(ACTIVATIONS[self.config.hidden_act](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_block: int | None = None
    mlp_block: int | None = None

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(RMSNorm, self.config.rms_norm_eps, unit_offset=self.config.norm_unit_offset, **kw)
        h, layer_cache = Attention(self.config, name="self_attn", attention_block=self.attention_block, **kw)(
            norm(name="input_layernorm")(x), positions, layer_cache)
        x = x + h
        x = x + MLP(self.config, name="mlp", mlp_block=self.mlp_block, **kw)(norm(name="post_attention_layernorm")(x))
        return x, layer_cache


class Llama(nn.Module):
    """Llama-family language model.

    `model.apply(variables, tokens)` returns float32 logits [B, T, V];
    `model.apply(variables, tokens, cache)` returns `(logits, cache)` and continues from `cache["index"]`
    (see `init_cache` and `jlora.models.generate`);
    `model.apply(variables, tokens, hidden=True)` returns the final hidden states [B, T, C] and
    `model.head(variables, hidden)` their logits (for a loss that never holds all the logits at once).

    `scan=True` stacks the layers' params under `layers/` with a leading layer axis (convert a loaded
    tree with `jlora.models.layers.stack_layers`); `remat` is "none", "dots" or "full" (see `layers.repeat`);
    `attention_block` (say 512) computes attention that many queries at a time, for long sequences
    (`jlora.models.attention.blocked_attention`); `mlp_block` (say 256) runs the MLP that many tokens
    (of all B * T) at a time, never holding the full [tokens, intermediate_size] activations
    (`jlora.models.layers.token_blocks`).
    """
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype
    param_dtype: jnp.dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention_block: int | None = None
    mlp_block: int | None = None
    layer_name = "layers"  # where the layers' params sit: `layers_{i}/...`, or `layers/...` when scanned

    @nn.compact
    def __call__(self, tokens, cache=None, *, hidden=False):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        start = 0 if cache is None else cache["index"]
        with jax.ensure_compile_time_eval():  # concrete without a cache, for `rotary`'s constant table
            positions = start + jnp.arange(tokens.shape[1])
        embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="embed_tokens", **kw)
        x = embed(tokens)
        if c.scale_embeddings:  # Gemma rounds sqrt(hidden_size) to the compute dtype first, as here
            x = x * jnp.asarray(c.hidden_size ** 0.5, x.dtype)
        block = layers.repeat(DecoderLayer, remat=self.remat, scan=self.scan, length=c.num_hidden_layers)
        new_cache = {}
        names = ["layers"] if self.scan else [f"layers_{i}" for i in range(c.num_hidden_layers)]
        for name in names:
            x, new_cache[name] = block(c, name=name, attention_block=self.attention_block, mlp_block=self.mlp_block,
                                       **kw)(x, positions, None if cache is None else cache[name])
        x = RMSNorm(c.rms_norm_eps, unit_offset=c.norm_unit_offset, name="norm", **kw)(x)
        if hidden:
            return x
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, kernel_init=init, name="lm_head", **kw)(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {**new_cache, "index": start + tokens.shape[1]}

    def head(self, variables, x, vocab=None):
        """Float32 logits of final hidden states `x` [..., C] from `apply(variables, tokens, hidden=True)`;
        with `vocab=(start, size)`, of those `size` entries only (`start` may be traced)."""
        params = variables["params"]
        x = x.astype(self.dtype)
        if self.config.tie_word_embeddings:  # contract with the [V, C] table as it is: no transposed copy
            table = params["embed_tokens"]["embedding"]
            table = table if vocab is None else jax.lax.dynamic_slice_in_dim(table, *vocab, axis=0)
            return jnp.einsum("...c,vc->...v", x, table.astype(self.dtype)).astype(jnp.float32)
        kernel = params["lm_head"]["kernel"]
        kernel = kernel if vocab is None else jax.lax.dynamic_slice_in_dim(kernel, *vocab, axis=1)
        return jnp.dot(x, kernel.astype(self.dtype)).astype(jnp.float32)

    def init_cache(self, batch_size, max_length):
        """An empty cache for `batch_size` rows of at most `max_length` positions (prompt + new tokens)."""
        c = self.config
        if max_length > c.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds max_position_embeddings={c.max_position_embeddings}.")
        names = [f"layers_{i}" for i in range(c.num_hidden_layers)]
        cache = attention.init_cache(names, batch_size, max_length, c.num_key_value_heads, c.head_dim, self.dtype)
        return layers.stack_layers(cache, "layers") if self.scan else cache

    @property
    def max_length(self):
        return self.config.max_position_embeddings


def hf_key_map(config):
    """`{hf_name: (param_path, transform)}` for a `LlamaForCausalLM` (or Qwen2/Qwen3/Mistral/Gemma) checkpoint.

    Torch weights are (out, in), Flax kernels (in, out); every family uses the same names.
    """
    c = config
    key_map = {
        "model.embed_tokens.weight": ("embed_tokens/embedding", None),
        "model.norm.weight": ("norm/weight", None),
    }
    if not c.tie_word_embeddings:
        key_map["lm_head.weight"] = ("lm_head/kernel", transpose)
    qkv_bias = c.attention_bias or c.qkv_bias
    for i in range(c.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        norms = ["input_layernorm", "post_attention_layernorm"] + (["self_attn.q_norm", "self_attn.k_norm"] if c.qk_norm else [])
        for norm in norms:
            key_map[f"{hf}.{norm}.weight"] = (f"{ours}/{norm.replace('.', '/')}/weight", None)
        for proj, has_bias in [("self_attn.q_proj", qkv_bias), ("self_attn.k_proj", qkv_bias),
                               ("self_attn.v_proj", qkv_bias), ("self_attn.o_proj", c.attention_bias),
                               ("mlp.gate_proj", c.mlp_bias), ("mlp.up_proj", c.mlp_bias),
                               ("mlp.down_proj", c.mlp_bias)]:
            path = f"{ours}/{proj.replace('.', '/')}"
            key_map[f"{hf}.{proj}.weight"] = (f"{path}/kernel", transpose)
            if has_bias:
                key_map[f"{hf}.{proj}.bias"] = (f"{path}/bias", None)
    return key_map


def from_pretrained(directory, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """Load a Hugging Face Llama, Mistral, Qwen2, Qwen3 or Gemma directory (config.json + safetensors).

    Args:
      directory: a directory written by e.g. `LlamaForCausalLM.save_pretrained` (model_type a key of VARIANTS).
      dtype: compute dtype. param_dtype: dtype the weights are stored in.

    Returns:
      `(model, variables, config)`.
    """
    config = LlamaConfig.from_hf(read_config(directory), source=Path(directory) / "config.json")
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

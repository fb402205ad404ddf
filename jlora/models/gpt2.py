"""GPT-2 in Flax, loading Hugging Face `GPT2LMHeadModel` safetensors.

Param paths follow Hugging Face's names, so LoRA targets like `c_attn` or `c_proj` match:

    wte/embedding [V, C]                 wpe/embedding [n_positions, C]
    h_{i}/ln_1/{scale,bias}              h_{i}/attn/c_attn/{kernel [C, 3C], bias}
    h_{i}/attn/c_proj/{kernel,bias}      h_{i}/ln_2/{scale,bias}
    h_{i}/mlp/c_fc/{kernel,bias}         h_{i}/mlp/c_proj/{kernel,bias}
    ln_f/{scale,bias}

The output head is tied: logits = x @ wte.embedding.T.
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
from jlora.models.checkpoint import assign, check_tied, param_shapes, read_config, read_safetensors


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, as in Hugging Face
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not supported; "
                             f"known: {sorted(ACTIVATIONS)}.")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def mlp_width(self):
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """The config of a Hugging Face GPT-2 `config.json` dict (``source``: the file, as errors name it);
        refuses flags this model does not implement, and a size missing or a field of the wrong type."""
        fields = files.dataclass_fields(cls)
        sizes = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        files.checked(hf, fields, source, positive=(*sizes, "n_inner"))  # a size left out is transformers' default, as here
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if hf.get(flag):
                raise NotImplementedError(f"{source}: GPT-2 config sets {flag}=True, which jlora.models.gpt2 does not implement.")
        if not hf.get("scale_attn_weights", True):
            raise NotImplementedError(f"{source}: GPT-2 config sets scale_attn_weights=False, which jlora.models.gpt2 "
                                      "does not implement.")
        try:
            return cls(**{k: v for k, v in hf.items() if k in fields})
        except ValueError as error:  # sizes that do not fit together, an activation not implemented
            raise CheckpointError(f"{source}: {error}") from None


ACTIVATIONS = {
    "gelu_new": partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(nn.gelu, approximate=True),
    "gelu": partial(nn.gelu, approximate=False),
    "relu": nn.relu,
}

init = nn.initializers.normal(0.02)


class Attention(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_block: int | None = None

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        config = self.config
        batch, length, _ = x.shape
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init)
        query, key, value = jnp.split(dense(3 * config.n_embd, name="c_attn")(x), 3, axis=-1)
        heads = lambda t: t.reshape(batch, length, config.n_head, config.head_dim)
        keys, values, key_positions, layer_cache = attention.extend(layer_cache, heads(key), heads(value), positions)
        y = attention.causal_attention(heads(query), keys, values, positions, key_positions, block=self.attention_block)
        return dense(config.n_embd, name="c_proj")(y), layer_cache


class MLP(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    mlp_block: int | None = None

    def setup(self):
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init)
        self.c_fc = dense(self.config.mlp_width)
        self.c_proj = dense(self.config.n_embd)

    def __call__(self, x):
        return layers.token_blocks(MLP.feed_forward, self, x, self.mlp_block)

    def feed_forward(self, x):
        return self.c_proj(ACTIVATIONS[self.config.activation_function](self.c_fc(x)))


class Block(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_block: int | None = None
    mlp_block: int | None = None

    @nn.compact
    def __call__(self, x, positions, layer_cache):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(nn.LayerNorm, epsilon=self.config.layer_norm_epsilon, **kw)
        h, layer_cache = Attention(self.config, name="attn", attention_block=self.attention_block, **kw)(norm(name="ln_1")(x), positions, layer_cache)
        x = x + h
        x = x + MLP(self.config, name="mlp", mlp_block=self.mlp_block, **kw)(norm(name="ln_2")(x))
        return x, layer_cache


class GPT2(nn.Module):
    """GPT-2 language model.

    `model.apply(variables, tokens)` returns float32 logits [B, T, V];
    `model.apply(variables, tokens, cache)` returns `(logits, cache)` and continues from `cache["index"]`
    (see `init_cache` and `jlora.models.generate`);
    `model.apply(variables, tokens, hidden=True)` returns the final hidden states [B, T, C] and
    `model.head(variables, hidden)` their logits.

    `scan=True` stacks the blocks' params under `h/` with a leading layer axis (convert a loaded tree
    with `jlora.models.layers.stack_layers(variables, "h")`); `remat` is "none", "dots" or "full";
    `attention_block` computes attention that many queries at a time (`attention.blocked_attention`);
    `mlp_block` runs the MLP that many tokens at a time (`layers.token_blocks`).
    """
    config: GPT2Config
    dtype: jnp.dtype = jnp.float32  # compute dtype
    param_dtype: jnp.dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention_block: int | None = None
    mlp_block: int | None = None
    layer_name = "h"  # where the layers' params sit: `h_{i}/...`, or `h/...` when scanned

    @nn.compact
    def __call__(self, tokens, cache=None, *, hidden=False):
        config = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        start = 0 if cache is None else cache["index"]
        positions = start + jnp.arange(tokens.shape[1])
        wte = nn.Embed(config.vocab_size, config.n_embd, embedding_init=init, name="wte", **kw)
        wpe = nn.Embed(config.n_positions, config.n_embd, embedding_init=init, name="wpe", **kw)
        x = wte(tokens) + wpe(positions)[None]
        block = layers.repeat(Block, remat=self.remat, scan=self.scan, length=config.n_layer)
        new_cache = {}
        names = ["h"] if self.scan else [f"h_{i}" for i in range(config.n_layer)]
        for name in names:
            x, new_cache[name] = block(config, name=name, attention_block=self.attention_block, mlp_block=self.mlp_block,
                                       **kw)(x, positions, None if cache is None else cache[name])
        x = nn.LayerNorm(epsilon=config.layer_norm_epsilon, name="ln_f", **kw)(x)
        if hidden:
            return x
        logits = wte.attend(x).astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {**new_cache, "index": start + tokens.shape[1]}

    def head(self, variables, x, vocab=None):
        """Float32 logits of final hidden states `x` [..., C] from `apply(variables, tokens, hidden=True)`;
        with `vocab=(start, size)`, of those `size` entries only (`start` may be traced)."""
        embedding = variables["params"]["wte"]["embedding"]
        embedding = embedding if vocab is None else jax.lax.dynamic_slice_in_dim(embedding, *vocab, axis=0)
        return jnp.einsum("...c,vc->...v", x.astype(self.dtype), embedding.astype(self.dtype)).astype(jnp.float32)

    def init_cache(self, batch_size, max_length):
        """An empty cache for `batch_size` rows of at most `max_length` positions (prompt + new tokens)."""
        if max_length > self.config.n_positions:
            raise ValueError(f"max_length={max_length} exceeds GPT-2 n_positions={self.config.n_positions}.")
        names = [f"h_{i}" for i in range(self.config.n_layer)]
        cache = attention.init_cache(names, batch_size, max_length, self.config.n_head, self.config.head_dim, self.dtype)
        return layers.stack_layers(cache, "h") if self.scan else cache

    @property
    def max_length(self):
        return self.config.n_positions


def hf_key_map(config):
    """`{hf_name: (param_path, transform)}` for a `GPT2LMHeadModel` checkpoint.

    HF GPT-2 uses Conv1D, whose weight is already (in, out): kernels are copied as they are.
    """
    key_map = {
        "wte.weight": ("wte/embedding", None),
        "wpe.weight": ("wpe/embedding", None),
        "ln_f.weight": ("ln_f/scale", None),
        "ln_f.bias": ("ln_f/bias", None),
    }
    per_layer = {
        "ln_1.weight": "ln_1/scale", "ln_1.bias": "ln_1/bias",
        "attn.c_attn.weight": "attn/c_attn/kernel", "attn.c_attn.bias": "attn/c_attn/bias",
        "attn.c_proj.weight": "attn/c_proj/kernel", "attn.c_proj.bias": "attn/c_proj/bias",
        "ln_2.weight": "ln_2/scale", "ln_2.bias": "ln_2/bias",
        "mlp.c_fc.weight": "mlp/c_fc/kernel", "mlp.c_fc.bias": "mlp/c_fc/bias",
        "mlp.c_proj.weight": "mlp/c_proj/kernel", "mlp.c_proj.bias": "mlp/c_proj/bias",
    }
    for i in range(config.n_layer):
        for hf_name, path in per_layer.items():
            key_map[f"h.{i}.{hf_name}"] = (f"h_{i}/{path}", None)
    return key_map


def _not_a_param(name):
    # lm_head.weight is a tied copy of wte; attn.bias / attn.masked_bias are causal-mask buffers of old checkpoints.
    return name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias"))


def from_pretrained(directory, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """Load a Hugging Face GPT-2 directory (config.json + model.safetensors).

    Args:
      directory: a directory written by `GPT2LMHeadModel.save_pretrained`.
      dtype: compute dtype. param_dtype: dtype the weights are stored in.

    Returns:
      `(model, variables, config)`.
    """
    config = GPT2Config.from_hf(read_config(directory), source=Path(directory) / "config.json")
    model = GPT2(config, dtype=dtype, param_dtype=param_dtype)
    # GPT2LMHeadModel prefixes names with 'transformer.'; the original 'gpt2' checkpoints do not.
    tensors = {name.removeprefix("transformer."): array for name, array in read_safetensors(directory).items()}
    check_tied(tensors, "lm_head.weight", "wte.weight", directory)
    expected = param_shapes(model, jnp.zeros((1, 1), jnp.int32))
    variables = assign(tensors, hf_key_map(config), expected, source=directory, param_dtype=param_dtype,
                       ignore=_not_a_param)
    return model, variables, config

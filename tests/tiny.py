"""Tiny GPT-2 and Llama for the adapter-kind tests, in jlora and (interop) in transformers + PEFT."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.models
from test_transform import assert_trees_close
from jlora import paths
from jlora.models.gpt2 import GPT2, GPT2Config
from jlora.models.llama import Llama, LlamaConfig

TOKENS = [[5, 17, 2, 60, 33, 1, 9, 44], [0, 61, 7, 7, 20, 39, 41, 2]]
GPT2_SIZES = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
# Grouped-query attention, so d_k = d_v = 2 heads · 8 = 16 differs from the width 32.
LLAMA_SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]  # c_proj: both attn/c_proj and mlp/c_proj
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomized(tree, seed=0, std=0.2):
    """Every leaf N(0, std), norm scales N(1, std): at Flax's 0.02 init an adapter barely moves the logits."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        mean = 1.0 if path.endswith(("/scale", "norm/weight")) else 0.0
        return jnp.asarray(mean + std * rng.standard_normal(x.shape), x.dtype)

    return paths.map_with_path(draw, tree)


@functools.cache
def jax_model(kind):
    """``(model, variables, tokens)`` of a tiny random ``'gpt2'`` or ``'llama'`` (made once per process)."""
    model = GPT2(GPT2Config(**GPT2_SIZES)) if kind == "gpt2" else Llama(LlamaConfig(**LLAMA_SIZES))
    tokens = jnp.array(TOKENS)
    return model, randomized(jax.eval_shape(model.init, jax.random.key(0), tokens)), tokens


def assert_adapt_equals_merge(fn, params, adapters, *args):
    """Values and gradients of ``jlora.adapt(fn, strict=True)`` and fn∘merge agree (as in
    test_transform, compiled: on two CPU cores jit is much faster than op-by-op dispatch)."""
    adapted = jlora.adapt(fn, strict=True)
    merged = lambda p, a, *args: fn(jlora.merge(p, a), *args)
    assert_trees_close(jax.jit(adapted)(params, adapters, *args), jax.jit(merged)(params, adapters, *args))

    def gradient(f):
        scalar = lambda p, a: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(f(p, a, *args)))
        return jax.jit(jax.grad(scalar, argnums=(0, 1)))(params, adapters)

    assert_trees_close(gradient(adapted), gradient(merged))


# ---- interop: the same weights in transformers, adapters set by hand in PEFT ----


def hf_model(kind, directory, seed=0):
    """A random transformers model saved to ``directory`` and loaded by jlora:
    ``(fresh, model, variables)``, where ``fresh()`` builds another torch copy of the same weights."""
    import torch
    import transformers

    if kind == "gpt2":
        config = transformers.GPT2Config(**GPT2_SIZES, bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(**LLAMA_SIZES)
        cls = transformers.LlamaForCausalLM

    def fresh():
        torch.manual_seed(seed)
        theirs = cls(config)
        with torch.no_grad():
            for name, param in theirs.named_parameters():
                param.normal_(1.0 if "norm" in name or "ln_" in name else 0.0, 0.2)
        return theirs.eval()

    fresh().save_pretrained(directory)
    model, variables, _, _ = jlora.models.load(str(directory))
    return fresh, model, variables


def peft_module(peft_model, path):
    """The PEFT layer that wraps the weight at our ``path`` (``params/h_0/attn/c_attn/kernel``)."""
    module = path.removeprefix("params/").removesuffix("/kernel")
    dotted = re.sub(r"(layers|h)_(\d+)", r"\1.\2", module).replace("/", ".")
    [module] = [m for n, m in peft_model.named_modules() if n.endswith("." + dotted) and hasattr(m, "base_layer")]
    return module


def torch_logits(torch_model, tokens=TOKENS):
    import torch

    with torch.no_grad():
        return torch_model(torch.tensor(tokens)).logits.numpy()


def to_torch(x):
    import torch

    return torch.tensor(np.asarray(x, np.float32))

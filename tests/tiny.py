"""Tiny random GPT-2 and Llama for the tests, in jlora and (interop) in transformers + PEFT."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.models
from helpers import randomized
from jlora.models.gpt2 import GPT2, GPT2Config
from jlora.models.llama import Llama, LlamaConfig

TOKENS = [[5, 17, 2, 60, 33, 1, 9, 44], [0, 61, 7, 7, 20, 39, 41, 2]]
GPT2_SIZES = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
# Grouped-query attention, so d_k = d_v = 2 heads · 8 = 16 differs from the width 32.
LLAMA_SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]  # c_proj: both attn/c_proj and mlp/c_proj
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_variables(model, seed=0, std=0.2, norms=1.0):
    """:func:`helpers.randomized` variables of a ``jlora.models`` model (its init traced, never run)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return randomized(shapes, seed, std, norms)


@functools.cache
def jax_model(kind):
    """``(model, variables, tokens)`` of a tiny random ``'gpt2'`` or ``'llama'`` (made once per process)."""
    model = GPT2(GPT2Config(**GPT2_SIZES)) if kind == "gpt2" else Llama(LlamaConfig(**LLAMA_SIZES))
    return model, random_variables(model), jnp.array(TOKENS)


# ---- interop: the same weights in transformers, adapters set by hand in PEFT ----


def hf_model(kind, directory, seed=0):
    """A random transformers model saved to ``directory`` and loaded by jlora:
    ``(fresh, model, variables)``, where ``fresh()`` builds another torch copy of the same weights."""
    import transformers

    if kind == "gpt2":
        config = transformers.GPT2Config(**GPT2_SIZES, bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(**LLAMA_SIZES)
        cls = transformers.LlamaForCausalLM

    def fresh():
        return randomized_torch(cls(config), seed)

    fresh().save_pretrained(directory)
    model, variables, _, _ = jlora.models.load(str(directory))
    return fresh, model, variables


def randomized_torch(model, seed=0, std=0.2):
    """:func:`helpers.randomized` for a torch model, in place: every parameter N(0, std), norms N(1, std);
    returns ``model.eval()``."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name or "ln_" in name else 0.0, std)
    return model.eval()


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


# ---- a tiny tokenizer, for exports that must stand alone ----

CHAT = (  # ChatML, as SmolLM2 and Qwen use
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer(add_bos=False):
    """A byte-level BPE of ~300 ids learned from a few lines, with ChatML special tokens at ids 0-2.

    One that adds BOS adds <|endoftext|>, as a text starting with BOS already gets none from jlora but
    another from transformers.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["ROMEO: But soft, what light through yonder window breaks?",
                                 "JULIET: O Romeo, Romeo, wherefore art thou Romeo?"] * 20, trainer)
    return jlora.models.Tokenizer(backend, bos_id=0 if add_bos else 1, eos_id=2, add_bos=add_bos, chat_template=CHAT)

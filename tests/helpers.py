"""What many tests share: random inputs, params and trained-looking adapters; trees that must be close;
and the check that ``jlora.adapt(fn)`` is ``fn`` of the merged params."""

import functools
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.cli.common import load_base as _LOAD_BASE  # the tests patch common.load_base with this cache
from jlora.cli.common import need_tokenizer
from jlora.core import paths
from jlora.core.adapter import is_adapter

TOL = 1e-5
EPS32 = float(np.finfo(np.float32).eps)


def float32_tol(expected, length, k=64):
    """What two float32 computations of ``expected`` (say jlora's and transformers' logits) may differ by:
    ``k`` ulps of its largest magnitude per square root of ``length``, the longest reduction feeding it
    (the hidden or intermediate size). Rounding errors of independent terms grow as the square root of
    their count; ``k`` covers the depth (layers, norms, softmax) of a tiny model. Measured against a
    float64 torch run (Gemma, hidden 32, intermediate 48): jlora 1.0e-4 off, transformers 4.5e-5 off, so
    both move and neither is the reference; this tolerance is 3.5e-4 there, and a misplaced weight or a
    missing scale moves logits by 0.1 or more."""
    return k * EPS32 * float(np.max(np.abs(np.asarray(expected, np.float64)))) * float(length) ** 0.5


def assert_sums_close(actual, expected, terms, tol=TOL):
    """Two float32 sums of ``terms`` (the array summed, or its size) equal within what float32 allows:
    each term carries up to ``tol`` in units of its own scale (at least 1), and independent errors of n
    terms add up as sqrt(n). A sum of 512 sines of logits, computed twice, differs by 1e-5 to 3e-5 from the
    float64 sum (both sides alike), more than ``tol`` alone."""
    n = terms if isinstance(terms, int) else np.size(terms)
    scale = max(1.0, float(np.max(np.abs(np.asarray(terms, np.float64))))) if not isinstance(terms, int) else 1.0
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=0, atol=tol * scale * n ** 0.5)


def normal(seed, *shape, dtype=jnp.float32):
    """An input of ``shape``, N(0, 1) from ``jax.random.key(seed)``."""
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def randomized(tree, seed=0, std=0.2, norms=1.0):
    """Every leaf of ``tree`` (arrays or shapes) N(0, std), norm scales N(norms, std), in the leaf's dtype.

    Random biases and norms make a misplaced tensor show; at Flax's 0.02 init an adapter would barely
    move the logits. One key of ``jax.random.split(key(seed), n)`` per leaf, in flattening order.
    """
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree))))

    def draw(path, x):
        mean = norms if path.endswith(("/scale", "norm/weight")) else 0.0
        return (mean + std * jax.random.normal(next(keys), x.shape)).astype(x.dtype)

    return paths.map_with_path(draw, tree)


def trained(adapters, seed=0, std=0.3, fields=None):
    """``adapters`` as after some training: each trainable array of each adapter (all but the kind's
    ``frozen_fields``; only ``fields`` when given) moved by std·N(0, 1) from where init left it. At init
    LoRA's B = 0 and IA3's vectors are ones, so the output would not change and neither would a mistake.

    seed: an int, or a ``np.random.Generator`` to go on drawing from.
    """
    rng = np.random.default_rng(seed)

    def move(adapter):
        def field(keypath, x):
            name = keypath[0].name
            if name in adapter.frozen_fields or (fields is not None and name not in fields):
                return x
            return jnp.asarray(np.asarray(x, np.float64) + std * rng.standard_normal(x.shape), x.dtype)

        return jax.tree_util.tree_map_with_path(field, adapter)

    return jax.tree.map(move, adapters, is_leaf=is_adapter)


def assert_trees_close(actual, expected, tol=TOL):
    """``chex.assert_trees_all_close`` with each leaf measured in units of the expected leaf's largest
    magnitude (at least 1): float32 sums of many terms round at that scale, whichever order they are
    added in. Structure, shapes and dtypes must match, and ``expected`` be finite."""
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    chex.assert_tree_all_finite(expected)
    unit = jax.tree.map(lambda y: max(1.0, float(np.max(np.abs(np.asarray(y, np.float64)), initial=0.0))), expected)
    in_units = lambda tree: jax.tree.map(lambda x, u: np.asarray(x, np.float64) / u, tree, unit)
    chex.assert_trees_all_close(in_units(actual), in_units(expected), rtol=0.0, atol=tol)


def assert_adapt_equals_merge(fn, params, adapters, *args, strict=True):
    """``jlora.adapt(fn)(params, adapters, *args) == fn(jlora.merge(params, adapters), *args)`` in values,
    run eagerly and under jit, and in gradients with respect to params and adapters; and the adapters
    matter: ``fn`` of the base params alone gives other values, and the adapters get a gradient.
    Everything but the eager run is compiled: on two CPU cores much faster than op by op.

    strict: every use of an adapted weight must have a factored rule (a fallback warning fails too).
    """
    adapted = jlora.adapt(fn, strict=strict)

    def merged(params, adapters, *args):
        return fn(jlora.merge(params, adapters), *args)

    def scalar(f):
        return lambda p, a: sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(f(p, a, *args)))

    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error")
        want = jax.jit(merged)(params, adapters, *args)
        for got in (adapted(params, adapters, *args), jax.jit(adapted)(params, adapters, *args)):
            assert_trees_close(got, want)
        base = jax.jit(fn)(params, *args)  # differs, or a dropped adapter would pass
        assert not all(np.allclose(b, w, rtol=TOL, atol=TOL) for b, w in zip(*map(jax.tree.leaves, (base, want))))
        want_grads = jax.jit(jax.grad(scalar(merged), argnums=(0, 1)))(params, adapters)
        got_grads = jax.jit(jax.grad(scalar(adapted), argnums=(0, 1)))(params, adapters)
        assert_trees_close(got_grads, want_grads)
    assert any(np.any(g) for g in jax.tree.leaves(want_grads[1]))


def load_base_once(name="smollm2-135m", dtype="float32", quantize=None, *, text=True):
    """``jlora.cli.common.load_base``, once per test process: SmolLM2 (or any base) is read, dequantised
    and tokenized once a session, whichever test module asks first."""
    loaded = _load_base_cached(name, dtype, quantize)
    if text:
        need_tokenizer(loaded[2], name)
    return loaded


@functools.cache
def _load_base_cached(name, dtype, quantize):
    return _LOAD_BASE(name, dtype, quantize, text=False)


def tiny_llama_dir(directory: Path, **sizes) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer (256 bytes + eos), as a Hugging Face directory
    (``sizes``: other ``LlamaConfig`` sizes). torch and transformers are imported here, so that
    importing this module does not need them."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))} | {"<eos>": 256}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    config = transformers.LlamaConfig(**dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             eos_token_id=256, bos_token_id=None) | sizes)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(directory)
    return directory

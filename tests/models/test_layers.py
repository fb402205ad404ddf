"""Scanned and rematerialised layers (jlora/models/layers.py): the same numbers as the unrolled model,
params/adapters/caches converted between the two layouts without loss, and less compiled memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_close, trained
from jlora.models import generate, layers
from jlora.models.llama import Llama, LlamaConfig
from tiny import GPT2_LINEAR, LLAMA_LINEAR, jax_model

PREFIX = {"llama": "layers", "gpt2": "h"}
LINEAR = {"llama": LLAMA_LINEAR, "gpt2": GPT2_LINEAR}


def lora_loss(model):
    adapted = jlora.adapt(model.apply, strict=True)
    return jax.jit(jax.value_and_grad(lambda a, v, t: jnp.sum(jnp.sin(adapted(v, a, t))), argnums=0))


@pytest.mark.slow  # heavy compile: kept out of the fast tier
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scanned_and_rematerialised_equal_unrolled_logits_and_lora_gradients(kind):
    model, variables, tokens = jax_model(kind)
    adapters = trained(jlora.init(variables, rank=4, targets=LINEAR[kind], key=jax.random.key(1)))
    want_logits = model.apply(variables, tokens)
    want_loss, want_grads = lora_loss(model)(adapters, variables, tokens)
    stacked, stacked_adapters = layers.stack_layers(variables, PREFIX[kind]), layers.stack_layers(adapters, PREFIX[kind])
    for scan, remat in [(True, "dots"), (True, "full")]:  # unrolled + remat shares their code path
        scanned = model.clone(scan=scan, remat=remat)
        v, a = (stacked, stacked_adapters) if scan else (variables, adapters)
        assert_trees_close(scanned.apply(v, tokens), want_logits, tol=1e-5)
        loss, grads = lora_loss(scanned)(a, v, tokens)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        assert_trees_close(layers.unstack_layers(grads, PREFIX[kind]) if scan else grads, want_grads, tol=1e-5)


def test_scanned_params_have_a_leading_layer_axis_and_stack_as_the_loaded_tree():
    model, variables, tokens = jax_model("llama")
    scanned = model.clone(scan=True)
    shapes = jax.eval_shape(scanned.init, jax.random.key(0), tokens)
    assert sorted(shapes["params"]) == ["embed_tokens", "layers", "lm_head", "norm"]
    assert shapes["params"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    stacked = layers.stack_layers(variables)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_stack_then_unstack_gives_back_the_same_params_and_adapters(method):
    model, variables, _ = jax_model("llama")
    adapters = trained(jlora.adapter.kind(method).create(variables, targets=["q_proj", "down_proj"]))
    stacked = layers.stack_layers(adapters)
    leaf = stacked["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert leaf.stack_axes == 1 and leaf.kernel_shape == (2, 48, 32)
    jax.tree.map(np.testing.assert_array_equal, layers.unstack_layers(stacked), adapters)
    assert jax.tree.structure(layers.unstack_layers(stacked)) == jax.tree.structure(adapters)
    jax.tree.map(np.testing.assert_array_equal, layers.unstack_layers(layers.stack_layers(variables)), variables)
    # merge works on the stacked layout and agrees with merging layer by layer
    merged = jlora.merge(layers.stack_layers(variables), stacked)
    assert_trees_close(layers.unstack_layers(merged), jlora.merge(variables, adapters))


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_scanned_model_generates_with_a_stacked_cache_as_the_unrolled_one():
    model, variables, tokens = jax_model("llama")
    scanned = model.clone(scan=True, remat="dots")
    cache = scanned.init_cache(2, 12)
    assert cache["layers"]["key"].shape == (2, 2, 12, 2, 8)
    stacked = layers.stack_layers(variables)
    logits, cache = scanned.apply(stacked, tokens[:, :5], cache)
    step, _ = scanned.apply(stacked, tokens[:, 5:6], cache)
    assert_trees_close(logits, model.apply(variables, tokens)[:, :5], tol=1e-5)
    assert_trees_close(step[:, 0], model.apply(variables, tokens[:, :6])[:, 5], tol=1e-5)
    want = generate(model.apply, variables, tokens[:, :4], model.init_cache(2, 7), max_new_tokens=3)
    got = generate(scanned.apply, stacked, tokens[:, :4], scanned.init_cache(2, 7), max_new_tokens=3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_remat_lowers_the_compiled_memory_of_a_lora_step():
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=512)
    tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)

    def memory(remat):
        model = Llama(config, scan=True, remat=remat)
        variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        adapters = jax.eval_shape(lambda v: jlora.init(v, 4, targets=LLAMA_LINEAR, stack_axes=1), variables)
        grad = jax.jit(jax.grad(lambda a, v, t: jnp.sum(jlora.adapt(model.apply)(v, a, t)[..., 0])))
        m = grad.lower(adapters, variables, tokens).compile().memory_analysis()
        return m.temp_size_in_bytes

    none, dots, full = memory("none"), memory("dots"), memory("full")
    assert full < dots < none, (none, dots, full)
    assert full < 0.5 * none, (none, full)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_blocked_attention_equals_dense_in_values_and_gradients_and_holds_no_full_score_matrix():
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=40)
    model = Llama(config)
    tokens = jax.random.randint(jax.random.key(0), (2, 100), 0, 64)  # 100: the last block is padded
    variables = model.init(jax.random.key(1), tokens[:, :1])
    adapters = trained(jlora.init(variables, rank=4, targets=LLAMA_LINEAR, key=jax.random.key(2)))
    want_loss, want_grads = lora_loss(model)(adapters, variables, tokens)
    blocked = model.clone(attention_block=32)
    assert_trees_close(blocked.apply(variables, tokens), model.apply(variables, tokens), tol=1e-5)
    loss, grads = lora_loss(blocked)(adapters, variables, tokens)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(grads, want_grads, tol=5e-5)  # float32 sums over 200 positions in another order

    # Compiled memory of the LoRA gradient at T=1024: the dense step holds [B, H, T, T] float32 scores
    # (8 MiB here) several times over; the blocked one a [B, H, 128, T] block at a time.
    long = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    config = dataclasses.replace(config, max_position_embeddings=1024, sliding_window=None)

    def temp_bytes(block):
        model = Llama(config, scan=True, remat="full", attention_block=block)
        v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        a = jax.eval_shape(lambda v: jlora.init(v, 4, targets=LLAMA_LINEAR, stack_axes=1), v)
        grad = jax.jit(jax.grad(lambda a, v, t: jnp.sum(jlora.adapt(model.apply)(v, a, t)[..., 0])))
        return grad.lower(a, v, long).compile().memory_analysis().temp_size_in_bytes

    scores = 2 * 4 * 1024 * 1024 * 4
    dense, blocked = temp_bytes(None), temp_bytes(128)
    assert dense > 2 * scores and blocked < scores, (dense, blocked, scores)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_blocked_mlp_equals_whole_in_values_and_gradients_and_keeps_its_param_paths(kind):
    model, variables, tokens = jax_model(kind)  # 2 x 8 = 16 tokens: blocks of 5, the last padded
    adapters = trained(jlora.init(variables, rank=4, targets=LINEAR[kind], key=jax.random.key(1)))
    want_loss, want_grads = lora_loss(model)(adapters, variables, tokens)
    param_loss = jax.jit(jax.grad(lambda m, v, t: jnp.sum(jnp.sin(m.apply(v, t))), argnums=1), static_argnums=0)
    blocked = model.clone(mlp_block=5)
    assert jax.tree.map(jnp.shape, blocked.init(jax.random.key(0), tokens)) == jax.tree.map(jnp.shape, variables)
    assert_trees_close(blocked.apply(variables, tokens), model.apply(variables, tokens), tol=1e-5)
    assert_trees_close(param_loss(blocked, variables, tokens), param_loss(model, variables, tokens), tol=1e-5)
    loss, grads = lora_loss(blocked)(adapters, variables, tokens)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(grads, want_grads, tol=1e-5)
    # Scanned and fully rematerialised, as a long sequence trains: the blocks' loop nests in the layers'.
    stacked, stacked_adapters = layers.stack_layers(variables, PREFIX[kind]), layers.stack_layers(adapters, PREFIX[kind])
    loss, grads = lora_loss(blocked.clone(scan=True, remat="full"))(stacked_adapters, stacked, tokens)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(layers.unstack_layers(grads, PREFIX[kind]), want_grads, tol=1e-5)


def test_blocked_mlp_holds_no_full_intermediate():
    # Compiled memory of the LoRA gradient at 2 x 1024 tokens: the whole MLP holds [2048, 4096] float32
    # intermediates (32 MiB each) several times over; the blocked one [128, 4096] at a time.
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

    def temp_bytes(block):
        model = Llama(config, scan=True, remat="full", attention_block=128, mlp_block=block)
        v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        a = jax.eval_shape(lambda v: jlora.init(v, 4, targets=LLAMA_LINEAR, stack_axes=1), v)
        grad = jax.jit(jax.grad(lambda a, v, t: jnp.sum(jlora.adapt(model.apply)(v, a, t)[..., 0])))
        return grad.lower(a, v, tokens).compile().memory_analysis().temp_size_in_bytes

    intermediate = 2 * 1024 * 4096 * 4
    whole, blocked = temp_bytes(None), temp_bytes(128)
    assert whole > 2 * intermediate and blocked < intermediate, (whole, blocked, intermediate)


def test_bad_layer_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"remat='some'; choose one of \['dots', 'full', 'none'\]"):
        layers.repeat(object, remat="some")
    tree = {"layers_0": {"w": jnp.zeros(3)}, "layers_1": {"w": jnp.zeros(4)}}
    with pytest.raises(ValueError, match=r"layers differ in shape at 'layers/w': \[\(3,\), \(4,\)\]"):
        layers.stack_layers(tree)
    with pytest.raises(ValueError, match=r"not numbered 0..1: found \[0, 2\]"):
        layers.stack_layers({"layers_0": {}, "layers_2": {}})
    with pytest.raises(ValueError, match=r"no stacked 'layers' subtree to unstack; top-level keys are \['h'\]"):
        layers.unstack_layers({"h": {}})
    adapters = jlora.init({"layers_0": {"w": jnp.ones((4, 4))}, "layers_1": {"w": jnp.ones((4, 4))}}, rank=2, targets=["w"],
                          rank_pattern={"layers_1/w": 1})
    with pytest.raises(ValueError, match=r"cannot stack the layers' adapters at 'layers/w'"):
        layers.stack_layers(adapters)

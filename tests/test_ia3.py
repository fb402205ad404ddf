"""(IA)³: vectors that rescale k, v and the FFN's inner activation; adapt equals merge; PEFT's logits."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_adapt_equals_merge, assert_trees_close, trained
from jlora.training import checkpoint
from jlora.kinds import ia3
from jlora import training as train
from jlora.core.adapter import table
from tiny import TOKENS, hf_model, jax_model, peft_module, to_torch, torch_logits

# IA3's vectors start at one; N(1, 0.5) entries each change the output visibly.
STD = 0.5


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return jax_model(request.param)


# ---- what is scaled, and how many values train ----


def test_gpt2_defaults_scale_the_k_v_thirds_of_c_attn_and_the_mlp_input():
    _, params, _ = jax_model("gpt2")
    adapters = ia3.init(params)
    found = table(adapters)
    assert sorted(found) == [f"params/h_{i}/{m}/kernel" for i in (0, 1) for m in ("attn/c_attn", "mlp/c_proj")]
    c_attn, c_proj = found["params/h_0/attn/c_attn/kernel"], found["params/h_0/mlp/c_proj/kernel"]
    assert (c_attn.side, c_attn.scale.shape, c_attn.offset, c_attn.kernel_shape) == ("output", (64,), 32, (32, 96))
    assert (c_proj.side, c_proj.scale.shape, c_proj.offset, c_proj.kernel_shape) == ("input", (128,), 0, (128, 32))
    np.testing.assert_array_equal(c_attn.vector(), np.ones(96))
    # L·(d_k + d_v + d_ff) = 2·(32 + 32 + 128); the q third is not a parameter.
    assert jlora.count_params(params, adapters).trainable == 384


def test_llama_defaults_scale_k_v_outputs_and_the_down_projection_input():
    _, params, _ = jax_model("llama")
    adapters = ia3.init(params)
    sides = {p: (a.side, a.scale.shape) for p, a in table(adapters).items()}
    assert sides == {
        f"params/layers_{i}/{m}/kernel": side for i in (0, 1) for m, side in (
            ("self_attn/k_proj", ("output", (16,))),
            ("self_attn/v_proj", ("output", (16,))),
            ("mlp/down_proj", ("input", (48,))),
        )
    }
    assert jlora.count_params(params, adapters).trainable == 2 * (16 + 16 + 48)


class FlaxExampleBlock(nn.Module):
    """The Flax examples' layout: MultiHeadDotProductAttention's DenseGeneral query/key/value/out,
    then an MlpBlock of two unnamed Dense layers."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(x, x)
        return x + MlpBlock()(x)


class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(24)(x))
        return nn.Dense(x.shape[-1])(h)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_flax_example_names_key_value_and_the_mlp_blocks_second_dense():
    model, x = FlaxExampleBlock(), jax.random.normal(jax.random.key(1), (2, 5, 16))
    params = jax.jit(model.init)(jax.random.key(0), x)
    adapters = ia3.init(params)
    sides = {p: (a.side, a.scale.shape) for p, a in table(adapters).items()}
    assert sides == {
        "params/MultiHeadDotProductAttention_0/key/kernel": ("output", (16,)),  # (in, heads, head_dim)
        "params/MultiHeadDotProductAttention_0/value/kernel": ("output", (16,)),
        "params/MlpBlock_0/Dense_1/kernel": ("input", (24,)),
    }
    assert_adapt_equals_merge(model.apply, params, trained(adapters, std=STD), x)


# ---- the defining formula, written out ----


def test_adapt_and_merge_follow_the_ia3_formula():
    rng = np.random.default_rng(0)
    w = {"k_proj": rng.normal(size=(6, 4)), "v_proj": rng.normal(size=(6, 4)),
         "down_proj": rng.normal(size=(10, 6)), "c_attn": rng.normal(size=(6, 12))}
    params = {name: {"kernel": jnp.asarray(v, jnp.float32)} for name, v in w.items()}
    adapters = trained(ia3.init(params), std=STD)
    l = {name: np.asarray(table(adapters)[f"{name}/kernel"].scale, np.float64) for name in w}
    assert l["c_attn"].shape == (8,)
    l_qkv = np.concatenate([np.ones(4), l["c_attn"]])
    x, h = rng.normal(size=(3, 6)), rng.normal(size=(3, 10))

    def fn(p, x, h):
        k, v, c = (x @ p[name]["kernel"] for name in ("k_proj", "v_proj", "c_attn"))
        return k, v, h @ p["down_proj"]["kernel"], c

    expected = ((x @ w["k_proj"]) * l["k_proj"], (x @ w["v_proj"]) * l["v_proj"],
                (h * l["down_proj"]) @ w["down_proj"], (x @ w["c_attn"]) * l_qkv)
    got = jlora.adapt(fn, strict=True)(params, adapters, jnp.asarray(x, jnp.float32), jnp.asarray(h, jnp.float32))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    merged = jlora.merge(params, adapters)
    np.testing.assert_allclose(merged["k_proj"]["kernel"], w["k_proj"] * l["k_proj"][None, :], rtol=1e-6)
    np.testing.assert_allclose(merged["down_proj"]["kernel"], w["down_proj"] * l["down_proj"][:, None], rtol=1e-6)
    np.testing.assert_allclose(merged["c_attn"]["kernel"], w["c_attn"] * l_qkv[None, :], rtol=1e-6)


def test_at_init_the_model_is_unchanged(tiny):
    model, params, tokens = tiny
    adapted = jax.jit(jlora.adapt(model.apply, strict=True))
    assert_trees_close(adapted(params, ia3.init(params), tokens), jax.jit(model.apply)(params, tokens))


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_adapt_equals_model_of_merged_params(tiny):
    model, params, tokens = tiny
    assert_adapt_equals_merge(model.apply, params, trained(ia3.init(params), std=STD), tokens)


def test_stacked_layers_under_scan():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = jnp.tanh(nn.Dense(16, name="key")(x)) * nn.Dense(16, name="value")(x)
            return x + nn.Dense(8, name="down_proj")(jax.nn.relu(nn.Dense(32, name="up_proj")(h))), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scanned(name="layers")(x, None)[0]

    model, x = Stack(), jax.random.normal(jax.random.key(2), (4, 8))
    params = jax.jit(model.init)(jax.random.key(0), x)
    adapters = trained(ia3.init(params, stack_axes=1), std=STD)
    found = table(adapters)
    assert found["params/layers/key/kernel"].scale.shape == (3, 16)
    assert found["params/layers/down_proj/kernel"].scale.shape == (3, 32)
    assert_adapt_equals_merge(model.apply, params, adapters, x)


# ---- merge, unmerge, training, checkpoints ----


def test_unmerge_inverts_merge(tiny):
    _, params, _ = tiny
    adapters = trained(ia3.init(params), std=STD)
    assert_trees_close(jlora.unmerge(jlora.merge(params, adapters), adapters), params, tol=1e-6)


def test_unmerge_refuses_a_vector_entry_too_close_to_zero():
    params = {"mlp": {"down_proj": {"kernel": jnp.ones((8, 4))}}, "k_proj": {"kernel": jnp.ones((4, 4))}}
    adapters = ia3.init(params)
    down = adapters["mlp"]["down_proj"]["kernel"]
    adapters["mlp"]["down_proj"]["kernel"] = ia3.IA3(down.scale.at[5].set(1e-8), down.shape, down.side)
    merged = jlora.merge(params, adapters)
    assert float(merged["mlp"]["down_proj"]["kernel"][5, 0]) == pytest.approx(1e-8)
    with pytest.raises(ValueError, match=r"unmerge at 'mlp/down_proj/kernel'.*scale entry \(5,\) is 1e-08"):
        jlora.unmerge(merged, adapters)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_optimizer_updates_only_the_vectors():
    rng = np.random.default_rng(0)
    params = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32), "bias": jnp.zeros(shape[1])}
              for name, shape in (("k_proj", (6, 4)), ("up_proj", (4, 10)), ("down_proj", (10, 6)))}
    adapters = ia3.init(params)
    x, y = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32), jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)

    def loss(params, adapters):
        def mlp(p, x):
            h = jnp.tanh(x @ p["k_proj"]["kernel"] + p["k_proj"]["bias"]) @ p["up_proj"]["kernel"]
            return jax.nn.relu(h) @ p["down_proj"]["kernel"]

        return jnp.mean((jlora.adapt(mlp, strict=True)(params, adapters, x) - y) ** 2)

    tx = jlora.optimizer(optax.adam(1e-2))
    grads = jax.grad(loss, argnums=(0, 1))(params, adapters)
    (params_update, adapters_update), _ = tx.update(grads, tx.init((params, adapters)), (params, adapters))
    assert all(not np.any(u) for u in jax.tree.leaves(params_update))  # the base and its biases stay
    assert sorted(table(adapters_update)) == ["down_proj/kernel", "k_proj/kernel"]
    for update in jax.tree.leaves(adapters_update):
        np.testing.assert_allclose(np.abs(update), 1e-2, rtol=1e-3)  # adam's first step: lr · sign(g)
    assert float(loss(params, optax.apply_updates(adapters, adapters_update))) < float(loss(params, adapters))


def test_train_steps_and_checkpoint_round_trip(tmp_path):
    model, params, tokens = jax_model("gpt2")
    config = train.TrainConfig(max_steps=3, warmup_steps=1, batch_size=2, learning_rate=1e-2)
    frozen, trainable = jlora.split(params, ia3.init(params))
    state = train.init_state(trainable, config)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones(tokens.shape)}
    step = train.make_step(model.apply, config)
    state, _ = step(step(state, frozen, batch)[0], frozen, batch)
    c_attn = table(state.trainable.adapters)["params/h_0/attn/c_attn/kernel"]
    assert c_attn.offset == 32 and not np.allclose(c_attn.scale, 1.0)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(state, {"adapter": "ia3"})
    restored, meta = ckpt.restore(jax.eval_shape(lambda: state), expect={"adapter": "ia3"})
    chex.assert_trees_all_equal(restored, state)
    assert table(restored.trainable.adapters)["params/h_1/mlp/c_proj/kernel"].side == "input"


# ---- clear errors ----


def test_feedforward_must_be_among_the_targets():
    params = {"k_proj": {"kernel": jnp.ones((4, 4))}, "down_proj": {"kernel": jnp.ones((8, 4))}}
    with pytest.raises(ValueError, match=r"feedforward selects down_proj/kernel, which targets does not"):
        ia3.init(params, targets=["k_proj"], feedforward=["down_proj"])


def test_fused_qkv_needs_an_output_in_three_equal_parts():
    params = {"c_attn": {"kernel": jnp.ones((4, 10))}}
    with pytest.raises(ValueError, match=r"fused_qkv selects 'c_attn/kernel' \(shape \(4, 10\)\).*three equal"):
        ia3.init(params)
    assert table(ia3.init(params, fused_qkv=()))["c_attn/kernel"].scale.shape == (10,)


def test_a_vector_of_the_wrong_size_is_refused():
    params = {"k_proj": {"kernel": jnp.ones((4, 8))}}
    bad = {"k_proj": {"kernel": ia3.IA3(jnp.ones(5), (4, 8), "output", offset=4)}}
    with pytest.raises(ValueError, match=r"'k_proj/kernel'.*scale of shape \(5,\) at offset 4.*offset \+ n <= 8"):
        jlora.merge(params, bad)
    other = {"k_proj": {"kernel": ia3.IA3(jnp.ones(8), (4, 16), "output")}}
    with pytest.raises(ValueError, match=r"shape \(4, 16\), but the params have shape \(4, 8\)"):
        jlora.adapt(lambda p, x: x @ p["k_proj"]["kernel"])(params, other, jnp.ones((1, 4)))


# ---- the same numbers as PEFT ----


def set_peft_vectors(peft_model, adapters):
    """PEFT's ``ia3_l`` is [out, 1] for an output-scaled layer and [1, in] for a feedforward one."""
    for path, adapter in table(adapters).items():
        vector = peft_module(peft_model, path).ia3_l["default"]
        vector.data.copy_(to_torch(adapter.vector()).reshape(vector.shape))


@pytest.mark.interop
def test_llama_logits_equal_peft(tmp_path):
    peft = pytest.importorskip("peft")
    fresh, model, variables = hf_model("llama", tmp_path)
    adapters = trained(ia3.init(variables), std=STD)
    theirs = peft.get_peft_model(fresh(), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])).eval()
    set_peft_vectors(theirs, adapters)
    expected = torch_logits(theirs)
    ours = np.asarray(jlora.adapt(model.apply)(variables, adapters, jnp.array(TOKENS)))
    assert np.abs(expected - torch_logits(fresh())).max() > 0.1  # the vectors matter
    assert np.abs(ours - expected).max() < 1e-4


@pytest.mark.interop
def test_gpt2_logits_equal_peft_which_also_scales_the_c_attn_bias(tmp_path):
    peft = pytest.importorskip("peft")
    fresh, model, variables = hf_model("gpt2", tmp_path)
    adapters = trained(ia3.init(variables), std=STD)
    theirs = peft.get_peft_model(fresh(), peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)).eval()
    set_peft_vectors(theirs, adapters)  # the q third of c_attn's vector is one
    expected = torch_logits(theirs)
    ours = np.asarray(jlora.adapt(model.apply)(variables, adapters, jnp.array(TOKENS)))
    # PEFT computes (x·W + b) ⊙ l; jlora scales the weight only, (x·W) ⊙ l + b, as the paper.
    assert np.abs(ours - expected).max() > 1e-2
    scales = {p.replace("/kernel", "/bias"): a.vector() for p, a in table(adapters).items() if a.side == "output"}
    with_scaled_bias = jlora.paths.map_with_path(lambda p, w: w * scales[p] if p in scales else w, variables)
    ours = np.asarray(jlora.adapt(model.apply)(with_scaled_bias, adapters, jnp.array(TOKENS)))
    assert np.abs(ours - expected).max() < 1e-4


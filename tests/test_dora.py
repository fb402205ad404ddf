"""DoRA: m ⊙ (W0 + ΔW)/‖W0 + ΔW‖_c; adapt equals merge with the norm detached (as PEFT); exact unmerge."""

import dataclasses

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
from jlora.kinds import dora
from jlora import training as train
from jlora.core.adapter import table
from tiny import GPT2_LINEAR, LLAMA_LINEAR, TOKENS, hf_model, jax_model, peft_module, to_torch, torch_logits

LINEAR = {"gpt2": GPT2_LINEAR, "llama": LLAMA_LINEAR}


def column_norm(w, axis=0):
    return np.sqrt(np.sum(np.square(w), axis=axis, keepdims=True))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return (request.param, *jax_model(request.param))


# ---- initialisation and the defining formula ----


def test_init_sets_m_to_the_column_norms_and_leaves_the_weight_unchanged():
    w = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    params = {"attn": {"query": {"kernel": jnp.asarray(w)}}}
    adapters = dora.init(params, rank=4, alpha=8, use_rslora=True)
    found = adapters["attn"]["query"]["kernel"]
    assert (found.a.shape, found.b.shape, found.m.shape, found.scaling) == ((16, 4), (4, 8), (8,), 4.0)
    # PEFT: torch.linalg.norm(weight, dim=1) of the [out, in] weight, one per output feature.
    np.testing.assert_allclose(found.m, np.linalg.norm(w, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(found.base_norm, found.m)
    np.testing.assert_array_equal(jlora.merge(params, adapters)["attn"]["query"]["kernel"], w)


@pytest.mark.parametrize(
    "shape, options, norm_axes",
    [
        ((12, 10), {}, (0,)),
        ((12, 2, 5), {}, (0,)),  # DenseGeneral (in, heads, head_dim): one norm per (head, dim)
        ((3, 12, 10), {"stack_axes": 1}, (1,)),  # nn.scan: one norm per layer and column
        ((2, 6, 10), {"in_axes": 2}, (0, 1)),  # an output projection (heads, head_dim, out)
    ],
)
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_merge_follows_the_dora_formula(shape, options, norm_axes):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape)
    params = {"w": jnp.asarray(w, jnp.float32)}
    adapters = trained(dora.init(params, rank=3, alpha=6, targets=["w"], **options), std=0.15)
    d = adapters["w"]
    a, b, m = (np.asarray(x, np.float64) for x in (d.a, d.b, d.m))
    stack = shape[:1] if options.get("stack_axes") else ()
    n_in = options.get("in_axes", 1)
    fan_in, out = shape[len(stack) : len(stack) + n_in], shape[len(stack) + n_in :]
    delta = 2.0 * np.matmul(a.reshape(stack + (-1, 3)), b.reshape(stack + (3, -1))).reshape(stack + fan_in + out)
    direction = w + delta
    expected = np.expand_dims(m, norm_axes) * direction / np.sqrt(np.sum(direction**2, axis=norm_axes, keepdims=True))
    np.testing.assert_allclose(jlora.merge(params, adapters)["w"], expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(jlora.unmerge(jlora.merge(params, adapters), adapters)["w"], w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_gradients_treat_the_norm_as_a_constant_as_peft_does():
    rng = np.random.default_rng(2)
    w, x = rng.normal(size=(6, 5)), rng.normal(size=(4, 6))
    params = {"w": jnp.asarray(w, jnp.float32)}
    adapters = trained(dora.init(params, rank=2, targets=["w"]))
    d = adapters["w"]
    constant = column_norm(w + d.scaling * np.asarray(d.a, np.float64) @ np.asarray(d.b, np.float64))

    def by_hand(m, a, b, norm):
        return jnp.sum(jnp.sin(x @ (m * (params["w"] + d.scaling * a @ b) / norm(a, b))))

    detached = jax.grad(by_hand, argnums=(0, 1, 2))(d.m, d.a, d.b, lambda a, b: jnp.asarray(constant, jnp.float32))
    full = jax.grad(by_hand, argnums=(0, 1, 2))(
        d.m, d.a, d.b, lambda a, b: jnp.linalg.norm(params["w"] + d.scaling * a @ b, axis=0, keepdims=True))
    adapted = jlora.adapt(lambda p, x: jnp.sin(x @ p["w"]).sum(), strict=True)
    grads = jax.grad(lambda a: adapted(params, a, jnp.asarray(x, jnp.float32)))(adapters)["w"]
    for ours, peft_like in zip((grads.m, grads.a, grads.b), detached):
        np.testing.assert_allclose(ours, peft_like, rtol=1e-4, atol=1e-5)
    for ours, with_norm in zip((grads.a, grads.b), full[1:]):  # m's gradient does not involve the norm
        assert np.abs(np.asarray(ours) - np.asarray(with_norm)).max() > 1e-2  # the choice is visible
    assert not np.any(grads.base_norm)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_adapt_equals_model_of_merged_params(tiny):
    kind, model, params, tokens = tiny
    adapters = trained(dora.init(params, rank=4, targets=LINEAR[kind]))
    assert_adapt_equals_merge(model.apply, params, adapters, tokens)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_adapt_of_a_transposed_use_and_stacked_layers():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = jnp.tanh(nn.Dense(16, name="query")(x))
            return x + h @ self.variables["params"]["query"]["kernel"].T + nn.Dense(8, name="value")(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scanned(name="layers")(x, None)[0]

    model, x = Stack(), jax.random.normal(jax.random.key(2), (4, 8))
    params = jax.jit(model.init)(jax.random.key(0), x)
    adapters = trained(dora.init(params, rank=2, stack_axes=1))
    assert table(adapters)["params/layers/query/kernel"].m.shape == (3, 16)
    assert_adapt_equals_merge(model.apply, params, adapters, x)


# ---- unmerge ----


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_unmerge_recovers_the_base(tiny):
    kind, _, params, _ = tiny
    adapters = trained(dora.init(params, rank=4, targets=LINEAR[kind]), std=0.1)
    assert_trees_close(jlora.unmerge(jlora.merge(params, adapters), adapters), params, tol=2e-6)


def test_unmerge_refuses_what_it_cannot_invert():
    w = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    params = {"proj": {"kernel": jnp.asarray(w)}}
    adapters = trained(dora.init(params, rank=2, targets=["proj"]))
    d = adapters["proj"]["kernel"]
    merged = jlora.merge(params, adapters)
    # ‖ΔW‖ >= ‖W0‖ in column 2: another base of the same norm merges to the same weight.
    big = {"proj": {"kernel": dataclasses.replace(d, b=d.b.at[:, 2].multiply(100.0))}}
    with pytest.raises(ValueError, match=r"'proj/kernel': cannot unmerge: DoRA column \(2,\) has ‖ΔW‖ >= ‖W0‖"):
        jlora.unmerge(jlora.merge(params, big), big)
    zero = {"proj": {"kernel": dataclasses.replace(d, m=d.m.at[1].set(0.0))}}
    with pytest.raises(ValueError, match=r"unmerge at 'proj/kernel'.*magnitude m entry \(1,\) is 0"):
        jlora.unmerge(merged, zero)
    unknown = {"proj": {"kernel": dataclasses.replace(d, base_norm=None)}}
    np.testing.assert_array_equal(jlora.merge(params, unknown)["proj"]["kernel"], merged["proj"]["kernel"])
    with pytest.raises(ValueError, match=r"unmerge at 'proj/kernel': cannot unmerge a DoRA without base_norm"):
        jlora.unmerge(merged, unknown)


# ---- what trains ----


def test_counts_m_a_and_b_as_trainable_and_base_norm_as_frozen():
    _, params, _ = jax_model("llama")
    adapters = dora.init(params, rank=4, targets=["q_proj", "down_proj"])
    count = jlora.count_params(params, adapters)
    # q_proj 32→32: m 32 + A 32·4 + B 4·32; down_proj 48→32: m 32 + A 48·4 + B 4·32; two layers.
    assert count.trainable == 2 * ((32 + 128 + 128) + (32 + 192 + 128))
    base = sum(x.size for x in jax.tree.leaves(params))
    assert count.total == base + count.trainable + 2 * (32 + 32)  # base_norm: held, not trained


def test_optimizer_updates_m_a_b_never_base_norm_and_lora_plus_scales_b():
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
    adapters = trained(dora.init(params, rank=2, targets=["w"]))
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    loss = lambda p, a: jnp.sum(jnp.sin(jlora.adapt(lambda p, x: x @ p["w"], strict=True)(p, a, x)))
    grads = jax.grad(loss, argnums=(0, 1))(params, adapters)
    tree = (params, adapters)
    plain = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.5))  # decay would move any leaf it reached
    (p_up, a_up), _ = plain.update(grads, plain.init(tree), tree)
    assert not np.any(p_up["w"]) and not np.any(a_up["w"].base_norm)
    for field in ("m", "a", "b"):
        assert np.all(np.abs(getattr(a_up["w"], field)) > 0), field
    plus = jlora.optimizer(optax.adam(1e-2), lora_plus_ratio=16.0)
    (_, plus_up), _ = plus.update(grads, plus.init(tree), tree)
    adam = jlora.optimizer(optax.adam(1e-2))
    (_, adam_up), _ = adam.update(grads, adam.init(tree), tree)
    np.testing.assert_allclose(plus_up["w"].b, 16.0 * adam_up["w"].b, rtol=1e-6)
    np.testing.assert_array_equal(plus_up["w"].m, adam_up["w"].m)
    np.testing.assert_array_equal(plus_up["w"].a, adam_up["w"].a)


def test_train_steps_and_checkpoint_round_trip(tmp_path):
    model, params, tokens = jax_model("gpt2")
    config = train.TrainConfig(max_steps=3, warmup_steps=1, batch_size=2, learning_rate=1e-2, weight_decay=0.1)
    start = dora.init(params, rank=2, targets=["c_attn"])
    frozen, trainable = jlora.split(params, start)
    state = train.init_state(trainable, config)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones(tokens.shape)}
    step = train.make_step(model.apply, config)
    state, _ = step(step(state, frozen, batch)[0], frozen, batch)
    before, after = (table(t)["params/h_0/attn/c_attn/kernel"] for t in (start, state.trainable.adapters))
    np.testing.assert_array_equal(after.base_norm, before.base_norm)
    assert not np.allclose(after.m, before.m) and np.any(after.b)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(state, {"adapter": "dora"})
    restored, _ = ckpt.restore(jax.eval_shape(lambda: state), expect={"adapter": "dora"})
    chex.assert_trees_all_equal(restored, state)


# ---- the same numbers as PEFT ----


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_equal_peft(tmp_path, kind):
    peft = pytest.importorskip("peft")
    fresh, model, variables = hf_model(kind, tmp_path)
    adapters = trained(dora.init(variables, rank=4, alpha=8, targets=LINEAR[kind]))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR[kind], use_dora=True,
                             fan_in_fan_out=kind == "gpt2", init_lora_weights=False)
    theirs = peft.get_peft_model(fresh(), config).eval()
    for path, d in table(adapters).items():
        layer = peft_module(theirs, path)
        assert layer.scaling["default"] == d.scaling
        layer.lora_A["default"].weight.data.copy_(to_torch(d.a).T)  # [r, in]
        layer.lora_B["default"].weight.data.copy_(to_torch(d.b).T)  # [out, r]
        layer.lora_magnitude_vector["default"].weight.data.copy_(to_torch(d.m))
    expected = torch_logits(theirs)
    ours = np.asarray(jlora.adapt(model.apply)(variables, adapters, jnp.array(TOKENS)))
    assert np.abs(expected - torch_logits(fresh())).max() > 0.1
    assert np.abs(ours - expected).max() < 1e-4

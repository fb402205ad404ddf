"""LoRA variants that are options of LoRA: rsLoRA (scaling alpha/√r) and LoRA+ (B's learning rate ratio × A's)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import trained
from jlora.core.adapter import table
from tiny import GPT2_LINEAR, LLAMA_LINEAR, TOKENS, hf_model, peft_module, to_torch, torch_logits

LINEAR = {"gpt2": GPT2_LINEAR, "llama": LLAMA_LINEAR}


# ---- rsLoRA (Kalajdzievski, 2023) ----


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(rank):
    rng = np.random.default_rng(rank)
    w, x = rng.normal(size=(16, 24)), rng.normal(size=(3, 16))
    params = {"query": {"kernel": jnp.asarray(w, jnp.float32)}}
    rs = trained(jlora.init(params, rank=rank, alpha=8, use_rslora=True))
    plain = jlora.init(params, rank=rank, alpha=8)
    lora = rs["query"]["kernel"]
    assert lora.scaling == 8 / math.sqrt(rank) and plain["query"]["kernel"].scaling == 8 / rank
    expected = w + 8 / math.sqrt(rank) * np.asarray(lora.a, np.float64) @ np.asarray(lora.b, np.float64)
    np.testing.assert_allclose(jlora.merge(params, rs)["query"]["kernel"], expected, rtol=1e-5, atol=1e-5)
    out = jlora.adapt(lambda p, x: x @ p["query"]["kernel"], strict=True)(params, rs, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, x @ expected, rtol=1e-5, atol=1e-4)


def test_rslora_with_rank_and_alpha_patterns():
    params = {name: {"kernel": jnp.ones((16, 16))} for name in ("query", "value")}
    adapters = jlora.init(
        params, rank=4, alpha=8, use_rslora=True, rank_pattern={"value": 9}, alpha_pattern={"value": 3}
    )
    assert adapters["query"]["kernel"].scaling == 8 / 2 and adapters["value"]["kernel"].scaling == 3 / 3


# ---- LoRA+ (Hayou et al., 2024) ----


def lora_plus_setup(seed=0):
    rng = np.random.default_rng(seed)
    params = {"query": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
              "value": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}}
    adapters = trained(jlora.init(params, rank=2), seed)
    x, y = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    fn = lambda p, x: jnp.tanh(x @ p["query"]["kernel"]) * (x @ p["value"]["kernel"])
    loss = lambda a, x: jnp.mean((jlora.adapt(fn, strict=True)(params, a, x) - y) ** 2)
    return adapters, x, loss


@pytest.mark.parametrize("make", [optax.sgd, optax.adam], ids=["sgd", "adam"])
def test_lora_plus_gives_b_ratio_times_the_learning_rate_of_a(make):
    adapters, x, loss = lora_plus_setup()
    lr, ratio = 1e-2, 16.0
    tx = jlora.optimizer(make(lr), lora_plus_ratio=ratio)
    state = tx.init(adapters)
    # The same optimizer written out per factor: lr for A, ratio·lr for B.
    a_tx, b_tx = make(lr), make(ratio * lr)
    a_of = lambda t: {k: t[k]["kernel"].a for k in t}
    b_of = lambda t: {k: t[k]["kernel"].b for k in t}
    a_state, b_state = a_tx.init(a_of(adapters)), b_tx.init(b_of(adapters))
    for step in range(3):  # several steps, so that optimizer state carries over
        grads = jax.grad(loss)(adapters, x * (1 + step))
        updates, state = tx.update(grads, state, adapters)
        a_updates, a_state = a_tx.update(a_of(grads), a_state)
        b_updates, b_state = b_tx.update(b_of(grads), b_state)
        for name in adapters:
            np.testing.assert_allclose(updates[name]["kernel"].a, a_updates[name], rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(updates[name]["kernel"].b, b_updates[name], rtol=1e-5, atol=1e-9)
        assert np.abs(np.asarray(b_updates["query"])).max() > 1e-4
        adapters = optax.apply_updates(adapters, updates)


# ---- the same numbers as PEFT ----


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rslora_logits_equal_peft(tmp_path, kind):
    peft = pytest.importorskip("peft")
    fresh, model, variables = hf_model(kind, tmp_path)
    adapters = trained(jlora.init(variables, rank=4, alpha=8, targets=LINEAR[kind], use_rslora=True))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR[kind], use_rslora=True,
                             fan_in_fan_out=kind == "gpt2")
    theirs = peft.get_peft_model(fresh(), config).eval()
    for path, lora in table(adapters).items():
        layer = peft_module(theirs, path)
        assert layer.scaling["default"] == lora.scaling == 8 / 2
        layer.lora_A["default"].weight.data.copy_(to_torch(lora.a).T)  # [r, in]
        layer.lora_B["default"].weight.data.copy_(to_torch(lora.b).T)  # [out, r]
    expected = torch_logits(theirs)
    ours = np.asarray(jlora.adapt(model.apply)(variables, adapters, jnp.array(TOKENS)))
    assert np.abs(expected - torch_logits(fresh())).max() > 0.1
    assert np.abs(ours - expected).max() < 1e-4

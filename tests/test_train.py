"""The jitted train step: loss masking, optimizer schedule, accumulation, 1 vs 8 devices, chunked
cross entropy, bf16 base."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_trees_close, trained
from jlora import training as train
from jlora.models.gpt2 import GPT2, GPT2Config
from tiny import GPT2_LINEAR, LLAMA_LINEAR, jax_model

TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def setup():
    model = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((8, 16))}
    params = model.init(jax.random.key(0), batch["tokens"])
    frozen, trainable = jlora.split(params, jlora.init(params, rank=4, targets=TARGETS))
    return model, params, frozen, trainable, batch


def run(model, frozen, trainable, batch, config, devices, steps=1):
    mesh = train.mesh(devices)
    state = train.replicate(train.init_state(trainable, config), mesh)
    frozen = train.replicate(frozen, mesh)
    step = train.make_step(model.apply, config)
    for _ in range(steps):
        state, metrics = step(state, frozen, train.shard_batch(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.devices(8)
def test_eight_devices_equal_one(setup):
    model, _, frozen, trainable, batch = setup
    assert jax.device_count() == 8
    config = train.TrainConfig(max_steps=5, warmup_steps=0, batch_size=8, learning_rate=1e-2)
    one, m1 = run(model, frozen, trainable, batch, config, jax.devices()[:1])
    eight, m8 = run(model, frozen, trainable, batch, config, jax.devices())
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), eight.trainable, one.trainable)
    assert not np.array_equal(  # the step did move the adapters
        jax.tree.leaves(eight.trainable)[1], jax.tree.leaves(trainable)[1]
    )


@pytest.mark.devices(8)
def test_fsdp_sharded_base_gives_the_same_step(setup):
    model, _, frozen, trainable, batch = setup
    config = train.TrainConfig(max_steps=5, warmup_steps=0, batch_size=8, learning_rate=1e-2)
    mesh = train.mesh()
    sharded = train.shard_fsdp(frozen, mesh)
    wte = sharded["params"]["wte"]["embedding"]
    assert len(wte.sharding.device_set) == 8 and wte.addressable_shards[0].data.shape == (8, 32)
    state = train.replicate(train.init_state(trainable, config), mesh)
    state, metrics = train.make_step(model.apply, config)(state, sharded, train.shard_batch(batch, mesh))
    one, m1 = run(model, frozen, trainable, batch, config, jax.devices()[:1])
    np.testing.assert_allclose(metrics["loss"], m1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), jax.device_get(state.trainable), one.trainable)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_accumulation_averages_micro_batch_gradients(setup):
    model, _, frozen, trainable, batch = setup
    sgd = jlora.optimizer(optax.sgd(1.0))
    whole = train.TrainConfig(max_steps=2, batch_size=8, accumulate=1)
    split = train.TrainConfig(max_steps=2, batch_size=8, accumulate=4)
    out = {}
    for config in (whole, split):
        state = train.init_state(trainable, config, sgd)
        out[config.accumulate] = train.make_step(model.apply, config, sgd)(state, frozen, batch)
    # Equal-sized micro-batches with full masks: the mean of means is the mean.
    np.testing.assert_allclose(out[4][1]["loss"], out[1][1]["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[4][0].trainable, out[1][0].trainable)


def test_loss_is_masked():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]]]))
    targets = jnp.array([[0, 0, 0]])
    loss, count = train.lm_loss(logits, targets, jnp.array([[0, 1, 1]]))
    assert count == 2
    np.testing.assert_allclose(loss, -(np.log(0.9) + np.log(0.1)) / 2, rtol=1e-6)


def test_schedule_warms_up_from_the_first_step_then_decays_to_zero():
    lr = train.schedule(train.TrainConfig(learning_rate=1.0, warmup_steps=4, max_steps=14, schedule="linear"))
    assert [float(lr(s)) for s in (0, 1, 2, 3, 4, 9, 14)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.0])
    cosine = train.schedule(train.TrainConfig(learning_rate=1.0, warmup_steps=0, max_steps=10))
    assert float(cosine(5)) == pytest.approx(0.5)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_the_first_step_trains_at_a_positive_rate_and_reports_a_finite_grad_norm(setup):
    model, params, frozen, trainable, batch = setup
    config = train.TrainConfig(max_steps=10, warmup_steps=5, batch_size=8, learning_rate=1e-2, grad_clip=0.0)
    state, metrics = run(model, frozen, trainable, batch, config, jax.devices()[:1])
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2 / 5)
    adapted = jlora.adapt(train.make_loss(model.apply))
    norm = optax.tree.norm(jax.grad(lambda t: adapted(*jlora.combine(frozen, t), batch["tokens"], batch["targets"],
                                                      batch["loss_mask"])[0])(trainable))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.trainable, trainable))


def test_the_eval_sample_spreads_over_the_whole_held_out_data():
    rows = np.arange(100, dtype=np.int32)[:, None].repeat(16, 1)
    dataset = jlora.data.Dataset(rows, rows, np.ones(rows.shape, np.float32))
    assert train.eval_sample(dataset, tokens=5 * 16).tokens[:, 0].tolist() == [0, 20, 40, 60, 80]
    assert train.eval_sample(dataset, tokens=15).tokens[:, 0].tolist() == [0]  # at least one sequence
    assert len(train.eval_sample(dataset, tokens=10**6)) == 100  # all of it, each row once
    with pytest.raises(ValueError, match="tokens must be a positive number of token positions, got 0"):
        train.eval_sample(dataset, tokens=0)


def test_frozen_base_never_changes_and_loss_drops(setup):
    model, params, frozen, trainable, batch = setup
    config = train.TrainConfig(max_steps=20, warmup_steps=2, batch_size=8, learning_rate=3e-2)
    state, step = train.init_state(trainable, config), train.make_step(model.apply, config)
    losses = []
    for _ in range(20):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.2
    assert int(state.step) == 20
    params_after, _ = jlora.combine(frozen, state.trainable)
    chex.assert_trees_all_equal(params_after, params)


@pytest.mark.parametrize("setting, message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(accumulate=0), "accumulate must be an integer >= 1, got 0"),
    (dict(max_steps=-1), "max_steps must be an integer >= 1, got -1"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
    (dict(seed=1.5), "seed must be an integer >= 0, got 1.5"),
    (dict(learning_rate=0.0), r"learning_rate must be a finite number > 0, got 0.0"),
    (dict(learning_rate=float("nan")), r"learning_rate must be a finite number > 0, got nan"),
    (dict(dropout=1.0), r"dropout must be a finite number in \[0.0, 1.0\), got 1.0"),
    (dict(grad_clip=-1.0), r"grad_clip must be a finite number in \[0.0, inf\), got -1.0"),
    (dict(loss_chunk=-1), "loss_chunk must be an integer >= 0, got -1"),
])
def test_train_config_refuses_each_bad_value_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**setting)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by accumulate 4"):
        train.TrainConfig(batch_size=6, accumulate=4)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'linear', got 'step'"):
        train.TrainConfig(schedule="step")


@pytest.mark.devices(8)
def test_a_batch_the_devices_cannot_share_is_refused(setup):
    model, _, frozen, trainable, batch = setup
    with pytest.raises(ValueError, match="batch of 6 rows cannot be split over 8 devices"):
        train.shard_batch(jax.tree.map(lambda x: x[:6], batch), train.mesh())


@pytest.mark.slow  # heavy compile: kept out of the fast tier
@pytest.mark.parametrize("kind, head", [("llama", "lm_head"), ("gpt2", "wte")])
def test_chunked_loss_equals_the_full_loss_with_lora_on_the_head(kind, head):
    """Untied lm_head (Llama) and tied embeddings (GPT-2) both train through the chunked head; 8
    positions in chunks of 3 leave a padded, masked last chunk."""
    model, variables, tokens = jax_model(kind)
    targets = (LLAMA_LINEAR if kind == "llama" else GPT2_LINEAR) + [head]
    adapters = trained(jlora.init(variables, rank=4, targets=targets, key=jax.random.key(1)))
    batch = (tokens, jnp.roll(tokens, -1, axis=1), jnp.ones(tokens.shape).at[0, :3].set(0))
    full = jlora.adapt(train.make_loss(model.apply), strict=True)
    chunked = jlora.adapt(train.make_loss(functools.partial(model.apply, hidden=True), model.head, 3), strict=True)
    grad = lambda loss: jax.jit(jax.value_and_grad(lambda a: loss(variables, a, *batch)[0]))(adapters)
    (want, want_grads), (got, got_grads) = grad(full), grad(chunked)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert_trees_close(got_grads, want_grads, tol=1e-6)
    assert np.abs(got_grads["params"][head]["embedding" if head == "wte" else "kernel"].b).max() > 0
    assert chunked(variables, adapters, *batch)[1] == 13


@pytest.mark.parametrize("kind, head", [("llama", "lm_head"), ("gpt2", "wte")])
def test_vocab_blocked_loss_equals_the_full_loss_in_value_and_gradients(kind, head):
    """64 vocabulary entries 10 at a time: the last block is shifted back and its repeats masked."""
    model, variables, tokens = jax_model(kind)
    targets = LLAMA_LINEAR if kind == "llama" else GPT2_LINEAR
    adapters = trained(jlora.init(variables, rank=4, targets=targets, key=jax.random.key(1)))
    batch = (tokens, jnp.roll(tokens, -1, axis=1), jnp.ones(tokens.shape).at[0, :3].set(0))
    full = jlora.adapt(train.make_loss(model.apply), strict=True)
    blocked = jlora.adapt(train.make_loss(functools.partial(model.apply, hidden=True), model.head, 3, vocab_block=10,
                                          vocab_size=64), strict=True)
    grad = lambda loss: jax.jit(jax.value_and_grad(lambda a: loss(variables, a, *batch)[0]))(adapters)
    (want, want_grads), (got, got_grads) = grad(full), grad(blocked)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert_trees_close(got_grads, want_grads, tol=1e-6)
    with pytest.raises(ValueError, match="vocab_block 65 must be in 1..vocab_size \\(64\\)"):
        train.chunked_lm_loss(model.head, tokens[..., None], tokens, jnp.ones(tokens.shape), 3, 65, 64)
    with pytest.raises(ValueError, match="loss_vocab_block needs make_step's head_fn and vocab_size"):
        train.make_step(model.apply, train.TrainConfig(loss_vocab_block=8))


def test_step_with_a_chunked_head_equals_the_step_without(setup):
    model, _, frozen, trainable, batch = setup
    config = train.TrainConfig(max_steps=3, batch_size=8, loss_chunk=5)
    state = train.init_state(trainable, config)
    want = train.make_step(model.apply, config)(state, frozen, batch)
    state = train.init_state(trainable, config)
    got = train.make_step(functools.partial(model.apply, hidden=True), config, head_fn=model.head)(state, frozen, batch)
    np.testing.assert_allclose(got[1]["loss"], want[1]["loss"], rtol=1e-6)
    assert_trees_close(got[0].trainable, want[0].trainable, tol=1e-6)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_bf16_base_trains_float32_adapters_optimizer_state_and_loss(setup):
    model, params, _, _, batch = setup
    config = train.TrainConfig(max_steps=3, batch_size=8, loss_chunk=4)
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model_d = model.clone(dtype=dtype, param_dtype=dtype, scan=True, remat="full")
        variables = jax.tree.map(lambda x: x.astype(dtype), jlora.models.layers.stack_layers(params, "h"))
        adapters = jlora.init(variables, rank=4, targets=TARGETS, stack_axes=1)
        frozen, trainable = jlora.split(variables, adapters)
        state = train.init_state(trainable, config)
        step = train.make_step(functools.partial(model_d.apply, hidden=True), config, head_fn=model_d.head)
        state, metrics = step(state, frozen, batch)
        state, metrics = step(state, frozen, batch)
        assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(dtype)}
        floats = [x for x in jax.tree.leaves((state.trainable, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
        assert metrics["loss"].dtype == jnp.float32
        losses[dtype] = float(metrics["loss"])
    assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-2)

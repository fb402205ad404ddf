import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import trained
from jlora.core.optimizer import labels

STEPS = 4


def setup():
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    params = {
        "query": {"kernel": arr(6, 6), "bias": arr(6)},
        "value": {"kernel": arr(6, 6), "bias": arr(6)},
        "mlp": {"kernel": arr(6, 3), "bias": arr(3)},
    }
    adapters = jlora.init(params, rank=2, key=jax.random.key(1))
    x, y = arr(5, 6), arr(5, 3)
    return params, adapters, x, y


def model(params, x):
    q = x @ params["query"]["kernel"] + params["query"]["bias"]
    v = x @ params["value"]["kernel"] + params["value"]["bias"]
    return jnp.tanh(q * v) @ params["mlp"]["kernel"] + params["mlp"]["bias"]


def loss(params, adapters, x, y):
    return jnp.mean((jlora.adapt(model)(params, adapters, x) - y) ** 2)


def array_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def n_elements(tree):
    return sum(x.size for x in array_leaves(tree))


def masked_or_empty(tree):
    """True when ``tree`` holds no arrays, only optax's placeholders for leaves without state."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, (optax.MaskedNode, optax.EmptyState)))
    return all(isinstance(n, (optax.MaskedNode, optax.EmptyState)) for n in nodes)


def test_labels_name_a_b_base_and_frozen():
    params, adapters, _, _ = setup()
    frozen, trainable = jlora.split(params, adapters, bias="lora_only")
    got = labels((frozen, trainable))
    assert got[0]["mlp"] == {"kernel": "frozen", "bias": "frozen"}
    assert got[0]["query"]["kernel"] == "frozen"
    lora = got[1].adapters["query"]["kernel"]
    assert (lora.a, lora.b) == ("adapter", "adapter_b")
    assert got[1].base == {"query": {"bias": "base"}, "value": {"bias": "base"}}


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_adamw_on_params_and_adapters_moves_only_the_adapters():
    params, adapters, x, y = setup()
    tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1))
    tree = (params, adapters)
    state = tx.init(tree)

    # mu and nu for each adapter element, plus adam's step count in each of the three adamw groups
    # (adapter, adapter_b, base); the frozen params have none.
    n_adapter = n_elements(adapters)
    assert n_adapter == 2 * (6 * 2 + 2 * 6)  # query and value, each A 6x2 and B 2x6
    assert n_elements(state) == 2 * n_adapter + 3
    assert len(array_leaves(state)) == 2 * len(array_leaves(adapters)) + 3
    for group, inner in state.inner_states.items():
        if group == "frozen":
            assert inner.inner_state == optax.EmptyState()
            continue
        adam = inner.inner_state[0]
        assert adam.count.shape == ()
        assert masked_or_empty(adam.mu[0]) and masked_or_empty(adam.nu[0])

    for _ in range(STEPS):
        grads = jax.grad(lambda t: loss(*t, x, y))(tree)
        # The frozen params do get a gradient here; the optimizer must still leave them alone.
        assert float(jnp.abs(grads[0]["mlp"]["kernel"]).sum()) > 0
        updates, state = tx.update(grads, state, tree)
        for u in jax.tree.leaves(updates[0]):
            np.testing.assert_array_equal(u, np.zeros_like(u))
        tree = optax.apply_updates(tree, updates)

    new_params, new_adapters = tree
    chex.assert_trees_all_equal(new_params, params)
    for name in ("query", "value"):
        for field in ("a", "b"):
            assert not np.array_equal(getattr(new_adapters[name]["kernel"], field), getattr(adapters[name]["kernel"], field))
    assert all(int(inner.inner_state[0].count) == STEPS for g, inner in state.inner_states.items() if g != "frozen")


def test_adamw_on_the_split_trainable_tree():
    params, adapters, x, y = setup()
    frozen, trainable = jlora.split(params, adapters, bias="lora_only")
    tx = jlora.optimizer(optax.adamw(1e-2))
    state = tx.init(trainable)
    n_trainable = n_elements(trainable)
    assert n_trainable == n_elements(adapters) + 6 + 6  # the query and value biases
    assert n_elements(state) == 2 * n_trainable + 3

    def split_loss(trainable, frozen):
        return loss(*jlora.combine(frozen, trainable), x, y)

    start = trainable
    for _ in range(STEPS):
        grads = jax.grad(split_loss)(trainable, frozen)
        assert jax.tree.structure(grads) == jax.tree.structure(trainable)
        updates, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)

    new_params, _ = jlora.combine(frozen, trainable)
    for path in ("mlp/kernel", "mlp/bias", "query/kernel", "value/kernel"):
        module, leaf = path.split("/")
        np.testing.assert_array_equal(new_params[module][leaf], params[module][leaf])
    for module in ("query", "value"):
        assert not np.array_equal(new_params[module]["bias"], params[module]["bias"])
        assert not np.array_equal(trainable.adapters[module]["kernel"].b, start.adapters[module]["kernel"].b)


def test_bias_none_gives_base_no_state():
    params, adapters, _, _ = setup()
    _, trainable = jlora.split(params, adapters, bias="none")
    state = jlora.optimizer(optax.adam(1e-3)).init(trainable)
    assert n_elements(state) == 2 * n_elements(adapters) + 3
    base_adam = state.inner_states["base"].inner_state[0]
    assert masked_or_empty(base_adam.mu) and masked_or_empty(base_adam.nu)


@pytest.mark.parametrize("ratio", [16.0, 2.5])
def test_lora_plus_scales_b_updates_by_the_ratio(ratio):
    params, adapters, x, y = setup()
    adapters = trained(adapters, seed=1, std=1.0, fields=["b"])  # so that A's gradient is not zero either
    grads = jax.grad(loss, argnums=1)(params, adapters, x, y)
    plain_tx = jlora.optimizer(optax.sgd(0.1))
    plus_tx = jlora.optimizer(optax.sgd(0.1), lora_plus_ratio=ratio)
    plain, _ = plain_tx.update(grads, plain_tx.init(adapters), adapters)
    plus, _ = plus_tx.update(grads, plus_tx.init(adapters), adapters)
    for name in ("query", "value"):
        plain_lora, plus_lora = plain[name]["kernel"], plus[name]["kernel"]
        assert float(jnp.abs(plain_lora.a).sum()) > 0 and float(jnp.abs(plain_lora.b).sum()) > 0
        np.testing.assert_array_equal(plus_lora.a, plain_lora.a)
        np.testing.assert_array_equal(plus_lora.b, plain_lora.b * ratio)
        np.testing.assert_allclose(plain_lora.b, -0.1 * grads[name]["kernel"].b, rtol=1e-7)


def test_lora_plus_leaves_the_base_leaves_at_the_plain_rate():
    params, adapters, x, y = setup()
    frozen, trainable = jlora.split(params, adapters, bias="all")
    grads = jax.grad(lambda t: loss(*jlora.combine(frozen, t), x, y))(trainable)
    plus_tx = jlora.optimizer(optax.sgd(0.1), lora_plus_ratio=16.0)
    plus, _ = plus_tx.update(grads, plus_tx.init(trainable), trainable)
    for module in ("query", "value", "mlp"):
        np.testing.assert_array_equal(plus.base[module]["bias"], grads.base[module]["bias"] * -0.1)


def test_an_optimizer_over_nothing_trainable_is_refused():
    params = {"dense": {"kernel": jnp.ones((4, 4))}}
    tx = jlora.optimizer(optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"jlora.optimizer got a tree with no trainable leaves .* every update would be zero"):
        tx.init(params)
    frozen, trainable = jlora.split(params, {})
    with pytest.raises(ValueError, match="no trainable leaves"):
        tx.init(trainable)
    with pytest.raises(ValueError, match=r"lora_plus_ratio must be a finite number > 0 .* got -2"):
        jlora.optimizer(optax.adam(1e-3), lora_plus_ratio=-2)

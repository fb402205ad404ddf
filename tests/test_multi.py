"""Many adapters, one base, one batch: ``jlora.stack`` and ``jlora.adapt(fn)(params, stacked, x, adapter_ids=ids)``
equal running each example with its own adapter, in values and gradients; hot swaps never recompile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_sums_close, assert_trees_close, normal, trained
from jlora.models import generate
from jlora.models.gpt2 import GPT2, GPT2Config
from jlora.models.llama import Llama, LlamaConfig
from tiny import GPT2_SIZES, LLAMA_SIZES, TOKENS, random_variables

TARGETS = r".*/(q_proj|v_proj|down_proj|c_attn)/kernel"  # Llama or GPT-2
KINDS = {
    "lora": lambda params, rank: jlora.init(params, rank=rank, targets=TARGETS),
    "dora": lambda params, rank: jlora.dora.init(params, rank=rank, targets=TARGETS),
    "ia3": lambda params, rank: jlora.ia3.init(params),
}
IDS = [2, 0, -1, 1, 1]  # adapter 1 twice, one example with the base alone


def three_adapters(kind, params):
    """Three trained adapter trees of ``kind`` with ranks 2, 4, 3 (padded to 4 in a stack)."""
    return [trained(KINDS[kind](params, rank), seed=seed) for seed, rank in enumerate([2, 4, 3])]


@functools.cache
def jax_model(kind):
    """The tiny models of ``tests/tiny.py`` with one layer: compiling the per-example path is most of each test."""
    one_layer = GPT2(GPT2Config(**{**GPT2_SIZES, "n_layer": 1})) if kind == "gpt2" else \
        Llama(LlamaConfig(**{**LLAMA_SIZES, "num_hidden_layers": 1}))
    return one_layer, random_variables(one_layer), jnp.array(TOKENS)


def five_examples():
    _, _, tokens = jax_model("llama")
    return jnp.concatenate([tokens, tokens[::-1], tokens[:1]])  # 5 rows: the first and last are the same tokens


@pytest.mark.slow  # heavy compile: kept out of the fast tier
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_each_adapter_alone_in_values_and_gradients(kind):
    model, params, _ = jax_model("llama")
    adapters, tokens = three_adapters(kind, params), five_examples()
    adapted = jlora.adapt(model.apply, strict=True)
    loss = lambda logits: jnp.sum(jnp.sin(logits))

    @jax.jit
    def mixed(stacked):
        logits, pullback = jax.vjp(lambda s: adapted(params, s, tokens, adapter_ids=jnp.array(IDS)), stacked)
        return logits, pullback(jnp.cos(logits))[0]  # the gradient of loss(logits)

    @jax.jit
    def alone(adapter, rows):
        return jax.value_and_grad(lambda a: loss(adapted(params, a, tokens[rows])))(adapter)

    logits, grads = mixed(jlora.stack(adapters))
    assert_trees_close(logits[2:3], jax.jit(model.apply)(params, tokens[2:3]))  # id -1: the base alone
    grads = jlora.unstack(grads, like=adapters)
    for i, adapter in enumerate(adapters):
        rows = [row for row, j in enumerate(IDS) if j == i]
        value, grad = alone(adapter, jnp.array(rows))
        assert_sums_close(loss(logits[jnp.array(rows)]), value, jnp.sin(logits[jnp.array(rows)]))
        for row in rows:  # each example's logits, not only their sum
            assert_trees_close(logits[row : row + 1], jax.jit(adapted)(params, adapter, tokens[row : row + 1]))
        assert_trees_close(grads[i], grad)  # each adapter: the gradient of its own examples alone
    assert not np.allclose(logits[0], logits[4], atol=1e-3)  # the same tokens with adapters 2 and 1


def test_padded_ranks_contribute_exactly_zero():
    model, params, tokens = jax_model("llama")
    small, large = three_adapters("lora", params)[:2]  # ranks 2 and 4
    stacked = jlora.stack([small, large])
    padded = jlora.multi.take(stacked, 0)
    for path, adapter in jlora.adapter.table(padded).items():
        assert adapter.a.shape[-1] == 4 and not np.any(adapter.a[:, 2:]) and not np.any(adapter.b[2:]), path
    adapted = jlora.adapt(model.apply)
    grads = jax.jit(jax.grad(lambda s: jnp.sum(jnp.sin(adapted(params, s, tokens, adapter_ids=jnp.array([0, 0]))))))(stacked)
    for adapter in jlora.adapter.table(jlora.multi.take(grads, 0)).values():
        assert np.any(adapter.a[:, :2]) and np.any(adapter.b[:2])
        assert not np.any(adapter.a[:, 2:]) and not np.any(adapter.b[2:])  # exactly zero: the padding never trains
    alone = jax.jit(adapted)
    assert_trees_close(alone(params, padded, tokens), alone(params, small, tokens))
    assert jax.tree.all(jax.tree.map(np.array_equal, jlora.unstack(stacked, like=[small, large]), [small, large]))


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_hot_swap_and_loading_a_free_slot_do_not_recompile():
    model, params, tokens = jax_model("llama")
    first, second, third = three_adapters("lora", params)
    adapted = jlora.adapt(model.apply)
    step = jax.jit(lambda s, x, ids: adapted(params, s, x, adapter_ids=ids))
    stacked = jlora.stack([first], capacity=2, rank=4)
    ids = jnp.array([0, 1])
    step(stacked, tokens, ids)
    compiled = step._cache_size()
    for slot, adapter in ((1, second), (0, third)):  # a free slot, then a swap (rank 3 into 4)
        stacked = jlora.multi.put(stacked, slot, adapter)
        out = step(stacked, tokens, ids)
        assert_trees_close(out[slot : slot + 1], adapted(params, adapter, tokens[slot : slot + 1]))
    assert step._cache_size() == compiled == 1


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_stacked_layers_take_an_adapter_axis_before_the_layer_axis():
    params = {"layers": {"kernel": normal(0, 3, 8, 8)}}  # 3 layers run by lax.scan

    def fn(params, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["layers"]["kernel"])[0]

    adapters = [trained(jlora.init(params, rank=r, targets=["layers"], stack_axes=1), seed=r) for r in (2, 3)]
    stacked = jlora.stack(adapters)
    assert stacked["layers"]["kernel"].a.shape == (2, 3, 8, 3)  # (adapter, layer, in, rank)
    x = normal(1, 4, 8)
    mixed = jlora.adapt(fn, strict=True)(params, stacked, x, adapter_ids=jnp.array([1, 0, -1, 1]))
    for row, i in enumerate([1, 0, -1, 1]):
        want = fn(params, x[row : row + 1]) if i < 0 else fn(jlora.merge(params, adapters[i]), x[row : row + 1])
        assert_trees_close(mixed[row : row + 1], want)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_generation_with_one_adapter_per_sequence():
    model, params, tokens = jax_model("gpt2")
    adapters = three_adapters("lora", params)[:2]
    adapted = jlora.adapt(model.apply)

    def apply_fn(v, tokens, cache):
        return adapted(v["params"], v["adapters"], tokens, cache, adapter_ids=v["ids"])

    def one(v, tokens, cache):
        return adapted(v["params"], v["adapters"], tokens, cache)

    prompt = jnp.concatenate([tokens[:, :3], tokens[:1, :3]])  # rows 0 and 2 share a prompt, not an adapter
    variables = dict(params=params, adapters=jlora.stack(adapters), ids=jnp.array([0, 1, 1]))
    out = generate(apply_fn, variables, prompt, model.init_cache(3, 9), max_new_tokens=6)
    for row, i in enumerate([0, 1, 1]):
        alone = generate(one, dict(params=params, adapters=adapters[i]), prompt[row : row + 1], model.init_cache(1, 9),
                         max_new_tokens=6)
        np.testing.assert_array_equal(out[row], alone[0])
    assert not np.array_equal(out[0], out[2])


def test_errors_name_what_is_wrong():
    model, params, tokens = jax_model("llama")
    adapters = three_adapters("lora", params)
    adapted = jlora.adapt(model.apply)
    stacked = jlora.stack(adapters)
    with pytest.raises(ValueError, match=r"adapter id 3 is outside -1..2"):
        adapted(params, stacked, tokens, adapter_ids=jnp.array([0, 3]))
    with pytest.raises(ValueError, match=r"no array argument has 3 entries"):
        adapted(params, stacked, tokens, adapter_ids=jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"same shape for one example as for the batch but depend on the example"):
        mean = jlora.adapt(lambda p, x: jnp.mean(model.apply(p, x)))
        jax.jit(lambda s, x: mean(params, s, x, adapter_ids=jnp.array([0, 1])))(stacked, tokens)
    odd = jlora.init(params, rank=2, alpha=4.0, targets=TARGETS)
    with pytest.raises(ValueError, match=r"cannot stack the adapters at 'params/layers_0/.*scaling"):
        jlora.stack([adapters[0], odd])
    with pytest.raises(ValueError, match=r"rank 4, more than the stack's rank 2"):
        jlora.stack(adapters, rank=2)
    with pytest.raises(ValueError, match=r"has rank 4, more than the stack's rank 2"):
        jlora.multi.put(jlora.stack(adapters[:1]), 0, adapters[1])


def test_batch_axis_per_argument():
    params = {"w": normal(0, 4, 4)}
    fn = lambda p, x, table: jnp.tanh(x @ p["w"]) @ table  # table [4, 4] is shared, though 4 = the batch
    adapters = [trained(jlora.init(params, rank=2, targets=["w"]), seed=s) for s in (0, 1)]
    x, table, ids = normal(1, 3, 4, 4), normal(2, 4, 4), [1, 0, -1, 1]  # x: examples on axis 1
    got = jlora.adapt(fn)(params, jlora.stack(adapters), x, table, adapter_ids=jnp.array(ids), batch_axis=(1, None))
    for row, i in enumerate(ids):
        weights = params if i < 0 else jlora.merge(params, adapters[i])
        assert_trees_close(got[:, row : row + 1], fn(weights, x[:, row : row + 1], table))


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_ranks_pad_through_the_kind_keeping_scaling_and_unstack_gives_back_alpha(kind):
    params = {"w": normal(0, 8, 6)}
    init = jlora.adapter.kind(kind).create
    small, large = (trained(init(params, rank=r, alpha=r / 2, targets=["w"])) for r in (2, 3))
    stacked = jlora.stack([small, large], rank=4)
    held = stacked["w"]
    assert (held.a.shape, held.b.shape, held.rank, held.scaling) == ((2, 8, 4), (2, 4, 6), 4, 0.5)
    for i, alone in enumerate((small, large)):
        taken = jlora.multi.take(stacked, i)
        np.testing.assert_allclose(jlora.merge(params, taken)["w"], jlora.merge(params, alone)["w"], rtol=0, atol=1e-6)
    back = jlora.multi.unstack(stacked, like=[small, large])
    for got, want in zip(back, (small, large)):
        assert (got["w"].alpha, got["w"].rank) == (want["w"].alpha, want["w"].rank)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match=r"cannot stack the adapters at 'w': .* of rank 2 .*scaling = alpha / r"):
        jlora.stack([small, trained(init(params, rank=2, alpha=3, targets=["w"]))])

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models import Llama, LlamaConfig, generate, sample_logits
from tiny import random_variables

CONFIG = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, max_position_embeddings=32)
MODEL = Llama(CONFIG)


@pytest.fixture(scope="module")
def variables():
    return random_variables(MODEL, seed=5, std=0.5, norms=0.0)  # the tokens named below come from these


LOGITS = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))  # token 1 most likely, then 3, 2, 0


def draws(n=4000, **sampling):
    keys = jax.random.split(jax.random.key(0), n)
    tokens = jax.jit(jax.vmap(lambda k: sample_logits(LOGITS, k, **sampling)[0]))(keys)
    return np.bincount(np.asarray(tokens), minlength=4) / n


def test_temperature_zero_is_argmax():
    logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0), temperature=0.0), [1, 0])


def test_plain_sampling_follows_the_softmax():
    np.testing.assert_allclose(draws(temperature=1.0), [0.05, 0.5, 0.15, 0.3], atol=0.03)


def test_top_k_keeps_the_k_most_likely_tokens():
    frequencies = draws(temperature=1.0, top_k=2)
    assert frequencies[0] == frequencies[2] == 0
    np.testing.assert_allclose(frequencies[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    assert draws(n=200, temperature=1.0, top_k=1)[1] == 1.0


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Cumulative probabilities in order 1, 3, 2, 0: 0.5, 0.8, 0.95, 1.0.
    assert np.count_nonzero(draws(temperature=1.0, top_p=0.7)) == 2
    frequencies = draws(temperature=1.0, top_p=0.9)
    assert frequencies[0] == 0
    np.testing.assert_allclose(frequencies[[1, 3, 2]], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    assert draws(n=200, temperature=1.0, top_p=1e-6)[1] == 1.0


def test_high_temperature_flattens_the_distribution():
    frequencies = draws(temperature=100.0)
    np.testing.assert_allclose(frequencies, 0.25, atol=0.03)


def test_generation_stops_when_every_row_has_produced_eos_and_pads_finished_rows(variables):
    prompt = np.array([[3, 14, 15], [7, 7, 7]])
    greedy = generate(MODEL.apply, variables, prompt, MODEL.init_cache(2, 12), max_new_tokens=9)
    assert greedy.shape == (2, 12)
    # With this seed token 24 is row 0's third new token and row 1's fourth.
    eos = 24
    assert list(greedy[0, 3:6]).index(eos) == 2 and list(greedy[1, 3:7]).index(eos) == 3
    stopped = generate(MODEL.apply, variables, prompt, MODEL.init_cache(2, 12), max_new_tokens=9, eos_id=eos)
    np.testing.assert_array_equal(stopped, [list(greedy[0, :6]) + [eos], list(greedy[1, :7])])


def test_generation_stops_early_on_any_of_several_eos_ids(variables):
    prompt = np.array([[3, 14, 15]])
    greedy = generate(MODEL.apply, variables, prompt, MODEL.init_cache(1, 10), max_new_tokens=7)
    stopped = generate(MODEL.apply, variables, prompt, MODEL.init_cache(1, 10), max_new_tokens=7,
                       eos_id=[50, int(greedy[0, 5])])
    np.testing.assert_array_equal(stopped, greedy[:, :6])


def test_sampling_is_reproducible_from_the_key_and_differs_between_keys(variables):
    prompt = np.array([[3, 14, 15]])
    sample = lambda seed: generate(MODEL.apply, variables, prompt, MODEL.init_cache(1, 13), max_new_tokens=10,
                                   temperature=1.5, top_k=20, top_p=0.95, rng=jax.random.key(seed))
    np.testing.assert_array_equal(sample(1), sample(1))
    assert not np.array_equal(sample(1), sample(2))


def test_a_wrapped_apply_function_generates_through_the_same_loop(variables):
    """What a LoRA transform does: params plus a delta, passed as one pytree to an apply function."""
    prompt = np.array([[3, 14, 15]])

    def adapted(both, tokens, cache):
        params = jax.tree_util.tree_map(jnp.add, both["frozen"], both["delta"])
        return MODEL.apply(params, tokens, cache)

    zero = jax.tree_util.tree_map(jnp.zeros_like, variables)
    plain = generate(MODEL.apply, variables, prompt, MODEL.init_cache(1, 8), max_new_tokens=5)
    wrapped = generate(adapted, {"frozen": variables, "delta": zero}, prompt, MODEL.init_cache(1, 8), max_new_tokens=5)
    np.testing.assert_array_equal(wrapped, plain)
    bumped = jax.tree_util.tree_map(lambda x: x + 0.3, zero)
    changed = generate(adapted, {"frozen": variables, "delta": bumped}, prompt, MODEL.init_cache(1, 8),
                       max_new_tokens=5)
    assert not np.array_equal(changed, plain)


def test_cached_apply_traces_to_a_plain_jaxpr(variables):
    cache = MODEL.init_cache(1, 8)
    jaxpr = jax.make_jaxpr(lambda v, t, c: MODEL.apply(v, t, c))(variables, jnp.zeros((1, 3), jnp.int32), cache)
    primitives = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert "dynamic_update_slice" in primitives and "dot_general" in primitives
    assert not {name for name in primitives if "callback" in name}


def test_a_cache_too_small_for_the_request_is_refused(variables):
    with pytest.raises(ValueError, match=r"cache holds 6 positions, but the prompt \(3\) plus max_new_tokens \(5\) "
                                         r"needs 7"):
        generate(MODEL.apply, variables, np.array([[1, 2, 3]]), MODEL.init_cache(1, 6), max_new_tokens=5)


def test_a_cache_longer_than_the_model_context_is_refused():
    with pytest.raises(ValueError, match="max_length=33 exceeds max_position_embeddings=32"):
        MODEL.init_cache(1, 33)

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models import Llama, LlamaConfig, Tokenizer, chat, complete, generate, penalize_repetition, sample_logits
generate_module = importlib.import_module("jlora.models.generate")  # the package exports the function as `generate`
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


# ---- repetition penalty, prompt buckets, chat ----


_forward = jax.jit(MODEL.apply)


def reference_greedy(variables, prompt, new, penalty=1.0):
    """Greedy decoding the slow way: the whole sequence through the model for every token, no cache,
    transformers' own repetition penalty on the last position's logits."""
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    penalize = RepetitionPenaltyLogitsProcessor(penalty)
    ids = [list(row) for row in prompt]
    for _ in range(new):
        # Padded to one length (causal attention: the padding changes no earlier position), one compilation.
        padded = np.zeros((len(ids), CONFIG.max_position_embeddings), np.int32)
        padded[:, :len(ids[0])] = ids
        logits = np.asarray(_forward(variables, padded))[:, len(ids[0]) - 1]
        scores = penalize(torch.tensor(ids), torch.tensor(logits)).numpy()
        ids = [row + [int(np.argmax(s))] for row, s in zip(ids, scores)]
    return np.array(ids)


def test_repetition_penalty_equals_transformers_processor():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(0).normal(size=(3, 11)).astype(np.float32)
    ids = np.array([[0, 3, 3, 7], [10, 10, 10, 10], [1, 2, 4, 9]])
    seen = np.zeros((3, 11), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits)).numpy()
        # XLA divides by multiplying with the reciprocal: equal to the last bit or one off.
        np.testing.assert_allclose(np.asarray(penalize_repetition(jnp.array(logits), seen, penalty)), expected,
                                   rtol=2e-7, atol=0)
        assert not np.array_equal(expected, logits)


def test_generate_with_a_repetition_penalty_equals_the_uncached_reference(variables):
    """The penalty sees the prompt and every token generated so far (the mask carried in the loop)."""
    prompt = np.array([[3, 14, 15], [7, 7, 7]])
    plain = generate(MODEL.apply, variables, prompt, MODEL.init_cache(2, 14), max_new_tokens=11)
    np.testing.assert_array_equal(plain, reference_greedy(variables, prompt, 11))
    penalized = generate(MODEL.apply, variables, prompt, MODEL.init_cache(2, 14), max_new_tokens=11,
                         repetition_penalty=3.0)
    np.testing.assert_array_equal(penalized, reference_greedy(variables, prompt, 11, penalty=3.0))
    assert not np.array_equal(penalized, plain)


def compiles():
    return generate_module._prefill._cache_size(), generate_module._decode._cache_size()


def test_prompts_of_other_lengths_in_one_bucket_reuse_the_compiled_model(variables):
    cache_size = 31  # no other test uses it, so the first call below compiles
    generate(MODEL.apply, variables, np.array([[5, 6, 7]]), MODEL.init_cache(1, cache_size), max_new_tokens=4)
    first = compiles()
    for prompt in ([[9]], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]], [[4, 4, 8, 8, 2]]):
        out = generate(MODEL.apply, variables, np.array(prompt), MODEL.init_cache(1, cache_size), max_new_tokens=6)
        np.testing.assert_array_equal(out, reference_greedy(variables, prompt, 6))
    assert compiles() == first
    generate(MODEL.apply, variables, np.array([list(range(1, 18))]), MODEL.init_cache(1, cache_size), max_new_tokens=2)
    assert compiles() == (first[0] + 1, first[1])  # 17 tokens: the next bucket, one more prompt pass


def char_tokenizer():
    """One token per character of a 53-letter alphabet (the tiny model's vocabulary), and a chat template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    alphabet = "abcdefghijklmnopqrstuvwxyz ?.:|<>ABCDEFGHIJKLMNOPQRST"
    assert len(alphabet) == CONFIG.vocab_size
    backend = Backend(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    backend.decoder = decoders.Fuse()
    template = ("{% for m in messages %}<{{ m['role'][0] }}:{{ m['content'] }}>{% endfor %}"
                "{% if add_generation_prompt %}<a:{% endif %}")
    return Tokenizer(backend, chat_template=template)


def test_chat_keeps_the_conversation_and_drops_the_oldest_exchange_when_full(variables):
    tokenizer = char_tokenizer()
    replies = list(chat(MODEL, variables, tokenizer, ["hi", "yo", "ok"], 4, temperature=0.0, context=32))
    assert all(len(reply) == 4 for reply in replies)
    assert replies[0] == complete(MODEL, variables, tokenizer, "<u:hi><a:", 4, context=32)
    # Turn 2 sees turn 1: '<u:hi><a:REPLY><u:yo><a:' is 23 characters, + 4 new fits in 32.
    history = f"<u:hi><a:{replies[0]}><u:yo><a:"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "yo"}]
    assert tokenizer.apply_chat_template(messages) == history
    assert replies[1] == complete(MODEL, variables, tokenizer, history, 4, context=32)
    # Turn 3 would be 37 characters + 4: the first exchange goes (23 + 4 fit), turn 2's stays.
    assert replies[2] == complete(MODEL, variables, tokenizer, f"<u:yo><a:{replies[1]}><u:ok><a:", 4, context=32)
    assert replies[2] != complete(MODEL, variables, tokenizer, "<u:ok><a:", 4, context=32)


def test_chat_without_template_continues_each_prompt_alone_on_one_compiled_model(variables):
    tokenizer = char_tokenizer()
    prompts = iter(["abc", "hello world", "xyz"])
    seen = []

    def typed():  # records the compilations after each reply, as a reader of stdin would
        for prompt in prompts:
            yield prompt
            seen.append(compiles())

    replies = list(chat(MODEL, variables, tokenizer, typed(), 4, template=False, temperature=0.0, context=29))
    assert replies == [complete(MODEL, variables, tokenizer, p, 4, context=29) for p in ("abc", "hello world", "xyz")]
    assert seen[0] == seen[1] == seen[2]
    with pytest.raises(ValueError, match="the prompt is 30 tokens, but the chat's context holds 29"):
        next(chat(MODEL, variables, tokenizer, ["a" * 30], 4, template=False, context=29))

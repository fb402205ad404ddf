"""Autoregressive generation with a key/value cache: greedy, or sampled with temperature, top-k, top-p.

Generation only needs a function `apply_fn(variables, tokens, cache) -> (logits, cache)`. For a plain
model that is `model.apply`; for params wrapped by a transform (LoRA) it is any function of the same
shape, e.g. `lambda v, tokens, cache: adapted(v["frozen"], v["adapters"], tokens, cache)`, so the same
loop serves both. The prompt runs once, then each new token is one jitted step over the cache.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits, rng, *, temperature=1.0, top_k=0, top_p=1.0):
    """One token id per row of `logits` [B, V].

    Args:
      logits: [B, V] float.
      rng: a PRNG key; unused when temperature == 0.
      temperature: 0 for greedy (argmax); otherwise logits are divided by it.
      top_k: keep only the k most likely tokens (0: all). Must be a Python int.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all).

    Returns:
      int32 [B].
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # The last kept token is the first whose cumulative probability reaches top_p.
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# The cache is donated: each step updates its buffers in place instead of copying them.
@partial(jax.jit, static_argnames=("apply_fn", "temperature", "top_k", "top_p"), donate_argnames=("cache",))
def _step(apply_fn, variables, tokens, cache, rng, *, temperature, top_k, top_p):
    logits, cache = apply_fn(variables, tokens, cache)
    return sample_logits(logits[:, -1], rng, temperature=temperature, top_k=top_k, top_p=top_p), cache


def generate(apply_fn, variables, prompt, cache, *, max_new_tokens, eos_id=None, temperature=0.0, top_k=0,
             top_p=1.0, rng=None):
    """Continue `prompt` by up to `max_new_tokens` tokens, stopping once every row has produced an eos.

    Args:
      apply_fn: `(variables, tokens [B, T], cache) -> (logits [B, T, V], cache)`, e.g. `model.apply`.
        Pass the same function object each call to reuse its compilation.
      variables: whatever `apply_fn` takes first (a pytree of arrays).
      prompt: int [B, P], every row the same length.
      cache: an empty cache with room for P + max_new_tokens, e.g. `model.init_cache(B, P + max_new_tokens)`.
        It is consumed (its buffers are donated); make a new one for each call.
      max_new_tokens: the most tokens to add.
      eos_id: an id or a sequence of ids that end a row; later positions of that row repeat it.
      temperature, top_k, top_p: see `sample_logits`; temperature 0 is greedy. Each distinct setting
        compiles the step once.
      rng: PRNG key for sampling (default `jax.random.key(0)`).

    Returns:
      np.int32 [B, P + n]: the prompt followed by the n <= max_new_tokens generated tokens.

    Example:
      >>> from jlora.models.gpt2 import GPT2, GPT2Config
      >>> model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
      >>> prompt = jnp.array([[1, 2, 3], [4, 5, 6]])
      >>> variables = model.init(jax.random.key(0), prompt)
      >>> cache = model.init_cache(2, prompt.shape[1] + 5)
      >>> ids = generate(model.apply, variables, prompt, cache, max_new_tokens=5, temperature=0.8, top_k=10)
      >>> ids.shape, ids[:, :3].tolist()
      ((2, 8), [[1, 2, 3], [4, 5, 6]])
    """
    prompt = np.asarray(prompt, np.int32)
    room = int(cache["index"]) + prompt.shape[1] + max_new_tokens
    buffer = next(iter(v for k, v in cache.items() if k != "index"))["key"].shape[-3]  # [(L,) B, S, H, D]
    if room > buffer + 1:  # the last token is sampled but never written back
        raise ValueError(f"cache holds {buffer} positions, but the prompt ({prompt.shape[1]}) plus "
                         f"max_new_tokens ({max_new_tokens}) needs {room - 1}.")
    stop = np.atleast_1d(np.asarray([] if eos_id is None else eos_id, np.int32))
    rng = jax.random.key(0) if rng is None else rng
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    done = np.zeros(prompt.shape[0], bool)
    generated = []
    tokens = prompt
    for _ in range(max_new_tokens):
        rng, step_rng = jax.random.split(rng)
        next_token, cache = _step(apply_fn, variables, jnp.asarray(tokens), cache, step_rng, **sampling)
        next_token = np.asarray(next_token)
        if stop.size:
            next_token = np.where(done, stop[0], next_token)
            done |= np.isin(next_token, stop)
        generated.append(next_token)
        if done.all():
            break
        tokens = next_token[:, None]
    return np.concatenate([prompt, np.stack(generated, axis=1) if generated else prompt[:, :0]], axis=1)


def complete(model, variables, tokenizer, prompt: str, max_new_tokens: int, *, temperature=0.0, top_k=0, top_p=1.0,
             seed=0) -> str:
    """The text a model adds to one prompt: encode, :func:`generate` within the model's context, decode.

    Args:
      model: a bundled model (its `apply`, `init_cache` and `max_length`).
      variables: its variables (for adapters, `jlora.merge` them in first: no cost per token).
      tokenizer: the model's `Tokenizer`.
      prompt: text; the result does not repeat it.
      max_new_tokens: the most tokens to add (fewer when the context is full).
      temperature, top_k, top_p, seed: sampling, as in `generate`; temperature 0 is greedy.

    Raises:
      ValueError: the prompt encodes to no token, or fills the model's whole context.

    Example:
      >>> model, variables, tokenizer, _ = jlora.models.load("smollm2-135m")
      >>> complete(model, variables, tokenizer, "The capital of France is", 2)
      ' Paris.'
    """
    ids = np.array([tokenizer.encode(prompt)], np.int32).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: generation continues at least one token")
    if ids.shape[1] >= model.max_length:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens, but the model's context holds {model.max_length}: "
                         "no room for a new token")
    max_new_tokens = max(0, min(max_new_tokens, model.max_length - ids.shape[1]))
    cache = model.init_cache(1, ids.shape[1] + max_new_tokens)
    out = generate(model.apply, variables, ids, cache, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                   temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.key(seed))
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

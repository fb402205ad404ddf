"""Autoregressive generation with a key/value cache: greedy, or sampled with temperature, top-k, top-p,
and a repetition penalty.

Generation only needs a function `apply_fn(variables, tokens, cache) -> (logits, cache)`. For a plain
model that is `model.apply`; for params wrapped by a transform (LoRA) it is any function of the same
shape, e.g. `lambda v, tokens, cache: adapted(v["frozen"], v["adapters"], tokens, cache)`, so the same
loop serves both. The prompt runs once (padded to a bucket of lengths, so prompts of other lengths
reuse its compilation), then every new token is one step of a jitted `lax.while_loop` over the cache:
no round trip to Python per token, and one compilation per cache size and sampling setting.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# Prompts are padded to a power of two at least this long, so a new prompt length compiles the
# prompt pass only when it crosses a power of two.
MIN_BUCKET = 16


def bucket(length: int, cap: int) -> int:
    """The padded length of a `length`-token prompt: the next power of two >= MIN_BUCKET, at most `cap`.

    Example:
      >>> bucket(5, 100), bucket(17, 100), bucket(70, 100)
      (16, 32, 100)
    """
    return min(cap, max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()))


def penalize_repetition(logits, seen, penalty):
    """CTRL's repetition penalty (Keskar et al., 2019), as transformers' `RepetitionPenaltyLogitsProcessor`:
    the logit of each token already in the sequence is divided by `penalty` where positive and
    multiplied by it where negative, so `penalty > 1` makes every such token less likely, once
    however often it occurred.

    Args:
      logits: [B, V] float.
      seen: [B, V] bool, True for the tokens already in each row (prompt and generated).
      penalty: a float > 0; 1.0 changes nothing.

    Returns:
      [B, V], the same dtype as `logits`.

    Example:
      >>> penalize_repetition(jnp.array([[2.0, -2.0, 2.0]]), jnp.array([[True, True, False]]), 2.0).tolist()
      [[1.0, -4.0, 2.0]]
    """
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def sample_logits(logits, rng, *, temperature=1.0, top_k=0, top_p=1.0):
    """One token id per row of `logits` [B, V].

    Args:
      logits: [B, V] float.
      rng: a PRNG key; unused when temperature == 0.
      temperature: 0 for greedy (argmax); otherwise logits are divided by it.
      top_k: keep only the k most likely tokens (0: all). Must be a Python int.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all;
        the most likely token is always kept).

    Returns:
      int32 [B].

    Example:
      >>> sample_logits(jnp.array([[0.0, 3.0, 1.0]]), jax.random.key(0), temperature=0.7, top_k=1).tolist()
      [1]
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # The last kept token is the first whose cumulative probability reaches top_p; rounding can
        # leave the total just under top_p, hence the clip to the least likely token.
        cutoff_index = jnp.minimum(jnp.sum(cumulative < top_p, axis=-1, keepdims=True), vocab - 1)
        cutoff = jnp.take_along_axis(ordered, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _choose(logits, seen, rng, sampling):
    temperature, top_k, top_p, penalty = sampling
    if penalty != 1.0:
        logits = penalize_repetition(logits, seen, penalty)
    return sample_logits(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)


def _length(cache):
    """The positions a cache holds: its buffers are [(L,) B, S, H, D]."""
    return jax.tree.leaves({k: v for k, v in cache.items() if k != "index"})[0].shape[-3]


def _mark(seen, tokens):
    """`seen` with `tokens` [B, T] set (ids out of range, the padding, are dropped)."""
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, tokens].set(True, mode="drop")


# The cache is donated: the prompt pass and every step update its buffers in place instead of copying them.
@partial(jax.jit, static_argnames=("apply_fn", "sampling"), donate_argnames=("cache",))
def _prefill(apply_fn, variables, tokens, length, cache, rng, *, sampling):
    """The first new token after `tokens[:, :length]` ([B, bucket], padded past `length` with ids out
    of range): the padding's keys land past the prompt, where no later query looks (attention is
    causal by position) and where the decode loop overwrites them."""
    start = cache["index"]
    logits, cache = apply_fn(variables, jnp.where(tokens < 0, 0, tokens), cache)
    last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
    seen = _mark(jnp.zeros(last.shape, bool), jnp.where(tokens < 0, last.shape[-1], tokens))
    return _choose(last, seen, rng, sampling), seen, {**cache, "index": start + length}


@partial(jax.jit, static_argnames=("apply_fn", "sampling"))
def _decode(apply_fn, variables, token, seen, cache, rng, done, stop, steps, *, sampling):
    """Up to `steps` tokens after `token` [B], in one `lax.while_loop`; stops early once every row is
    done. Returns `(count, tokens [B, S])`, the first `count` columns generated."""
    batch = token.shape[0]
    out = jnp.zeros((batch, _length(cache)), jnp.int32)

    def more(state):
        i, _, _, _, _, done, _ = state
        return (i < steps) & ~jnp.all(done)

    def step(state):
        i, token, seen, cache, rng, done, out = state
        rng, step_rng = jax.random.split(rng)
        logits, cache = apply_fn(variables, token[:, None], cache)
        seen = _mark(seen, token[:, None])
        token = _choose(logits[:, -1], seen, step_rng, sampling)
        if stop.shape[0]:
            token = jnp.where(done, stop[0], token)
            done = done | jnp.isin(token, stop)
        return i + 1, token, seen, cache, rng, done, out.at[:, i].set(token)

    count, *_, out = jax.lax.while_loop(more, step, (jnp.int32(0), token, seen, cache, rng, done, out))
    return count, out


def generate(apply_fn, variables, prompt, cache, *, max_new_tokens, eos_id=None, temperature=0.0, top_k=0,
             top_p=1.0, repetition_penalty=1.0, rng=None):
    """Continue `prompt` by up to `max_new_tokens` tokens, stopping once every row has produced an eos.

    Args:
      apply_fn: `(variables, tokens [B, T], cache) -> (logits [B, T, V], cache)`, e.g. `model.apply`.
        Pass the same function object each call to reuse its compilation.
      variables: whatever `apply_fn` takes first (a pytree of arrays).
      prompt: int [B, P], every row the same length.
      cache: an empty cache with room for P + max_new_tokens, e.g. `model.init_cache(B, P + max_new_tokens)`.
        It is consumed (its buffers are donated); make a new one for each call. Its size is part of
        what is compiled: a fixed size serves every later prompt that fits.
      max_new_tokens: the most tokens to add.
      eos_id: an id or a sequence of ids that end a row; later positions of that row repeat it.
      temperature, top_k, top_p: see `sample_logits`; temperature 0 is greedy.
      repetition_penalty: see `penalize_repetition` (1.0: none); it counts the prompt's tokens and
        the generated ones.
      rng: PRNG key for sampling (default `jax.random.key(0)`).

    Each distinct sampling setting, batch size and cache size compiles once; the prompt pass also
    once per `bucket` of prompt lengths.

    Returns:
      np.int32 [B, P + n]: the prompt followed by the n <= max_new_tokens generated tokens.

    Example:
      >>> from jlora.models.gpt2 import GPT2, GPT2Config
      >>> model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
      >>> prompt = jnp.array([[1, 2, 3], [4, 5, 6]])
      >>> variables = model.init(jax.random.key(0), prompt)
      >>> cache = model.init_cache(2, prompt.shape[1] + 5)
      >>> ids = generate(model.apply, variables, prompt, cache, max_new_tokens=5, temperature=0.8, top_k=10,
      ...                repetition_penalty=1.2)
      >>> ids.shape, ids[:, :3].tolist()
      ((2, 8), [[1, 2, 3], [4, 5, 6]])
    """
    prompt = np.asarray(prompt, np.int32)
    start = int(cache["index"])
    buffer = _length(cache)
    room = start + prompt.shape[1] + max_new_tokens
    if room > buffer + 1:  # the last token is sampled but never written back
        raise ValueError(f"cache holds {buffer} positions, but the prompt ({prompt.shape[1]}) plus "
                         f"max_new_tokens ({max_new_tokens}) needs {room - 1}.")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty is {repetition_penalty}; it must be > 0 (1.0: none)")
    if max_new_tokens <= 0:
        return prompt
    stop = np.atleast_1d(np.asarray([] if eos_id is None else eos_id, np.int32))
    rng = jax.random.key(0) if rng is None else rng
    sampling = (float(temperature), int(top_k), float(top_p), float(repetition_penalty))
    batch, length = prompt.shape
    padded = np.full((batch, bucket(length, buffer - start)), -1, np.int32)
    padded[:, :length] = prompt
    rng, first_rng = jax.random.split(rng)
    token, seen, cache = _prefill(apply_fn, variables, jnp.asarray(padded), jnp.int32(length), cache, first_rng,
                                  sampling=sampling)
    done = np.isin(np.asarray(token), stop)
    count, rest = _decode(apply_fn, variables, token, seen, cache, rng, jnp.asarray(done), jnp.asarray(stop),
                          jnp.int32(max_new_tokens - 1), sampling=sampling)
    generated = np.concatenate([np.asarray(token)[:, None], np.asarray(rest)[:, :int(count)]], axis=1)
    return np.concatenate([prompt, generated], axis=1)


def complete(model, variables, tokenizer, prompt: str, max_new_tokens: int, *, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.0, seed=0, context=None) -> str:
    """The text a model adds to one prompt: encode, :func:`generate` within the model's context, decode.

    Args:
      model: a bundled model (its `apply`, `init_cache` and `max_length`).
      variables: its variables (for adapters, `jlora.merge` them in first: no cost per token).
      tokenizer: the model's `Tokenizer`.
      prompt: text; the result does not repeat it.
      max_new_tokens: the most tokens to add (fewer when the context is full).
      temperature, top_k, top_p, repetition_penalty, seed: sampling, as in `generate`; temperature 0 is greedy.
      context: the cache's length in tokens, prompt and reply together. Give the same number to
        every call (as `chat` does) to compile once for all prompts; by default the `bucket` that
        holds this prompt and its reply.

    Raises:
      ValueError: the prompt encodes to no token, or fills the whole context.

    Example:
      >>> model, variables, tokenizer, _ = jlora.models.load("smollm2-135m")
      >>> complete(model, variables, tokenizer, "The capital of France is", 2)
      ' Paris.'
    """
    ids = np.array([tokenizer.encode(prompt)], np.int32).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: generation continues at least one token")
    limit = model.max_length if context is None else min(context, model.max_length)
    if ids.shape[1] >= limit:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens, but the {'model' if context is None else 'chat'}'s "
                         f"context holds {limit}: no room for a new token")
    max_new_tokens = max(0, min(max_new_tokens, limit - ids.shape[1]))
    size = limit if context is not None else bucket(ids.shape[1] + max_new_tokens, model.max_length)
    out = generate(model.apply, variables, ids, model.init_cache(1, size), max_new_tokens=max_new_tokens,
                   eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, rng=jax.random.key(seed))
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def chat(model, variables, tokenizer, prompts, max_new_tokens: int, *, template=True, context=2048, **sampling):
    """Reply to each prompt of `prompts` in turn, one compiled model for all of them.

    Every reply runs in a cache of `context` tokens (at most the model's), so the decode loop compiles
    once and the prompt pass once per `bucket` of lengths. With `template`, the prompts and replies
    so far are a conversation (a messages list) rendered with the tokenizer's chat template, the
    oldest exchanges dropped when it would leave fewer than `max_new_tokens` tokens for the reply;
    without it, each prompt is continued alone, as `complete` would.

    Args:
      model, variables, tokenizer: as for `complete`.
      prompts: an iterable of strings, read one at a time (stdin's lines, for instance): each reply
        is yielded before the next prompt is read.
      max_new_tokens: the most tokens in each reply.
      template: keep a conversation in the chat template (the tokenizer must have one).
      context: the cache's length, prompt (with history) and reply together.
      **sampling: `temperature`, `top_k`, `top_p`, `repetition_penalty`, `seed` of `complete`; each
        reply starts from the same seed.

    Yields:
      Each reply's text.

    Example:
      >>> model, variables, tokenizer, _ = jlora.models.load("smollm2-135m")
      >>> replies = chat(model, variables, tokenizer, ["What is the capital of France?", "And of Italy?"], 12)
      >>> [reply.split(".")[0] for reply in replies]
      ['The capital of France is Paris', 'The capital of Italy is Rome']
    """
    if template and tokenizer.chat_template is None:
        raise ValueError("this tokenizer has no chat template; chat without one (template=False, --no-template)")
    context = min(context, model.max_length)
    messages = []
    for prompt in prompts:
        if not template:
            yield complete(model, variables, tokenizer, prompt, max_new_tokens, context=context, **sampling)
            continue
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages)
        while len(messages) > 1 and len(tokenizer.encode(text)) + max_new_tokens > context:
            messages = messages[2:]  # the oldest user message and its reply
            text = tokenizer.apply_chat_template(messages)
        reply = complete(model, variables, tokenizer, text, max_new_tokens, context=context, **sampling)
        messages.append({"role": "assistant", "content": reply})
        yield reply

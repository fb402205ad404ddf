"""Causal attention with an optional key/value cache, shared by the GPT-2 and Llama files.

The cache is a plain pytree passed in and returned by `model.apply`, never Flax state, so that a
function transform of the params (LoRA) sees generation as one pure function:

    logits, cache = model.apply(variables, tokens, cache)

    cache = {"index": int32[],                      # how many positions are filled
             "h_0": {"key": [B, S, H_kv, D], "value": [B, S, H_kv, D]}, ...}

Every row of the batch is at the same position, so positions are `index + arange(T)`.
"""

import jax
import jax.numpy as jnp


def init_cache(layer_names, batch_size, max_length, num_kv_heads, head_dim, dtype):
    """An empty cache: one zero key/value buffer of length `max_length` per layer, index 0."""
    shape = (batch_size, max_length, num_kv_heads, head_dim)
    cache = {name: {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)} for name in layer_names}
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


def extend(layer_cache, keys, values, positions):
    """Write this call's keys/values at `positions[0]` and return what attention should see.

    Args:
      layer_cache: `{"key", "value"}` buffers [B, S, H_kv, D], or None to attend to this call only.
      keys, values: [B, T, H_kv, D] for the T new positions.
      positions: int [T], the positions of the new tokens.

    Returns:
      `(keys, values, key_positions, layer_cache)`: all keys/values to attend to, their positions,
      and the updated buffers (None when no cache was given).
    """
    if layer_cache is None:
        return keys, values, positions, None
    start = (0, positions[0], 0, 0)
    all_keys = jax.lax.dynamic_update_slice(layer_cache["key"], keys.astype(layer_cache["key"].dtype), start)
    all_values = jax.lax.dynamic_update_slice(layer_cache["value"], values.astype(layer_cache["value"].dtype), start)
    # Slots past the filled part hold zeros; their positions are later than any query, so the mask drops them.
    key_positions = jnp.arange(all_keys.shape[1])
    return all_keys, all_values, key_positions, {"key": all_keys, "value": all_values}


def causal_attention(queries, keys, values, query_positions, key_positions, window=None, block=None):
    """Softmax attention where a query sees only keys at its own or earlier positions.

    Grouped-query attention falls out of the shapes: query head h uses key/value head
    h // (H // H_kv), the same grouping as Hugging Face's `repeat_kv`.

    Args:
      queries: [B, T, H, D].
      keys, values: [B, S, H_kv, D], H divisible by H_kv.
      query_positions: int [T]; key_positions: int [S].
      window: if given, a query sees only keys fewer than `window` positions back (Mistral's sliding
        window, Hugging Face's `kv_idx > q_idx - sliding_window`).
      block: if given and T > block, the queries go `block` at a time (see `blocked_attention`): the
        same values, without a [B, H, T, S] score matrix.

    Returns:
      [B, T, H * D] in the dtype of `values`.
    """
    if block is not None and queries.shape[1] > block:
        return blocked_attention(queries, keys, values, query_positions, key_positions, window, block)
    batch, length, heads, head_dim = queries.shape
    kv_heads = keys.shape[2]
    # Head-major operands [B, H_kv, group, T, D]: the batched dots below then read row-major [T, D]
    # matrices, and the move fuses into the ops that produce them (RoPE, an adapter's add). Given
    # [B, T, H, D], XLA's CPU layouts put D major and added transposed copies of the queries, scores
    # and output every layer; SmolLM2's attention, forward and backward, runs ~25% faster this way.
    grouped = queries.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bgrtd,bgsd->bgrts", grouped, keys, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    visible = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        visible &= query_positions[:, None] - key_positions[None, :] < window
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bgrts,bgsd->bgrtd", weights, values)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads * head_dim)


def blocked_attention(queries, keys, values, query_positions, key_positions, window, block):
    """`causal_attention`, `block` queries at a time, each block recomputed in the backward pass.

    The scores of all T queries against all S keys, [B, H, T, S] in float32 plus the softmax and
    their gradients, are what a long sequence's step spends most memory on (1 GiB a tensor for 32
    heads at 2 x 2048). Here one block's exist at a time, forward and backward: the backward pass
    keeps only each block's queries and recomputes its scores (`jax.checkpoint`). The FLOPs are
    the dense version's plus one more score computation.
    """
    batch, length, heads, head_dim = queries.shape
    blocks = -(-length // block)
    pad = blocks * block - length  # padded queries repeat the last position; their rows are dropped
    queries = jnp.pad(queries, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch, blocks, block, heads, head_dim)
    positions = jnp.pad(query_positions, (0, pad), mode="edge").reshape(blocks, block)

    @jax.checkpoint
    def one_block(query_block, position_block):
        return causal_attention(query_block, keys, values, position_block, key_positions, window)

    out = jax.lax.map(lambda xs: one_block(*xs), (queries.swapaxes(0, 1), positions))
    return out.swapaxes(0, 1).reshape(batch, blocks * block, heads * head_dim)[:, :length]

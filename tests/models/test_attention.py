"""jlora.models.attention: causal (and sliding-window) grouped-query attention against a float64 numpy
softmax, the blocked form against the dense one, and the key/value cache written where positions say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import normal
from jlora.models import attention


def reference(queries, keys, values, query_positions, key_positions, window=None):
    """Softmax attention in float64 numpy, one query head at a time, head h on key/value head h // group."""
    q, k, v = (np.asarray(a, np.float64) for a in (queries, keys, values))
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, length, heads, dim))
    for h in range(heads):
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // group]) / np.sqrt(dim)
        seen = np.asarray(key_positions)[None, :] <= np.asarray(query_positions)[:, None]
        if window is not None:
            seen &= np.asarray(query_positions)[:, None] - np.asarray(key_positions)[None, :] < window
        scores = np.where(seen, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bts,bsd->btd", weights / weights.sum(-1, keepdims=True), v[:, :, h // group])
    return out.reshape(batch, length, heads * dim)


@pytest.mark.parametrize("window", [None, 3])
def test_grouped_query_attention_equals_the_float64_softmax(window):
    queries, keys, values = normal(0, 2, 7, 4, 8), normal(1, 2, 7, 2, 8), normal(2, 2, 7, 2, 8)
    positions = jnp.arange(7)
    got = attention.causal_attention(queries, keys, values, positions, positions, window)
    assert got.shape == (2, 7, 32) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference(queries, keys, values, positions, positions, window), atol=1e-5)


def test_the_first_query_sees_only_its_own_key():
    queries, keys, values = normal(0, 1, 4, 2, 8), normal(1, 1, 4, 2, 8), normal(2, 1, 4, 2, 8)
    got = attention.causal_attention(queries, keys, values, jnp.arange(4), jnp.arange(4))
    np.testing.assert_allclose(got[0, 0], values[0, 0].reshape(-1), atol=1e-6)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
@pytest.mark.parametrize("block", [2, 3])  # 3 does not divide 7: the last block is padded
def test_blocked_attention_equals_dense_in_values_and_gradients(block):
    queries, keys, values = normal(0, 2, 7, 4, 8), normal(1, 2, 7, 2, 8), normal(2, 2, 7, 2, 8)
    positions = jnp.arange(7)

    def loss(q, k, v, block):
        return jnp.sum(jnp.sin(attention.causal_attention(q, k, v, positions, positions, 4, block)))

    dense, dense_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(queries, keys, values, None)
    blocked, blocked_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(queries, keys, values, block)
    np.testing.assert_allclose(blocked, dense, rtol=1e-5)
    for got, expected in zip(blocked_grads, dense_grads):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_the_cache_holds_earlier_positions_so_one_step_equals_the_full_sequence():
    keys, values, queries = normal(1, 2, 5, 2, 8), normal(2, 2, 5, 2, 8), normal(0, 2, 5, 4, 8)
    cache = attention.init_cache(["h_0"], 2, 8, 2, 8, jnp.float32)
    assert cache["index"] == 0 and cache["h_0"]["key"].shape == (2, 8, 2, 8)
    k, v, key_positions, layer = attention.extend(cache["h_0"], keys[:, :4], values[:, :4], jnp.arange(4))
    k, v, key_positions, layer = attention.extend(layer, keys[:, 4:], values[:, 4:], jnp.arange(4, 5))
    np.testing.assert_array_equal(layer["key"][:, :5], keys)
    assert not np.any(layer["key"][:, 5:])  # the unfilled slots stay zero and are masked by position
    last = attention.causal_attention(queries[:, 4:], k, v, jnp.arange(4, 5), key_positions)
    full = attention.causal_attention(queries, keys, values, jnp.arange(5), jnp.arange(5))
    np.testing.assert_allclose(last, full[:, 4:], atol=1e-6)


def test_without_a_cache_extend_attends_to_this_call_only():
    keys, values = normal(1, 1, 3, 2, 8), normal(2, 1, 3, 2, 8)
    k, v, positions, layer = attention.extend(None, keys, values, jnp.arange(3))
    assert k is keys and v is values and layer is None
    np.testing.assert_array_equal(positions, jnp.arange(3))

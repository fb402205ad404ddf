"""``jlora.adapt(fn)(params, adapters, *args) == fn(jlora.merge(params, adapters), *args)``, in values
and in gradients with respect to both params and adapters, for whatever way ``fn`` uses a weight."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.lora import LoRA

TOL = dict(rtol=1e-5, atol=1e-5)


def random_b(adapters, seed=0):
    """Non-zero B, so the adapted function differs from the base one (B = 0 at init)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda lora: dataclasses.replace(lora, b=jnp.asarray(0.3 * rng.standard_normal(lora.b.shape), lora.b.dtype)),
        adapters, is_leaf=lambda x: isinstance(x, LoRA),
    )


def normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def assert_trees_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, **TOL)


def assert_adapt_matches_merge(fn, params, adapters, *args, jit=True):
    """Checks values, then gradients w.r.t. params and adapters; ``jit`` compiles each side once
    instead of op by op, which keeps the suite fast."""
    wrap = jax.jit if jit else (lambda f: f)
    adapted = jlora.adapt(fn)

    def merged(params, adapters, *args):
        return fn(jlora.merge(params, adapters), *args)

    want = wrap(merged)(params, adapters, *args)
    assert_trees_close(wrap(adapted)(params, adapters, *args), want)
    # The base function alone gives something else: the test would notice an adapter being dropped.
    base = wrap(fn)(params, *args)
    assert any(not np.allclose(b, w, **TOL) for b, w in zip(jax.tree.leaves(base), jax.tree.leaves(want)))

    cotangents = jax.tree.map(lambda y: normal(99, *y.shape), want)

    def scalar(g):
        return lambda p, a: sum(jnp.sum(y * c) for y, c in zip(jax.tree.leaves(g(p, a, *args)), jax.tree.leaves(cotangents)))

    got_grads = wrap(jax.grad(scalar(adapted), argnums=(0, 1)))(params, adapters)
    want_grads = wrap(jax.grad(scalar(merged), argnums=(0, 1)))(params, adapters)
    assert_trees_close(got_grads, want_grads)
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(want_grads[1]))
    return want


# --- plain functions of a nested dict ------------------------------------------------------------


def plain_params():
    return {
        "emb": {"embedding": normal(1, 11, 8)},
        "layer": {"query": {"kernel": normal(2, 8, 8), "bias": normal(3, 8)}, "value": {"kernel": normal(4, 8, 8)}},
    }


def test_plain_matmuls():
    params = plain_params()

    def fn(params, x):
        layer = params["layer"]
        q = x @ layer["query"]["kernel"] + layer["query"]["bias"]
        v = jnp.einsum("bd,de->be", x, layer["value"]["kernel"])
        return jnp.tanh(q) * v

    adapters = random_b(jlora.init(params, rank=3))
    assert_adapt_matches_merge(fn, params, adapters, normal(5, 4, 8), jit=False)


def test_weight_used_transposed_reshaped_and_twice():
    params = plain_params()

    def fn(params, x):
        w = params["layer"]["query"]["kernel"]
        h = jnp.tanh(x @ w)
        back = h @ w.T  # a tied use, contracting W's output axis
        heads = (x @ w.reshape(8, 2, 4).reshape(8, 8)).astype(jnp.float32)
        return back + heads

    adapters = random_b(jlora.init(params, rank=2, targets=["query"]))
    assert_adapt_matches_merge(fn, params, adapters, normal(6, 3, 8))


def test_embedding_lookup_and_tied_head():
    params = plain_params()

    def fn(params, ids):
        table = params["emb"]["embedding"]
        h = jnp.take(table, ids, axis=0)
        return h @ table.T

    adapters = random_b(jlora.init(params, rank=4, targets=["emb"]))
    assert_adapt_matches_merge(fn, params, adapters, jnp.array([[0, 3, 10], [7, 7, 1]]))


def test_weight_used_elementwise():
    # Not a linear use: whatever adapt does with it, the result must be that of the merged weight.
    params = plain_params()

    def fn(params, x):
        w = params["layer"]["value"]["kernel"]
        return x @ w + jnp.sum(w**2) + jnp.max(jnp.abs(w), axis=0)

    adapters = random_b(jlora.init(params, rank=2, targets=["value"]))
    assert_adapt_matches_merge(fn, params, adapters, normal(7, 2, 8))


def test_dict_outputs_and_keyword_arguments():
    params = plain_params()

    def fn(params, x, *, scale):
        h = x @ params["layer"]["query"]["kernel"]
        return {"h": h * scale, "norm": jnp.linalg.norm(h, axis=-1)}

    adapters = random_b(jlora.init(params, rank=2))
    x = normal(8, 3, 8)
    got = jlora.adapt(fn)(params, adapters, x, scale=2.0)
    assert_trees_close(got, fn(jlora.merge(params, adapters), x, scale=2.0))


def test_under_jit_and_with_control_flow():
    params = plain_params()

    def fn(params, x):
        w = params["layer"]["query"]["kernel"]

        def step(h, _):
            return jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(step, x, None, length=3)
        return jax.lax.cond(h.sum() > 0, lambda h: h @ w, lambda h: -(h @ w), h)

    adapters = random_b(jlora.init(params, rank=2, targets=["query"]))
    x = normal(9, 2, 8)
    assert_adapt_matches_merge(fn, params, adapters, x)
    np.testing.assert_allclose(
        jax.jit(jlora.adapt(fn))(params, adapters, x), fn(jlora.merge(params, adapters), x), **TOL
    )


# --- Flax linen ----------------------------------------------------------------------------------


class Block(nn.Module):
    heads: int = 2
    head_dim: int = 4

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)  # kernel (d, h, hd)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(x)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(x)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out")(out)  # kernel (h, hd, d)
        return x + nn.Dense(d, name="mlp")(nn.gelu(nn.Dense(2 * d, name="fc")(nn.LayerNorm()(x))))


class LinenModel(nn.Module):
    vocab: int = 13
    d: int = 8

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.d, name="embed")
        x = embed(ids)
        x = Block(name="block_0")(x)
        return embed.attend(x)


def test_linen_dense_general_embedding_and_tied_head():
    model = LinenModel()
    ids = jnp.array([[1, 5, 12, 0], [3, 3, 8, 2]])
    variables = model.init(jax.random.key(0), ids)
    adapters = random_b(
        jlora.init(variables, rank=2, targets=["query", "value", "out", "embed", "fc"], in_axes={"out": 2})
    )
    assert adapters["params"]["block_0"]["out"]["kernel"].a.shape == (2, 4, 2)
    assert adapters["params"]["embed"]["embedding"].a.shape == (13, 2)
    assert_adapt_matches_merge(model.apply, variables, adapters, ids)


class ScannedLayers(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return x + nn.Dense(x.shape[-1], name="value")(jnp.tanh(nn.Dense(x.shape[-1], name="query")(x))), None

        scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
        x, _ = scanned(name="layers")(x, None)
        return x


def test_linen_scan_with_stacked_kernels():
    model = ScannedLayers()
    x = normal(10, 2, 6)
    variables = model.init(jax.random.key(1), x)
    assert variables["params"]["layers"]["query"]["kernel"].shape == (3, 6, 6)
    adapters = random_b(jlora.init(variables, rank=2, stack_axes=1))
    assert adapters["params"]["layers"]["query"]["kernel"].a.shape == (3, 6, 2)
    assert_adapt_matches_merge(model.apply, variables, adapters, x)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv")(x))
        return nn.Conv(4, (3, 3), strides=2, name="head")(x)


def test_linen_conv_kernel_with_three_input_axes():
    model = ConvNet()
    x = normal(11, 2, 5, 5, 3)
    variables = model.init(jax.random.key(2), x)
    adapters = random_b(jlora.init(variables, rank=3, targets=["conv", "head"], in_axes=3))
    assert adapters["params"]["conv"]["kernel"].a.shape == (3, 3, 3, 3)
    assert adapters["params"]["head"]["kernel"].b.shape == (3, 4)
    assert_adapt_matches_merge(model.apply, variables, adapters, x)


# --- Flax NNX ------------------------------------------------------------------------------------


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(6, 6, rngs=rngs)
        self.value = nnx.Linear(6, 6, rngs=rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.query(x)) * self.value(x))


def test_nnx_state():
    graphdef, state = nnx.split(NnxModel(nnx.Rngs(0)))
    adapters = random_b(jlora.init(state, rank=2))

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    assert_adapt_matches_merge(run, state, adapters, normal(12, 3, 6))


# --- adapters that do not fit --------------------------------------------------------------------


def test_adapters_for_other_params_are_rejected_with_the_path():
    params = plain_params()
    adapters = jlora.init(params, rank=2)

    def fn(params, x):
        return x @ params["layer"]["query"]["kernel"]

    x = normal(13, 2, 8)
    other = {"layer": {"query": params["layer"]["query"]}}
    with pytest.raises(ValueError, match=r"adapters for layer/value/kernel have no weight at that path in the params"):
        jlora.adapt(fn)(other, adapters, x)
    wrong = {**params, "layer": {**params["layer"], "value": {"kernel": normal(14, 8, 4)}}}
    with pytest.raises(
        ValueError, match=re.escape("adapter at 'layer/value/kernel' is for a weight of shape (8, 8), but the params have shape (8, 4) there")
    ):
        jlora.adapt(fn)(wrong, adapters, x)

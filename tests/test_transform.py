"""``jlora.adapt(fn)(params, adapters, *args) == fn(jlora.merge(params, adapters), *args)``, in values and
in gradients with respect to both params and adapters, for whatever way ``fn`` uses a weight; computed in
factored form, with fewer FLOPs than the merged weights."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from helpers import TOL, assert_adapt_equals_merge, assert_trees_close, normal, trained
from jlora.core.adapter import table

# --- plain functions of a nested dict ------------------------------------------------------------


def plain_params():
    return {
        "emb": {"embedding": normal(1, 11, 8)},
        "layer": {"query": {"kernel": normal(2, 8, 8), "bias": normal(3, 8)}, "value": {"kernel": normal(4, 8, 8)}},
    }


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_plain_matmuls():
    params = plain_params()

    def fn(params, x):
        layer = params["layer"]
        q = x @ layer["query"]["kernel"] + layer["query"]["bias"]
        v = jnp.einsum("bd,de->be", x, layer["value"]["kernel"])
        return jnp.tanh(q) * v

    adapters = trained(jlora.init(params, rank=3))
    assert_adapt_equals_merge(fn, params, adapters, normal(5, 4, 8))


def test_plain_jnp_mlp():
    params = {"w1": normal(0, 8, 32), "w2": normal(1, 32, 4)}
    mlp = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    adapters = trained(jlora.init(params, rank=2, targets=r"w\d"))
    assert_adapt_equals_merge(mlp, params, adapters, normal(2, 5, 8))


def test_weight_used_transposed_reshaped_and_twice():
    params = plain_params()

    def fn(params, x):
        w = params["layer"]["query"]["kernel"]
        h = jnp.tanh(x @ w)
        back = h @ w.T  # a tied use, contracting W's output axis
        heads = (x @ w.reshape(8, 2, 4).reshape(8, 8)).astype(jnp.float32)
        return back + heads

    adapters = trained(jlora.init(params, rank=2, targets=["query"]))
    assert_adapt_equals_merge(fn, params, adapters, normal(6, 3, 8))


def test_weight_used_elementwise():
    # Not a linear use: whatever adapt does with it, the result must be that of the merged weight.
    params = plain_params()

    def fn(params, x):
        w = params["layer"]["value"]["kernel"]
        return x @ w + jnp.sum(w**2) + jnp.max(jnp.abs(w), axis=0)

    adapters = trained(jlora.init(params, rank=2, targets=["value"]))
    assert_adapt_equals_merge(fn, params, adapters, normal(7, 2, 8), strict=False)


def test_dict_outputs_and_keyword_arguments():
    params = plain_params()

    def fn(params, x, *, scale):
        h = x @ params["layer"]["query"]["kernel"]
        return {"h": h * scale, "norm": jnp.linalg.norm(h, axis=-1)}

    adapters = trained(jlora.init(params, rank=2))
    x = normal(8, 3, 8)
    got = jlora.adapt(fn)(params, adapters, x, scale=2.0)
    chex.assert_trees_all_close(got, fn(jlora.merge(params, adapters), x, scale=2.0), rtol=TOL, atol=TOL, strict=True)


# --- control flow and transformations ------------------------------------------------------------


def test_under_jit_and_with_control_flow():
    params = plain_params()

    def fn(params, x):
        w = params["layer"]["query"]["kernel"]

        def step(h, _):
            return jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(step, x, None, length=3)
        return jax.lax.cond(h.sum() > 0, lambda h: h @ w, lambda h: -(h @ w), h)

    adapters = trained(jlora.init(params, rank=2, targets=["query"]))
    x = normal(9, 2, 8)
    assert_adapt_equals_merge(fn, params, adapters, x)
    np.testing.assert_allclose(
        jax.jit(jlora.adapt(fn))(params, adapters, x), fn(jlora.merge(params, adapters), x), rtol=TOL, atol=TOL
    )


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_nested_jit_checkpoint_cond_custom_vjp_and_fori():
    @jax.custom_vjp
    def double(x):
        return 2 * x

    double.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))

    @jax.jit
    def layer(w, x):
        return jnp.tanh(x @ w)

    def fn(p, x):
        h = jax.checkpoint(layer)(p["w"], x)
        h = double(h @ p["u"].T)  # the transposed use: x·Uᵀ
        h = jax.lax.cond(h.sum() > 0, lambda h: h @ p["w"], lambda h: -(h @ p["w"]), h)
        return jax.lax.fori_loop(0, 2, lambda i, h: jnp.sin(h @ p["w"]), h)

    params = {"w": normal(0, 6, 6) / 3, "u": normal(1, 6, 6) / 3}
    adapters = trained(jlora.init(params, rank=2, targets=["w", "u"]))
    assert_adapt_equals_merge(fn, params, adapters, normal(2, 3, 6))


# --- Flax linen ----------------------------------------------------------------------------------


class GPTBlock(nn.Module):
    """A GPT-2-style block with its four linear layers (fused qkv as in GPT-2's c_attn)."""

    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        t = x.shape[1]
        h = nn.LayerNorm(name="ln_1")(x)
        q, k, v = jnp.split(nn.Dense(3 * self.d, name="c_attn")(h), 3, axis=-1)
        split = lambda z: z.reshape(z.shape[0], t, self.heads, -1).transpose(0, 2, 1, 3)
        q, k, v = split(q), split(k), split(v)
        att = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        y = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(att), v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + nn.Dense(self.d, name="c_proj")(y)
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.Dense(4 * self.d, name="c_fc")(h)
        return x + nn.Dense(self.d, name="mlp_proj")(jax.nn.gelu(h))


class GPT(nn.Module):
    vocab: int = 50
    d: int = 16
    heads: int = 2
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(self.vocab, self.d, name="wte")
        x = wte(tokens) + self.param("wpe", nn.initializers.normal(0.02), (tokens.shape[1], self.d))
        for i in range(self.layers):
            x = GPTBlock(self.d, self.heads, name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


@pytest.fixture(scope="module")
def gpt():
    model = GPT()
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
    params = model.init(jax.random.key(0), tokens)
    return model, params, tokens


ALL_LINEAR = ["c_attn", "c_proj", "c_fc", "mlp_proj"]


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_gpt_all_linear_layers(gpt):
    model, params, tokens = gpt
    adapters = trained(jlora.init(params, rank=4, targets=ALL_LINEAR))
    assert len(table(adapters)) == 8
    assert_adapt_equals_merge(model.apply, params, adapters, tokens)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_tied_embedding_lookup_and_head(gpt):
    """One table used by a lookup and, transposed, as the output head: in plain jnp and in a linen GPT."""
    params = plain_params()

    def fn(params, ids):
        embedding = params["emb"]["embedding"]
        return jnp.take(embedding, ids, axis=0) @ embedding.T

    adapters = trained(jlora.init(params, rank=4, targets=["emb"]))
    assert_adapt_equals_merge(fn, params, adapters, jnp.array([[0, 3, 10], [7, 7, 1]]))

    model, params, tokens = gpt
    adapters = trained(jlora.init(params, rank=3, targets=["wte"]))
    assert list(table(adapters)) == ["params/wte/embedding"]
    assert_adapt_equals_merge(model.apply, params, adapters, tokens)


def test_at_init_output_is_unchanged(gpt):
    model, params, tokens = gpt
    adapters = jlora.init(params, rank=4, targets=ALL_LINEAR + ["wte"])
    np.testing.assert_array_equal(jlora.adapt(model.apply)(params, adapters, tokens), model.apply(params, tokens))


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_under_jit_grad_vmap_checkpoint(gpt):
    model, params, tokens = gpt
    adapters = trained(jlora.init(params, rank=4, targets=ALL_LINEAR))
    adapted = jlora.adapt(model.apply, strict=True)
    expected = model.apply(jlora.merge(params, adapters), tokens)
    assert_trees_close(jax.jit(adapted)(params, adapters, tokens), expected)
    assert_trees_close(jax.checkpoint(adapted)(params, adapters, tokens), expected)
    per_row = jax.vmap(lambda t: adapted(params, adapters, t[None])[0])(tokens)
    assert_trees_close(per_row, expected)
    loss = lambda a, f: jnp.mean(f(params, a, tokens) ** 2)
    assert_trees_close(
        jax.jit(jax.grad(loss), static_argnums=1)(adapters, adapted),
        jax.grad(lambda a: jnp.mean(model.apply(jlora.merge(params, a), tokens) ** 2))(adapters),
    )


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


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_dense_general_3d_kernels_embedding_and_tied_head():
    model = LinenModel()
    ids = jnp.array([[1, 5, 12, 0], [3, 3, 8, 2]])
    variables = model.init(jax.random.key(0), ids)
    adapters = trained(
        jlora.init(variables, rank=3, targets=["query", "value", "out", "embed", "fc"], in_axes={"out": 2})
    )
    found = table(adapters)
    chex.assert_shape(found["params/block_0/query/kernel"].b, (3, 2, 4))  # (rank, heads, head_dim)
    chex.assert_shape(found["params/block_0/out/kernel"].a, (2, 4, 3))  # (heads, head_dim, rank)
    chex.assert_shape(found["params/embed/embedding"].a, (13, 3))
    assert_adapt_equals_merge(model.apply, variables, adapters, ids)


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


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_scan_over_stacked_layers():
    model = ScannedLayers()
    x = normal(10, 2, 6)
    variables = model.init(jax.random.key(1), x)
    chex.assert_shape(variables["params"]["layers"]["query"]["kernel"], (3, 6, 6))
    adapters = trained(jlora.init(variables, rank=2, stack_axes=1))
    lora = table(adapters)["params/layers/query/kernel"]
    chex.assert_shape(lora.a, (3, 6, 2))
    chex.assert_shape(lora.b, (3, 2, 6))
    assert_adapt_equals_merge(model.apply, variables, adapters, x)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv")(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, name="strided")(x))
        return nn.Conv(4, (3, 3), strides=2, padding="VALID", name="head")(x)


def test_conv_kernels_with_three_input_axes():
    model = ConvNet()
    x = normal(11, 2, 9, 9, 3)
    variables = model.init(jax.random.key(2), x)
    adapters = trained(jlora.init(variables, rank=2, targets=["conv", "strided", "head"], in_axes=3))
    found = table(adapters)
    chex.assert_shape(found["params/conv/kernel"].a, (3, 3, 3, 2))
    chex.assert_shape(found["params/head/kernel"].b, (2, 4))
    assert_adapt_equals_merge(model.apply, variables, adapters, x)


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
    adapters = trained(jlora.init(state, rank=2))
    assert sorted(table(adapters)) == ["query/kernel", "value/kernel"]

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    assert_adapt_equals_merge(run, state, adapters, normal(12, 3, 6))


# --- fallbacks, dropout, and adapters that do not fit --------------------------------------------


def test_unrecognised_use_falls_back_with_warning_or_raises_when_strict():
    params = {"w": jnp.ones((4, 4))}
    adapters = trained(jlora.init(params, rank=2, targets=["w"]))
    fn = lambda p, x: x @ jnp.exp(p["w"])  # exp of a weight has no factored form
    with pytest.warns(UserWarning, match=r"'?w'? used by `exp`"):
        out = jlora.adapt(fn)(params, adapters, jnp.ones((2, 4)))
    np.testing.assert_allclose(out, fn(jlora.merge(params, adapters), jnp.ones((2, 4))), rtol=1e-6)
    with pytest.raises(ValueError, match=r"w used by `exp`, which has no factored rule; that use gets the merged weight "
                                         r"W0 \+ ΔW \(strict=True\): the result is still equal to the merged model's, only "
                                         r"that use is not factored; pass strict=False to accept it, or use the weight "
                                         r"through a matmul .*jax.make_jaxpr\(fn\)"):
        jlora.adapt(fn, strict=True)(params, adapters, jnp.ones((2, 4)))


def test_lora_dropout_only_with_rng():
    params = {"w": jnp.zeros((64, 64))}
    adapters = jlora.init(params, rank=4, targets=["w"])
    adapters["w"] = jlora.LoRA(jnp.ones((64, 4)), jnp.ones((4, 64)), alpha=4.0)  # scaling alpha / r = 1
    x = jnp.ones((1, 64))
    adapted = jlora.adapt(lambda p, x: x @ p["w"], dropout=0.5)
    np.testing.assert_array_equal(adapted(params, adapters, x), jnp.full((1, 64), 256.0))
    dropped = adapted(params, adapters, x, lora_rng=jax.random.key(0))
    # Each input survives with p=0.5 scaled by 2, so every output is 8·(survivors).
    survivors = float(dropped[0, 0]) / 8
    assert survivors == int(survivors) and 16 <= survivors <= 48
    np.testing.assert_array_equal(dropped, jnp.full((1, 64), dropped[0, 0]))
    assert not np.array_equal(dropped, adapted(params, adapters, x, lora_rng=jax.random.key(1)))


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_adapters_that_do_not_fit_are_refused_with_the_path(gpt):
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

    # Adapters of a narrower model: the path and both shapes are named.
    model, params, tokens = gpt
    narrower = jlora.init(GPT(d=8).init(jax.random.key(0), tokens), rank=2, targets=["c_attn"])
    with pytest.raises(ValueError, match=r"params/h_0/c_attn/kernel.*shape \(8, 24\).*\(16, 48\)"):
        jlora.adapt(model.apply)(params, narrower, tokens)


# --- cost ----------------------------------------------------------------------------------------


def _train_step(model, params, adapters, tokens, factored):
    apply = jlora.adapt(model.apply) if factored else (lambda p, a, t: model.apply(jlora.merge(p, a), t))

    def loss(adapters):
        logits = apply(params, adapters, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    return jax.value_and_grad(loss)(adapters)


def _flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_factored_step_needs_fewer_flops_than_merged():
    model = GPT(vocab=64, d=64, heads=4, layers=2)
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 64)
    params = model.init(jax.random.key(0), tokens)
    adapters = jlora.init(params, rank=4, targets=ALL_LINEAR)
    factored = _flops(lambda p, a, t: _train_step(model, p, a, t, True), params, adapters, tokens)
    merged = _flops(lambda p, a, t: _train_step(model, p, a, t, False), params, adapters, tokens)
    assert factored < merged, (factored, merged)

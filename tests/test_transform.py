"""jlora.adapt computes fn∘merge in factored form: same values and gradients, fewer FLOPs."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora

TOL = 1e-5


def randomize(adapters, scale=0.3, seed=0):
    """Non-zero A and B so the adapters change the output."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def assert_trees_close(a, b, tol=TOL):
    """Each leaf of ``a`` within ``tol`` of ``b``, relative to the leaf's largest magnitude (at least 1):
    float32 sums of many terms round at that scale whichever order they are added in."""

    def check(path, x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (jax.tree_util.keystr(path), x.shape, y.shape)
        error = np.max(np.abs(x - y), initial=0.0) / max(1.0, np.max(np.abs(y), initial=0.0))
        assert error <= tol, f"{jax.tree_util.keystr(path)}: scaled error {error:.2e} > {tol:.0e}"

    jax.tree_util.tree_map_with_path(check, a, b)


def assert_adapt_equals_merge(fn, params, adapters, *args, grads=True):
    """Values and gradients (w.r.t. params and adapters) of adapt(fn) and fn∘merge agree."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every use here must have a factored rule
        adapted = jlora.adapt(fn, strict=True)
        assert_trees_close(adapted(params, adapters, *args), fn(jlora.merge(params, adapters), *args))
        if not grads:
            return

        def scalar(tree):
            return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(tree))

        g_factored = jax.grad(lambda p, a: scalar(adapted(p, a, *args)), argnums=(0, 1))(params, adapters)
        g_merged = jax.grad(lambda p, a: scalar(fn(jlora.merge(p, a), *args)), argnums=(0, 1))(params, adapters)
        assert_trees_close(g_factored, g_merged)


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


def test_gpt_all_linear_layers(gpt):
    model, params, tokens = gpt
    adapters = randomize(jlora.init(params, rank=4, targets=ALL_LINEAR))
    assert len(jlora.adapter.table(adapters)) == 8
    assert_adapt_equals_merge(model.apply, params, adapters, tokens)


def test_tied_embedding_lookup_and_head(gpt):
    model, params, tokens = gpt
    adapters = randomize(jlora.init(params, rank=3, targets=["wte"]))
    assert list(jlora.adapter.table(adapters)) == ["params/wte/embedding"]
    assert_adapt_equals_merge(model.apply, params, adapters, tokens)


def test_at_init_output_is_unchanged(gpt):
    model, params, tokens = gpt
    adapters = jlora.init(params, rank=4, targets=ALL_LINEAR + ["wte"])
    np.testing.assert_array_equal(jlora.adapt(model.apply)(params, adapters, tokens), model.apply(params, tokens))


def test_dense_general_attention_3d_kernels():
    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.DenseGeneral((4, 8), name="query")(x)
            v = nn.DenseGeneral((4, 8), name="value")(x)
            att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, q))
            return nn.DenseGeneral(32, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", att, v))

    model, x = Attention(), jax.random.normal(jax.random.key(2), (2, 5, 32))
    params = model.init(jax.random.key(0), x)
    adapters = randomize(jlora.init(params, rank=4, targets=["query", "value", "out"], in_axes={"out": 2}))
    table = jlora.adapter.table(adapters)
    assert table["params/query/kernel"].b.shape == (4, 4, 8)
    assert table["params/out/kernel"].a.shape == (4, 8, 4)
    assert_adapt_equals_merge(model.apply, params, adapters, x)


def test_scan_over_stacked_layers():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(16, name="query")(x)) + nn.Dense(16, name="value")(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scanned(name="layers")(x, None)[0]

    model, x = Stack(), jax.random.normal(jax.random.key(2), (4, 16))
    params = model.init(jax.random.key(0), x)
    adapters = randomize(jlora.init(params, rank=2, stack_axes=1))
    lora = jlora.adapter.table(adapters)["params/layers/query/kernel"]
    assert (lora.a.shape, lora.b.shape) == ((3, 16, 2), (3, 2, 16))
    assert_adapt_equals_merge(model.apply, params, adapters, x)


def test_conv_kernels():
    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
            return nn.Conv(4, (3, 3), strides=2, padding="VALID", name="conv2")(x)

    model, x = ConvNet(), jax.random.normal(jax.random.key(2), (2, 9, 9, 3))
    params = model.init(jax.random.key(0), x)
    adapters = randomize(jlora.init(params, rank=2, targets=["conv1", "conv2"], in_axes=3))
    assert jlora.adapter.table(adapters)["params/conv1/kernel"].a.shape == (3, 3, 3, 2)
    assert_adapt_equals_merge(model.apply, params, adapters, x)


def test_nnx_model():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(8, 16, rngs=rngs)
            self.value = nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, x):
            return self.value(nnx.relu(self.query(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (3, 8))
    adapters = randomize(jlora.init(state, rank=2))
    assert sorted(jlora.adapter.table(adapters)) == ["query/kernel", "value/kernel"]
    assert_adapt_equals_merge(lambda s, x: nnx.merge(graphdef, s)(x), state, adapters, x)


def test_plain_jnp_mlp():
    params = {"w1": jax.random.normal(jax.random.key(0), (8, 32)), "w2": jax.random.normal(jax.random.key(1), (32, 4))}
    x = jax.random.normal(jax.random.key(2), (5, 8))
    mlp = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    adapters = randomize(jlora.init(params, rank=2, targets=r"w\d"))
    assert_adapt_equals_merge(mlp, params, adapters, x)


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

    params = {"w": jax.random.normal(jax.random.key(0), (6, 6)) / 3, "u": jax.random.normal(jax.random.key(1), (6, 6)) / 3}
    adapters = randomize(jlora.init(params, rank=2, targets=["w", "u"]))
    assert_adapt_equals_merge(fn, params, adapters, jax.random.normal(jax.random.key(2), (3, 6)))


def test_under_jit_grad_vmap_checkpoint(gpt):
    model, params, tokens = gpt
    adapters = randomize(jlora.init(params, rank=4, targets=ALL_LINEAR))
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


def test_unrecognised_use_falls_back_with_warning_or_raises_when_strict():
    params = {"w": jnp.ones((4, 4))}
    adapters = randomize(jlora.init(params, rank=2, targets=["w"]))
    fn = lambda p, x: x @ jnp.exp(p["w"])  # exp of a weight has no factored form
    with pytest.warns(UserWarning, match=r"'?w'? used by `exp`"):
        out = jlora.adapt(fn)(params, adapters, jnp.ones((2, 4)))
    np.testing.assert_allclose(out, fn(jlora.merge(params, adapters), jnp.ones((2, 4))), rtol=1e-6)
    with pytest.raises(ValueError, match=r"w used by `exp`.*strict=True"):
        jlora.adapt(fn, strict=True)(params, adapters, jnp.ones((2, 4)))


def test_mismatched_adapters_are_refused(gpt):
    model, params, tokens = gpt
    other = jlora.init(GPT(d=8).init(jax.random.key(0), tokens), rank=2, targets=["c_attn"])
    with pytest.raises(ValueError, match=r"params/h_0/c_attn/kernel.*shape \(8, 24\).*\(16, 48\)"):
        jlora.adapt(model.apply)(params, other, tokens)


def test_lora_dropout_only_with_rng():
    params = {"w": jnp.zeros((64, 64))}
    adapters = jlora.init(params, rank=4, targets=["w"])
    adapters["w"] = jlora.LoRA(jnp.ones((64, 4)), jnp.ones((4, 64)), 1.0)
    x = jnp.ones((1, 64))
    adapted = jlora.adapt(lambda p, x: x @ p["w"], dropout=0.5)
    np.testing.assert_array_equal(adapted(params, adapters, x), jnp.full((1, 64), 256.0))
    dropped = adapted(params, adapters, x, lora_rng=jax.random.key(0))
    # Each input survives with p=0.5 scaled by 2, so every output is 8·(survivors).
    survivors = float(dropped[0, 0]) / 8
    assert survivors == int(survivors) and 16 <= survivors <= 48
    np.testing.assert_array_equal(dropped, jnp.full((1, 64), dropped[0, 0]))
    assert not np.array_equal(dropped, adapted(params, adapters, x, lora_rng=jax.random.key(1)))


def _train_step(model, params, adapters, tokens, factored):
    apply = jlora.adapt(model.apply) if factored else (lambda p, a, t: model.apply(jlora.merge(p, a), t))

    def loss(adapters):
        logits = apply(params, adapters, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    return jax.value_and_grad(loss)(adapters)


def _flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_factored_step_needs_fewer_flops_than_merged():
    model = GPT(vocab=64, d=64, heads=4, layers=2)
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 64)
    params = model.init(jax.random.key(0), tokens)
    adapters = jlora.init(params, rank=4, targets=ALL_LINEAR)
    factored = _flops(lambda p, a, t: _train_step(model, p, a, t, True), params, adapters, tokens)
    merged = _flops(lambda p, a, t: _train_step(model, p, a, t, False), params, adapters, tokens)
    assert factored < merged, (factored, merged)

"""jlora.quantize: the formats' round-trip error and bytes, and a quantised base under adapt, merge and the train step."""

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.quant.quantize import NF4, nbytes, stack, unstack
from jlora import training as train
from jlora.models import layers
from helpers import assert_trees_close, normal, trained
from tiny import LLAMA_LINEAR, jax_model

# QLoRA (Dettmers et al., 2023), Appendix E: the NF4 data type's 16 values.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0]


def test_nf4_levels_are_the_papers_table():
    assert NF4.tolist() == np.float32(PAPER_NF4).tolist()
    # Weights that are levels times their block's absmax come back exactly (every absmax 2, their mean
    # 2, survive the double quantisation exactly).
    levels = jnp.asarray(np.tile(NF4, 4)).reshape(64, 1) * jnp.array([[2.0, 2.0]])
    np.testing.assert_array_equal(jlora.dequantize(jlora.quantize({"w": levels}, "nf4"))["w"], levels)


@pytest.mark.parametrize("fmt, bound", [
    ("nf4", lambda absmax: absmax * (1 - 0.6961928009986877) / 2),  # half the widest gap, -1 to -0.696
    ("int4", lambda absmax: absmax / 7 / 2),
    ("int8", lambda absmax: absmax / 127 / 2),
])
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_round_trip_error_is_within_half_a_step_of_each_block(fmt, bound):
    w = normal(0, 256, 48)
    back = jlora.dequantize(jlora.quantize({"w": w}, fmt, block_size=64))["w"]
    assert back.shape == w.shape and back.dtype == w.dtype
    # Blocks run along axis 0 (the input axis); int8's one block is the whole column.
    size = 256 if fmt == "int8" else 64
    absmax = jnp.repeat(jnp.max(jnp.abs(w.reshape(-1, size, 48)), axis=1), size, axis=0)
    error = jnp.abs(back - w)
    # nf4's absmaxes are themselves int8 codes, within half a step of their own (mean-centred) scale.
    slack = jnp.max(jnp.abs(absmax - jnp.mean(absmax))) / 127 / 2 if fmt == "nf4" else 0.0
    slack = slack + 1e-6 * absmax
    assert bool(jnp.all(error <= bound(absmax) + slack))
    assert float(jnp.mean(error)) > 0  # it is lossy: the bound is not met by returning w


def test_packed_bytes():
    w = normal(1, 512, 32, dtype=jnp.bfloat16)
    nf4, int4, int8 = (jlora.quantize({"w": w}, f)["w"] for f in ("nf4", "int4", "int8"))
    blocks = 512 // 64 * 32
    assert nf4.arrays["values"].shape == (32, 8, 32) and nf4.arrays["values"].dtype == jnp.uint8
    # 4 bits a value; one int8 absmax a block (padded to 256), one float32 per 256 of those, the offset.
    assert nf4.nbytes == 512 * 32 // 2 + 256 + 4 + 4
    assert int4.nbytes == 512 * 32 // 2 + 4 * blocks
    assert int8.nbytes == 512 * 32 + 4 * 32
    assert nbytes({"w": nf4, "b": jnp.zeros(32)}) == nf4.nbytes + 128
    assert w.nbytes / nf4.nbytes > 3.6


def test_default_targets_skip_vectors_and_keep_dtype():
    matrix, vector = jnp.ones((32, 32), jnp.bfloat16), jnp.ones(32, jnp.bfloat16)
    params = {"embed": {"embedding": matrix}, "norm": {"scale": vector, "weight": vector},
              "attn": {"kernel": matrix, "bias": vector}, "out": {"kernel": matrix, "bias": jnp.ones((2, 32))}}
    qparams = jlora.quantize(params, "nf4", block_size=16)
    quantized = {p for p, leaf in jlora.paths.leaves(qparams) if isinstance(leaf, jlora.Quantized)}
    assert quantized == {"embed/embedding", "attn/kernel", "out/kernel"}  # never a bias (even a matrix) or norm
    assert qparams["out"]["bias"] is params["out"]["bias"] and qparams["norm"]["weight"] is vector
    assert jlora.dequantize(qparams)["attn"]["kernel"].dtype == jnp.bfloat16


def test_embedding_rows_get_their_own_scales():
    # Token rows of very different norms (frequent vs rare tokens): blocks along each row keep every
    # row's relative error at the format's; blocks along the vocabulary let a large row's scale crush
    # the small rows to zero. (int4: plain float32 scales, so only the block axis differs.)
    rows = jax.random.normal(jax.random.key(1), (128, 64)) * jnp.logspace(0, -3, 128)[:, None]
    params = {"embed": {"embedding": rows}, "proj": {"kernel": rows}}
    qparams = jlora.quantize(params, "int4")
    assert (qparams["embed"]["embedding"].axis, qparams["proj"]["kernel"].axis) == (1, 0)
    assert jlora.quantize(params, "nf4")["embed"]["embedding"].axis == 1
    row_error = lambda back: jnp.linalg.norm(back - rows, axis=1) / jnp.linalg.norm(rows, axis=1)
    by_row = row_error(jlora.dequantize(qparams)["embed"]["embedding"])
    by_vocab = row_error(jlora.dequantize(jlora.quantize(params, "int4", axis=-2))["embed"]["embedding"])
    assert float(by_row.max()) < 0.16 and float(by_vocab.max()) == 1.0


def test_bad_format_and_block_size_are_named():
    params = {"mlp": {"kernel": jnp.ones((48, 16))}}
    with pytest.raises(ValueError, match=r"unknown quantisation format 'nf5'; choose one of nf4, int4, int8"):
        jlora.quantize(params, "nf5")
    with pytest.raises(ValueError, match=r"'mlp/kernel' \(shape \(48, 16\)\) to nf4 in blocks of 64 along axis 0 "
                                         r"\(length 48\): block_size must be an even integer >= 2 that divides 48"):
        jlora.quantize(params, "nf4")
    with pytest.raises(ValueError, match=r"target 'mlp/bias' is not a floating-point matrix \(shape \(16,\), dtype float32\)"):
        jlora.quantize({"mlp": {"bias": jnp.ones(16)}}, "int4", targets="mlp/bias")


@pytest.fixture(scope="module")
def quantized_llama():
    model, variables, tokens = jax_model("llama")
    qparams = jlora.quantize(variables, "nf4", block_size=16)
    adapters = trained(jlora.init(qparams, rank=4, targets=LLAMA_LINEAR))
    return model, qparams, adapters, tokens


def test_adapt_on_a_quantised_base_equals_the_dequantised_merge(quantized_llama):
    model, qparams, adapters, tokens = quantized_llama
    adapted = jax.jit(jlora.adapt(model.apply, strict=True))
    merged = jax.jit(lambda qp, a: model.apply(jlora.merge(qp, a), tokens))
    want = merged(qparams, adapters)
    # The embedding and output head are quantised and have no adapter: they are used dequantised.
    assert_trees_close(adapted(qparams, adapters, tokens), want)
    loss = lambda f: lambda a: jnp.sum(jnp.sin(f(a)))
    got_grads = jax.jit(jax.grad(loss(lambda a: jlora.adapt(model.apply)(qparams, a, tokens))))(adapters)
    want_grads = jax.jit(jax.grad(loss(lambda a: merged(qparams, a))))(adapters)
    assert_trees_close(got_grads, want_grads)
    assert any(np.any(g) for g in jax.tree.leaves(got_grads))


def test_the_backward_pass_recomputes_the_dense_weight(quantized_llama, capsys):
    # Under jax.grad, what a quantised use keeps for the backward pass is its inputs (packed codes,
    # x, the factors): the dense weight is dequantised again inside the remat'd use.
    model, qparams, adapters, tokens = quantized_llama
    kernel = qparams["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    jax.ad_checkpoint.print_saved_residuals(lambda a: jnp.sum(jlora.adapt(model.apply)(qparams, a, tokens)), adapters)
    saved = capsys.readouterr().out
    assert "u8[48,2,8]" in saved  # the up and gate projections' packed codes, (out, in / 16, 16 / 2)
    assert "f32[32,48]" not in saved and "f32[48,32]" not in saved


def test_the_train_step_holds_the_quantised_bytes(quantized_llama):
    model, qparams, _, tokens = quantized_llama
    _, variables, _ = jax_model("llama")
    config = train.TrainConfig(batch_size=2, max_steps=2)
    step = train.make_step(model.apply, config)
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": jnp.ones_like(tokens)}

    def argument_bytes(params):
        adapters = jlora.init(params, rank=4, targets=LLAMA_LINEAR)
        frozen, trainable = jlora.split(params, adapters)
        state = train.init_state(trainable, config)
        return step.lower(state, frozen, batch).compile().memory_analysis().argument_size_in_bytes

    dense_bytes, quantized_bytes = nbytes(variables), nbytes(qparams)
    assert quantized_bytes < dense_bytes / 3
    assert argument_bytes(variables) - argument_bytes(qparams) == dense_bytes - quantized_bytes


def test_count_params_counts_a_quantised_weight_by_its_shape_and_bytes():
    params = {"mlp": {"kernel": jnp.ones((128, 32)), "bias": jnp.zeros(32)}}
    qparams = jlora.quantize(params, "int4", block_size=32)
    adapters = jlora.init(qparams, rank=4, targets=["mlp"])
    counted = jlora.count_params(qparams, adapters)
    adapter_values = 128 * 4 + 4 * 32
    assert counted.total == 128 * 32 + 32 + adapter_values
    assert counted.total_bytes == 128 * 32 // 2 + 4 * 4 * 32 + 4 * 32 + 4 * adapter_values  # codes, scales, bias, A, B
    assert counted.trainable == adapter_values


# ---- stacked layers (nn.scan): a quantised base stacks per layer and is dequantised one layer at a time ----


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_stacked_quantized_weights_unstack_to_the_same_arrays_and_dequantise_per_layer():
    model, variables, _ = jax_model("llama")
    qparams = jlora.quantize(variables, "nf4", block_size=16)
    stacked = layers.stack_layers(qparams)
    kernel = stacked["params"]["layers"]["mlp"]["up_proj"]["kernel"]
    one = qparams["params"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert (kernel.shape, kernel.axis, kernel.lead, one.lead) == ((2, 32, 48), 1, 1, 0)
    assert kernel.arrays["values"].shape == (2, 48, 2, 8) and kernel.arrays["scale_offset"].shape == (2,)
    assert kernel.nbytes == 2 * one.nbytes and nbytes(stacked) == nbytes(qparams)
    assert repr(kernel) == f"Quantized(nf4, shape=(2, 32, 48), dtype=float32, lead=1, {2 * one.nbytes} bytes)"
    back = layers.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(qparams)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(got, want)
    # Each layer dequantises with its own scales: the stack's dense weight is the layers' stacked.
    np.testing.assert_array_equal(jlora.dequantize(stacked)["params"]["layers"]["mlp"]["up_proj"]["kernel"][1],
                                  one.dense())
    assert_trees_close(jlora.dequantize(stacked), layers.stack_layers(jlora.dequantize(qparams)), tol=0)


def test_quantising_a_stacked_tree_per_layer_equals_quantising_the_layers_then_stacking():
    _, variables, _ = jax_model("llama")
    want = layers.stack_layers(jlora.quantize(variables, "nf4", block_size=16))
    got = jlora.quantize(layers.stack_layers(variables), "nf4", block_size=16, stack_axes={"layers": 1})
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # The stacked norms (2, 32) are each layer's vector: left as they are.
    assert got["params"]["layers"]["input_layernorm"]["weight"].shape == (2, 32)
    with pytest.raises(ValueError, match=r"cannot quantise 'layers/norm' \(shape \(2, 32\)\) with stack_axes=1: "
                                         r"each layer's weight must keep 2 or more axes"):
        jlora.quantize({"layers": {"norm": jnp.ones((2, 32))}}, "int8", targets="layers/norm", stack_axes=1)
    with pytest.raises(ValueError, match=r"no stacked layer axis"):
        unstack(jlora.quantize({"w": jnp.ones((32, 32))}, block_size=16)["w"], "w")
    with pytest.raises(ValueError, match=r"cannot stack the layers' quantised weights at 'w': they differ"):
        stack([jlora.quantize({"w": jnp.ones((32, 32))}, f, block_size=16)["w"] for f in ("nf4", "int4")], "w")


@pytest.fixture(scope="module")
def scanned_quantized_llama(quantized_llama):
    model, qparams, adapters, tokens = quantized_llama
    return model.clone(scan=True, remat="full"), layers.stack_layers(qparams), layers.stack_layers(adapters)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_a_scanned_quantised_base_equals_the_unrolled_one_and_the_dequantised_merge(quantized_llama,
                                                                                    scanned_quantized_llama):
    model, qparams, adapters, tokens = quantized_llama
    scanned, qstacked, stacked_adapters = scanned_quantized_llama
    got = jax.jit(jlora.adapt(scanned.apply, strict=True))(qstacked, stacked_adapters, tokens)
    assert_trees_close(got, jlora.adapt(model.apply, strict=True)(qparams, adapters, tokens), tol=1e-5)
    assert_trees_close(got, model.apply(jlora.merge(qparams, adapters), tokens), tol=1e-5)
    assert_trees_close(layers.unstack_layers(jlora.merge(qstacked, stacked_adapters)), jlora.merge(qparams, adapters))
    loss = lambda f: jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(f(a)))))
    got_grads = loss(lambda a: jlora.adapt(scanned.apply, strict=True)(qstacked, a, tokens))(stacked_adapters)
    want_grads = loss(lambda a: model.apply(jlora.merge(qparams, a), tokens))(adapters)
    assert_trees_close(layers.unstack_layers(got_grads), want_grads)
    assert any(np.any(g) for g in jax.tree.leaves(got_grads))


def test_each_scan_iteration_dequantises_its_own_layer_only(scanned_quantized_llama, capsys):
    scanned, qstacked, stacked_adapters = scanned_quantized_llama
    tokens = jnp.zeros((2, 8), jnp.int32)
    adapted = lambda a: jnp.sum(jlora.adapt(scanned.apply)(qstacked, a, tokens))
    text = str(jax.make_jaxpr(jax.grad(adapted))(stacked_adapters))
    assert "f32[32,48]" in text  # one layer's dense up/gate projection, inside the scan's body
    assert "f32[2,32,48]" not in text and "f32[2,48,32]" not in text  # never the stack's
    jax.ad_checkpoint.print_saved_residuals(adapted, stacked_adapters)
    saved = capsys.readouterr().out
    assert "u8[2,48,2,8]" in saved and "f32[32,48]" not in saved  # the stacked codes are kept, not dense weights


def test_the_scanned_train_step_holds_the_quantised_bytes(scanned_quantized_llama):
    scanned, qstacked, _ = scanned_quantized_llama
    _, variables, tokens = jax_model("llama")
    config = train.TrainConfig(batch_size=2, max_steps=2)
    step = train.make_step(scanned.apply, config)
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": jnp.ones_like(tokens)}

    def argument_bytes(params):
        adapters = jlora.init(params, rank=4, targets=LLAMA_LINEAR, stack_axes={"layers": 1})
        frozen, trainable = jlora.split(params, adapters)
        state = train.init_state(trainable, config)
        return step.lower(state, frozen, batch).compile().memory_analysis().argument_size_in_bytes

    dense = layers.stack_layers(variables)
    assert argument_bytes(dense) - argument_bytes(qstacked) == nbytes(dense) - nbytes(qstacked)

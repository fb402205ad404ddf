import jax
import jax.numpy as jnp
import pytest

import jlora

D, LAYERS, VOCAB, POSITIONS = 768, 12, 50257, 1024


def gpt2_small_shapes(dtype=jnp.float32):
    """GPT-2 small's parameter tree with Hugging Face's names, as shapes only."""

    def w(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def norm():
        return {"scale": w(D), "bias": w(D)}

    params = {"wte": {"embedding": w(VOCAB, D)}, "wpe": {"embedding": w(POSITIONS, D)}, "ln_f": norm()}
    for i in range(LAYERS):
        params[f"h_{i}"] = {
            "ln_1": norm(),
            "attn": {"c_attn": {"kernel": w(D, 3 * D), "bias": w(3 * D)}, "c_proj": {"kernel": w(D, D), "bias": w(D)}},
            "ln_2": norm(),
            "mlp": {"c_fc": {"kernel": w(D, 4 * D), "bias": w(4 * D)}, "c_proj": {"kernel": w(4 * D, D), "bias": w(D)}},
        }
    return {"params": params}


GPT2_SMALL_TOTAL = 124_439_808  # Hugging Face's count for `gpt2` (tied head)


def test_gpt2_small_tree_has_gpt2_small_size():
    params = gpt2_small_shapes()
    assert sum(x.size for x in jax.tree.leaves(params)) == GPT2_SMALL_TOTAL


def test_gpt2_small_r8_on_c_attn_trains_294912_params():
    params = gpt2_small_shapes()
    adapters = jlora.init(params, rank=8, targets=["c_attn"])
    count = jlora.count_params(params, adapters)
    assert count.trainable == 294_912 == LAYERS * 8 * (D + 3 * D)
    assert count.total == GPT2_SMALL_TOTAL + 294_912
    assert count.trainable_bytes == 4 * 294_912
    assert count.total_bytes == 4 * (GPT2_SMALL_TOTAL + 294_912)
    # The default targets find c_attn too.
    assert jlora.count_params(params, jlora.init(params, rank=8)).trainable == 294_912


def test_count_str_reads_like_peft():
    params = gpt2_small_shapes()
    count = jlora.count_params(params, jlora.init(params, rank=8, targets=["c_attn"]))
    assert str(count) == (
        "trainable params: 294,912 (1,179,648 bytes) || all params: 124,734,720 (498,938,880 bytes) "
        "|| trainable: 0.2364%"
    )


@pytest.mark.parametrize(
    "bias, extra",
    [
        ("none", 0),
        ("lora_only", LAYERS * 3 * D),  # the c_attn biases
        # every bias: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj per layer, and ln_f
        ("all", LAYERS * (D + 3 * D + D + D + 4 * D + D) + D),
    ],
)
def test_bias_modes_add_exactly_their_biases(bias, extra):
    params = gpt2_small_shapes()
    adapters = jlora.init(params, rank=8, targets=["c_attn"])
    count = jlora.count_params(params, adapters, bias=bias)
    assert count.trainable == 294_912 + extra
    assert count.total == GPT2_SMALL_TOTAL + 294_912  # unfreezing a bias does not add parameters
    assert count.trainable_bytes == 4 * (294_912 + extra)


def test_bytes_follow_each_leafs_dtype():
    params = gpt2_small_shapes(jnp.bfloat16)
    adapters = jlora.init(params, rank=8, targets=["c_attn"])  # float32 factors on a bfloat16 base
    count = jlora.count_params(params, adapters, bias="lora_only")
    assert count.trainable_bytes == 4 * 294_912 + 2 * LAYERS * 3 * D
    assert count.total_bytes == 2 * GPT2_SMALL_TOTAL + 4 * 294_912


def test_rank_pattern_changes_the_count():
    params = gpt2_small_shapes()
    adapters = jlora.init(params, rank=8, targets=["c_attn"], rank_pattern={"h_0": 2})
    assert jlora.count_params(params, adapters).trainable == 11 * 8 * 4 * D + 2 * 4 * D


def test_stacked_layers_count_every_layer():
    params = {"query": {"kernel": jnp.zeros((LAYERS, 64, 32))}}
    adapters = jlora.init(params, rank=4, stack_axes=1)
    assert jlora.count_params(params, adapters).trainable == LAYERS * 4 * (64 + 32)


def test_adapters_of_another_model_are_refused():
    params = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    other = jlora.init({"q_proj": {"kernel": jnp.ones((8, 16))}}, rank=2)
    with pytest.raises(ValueError, match=r"adapter at 'q_proj/kernel' is for a weight of shape \(8, 16\), but the params have shape \(8, 8\)"):
        jlora.count_params(params, other)

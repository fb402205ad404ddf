"""The adapter protocol and kind registry: a new kind is one class, and every part of jlora takes it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import cli
from jlora.core import adapter, paths
from jlora.training import checkpoint
from jlora.interop import peft
from jlora import training as train
from jlora.core.adapter import Adapter


# ---- a new adapter kind, written as a user would: this class is all it takes ----


@functools.partial(jax.tree_util.register_dataclass, data_fields=["gate"], meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class Gate(Adapter, name="test-gate"):
    """W = W0 · (1 + g): one trained scalar per weight."""

    gate: jax.Array
    shape: tuple

    @classmethod
    def create(cls, params, targets=("head",)):
        chosen = paths.select(params, list(targets))
        return paths.nest({p: cls(jnp.zeros(()), tuple(w.shape)) for p, w in chosen.items()})

    @property
    def kernel_shape(self):
        return self.shape

    def merge(self, w):
        return (w * (1.0 + self.gate)).astype(w.dtype)

    def unmerge(self, w):
        return (w / (1.0 + self.gate)).astype(w.dtype)


# ---- a tiny language model for it ----

VOCAB, WIDTH = 16, 8


def apply_fn(params, tokens):
    return jnp.take(params["embed"], tokens, axis=0) @ params["head"]["kernel"]


def tiny():
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"embed": jax.random.normal(keys[0], (VOCAB, WIDTH)), "head": {"kernel": jax.random.normal(keys[1], (WIDTH, VOCAB))}}
    tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, VOCAB)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((8, 8))}
    return params, batch


def test_a_new_kind_registers_itself_and_the_command_line_offers_it():
    assert adapter.KINDS["test-gate"] is Gate and Gate.name == "test-gate"
    assert adapter.kind("test-gate") is Gate
    method = next(a for a in cli.parser()._subparsers._group_actions[0].choices["finetune"]._actions if a.dest == "method")
    assert "test-gate" in method.choices and {"lora", "dora", "ia3"} <= set(method.choices)


def test_a_new_kind_trains_merges_counts_and_checkpoints_with_no_template(tmp_path):
    params, batch = tiny()
    adapters = Gate.create(params)
    assert jlora.count_params(params, adapters).trainable == 1
    config = train.TrainConfig(max_steps=3, warmup_steps=0, batch_size=8, learning_rate=0.1)
    frozen, trainable = jlora.split(params, adapters)
    step = train.make_step(apply_fn, config)
    state = train.init_state(trainable, config)
    result = jlora.fit(lambda s, b: step(s, frozen, b), state, lambda k: batch, max_steps=3,
                       checkpointer=checkpoint.Checkpointer(tmp_path), metadata={"train": dataclasses.asdict(config)})
    gate = float(result.state.trainable.adapters["head"]["kernel"].gate)
    assert gate != 0.0 and [h["step"] for h in result.history] == [1, 2, 3]

    restored, meta = checkpoint.Checkpointer(tmp_path).restore()
    assert meta["trainable"]["adapters"]["head/kernel"] == {
        "kind": "test-gate", "static": {"shape": [WIDTH, VOCAB]}, "arrays": {"gate": [[], "float32"]}}
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(result.state))
    merged = jlora.merge(params, restored.trainable.adapters)
    np.testing.assert_allclose(merged["head"]["kernel"], params["head"]["kernel"] * (1 + gate), rtol=1e-6)
    np.testing.assert_allclose(jlora.unmerge(merged, restored.trainable.adapters)["head"]["kernel"],
                               params["head"]["kernel"], rtol=1e-5)
    # No factored form: adapt uses the merged weight, and equals the merged model.
    np.testing.assert_allclose(jlora.adapt(apply_fn)(params, restored.trainable.adapters, batch["tokens"]),
                               apply_fn(merged, batch["tokens"]), rtol=1e-5)


def test_a_kind_without_a_peft_format_is_refused_by_export_naming_the_kinds_that_have_one(tmp_path):
    from jlora.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)
    adapters = {"params": {"layers_0": {"self_attn": {"q_proj": {"kernel": Gate(jnp.zeros(()), (8, 8))}}}}}
    with pytest.raises(peft.PeftFormatError, match=r"one kind with a PEFT format \(dora, ia3, lora; .*: Gate"):
        peft.export_peft(adapters, config, tmp_path / "peft")


def test_kind_names_are_unique_and_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"adapter kind name 'lora' is taken by jlora.kinds.lora.LoRA"):
        type("Other", (Adapter,), {}, name="lora")
    with pytest.raises(ValueError, match=r"unknown adapter kind 'vera'; known kinds: .*dora, ia3, lora"):
        adapter.kind("vera")


@pytest.mark.parametrize("make", [
    lambda p: jlora.init(p, rank=2, targets=["head"], alpha=3.0, stack_axes={"head": 0}),
    lambda p: jlora.dora.init(p, rank=2, targets=["head"]),
    lambda p: jlora.ia3.init(p, targets=["head"], feedforward=["head"]),
])
def test_describe_then_abstract_gives_the_tree_structure_back(make):
    params, _ = tiny()
    adapters = make(params)
    template = adapter.abstract(adapter.describe(adapters))
    assert jax.tree.structure(template) == jax.tree.structure(adapters)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), template) == jax.tree.map(lambda x: (x.shape, x.dtype), adapters)


def test_abstract_of_an_unknown_kind_names_the_path():
    with pytest.raises(ValueError, match=r"adapter at 'head/kernel': unknown adapter kind 'vera'"):
        adapter.abstract({"head/kernel": {"kind": "vera", "static": {}, "arrays": {}}})

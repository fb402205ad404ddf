"""Checkpoints for library users: any optax chain, adapters alone, a state of their own; a restore
with no template gives back the same tree, and a template that does not fit is a named error that
never marks the checkpoint damaged."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.training import checkpoint

PARAMS = {"dense": {"kernel": jnp.arange(48.0).reshape(6, 8) / 48, "bias": jnp.zeros(8)},
          "out": {"kernel": jnp.ones((8, 4)) / 8}}


def adapters_of(rank=2):
    return jlora.init(PARAMS, rank=rank, targets=["dense", "out"])


def loss(adapters, x):
    params = jlora.merge(PARAMS, adapters)
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.sum((h @ params["out"]["kernel"]) ** 2)


def train(tx, adapters, opt_state, steps):
    x = jnp.linspace(-1, 1, 12).reshape(2, 6)
    for _ in range(steps):
        grads = jax.grad(loss)(adapters, x)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
    return adapters, opt_state


CHAINS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "multi_transform, two groups": lambda: optax.multi_transform(
        {"a": optax.adam(1e-2), "b": optax.sgd(1e-1, momentum=0.9)}, {"dense": "a", "out": "b"}),
    "chain: clipping and a schedule": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10))),
}


def assert_same_tree(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype


@pytest.mark.parametrize("chain", CHAINS)
def test_a_state_with_any_optax_chain_restores_without_a_template_and_trains_on_equally(tmp_path, chain):
    tx = CHAINS[chain]()
    adapters, opt_state = train(tx, adapters_of(), tx.init(adapters_of()), 3)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save({"adapters": adapters, "opt_state": opt_state}, {"note": chain}, step=3)

    restored, metadata = checkpoint.Checkpointer(tmp_path).restore()  # no template, no optimizer given
    assert metadata["note"] == chain and metadata["step"] == 3
    assert_same_tree(restored, {"adapters": adapters, "opt_state": opt_state})
    # Two more steps from the restored state equal two more from the one saved.
    assert_same_tree(train(tx, restored["adapters"], restored["opt_state"], 2), train(tx, adapters, opt_state, 2))


def test_jloras_train_state_with_the_users_own_optimizer_restores_without_a_template(tmp_path):
    tx = CHAINS["chain: clipping and a schedule"]()
    frozen, trainable = jlora.split(PARAMS, adapters_of())
    state = jlora.train.TrainState(jnp.asarray(7, jnp.int32), trainable, tx.init(trainable), jnp.zeros(2, jnp.uint32))
    checkpoint.Checkpointer(tmp_path).save(state)
    restored, metadata = checkpoint.Checkpointer(tmp_path).restore()
    assert isinstance(restored, jlora.train.TrainState) and metadata["step"] == 7
    assert_same_tree(restored, state)


def test_adapters_alone_save_and_restore_and_a_state_without_step_must_name_one(tmp_path):
    adapters = jax.tree.map(lambda x: x + 1, adapters_of())
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(ValueError, match=rf"saving a dict without a .step in {tmp_path}: pass step=N"):
        ckpt.save(adapters)
    assert ckpt.save(adapters, step=10) == tmp_path / "10"
    restored, _ = checkpoint.Checkpointer(tmp_path).restore()
    assert_same_tree(restored, adapters)
    assert jlora.adapter.table(restored)["dense/kernel"].a.shape == (6, 2)


class Progress(NamedTuple):  # a user's own state class
    seen: jax.Array
    best: jax.Array


def test_a_users_namedtuple_restores_and_an_unimported_class_is_named(tmp_path):
    state = {"progress": Progress(jnp.asarray(5), jnp.asarray(0.25)), "adapters": adapters_of()}
    checkpoint.Checkpointer(tmp_path).save(state, step=1)
    restored, metadata = checkpoint.Checkpointer(tmp_path).restore()
    assert_same_tree(restored, state)
    assert metadata["structure"]["dict"]["progress"]["namedtuple"] == f"{__name__}:Progress"
    described = {"namedtuple": "nowhere.imported:Thing", "fields": {}}
    with pytest.raises(checkpoint.CheckpointError, match=r"^ckpt holds a Thing of module nowhere.imported, which this "
                                                         r"program has not imported; import nowhere.imported before"):
        checkpoint.abstract_tree(described, "ckpt")


def test_a_template_that_does_not_fit_is_named_and_never_marks_the_checkpoint_damaged(tmp_path):
    tx = optax.adam(1e-2)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save({"adapters": adapters_of(), "opt_state": tx.init(adapters_of())}, step=2)
    other = {"adapters": adapters_of(rank=4), "opt_state": tx.init(adapters_of(rank=4))}
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"^{tmp_path / '2'} does not fit the template at 12 leaf\(s\): \['adapters'\]\['dense'\]\['kernel'\]"
            r"\.a: saved \(6, 2\), template \(6, 4\); .*; \.\.\.$")):
        ckpt.restore(other)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the template") as refused:
        ckpt.restore_intact(other)
    assert not isinstance(refused.value, checkpoint.DamagedCheckpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]  # not renamed, still restorable
    assert_same_tree(ckpt.restore()[0]["adapters"], adapters_of())

    class Other(NamedTuple):  # the same fields and shapes as Progress, another class
        seen: jax.Array
        best: jax.Array

    mine = checkpoint.Checkpointer(tmp_path / "mine")
    mine.save({"p": Progress(jnp.asarray(1), jnp.asarray(2.0))}, step=1)
    with pytest.raises(checkpoint.CheckpointError, match="holds the template's arrays in other containers"):
        mine.restore({"p": Other(jnp.asarray(1), jnp.asarray(2.0))})

"""Adapter-only orbax checkpoints: exact resume, crash safety, refusal of the wrong base or rank."""

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import checkpoint, data, train
from jlora.models.gpt2 import GPT2, GPT2Config

CONFIG = train.TrainConfig(max_steps=6, warmup_steps=2, batch_size=4, learning_rate=1e-2, dropout=0.1)


@pytest.fixture(scope="module")
def setup():
    model = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    rows = np.asarray(jax.random.randint(jax.random.key(0), (12, 17), 0, 64), np.int32)
    dataset = data.Dataset(rows[:, :-1], rows[:, 1:], np.ones((12, 16), np.float32))
    params = model.init(jax.random.key(0), jnp.asarray(dataset.tokens[:1]))
    return model, params, dataset


def metadata_for(params, rank=4):
    return {"base": {"fingerprint": checkpoint.base_fingerprint(params)}, "adapter": {"rank": rank}}


def fresh(params, rank=4):
    frozen, trainable = jlora.split(params, jlora.init(params, rank=rank, targets=["c_attn"]))
    return frozen, train.init_state(trainable, CONFIG)


def steps(model, frozen, state, dataset, start, stop):
    step = train.make_step(model.apply, CONFIG)
    for k in range(start, stop):
        state, _ = step(state, frozen, data.batch_at(dataset, CONFIG.batch_size, CONFIG.seed, k))
    return state


def test_resume_is_bitwise_equal_to_a_straight_run(setup, tmp_path):
    model, params, dataset = setup
    frozen, state = fresh(params)
    straight = steps(model, frozen, state, dataset, 0, 6)

    frozen, state = fresh(params)
    half = steps(model, frozen, state, dataset, 0, 3)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(half, metadata_for(params))
    del half

    frozen, template = fresh(params)
    restored, meta = checkpoint.Checkpointer(tmp_path / "ckpt").restore(
        jax.eval_shape(lambda: template), expect=metadata_for(params)
    )
    assert int(restored.step) == 3 and meta["step"] == 3 and meta["jlora_version"] == jlora.__version__
    resumed = steps(model, frozen, restored, dataset, int(restored.step), 6)
    chex.assert_trees_all_equal(resumed, straight)


def test_checkpoint_holds_only_adapters(setup, tmp_path):
    model, params, _ = setup
    _, state = fresh(params)
    path = checkpoint.Checkpointer(tmp_path).save(state, metadata_for(params))
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.trainable))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    # Adapters plus AdamW's two moments, plus orbax's small metadata files; never the base.
    assert checkpoint.dir_bytes(path) < 3 * adapter_bytes + 64_000 < base_bytes


def test_other_base_or_rank_is_refused(setup, tmp_path):
    model, params, _ = setup
    _, state = fresh(params)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(state, metadata_for(params))
    other = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(checkpoint.CheckpointError, match=r"made with base=\{'fingerprint': '[0-9a-f]{16}'\}, but this run has base"):
        ckpt.restore(jax.eval_shape(lambda: state), expect=metadata_for(other))
    with pytest.raises(checkpoint.CheckpointError, match=r"adapter=\{'rank': 4\}, but this run has adapter=\{'rank': 8\}"):
        ckpt.restore(jax.eval_shape(lambda: state), expect={"adapter": {"rank": 8}})


def test_missing_checkpoint_and_unwritable_directory(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint in"):
        checkpoint.Checkpointer(tmp_path / "empty").restore(None)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match="cannot create output directory .*file/sub"):
        checkpoint.Checkpointer(blocker / "sub")


KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jlora import checkpoint, train

    state = train.TrainState(jnp.array(1), {"a": jnp.ones((256, 256))}, {}, jnp.zeros(2, jnp.uint32))
    ckpt = checkpoint.Checkpointer(sys.argv[1])
    ckpt.save(state, {"run": "first"})
    # Die inside the second save, after the arrays are written and before it is committed.
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    ocp.JsonCheckpointHandler.save = die
    ocp.JsonCheckpointHandler.async_save = die
    ckpt.save(state._replace(step=jnp.array(2), trainable={"a": jnp.zeros((256, 256))}), {"run": "second"})
    """
)


def test_sigkill_mid_save_keeps_the_last_complete_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-2000:]
    assert any(p.name.startswith("2") for p in tmp_path.iterdir())  # the interrupted save left its partial dir
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    template = train.TrainState(jnp.array(0), {"a": jnp.zeros((256, 256))}, {}, jnp.zeros(2, jnp.uint32))
    state, meta = ckpt.restore(jax.eval_shape(lambda: template))
    assert meta["run"] == "first"
    np.testing.assert_array_equal(state.trainable["a"], np.ones((256, 256)))

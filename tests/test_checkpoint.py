"""Adapter-only orbax checkpoints: exact resume, crash safety, refusal of the wrong base or rank."""

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.training import checkpoint, data
from jlora import training as train
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


@pytest.mark.slow  # heavy compile: kept out of the fast tier
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
    from jlora.training import checkpoint
    from jlora import training as train

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


@pytest.mark.subprocess
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


@pytest.mark.parametrize("kind, bias", [("lora", "lora_only"), ("dora", "none"), ("ia3", "all")])
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_a_checkpoint_restores_with_no_template_or_options(setup, tmp_path, kind, bias):
    model, params, dataset = setup
    config = train.TrainConfig(max_steps=2, warmup_steps=1, batch_size=4, lora_plus_ratio=4.0)
    adapters = jlora.adapter.kind(kind).create(params, targets=["c_attn", "c_fc"])
    frozen, trainable = jlora.split(params, adapters, bias)
    state = train.make_step(model.apply, config)(train.init_state(trainable, config), frozen,
                                                 data.batch_at(dataset, 4, 0, 0))[0]
    checkpoint.Checkpointer(tmp_path).save(state, {"train": dataclasses.asdict(config)})
    restored, meta = checkpoint.Checkpointer(tmp_path).restore()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(state))
    assert {a["kind"] for a in meta["trainable"]["adapters"].values()} == {kind}
    assert sorted(meta["trainable"]["base"]) == sorted(p for p, _ in jlora.paths.leaves(trainable.base))


LEGACY = Path(__file__).parent / "data" / "checkpoint-0.1"


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_a_checkpoint_of_jlora_0_1_restores_from_its_options(tmp_path):
    # Written by jlora 0.1's code (tests/data/README.md): its metadata names the kind and init options only.
    model = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    params = model.init(jax.random.key(0), jnp.asarray(np.arange(32).reshape(2, 16) % 64, jnp.int32))
    ckpt = checkpoint.Checkpointer(LEGACY)
    with pytest.raises(checkpoint.CheckpointError, match=r"written by jlora 0.1.0 and does not describe its adapters; pass the base params"):
        ckpt.restore()
    state, meta = ckpt.restore(base=params, expect={"base": {"name": "tiny-gpt2", "fingerprint": checkpoint.base_fingerprint(params)}})
    assert int(state.step) == 2 and meta["adapter"]["options"]["targets"] == "c_attn,c_fc"
    saved = np.load(LEGACY.parent / "checkpoint-0.1-trainable.npz")
    restored = {p.replace("/", "|"): np.asarray(x) for p, x in jlora.paths.leaves(state.trainable)}
    assert sorted(restored) == sorted(saved.files) and len(saved.files) == 4 * 2 + 4  # a, b per weight; 4 biases
    for name in saved.files:
        np.testing.assert_array_equal(restored[name], saved[name])
    lora = jlora.adapter.table(state.trainable.adapters)["params/h_0/attn/c_attn/kernel"]
    assert isinstance(lora, jlora.LoRA) and lora.scaling == 2.0 and lora.rank == 2


def test_a_checkpoint_of_an_unknown_kind_is_refused_naming_path_and_kind(setup, tmp_path):
    model, params, dataset = setup
    frozen, trainable = jlora.split(params, jlora.init(params, rank=2, targets=["c_attn"]))
    state = train.init_state(trainable, CONFIG)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(state)
    metadata = ckpt.metadata()
    metadata["trainable"]["adapters"]["params/h_0/attn/c_attn/kernel"]["kind"] = "vera"
    with pytest.raises(checkpoint.CheckpointError, match=r"1: adapter at 'params/h_0/attn/c_attn/kernel': unknown adapter kind 'vera'"):
        checkpoint.saved_structure(metadata, where=tmp_path / "1")


def test_a_saved_step_holds_each_array_once(tmp_path):
    # Random (incompressible) float32 leaves of the sizes LoRA factors have, replicated over the 8
    # devices as the train step places them. orbax's default save wrote one OCDBT version per array,
    # each a new copy of the b-tree node, and inlined replica slices twice: 1.8–2.3× the data.
    mesh = train.mesh()
    rng = np.random.default_rng(0)
    arrays = {f"layer_{i}": {"a": rng.standard_normal((96, 8), np.float32), "b": rng.standard_normal((8, 96), np.float32)}
              for i in range(24)}
    state = train.TrainState(jnp.array(1), train.replicate(arrays, mesh), {}, jnp.zeros(2, jnp.uint32))
    data_bytes = sum(x.nbytes for x in jax.tree.leaves(arrays))
    path = checkpoint.Checkpointer(tmp_path).save(state)
    stored = sum(f.stat().st_size for f in (path / "state").rglob("*") if f.is_file() and f.parent.name == "d")
    assert 0.8 * data_bytes <= stored <= 1.05 * data_bytes + 16_384, (stored, data_bytes)  # zstd takes ~5%
    restored, _ = checkpoint.Checkpointer(tmp_path).restore(jax.eval_shape(lambda: state))
    jax.tree.map(np.testing.assert_array_equal, restored.trainable, arrays)


def test_restoring_into_adapters_of_another_rank_names_the_paths_and_shapes(setup, tmp_path):
    model, params, dataset = setup
    frozen, state = fresh(params, rank=4)
    checkpoint.Checkpointer(tmp_path).save(state)
    _, other = fresh(params, rank=2)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds other adapters than the template at 2 path\(s\): "
                       r"params/h_0/attn/c_attn/kernel: saved lora \(a \(32, 4\), b \(4, 96\)\), template lora \(a \(32, 2\), b \(2, 96\)\)"):
        checkpoint.Checkpointer(tmp_path).restore(jax.eval_shape(lambda: other))


def saved_steps(params, directory, steps):
    frozen, state = fresh(params)
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=5)
    for step in steps:
        ckpt.save(state._replace(step=jnp.array(step)))
    return state


@pytest.mark.parametrize("damage", ["truncate the array files", "delete the metadata"])
def test_a_damaged_newest_step_is_reported_and_the_newest_intact_one_restored(setup, tmp_path, damage):
    model, params, dataset = setup
    state = saved_steps(params, tmp_path, [2, 4])
    if damage == "truncate the array files":
        for victim in (p for p in (tmp_path / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
            victim.write_bytes(victim.read_bytes()[:100])
    else:
        (tmp_path / "4" / "meta" / "metadata").unlink()
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=rf"cannot (restore|read the metadata of) {tmp_path / '4'}"):
        ckpt.restore()
    restored, meta, damaged = ckpt.restore_intact()
    assert int(restored.step) == 2 and meta["step"] == 2
    assert len(damaged) == 1 and str(tmp_path / "4") in damaged[0] and damaged[0].endswith(f"(moved to {tmp_path / '4.damaged'})")
    assert (tmp_path / "4.damaged").is_dir() and ckpt.latest_step() == 2
    jax.tree.map(np.testing.assert_array_equal, restored.trainable, jax.device_get(state.trainable))


def test_when_no_step_restores_every_reason_is_listed(setup, tmp_path):
    model, params, dataset = setup
    saved_steps(params, tmp_path, [1])
    (tmp_path / "1" / "meta" / "metadata").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=rf"no checkpoint in {tmp_path} restores\n  cannot read the metadata of {tmp_path / '1'}"):
        checkpoint.Checkpointer(tmp_path).restore_intact()


def test_a_failed_save_stops_fit_naming_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    model, params, dataset = setup
    frozen, state = fresh(params)
    ckpt = checkpoint.Checkpointer(tmp_path)
    step = train.make_step(model.apply, CONFIG)
    real_save = ckpt.save

    def disk_full_at_step_4(state, metadata=None):
        if int(state.step) == 4:
            raise OSError(28, "No space left on device")
        return real_save(state, metadata)

    monkeypatch.setattr(ckpt, "save", disk_full_at_step_4)
    with pytest.raises(jlora.loop.SaveFailed, match="saving the checkpoint of step 4 failed: No space left on device") as failed:
        jlora.fit(lambda s, b: step(s, frozen, b), state, lambda k: data.batch_at(dataset, 4, 0, k), max_steps=6,
                  checkpointer=ckpt, save_every=2)
    assert failed.value.last_saved == 2 and checkpoint.Checkpointer(tmp_path).latest_step() == 2


PREVIOUS = Path(__file__).parent / "data" / "checkpoint-de3a17f"


def test_a_checkpoint_describing_lora_by_scaling_only_restores_to_the_same_adapters():
    # Written at commit de3a17f (tests/data/README.md), whose LoRA and DoRA held scaling and no alpha.
    state, meta = checkpoint.Checkpointer(PREVIOUS).restore()
    assert "alpha" not in meta["trainable"]["adapters"]["attn/query/kernel"]["static"]
    saved = np.load(PREVIOUS.parent / "checkpoint-de3a17f-trainable.npz")
    restored = {p.replace("/", "|"): np.asarray(x) for p, x in jlora.paths.leaves(state.trainable)}
    assert sorted(restored) == sorted(saved.files) and len(saved.files) == 2 + 2 + 4
    for name in saved.files:
        np.testing.assert_array_equal(restored[name], saved[name])
    found = jlora.adapter.table(state.trainable.adapters)
    query, value, mlp = found["attn/query/kernel"], found["attn/value/kernel"], found["mlp/kernel"]
    # rank 2 alpha 3; rank 3 alpha 5 with rsLoRA; DoRA rank 2 alpha 7: restored as alpha = scaling · r
    assert (type(query), query.alpha, query.use_rslora, query.scaling) == (jlora.LoRA, 3.0, False, 1.5)
    assert (value.alpha, value.use_rslora, value.scaling) == (5 / math.sqrt(3) * 3, False, 5 / math.sqrt(3))
    assert (type(mlp), mlp.alpha, mlp.use_rslora, mlp.scaling) == (jlora.DoRA, 7.0, False, 3.5)
    # into a template of this jlora's adapters (alpha, use_rslora): the old description is taken as equal to it
    again, _ = checkpoint.Checkpointer(PREVIOUS).restore(jax.eval_shape(lambda: state))
    jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(state))


def test_lora_describes_alpha_and_use_rslora_and_an_upgraded_description_equals_it():
    params = {"w": jnp.ones((8, 6))}
    lora = jlora.init(params, rank=3, alpha=5, use_rslora=True, targets=["w"])
    described = jlora.adapter.describe(lora)["w"]
    assert described["static"] == {"alpha": 5, "stack_axes": 0, "use_rslora": True}
    plain = jlora.init(params, rank=3, alpha=0.3, targets=["w"])
    old = jlora.adapter.describe(plain)
    old["w"]["static"] = {"scaling": plain["w"].scaling, "stack_axes": 0}
    upgraded = jlora.adapter.abstract(old)["w"]
    assert (upgraded.scaling, upgraded.use_rslora, upgraded.rank) == (plain["w"].scaling, False, 3)
    assert upgraded.alpha / 3 == 0.3 / 3
    # an rsLoRA scaling 1 / √5 that no alpha / 5 gives: restored as rsLoRA, the same scaling
    rs = jlora.init({"w": jnp.ones((8, 6))}, rank=5, alpha=1, use_rslora=True, targets=["w"])
    old = jlora.adapter.describe(rs)
    old["w"]["static"] = {"scaling": rs["w"].scaling, "stack_axes": 0}
    upgraded = jlora.adapter.abstract(old)["w"]
    assert rs["w"].scaling * 5 / 5 != rs["w"].scaling
    assert (upgraded.scaling, upgraded.use_rslora, upgraded.alpha) == (rs["w"].scaling, True, rs["w"].scaling * math.sqrt(5))

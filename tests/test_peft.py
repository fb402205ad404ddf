"""PEFT's adapter format: jlora adapters load in PEFT and PEFT's import into jlora with equal logits, the
round trip is bitwise, and every file that does not fit is refused by name."""

import dataclasses
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
import jlora.models
from helpers import trained
from jlora.kinds import dora, ia3
from jlora.core import paths
from jlora.interop import peft as jpeft
from jlora.core.adapter import table
from jlora.kinds.lora import scaling_for
from jlora.models import gpt2, llama
from tiny import randomized_torch

TOKENS = [[5, 17, 2, 60, 33, 1, 9, 44, 12, 3], [0, 61, 7, 7, 20, 39, 41, 2, 8, 50]]
GPT2 = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
LLAMA = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0)
# Every weight kind PEFT adapts, ranks and alphas varying by module, so the patterns must carry them.
LLAMA_ADAPTERS = dict(rank=4, alpha=6.0, targets=["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"],
                      rank_pattern={"layers_1/self_attn/q_proj": 2, "down_proj": 3}, alpha_pattern={"o_proj": 5.0})
GPT2_ADAPTERS = dict(rank=4, alpha=8.0, targets=["c_attn", "c_fc", "wpe"], rank_pattern={"c_fc": 3})


def abstract_params(config):
    """The base's variables as shapes only: enough for init, export and import of adapters."""
    model = jlora.interop.hf.family(config).model(config)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def assert_same_adapters(ours, theirs):
    ours, theirs = table(ours), table(theirs)
    assert sorted(ours) == sorted(theirs)
    for path, lora in ours.items():
        other = theirs[path]
        assert (lora.scaling, lora.stack_axes, lora.a.dtype, lora.b.dtype) == (
            other.scaling, other.stack_axes, other.a.dtype, other.b.dtype), path
        np.testing.assert_array_equal(lora.a, other.a)
        np.testing.assert_array_equal(lora.b, other.b)


# ---- round trip and the written config (no torch needed) ----


@pytest.mark.slow  # heavy compile: kept out of the fast tier
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("config, init", [(GPT2, GPT2_ADAPTERS), (LLAMA, LLAMA_ADAPTERS)], ids=["gpt2", "llama"])
def test_jlora_peft_jlora_round_trip_is_bitwise(tmp_path, config, init, use_rslora):
    params = abstract_params(config)
    adapters = trained(jlora.init(params, **init))
    jpeft.export_peft(adapters, config, tmp_path / "once", use_rslora=use_rslora)
    back = jpeft.import_peft(tmp_path / "once", params, config)
    assert_same_adapters(back, adapters)
    # and written again, the files are the same bytes
    jpeft.export_peft(back, config, tmp_path / "twice", use_rslora=use_rslora)
    for name in (jpeft.CONFIG_FILE, jpeft.WEIGHTS_FILE):
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes()


def test_written_config_names_modules_as_peft_matches_them(tmp_path):
    adapters = trained(jlora.init(abstract_params(LLAMA), **LLAMA_ADAPTERS))
    jpeft.export_peft(adapters, LLAMA, tmp_path, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    config = json.loads((tmp_path / jpeft.CONFIG_FILE).read_text())
    # alpha 6 at r=4 (scaling 1.5) is the common case; rank_pattern keeps jlora's alpha, so r=2 and r=3 keep 6 too.
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["fan_in_fan_out"]) == (4, 6, False, False)
    assert config["rank_pattern"] == {"down_proj": 3, "model.layers.1.self_attn.q_proj": 2}
    assert config["alpha_pattern"] == {"o_proj": 5}
    assert config["target_modules"] == ["down_proj", "embed_tokens", "lm_head", "o_proj", "q_proj", "v_proj"]
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == (
        "LORA", "CAUSAL_LM", "HuggingFaceTB/SmolLM2-135M")
    tensors = load_file(tmp_path / jpeft.WEIGHTS_FILE)
    assert len(tensors) == 2 * (4 * 2 + 2)  # q, v, o, down in each of 2 layers; embed_tokens, lm_head
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 64)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (64, 4)


def test_some_layers_only_are_targeted_by_full_module_name(tmp_path):
    params = abstract_params(GPT2)
    adapters = trained(jlora.init(params, rank=2, targets=r"params/h_1/(attn|mlp)/c_proj/kernel"))
    jpeft.export_peft(adapters, GPT2, tmp_path)
    config = json.loads((tmp_path / jpeft.CONFIG_FILE).read_text())
    assert config["target_modules"] == ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    assert config["fan_in_fan_out"] is True
    assert_same_adapters(jpeft.import_peft(tmp_path, params, GPT2), adapters)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_alpha_and_use_rslora_are_written_and_read_back_exactly(tmp_path, use_rslora):
    params = abstract_params(LLAMA)
    adapters = trained(jlora.init(params, rank=4, alpha=1 / 3, use_rslora=use_rslora, targets=["q_proj", "v_proj"],
                                  rank_pattern={"v_proj": 3}, alpha_pattern={"layers_1/self_attn/q_proj": 7.25}))
    jpeft.export_peft(adapters, LLAMA, tmp_path)
    config = json.loads((tmp_path / jpeft.CONFIG_FILE).read_text())
    assert (config["lora_alpha"], config["use_rslora"], config["rank_pattern"], config["alpha_pattern"]) == (
        1 / 3, use_rslora, {"v_proj": 3}, {"model.layers.1.self_attn.q_proj": 7.25})
    back = table(jpeft.import_peft(tmp_path, params, LLAMA))
    for path, lora in table(adapters).items():
        assert (back[path].alpha, back[path].use_rslora, back[path].rank) == (lora.alpha, use_rslora, lora.rank), path
        assert back[path].scaling == lora.scaling == scaling_for(lora.alpha, lora.rank, use_rslora)


def test_a_scaling_rule_asked_for_re_expresses_alpha_and_mixed_rules_are_refused(tmp_path):
    params = abstract_params(LLAMA)
    plain = trained(jlora.init(params, rank=4, alpha=8, targets=["q_proj"]))
    jpeft.export_peft(plain, LLAMA, tmp_path / "rs", use_rslora=True)
    config = json.loads((tmp_path / "rs" / jpeft.CONFIG_FILE).read_text())
    assert (config["lora_alpha"], config["use_rslora"]) == (4, True)  # scaling 8 / 4 = 4 / √4
    rs = trained(jlora.init(params, rank=4, alpha=8, targets=["v_proj"], use_rslora=True))
    mixed = paths.nest({**table(plain), **table(rs)})
    with pytest.raises(jpeft.PeftFormatError, match=r"mix use_rslora True \(model.layers.1.self_attn.v_proj\) and False \(model.layers.1.self_attn.q_proj\)"):
        jpeft.export_peft(mixed, LLAMA, tmp_path / "mixed")


# ---- refusals: each names what is wrong ----


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A GPT-2 adapter directory to damage, with the base it was made for."""
    directory = tmp_path_factory.mktemp("peft")
    params = abstract_params(GPT2)
    jpeft.export_peft(trained(jlora.init(params, rank=4, targets=["c_attn"])), GPT2, directory)
    return directory, params


def copy_with(source, target, *, config=None, tensors=None):
    target.mkdir()
    config_dict = json.loads((source / jpeft.CONFIG_FILE).read_text())
    weights = load_file(source / jpeft.WEIGHTS_FILE)
    (target / jpeft.CONFIG_FILE).write_text(json.dumps(config(config_dict) if config else config_dict))
    save_file(tensors(weights) if tensors else weights, str(target / jpeft.WEIGHTS_FILE), metadata={"format": "pt"})
    return target


def test_missing_or_corrupt_files_are_named(exported, tmp_path):
    source, params = exported
    with pytest.raises(jpeft.PeftFormatError, match=r"nowhere/adapter_config\.json does not exist"):
        jpeft.import_peft(tmp_path / "nowhere", params, GPT2)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / jpeft.CONFIG_FILE).write_bytes((source / jpeft.CONFIG_FILE).read_bytes())
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(jpeft.PeftFormatError, match=r"adapter_model\.safetensors does not exist .*safe_serialization=True"):
        jpeft.import_peft(tmp_path / "bin", params, GPT2)

    (tmp_path / "bin" / jpeft.WEIGHTS_FILE).write_bytes((source / jpeft.WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(jpeft.PeftFormatError, match=r"bin/adapter_model\.safetensors is not a readable safetensors file"):
        jpeft.import_peft(tmp_path / "bin", params, GPT2)

    (tmp_path / "bin" / jpeft.CONFIG_FILE).write_text('{"peft_type": "LORA", ')
    with pytest.raises(jpeft.PeftFormatError, match=r"bin/adapter_config\.json is not valid JSON"):
        jpeft.import_peft(tmp_path / "bin", params, GPT2)


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LOHA"}, r"peft_type='LOHA'; jlora imports PEFT adapters of peft_type \[.*'LORA'\]"),
    ({"alora_invocation_tokens": [5, 6]}, r"alora_invocation_tokens=\[5, 6\]: activated LoRA is not implemented"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]"),
], ids=["loha", "alora", "modules_to_save"])
def test_adapters_other_than_plain_lora_are_refused(exported, tmp_path, change, message):
    source, params = exported
    copy_with(source, tmp_path / "other", config=lambda c: {**c, **change})
    with pytest.raises(jpeft.PeftFormatError, match=message):
        jpeft.import_peft(tmp_path / "other", params, GPT2)


def test_adapter_for_another_base_is_refused_with_both_shapes(exported):
    source, _ = exported
    wider = dataclasses.replace(GPT2, n_embd=48)
    with pytest.raises(jpeft.PeftFormatError, match=(
            r"tensor base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight has shape \(4, 32\), "
            r"expected \(4, 48\) \(r=4 from the config, base weight params/h_0/attn/c_attn/kernel of shape \(48, 144\)\)")):
        jpeft.import_peft(source, abstract_params(wider), wider)
    with pytest.raises(jpeft.PeftFormatError, match=(
            r"base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight, .* are not LORA tensors of any "
            r"module of this LlamaConfig")):
        jpeft.import_peft(source, abstract_params(LLAMA), LLAMA)


def test_unknown_or_unpaired_tensors_are_named(exported, tmp_path):
    source, params = exported
    extra = {"base_model.model.transformer.h.5.attn.c_attn.lora_A.weight": np.ones((4, 32), np.float32),
             "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector": np.ones((96,), np.float32)}
    copy_with(source, tmp_path / "extra", tensors=lambda t: {**t, **extra})
    with pytest.raises(jpeft.PeftFormatError, match=(
            r"tensor\(s\) base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_magnitude_vector, "
            r"base_model\.model\.transformer\.h\.5\.attn\.c_attn\.lora_A\.weight are not LORA tensors of any module")):
        jpeft.import_peft(tmp_path / "extra", params, GPT2)

    b = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    copy_with(source, tmp_path / "unpaired", tensors=lambda t: {k: v for k, v in t.items() if k != b})
    with pytest.raises(jpeft.PeftFormatError, match=r"h\.1\.attn\.c_attn\.lora_A\.weight has no .*h\.1\.attn\.c_attn\.lora_B\.weight"):
        jpeft.import_peft(tmp_path / "unpaired", params, GPT2)

    copy_with(source, tmp_path / "rank", config=lambda c: {**c, "rank_pattern": {"transformer.h.1.attn.c_attn": 8}})
    with pytest.raises(jpeft.PeftFormatError, match=r"h\.1\.attn\.c_attn\.lora_A\.weight has shape \(4, 32\), expected \(8, 32\)"):
        jpeft.import_peft(tmp_path / "rank", params, GPT2)


def test_saved_embedding_must_be_the_bases(tmp_path):
    """PEFT saves a targeted embedding's full weight; one that differs from the base is trained on another."""
    params = abstract_params(LLAMA)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    jpeft.export_peft(trained(jlora.init(params, rank=2, targets=["embed_tokens"])), LLAMA, tmp_path / "emb")
    name = "base_model.model.model.embed_tokens.base_layer.weight"
    copy_with(tmp_path / "emb", tmp_path / "same", tensors=lambda t: {**t, name: np.ones((64, 32), np.float32)})
    assert list(table(jpeft.import_peft(tmp_path / "same", params, LLAMA))) == ["params/embed_tokens/embedding"]
    copy_with(tmp_path / "emb", tmp_path / "other", tensors=lambda t: {**t, name: np.zeros((64, 32), np.float32)})
    with pytest.raises(jpeft.PeftFormatError, match=r"embed_tokens\.base_layer\.weight differs from the base's params/embed_tokens/embedding"):
        jpeft.import_peft(tmp_path / "other", params, LLAMA)


def test_export_refuses_what_peft_would_compute_differently(tmp_path):
    params = abstract_params(GPT2)
    tied = trained(jlora.init(params, rank=2, targets=["wte"]))
    with pytest.raises(jpeft.PeftFormatError, match=r"'params/wte/embedding' changes an embedding that is also the output head"):
        jpeft.export_peft(tied, GPT2, tmp_path)
    wider = dataclasses.replace(GPT2, n_embd=48)
    other = trained(jlora.init(abstract_params(wider), rank=2, targets=["c_attn"]))
    with pytest.raises(jpeft.PeftFormatError, match=(
            r"'params/h_0/attn/c_attn/kernel' is for a weight of shape \(48, 144\), but this GPT2Config has shape "
            r"\(32, 96\) there")):
        jpeft.export_peft(other, GPT2, tmp_path)
    frozen, trainable = jlora.split(params, trained(jlora.init(params, rank=2, targets=["c_attn"])), bias="lora_only")
    with pytest.raises(jpeft.PeftFormatError, match=r"also trains base leaves params/h_0/attn/c_attn/bias"):
        jpeft.export_peft(trainable, GPT2, tmp_path)
    assert not (tmp_path / jpeft.WEIGHTS_FILE).exists()


@pytest.mark.parametrize("config, targets", [(GPT2, ["c_attn", "c_fc", "c_proj"]), (LLAMA, ["q_proj", "v_proj", "lm_head"])],
                         ids=["gpt2", "llama"])
@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_dora_round_trip_is_bitwise(tmp_path, config, targets):
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype) + jnp.arange(s.shape[-1]) / 100, abstract_params(config))
    adapters = trained(dora.init(params, rank=4, alpha=8.0, targets=targets, rank_pattern={targets[0]: 2}))
    jpeft.export_peft(adapters, config, tmp_path)
    written = json.loads((tmp_path / jpeft.CONFIG_FILE).read_text())
    assert written["use_dora"] is True and written["rank_pattern"] == {targets[0]: 2}
    tensors = load_file(tmp_path / jpeft.WEIGHTS_FILE)
    assert sum(name.endswith(".lora_magnitude_vector") for name in tensors) == len(table(adapters))
    back = table(jpeft.import_peft(tmp_path, params, config))
    for path, ours in table(adapters).items():
        theirs = back[path]
        assert type(theirs) is type(ours) and theirs.scaling == ours.scaling
        for field in ("a", "b", "m", "base_norm"):
            np.testing.assert_array_equal(getattr(theirs, field), getattr(ours, field))


def test_dora_without_magnitude_or_mixed_with_lora_is_refused(exported, tmp_path):
    source, params = exported
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    copy_with(source, tmp_path / "dora", config=lambda c: {**c, "use_dora": True})
    with pytest.raises(jpeft.PeftFormatError, match=r"transformer\.h\.0\.attn\.c_attn\.lora_magnitude_vector is missing"):
        jpeft.import_peft(tmp_path / "dora", params, GPT2)
    mixed = paths.nest({**table(trained(jlora.init(params, rank=2, targets=["c_attn"]))),
                        **table(trained(dora.init(params, rank=2, targets=["c_fc"])))})
    with pytest.raises(jpeft.PeftFormatError, match=r"all of one kind .* 'params/h_0/attn/c_attn/kernel': LoRA, .*DoRA"):
        jpeft.export_peft(mixed, GPT2, tmp_path / "mixed")


def test_ia3_round_trip_is_bitwise(tmp_path):
    params = abstract_params(LLAMA)
    adapters = trained(ia3.init(params), std=0.5)  # k_proj, v_proj scale outputs; down_proj its inputs
    jpeft.export_peft(adapters, LLAMA, tmp_path)
    written = json.loads((tmp_path / jpeft.CONFIG_FILE).read_text())
    assert (written["peft_type"], written["target_modules"], written["feedforward_modules"]) == (
        "IA3", ["down_proj", "k_proj", "v_proj"], ["down_proj"])
    tensors = load_file(tmp_path / jpeft.WEIGHTS_FILE)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.ia3_l"].shape == (16, 1)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.ia3_l"].shape == (1, 48)
    back = table(jpeft.import_peft(tmp_path, params, LLAMA))
    for path, ours in table(adapters).items():
        theirs = back[path]
        assert (type(theirs), theirs.shape, theirs.side, theirs.in_axes, theirs.stack_axes, theirs.offset) == (
            type(ours), ours.shape, ours.side, ours.in_axes, ours.stack_axes, ours.offset)
        np.testing.assert_array_equal(theirs.scale, ours.scale)


def test_ia3_where_peft_would_also_scale_a_bias_is_refused(tmp_path):
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), abstract_params(GPT2))
    with pytest.raises(jpeft.PeftFormatError, match=(
            r"'params/h_0/attn/c_attn/kernel' scales the outputs of transformer\.h\.0\.attn\.c_attn, which has a bias")):
        jpeft.export_peft(trained(ia3.init(params), std=0.5), GPT2, tmp_path)
    # feedforward modules scale inputs, which PEFT and jlora agree on
    jpeft.export_peft(trained(ia3.init(params, targets=["mlp/c_proj"]), std=0.5), GPT2, tmp_path)
    written = json.loads((tmp_path / jpeft.CONFIG_FILE).read_text())
    assert (written["target_modules"], written["feedforward_modules"]) == (
        ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"], ["c_proj"])
    # an output-scaled vector from PEFT imports only onto a zero bias
    vector = np.full((96, 1), 2.0, np.float32)
    (tmp_path / jpeft.CONFIG_FILE).write_text(json.dumps({"peft_type": "IA3", "target_modules": ["c_attn"], "feedforward_modules": []}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.ia3_l": vector}, str(tmp_path / jpeft.WEIGHTS_FILE))
    with pytest.raises(jpeft.PeftFormatError, match=r"base's params/h_0/attn/c_attn/bias is not zero"):
        jpeft.import_peft(tmp_path, params, GPT2)
    zero_bias = paths.map_with_path(lambda p, w: jnp.zeros_like(w) if p == "params/h_0/attn/c_attn/bias" else w, params)
    (only,) = table(jpeft.import_peft(tmp_path, zero_bias, GPT2)).values()
    np.testing.assert_array_equal(only.scale, vector[:, 0])


# ---- against PEFT itself ----

interop = pytest.mark.interop


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A small random transformers model saved with save_pretrained and loaded back by jlora, by name."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    made = {}

    def get(name):
        if name not in made:
            if name == "gpt2":
                theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**dataclasses.asdict(GPT2)))
            else:
                fields = {k: v for k, v in dataclasses.asdict(LLAMA).items() if k != "rope_theta"}
                theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                    **fields, rope_parameters={"rope_type": "default", "rope_theta": LLAMA.rope_theta}))
            directory = tmp_path_factory.mktemp(name)
            randomized_torch(theirs).save_pretrained(directory, safe_serialization=True)
            model, variables, _, config = jlora.models.load(str(directory))
            assert config == (GPT2 if name == "gpt2" else LLAMA)
            made[name] = directory, model, variables
        return made[name]

    return get


def torch_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def jlora_logits(model, variables, adapters):
    return np.asarray(jax.jit(jlora.adapt(model.apply))(variables, adapters, jnp.array(TOKENS)))


def load_in_peft(base_dir, peft_dir):
    """PeftModel.from_pretrained, failing on the missing/unexpected-key warnings that mean an adapter is not applied."""
    import peft
    import transformers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), peft_dir)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad
    return model.eval()


@interop
@pytest.mark.parametrize("name, init, use_rslora", [
    ("gpt2", GPT2_ADAPTERS, False),
    ("llama", LLAMA_ADAPTERS, False),
    ("llama", LLAMA_ADAPTERS, True),
], ids=["gpt2", "llama", "llama-rslora"])
def test_exported_adapter_gives_jloras_logits_in_peft(hf_base, tmp_path, name, init, use_rslora):
    base_dir, model, variables = hf_base(name)
    adapters = trained(jlora.init(variables, **init), seed=1)
    ours = jlora_logits(model, variables, adapters)
    assert np.abs(ours - np.asarray(model.apply(variables, jnp.array(TOKENS)))).max() > 0.1
    jpeft.export_peft(adapters, GPT2 if name == "gpt2" else LLAMA, tmp_path, use_rslora=use_rslora)
    theirs = torch_logits(load_in_peft(base_dir, tmp_path))
    diff = np.abs(theirs - ours).max()
    print(f"{name} rslora={use_rslora}: jlora -> PEFT max |logit diff| {diff:.2e}")
    assert diff < 1e-4


@interop
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_peft_trained_adapter_gives_peft_logits_in_jlora(hf_base, tmp_path, name):
    import peft
    import torch
    import transformers

    base_dir, model, variables = hf_base(name)
    if name == "gpt2":
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wpe"],
                               rank_pattern={"c_fc": 2}, alpha_pattern={"transformer.h.1.attn.c_proj": 3},
                               init_lora_weights=False, task_type="CAUSAL_LM")
    else:
        lora = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                               target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head"],
                               rank_pattern={"model.layers.0.self_attn.k_proj": 2, "up_proj": 3},
                               alpha_pattern={"v_proj": 3}, init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), lora)
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking factors: both non-zero and large enough to move the logits
        for param_name, param in theirs.named_parameters():
            if "lora_" in param_name:
                param.normal_(0.0, 0.3)
    theirs.save_pretrained(tmp_path)
    expected = torch_logits(theirs.eval())

    adapters = jpeft.import_peft(tmp_path, variables, GPT2 if name == "gpt2" else LLAMA)
    n_modules = sum(1 for n, _ in theirs.named_parameters() if n.endswith(("lora_A.default.weight", "lora_embedding_A.default")))
    assert len(table(adapters)) == n_modules
    ours = jlora_logits(model, variables, adapters)
    assert np.abs(expected - np.asarray(model.apply(variables, jnp.array(TOKENS)))).max() > 0.1
    diff = np.abs(ours - expected).max()
    print(f"{name}: PEFT -> jlora max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    if name == "llama":  # rsLoRA with patterns: r=3, alpha=6 on up_proj
        assert table(adapters)["params/layers_1/mlp/up_proj/kernel"].scaling == 6 / math.sqrt(3)


@interop
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_equals_peft_both_ways(hf_base, tmp_path, name):
    """A PEFT DoRA adapter imports with PEFT's logits, and exported again it loads in PEFT as the same adapter."""
    import peft
    import torch
    import transformers

    base_dir, model, variables = hf_base(name)
    config = GPT2 if name == "gpt2" else LLAMA
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets, rank_pattern={targets[1]: 2},
                           init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), lora)
    torch.manual_seed(2)
    with torch.no_grad():
        for param_name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in param_name:
                param.mul_(1.0 + 0.3 * torch.randn_like(param))
            elif "lora_" in param_name:
                param.normal_(0.0, 0.3)
    theirs.save_pretrained(tmp_path / "theirs")
    expected = torch_logits(theirs.eval())

    adapters = jpeft.import_peft(tmp_path / "theirs", variables, config)
    assert {type(d).__name__ for d in table(adapters).values()} == {"DoRA"}
    ours = jlora_logits(model, variables, adapters)
    assert np.abs(expected - np.asarray(model.apply(variables, jnp.array(TOKENS)))).max() > 0.1
    diff = np.abs(ours - expected).max()
    print(f"{name}: PEFT DoRA -> jlora max |logit diff| {diff:.2e}")
    assert diff < 1e-4

    jpeft.export_peft(adapters, config, tmp_path / "ours")
    again = load_file(tmp_path / "ours" / jpeft.WEIGHTS_FILE)
    assert again.keys() == load_file(tmp_path / "theirs" / jpeft.WEIGHTS_FILE).keys()
    diff = np.abs(torch_logits(load_in_peft(base_dir, tmp_path / "ours")) - ours).max()
    print(f"{name}: jlora DoRA -> PEFT max |logit diff| {diff:.2e}")
    assert diff < 1e-4


@interop
def test_ia3_equals_peft_both_ways(hf_base, tmp_path):
    """A PEFT IA3 adapter on Llama imports with PEFT's logits, and exported again loads in PEFT the same."""
    import peft
    import torch
    import transformers

    base_dir, model, variables = hf_base("llama")
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for param_name, param in theirs.named_parameters():
            if "ia3_l" in param_name:
                param.normal_(1.0, 0.5)
    theirs.save_pretrained(tmp_path / "theirs")
    expected = torch_logits(theirs.eval())

    adapters = jpeft.import_peft(tmp_path / "theirs", variables, LLAMA)
    assert {type(v).__name__ for v in table(adapters).values()} == {"IA3"} and len(table(adapters)) == 6
    ours = jlora_logits(model, variables, adapters)
    assert np.abs(expected - np.asarray(model.apply(variables, jnp.array(TOKENS)))).max() > 0.1
    diff = np.abs(ours - expected).max()
    print(f"llama: PEFT IA3 -> jlora max |logit diff| {diff:.2e}")
    assert diff < 1e-4

    jpeft.export_peft(adapters, LLAMA, tmp_path / "ours")
    diff = np.abs(torch_logits(load_in_peft(base_dir, tmp_path / "ours")) - ours).max()
    print(f"llama: jlora IA3 -> PEFT max |logit diff| {diff:.2e}")
    assert diff < 1e-4

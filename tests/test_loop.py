"""jlora.fit: history, evaluation and checkpoint cadence, resume, NaN stop and Ctrl-C."""

import json
import math
from typing import NamedTuple

import jax.numpy as jnp
import pytest

import jlora
from jlora import loop


class State(NamedTuple):
    step: int
    total: float


def step(state, batch):
    """Adds the batch to a running total; the loss is 1 / (step + 1), or NaN for a batch of None."""
    loss = math.nan if batch is None else 1.0 / (state.step + 1)
    return State(state.step + 1, state.total + (batch or 0)), {"loss": jnp.asarray(loss), "learning_rate": 0.5}


class Saves:
    """A stand-in checkpointer that records the steps it saved."""

    def __init__(self, steps=()):
        self.steps = list(steps)

    def latest_step(self):
        return self.steps[-1] if self.steps else None

    def save(self, state, metadata=None):
        self.steps.append(state.step)


def test_fit_logs_every_step_and_evaluates_and_saves_on_cadence(tmp_path):
    saves, logged = Saves(), []
    result = loop.fit(step, State(0, 0.0), lambda k: k, max_steps=6, checkpointer=saves, save_every=4,
                      evaluate=lambda s: {"valid_perplexity": s.total}, eval_every=3,
                      history_path=tmp_path / "history.jsonl", log=logged.append)
    assert result.state == State(6, 15.0) and result.last_saved == 6 and saves.steps == [4, 6]
    steps = [(h["step"], "loss" in h) for h in result.history]
    assert steps == [(0, False), (1, True), (2, True), (3, True), (3, False), (4, True), (5, True), (6, True), (6, False)]
    assert [h["valid_perplexity"] for h in result.history if "valid_perplexity" in h] == [0.0, 3.0, 15.0]
    assert [h["loss"] for h in result.history if "loss" in h][:2] == [1.0, 0.5]
    assert all(h["learning_rate"] == 0.5 and h["seconds"] >= 0 for h in result.history if "loss" in h)
    assert logged == result.history
    assert [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()] == result.history


def test_a_resumed_fit_drops_the_history_after_its_start_and_does_not_evaluate_before(tmp_path):
    path = tmp_path / "history.jsonl"
    loop.fit(step, State(0, 0.0), lambda k: k, max_steps=5, history_path=path)
    result = loop.fit(step, State(3, 3.0), lambda k: k, max_steps=4, history_path=path,
                      evaluate=lambda s: {"valid_perplexity": 1.0})
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 4]
    assert loop.read_history(path) == result.history


def test_only_the_writer_writes_the_history_and_logs_but_every_process_steps_and_saves(tmp_path):
    saves, logged = Saves(), []
    result = loop.fit(step, State(0, 0.0), lambda k: k, max_steps=3, checkpointer=saves,
                      history_path=tmp_path / "history.jsonl", log=logged.append, writer=False)
    assert result.state == State(3, 3.0) and saves.steps == [3] and len(result.history) == 3
    assert logged == [] and not (tmp_path / "history.jsonl").exists()


def test_a_non_finite_loss_stops_with_the_step_and_the_last_checkpoint(tmp_path):
    saves = Saves()
    with pytest.raises(loop.LossNotFinite, match="loss is nan at step 4") as stopped:
        loop.fit(step, State(0, 0.0), lambda k: None if k == 3 else k, max_steps=6, checkpointer=saves, save_every=2)
    assert stopped.value.step == 4 and stopped.value.last_saved == 2 and saves.steps == [2]


@pytest.mark.parametrize("before, stop_at, last_saved", [((), 0, None), ((), 3, 2), ((8,), 0, 8)])
def test_ctrl_c_says_how_far_it_got_and_what_is_saved(before, stop_at, last_saved):
    def batches(k):
        if k == stop_at:
            raise KeyboardInterrupt
        return k

    with pytest.raises(loop.Interrupted) as stopped:
        loop.fit(step, State(0, 0.0), batches, max_steps=6, checkpointer=Saves(before), save_every=2)
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert (stopped.value.step, stopped.value.last_saved) == (stop_at, last_saved)


def test_fit_is_the_public_loop():
    assert jlora.fit is loop.fit


def test_plotting_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"plotting needs matplotlib: pip install 'jlora\[plot\]'"):
        loop.plot_history([{"step": 1, "loss": 1.0}], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_the_plot_draws_training_and_evaluated_points(tmp_path):
    loop.plot_history([{"step": 0, "valid_perplexity": 9.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
                       {"step": 2, "valid_perplexity": 5.0}], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

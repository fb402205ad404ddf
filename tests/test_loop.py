"""jlora.fit: history, evaluation and checkpoint cadence, resume, NaN stop and Ctrl-C."""

import errno
import json
import math
import signal
from typing import NamedTuple

import jax.numpy as jnp
import pytest

import jlora
from jlora.training import loop


class State(NamedTuple):
    step: int
    total: float


def step(state, batch):
    """Adds the batch to a running total; the loss is 1 / (step + 1), or NaN for a batch of None."""
    loss = math.nan if batch is None else 1.0 / (state.step + 1)
    return State(state.step + 1, state.total + (batch or 0)), {"loss": jnp.asarray(loss), "learning_rate": 0.5}


class Saves:
    """A stand-in checkpointer that records the steps it saved (and their metadata), keeping ``keep``."""

    def __init__(self, steps=(), keep=None, metadata=None):
        self.steps, self.keep, self.saved = list(steps), keep, dict(metadata or {})

    def latest_step(self):
        return self.steps[-1] if self.steps else None

    def all_steps(self):
        return list(self.steps)

    def save(self, state, metadata=None):
        self.steps.append(state.step)
        self.saved[state.step] = metadata
        if self.keep:
            self.steps = self.steps[-self.keep:]

    def metadata(self, step):
        return self.saved[step]

    def delete(self, step):
        self.steps.remove(step)


def test_fit_logs_every_step_and_evaluates_and_saves_on_cadence(tmp_path):
    saves, logged = Saves(), []
    result = loop.fit(step, State(0, 0.0), lambda k: k, max_steps=6, checkpointer=saves, save_every=4,
                      evaluate=lambda s: {"valid_perplexity": s.total}, eval_every=3,
                      history_path=tmp_path / "history.jsonl", log=logged.append, tokens_per_step=64)
    assert result.state == State(6, 15.0) and result.last_saved == 6 and saves.steps == [4, 6]
    steps = [(h["step"], "loss" in h) for h in result.history]
    assert steps == [(0, False), (1, True), (2, True), (3, True), (3, False), (4, True), (5, True), (6, True), (6, False)]
    assert [h["valid_perplexity"] for h in result.history if "valid_perplexity" in h] == [0.0, 3.0, 15.0]
    assert [h["loss"] for h in result.history if "loss" in h][:2] == [1.0, 0.5]
    assert all(h["learning_rate"] == 0.5 and h["seconds"] >= 0 for h in result.history if "loss" in h)
    assert all(h["tokens_per_second"] == pytest.approx(64 / max(h["seconds"], 1e-9)) for h in result.history if "loss" in h)
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


def perplexities(*values):
    """An evaluate that returns ``values`` in turn as the validation perplexity."""
    queue = list(values)
    return lambda state: {"valid_perplexity": queue.pop(0)}


def test_the_best_evaluation_is_kept_apart_and_checkpoints_follow_the_evaluations():
    saves, best = Saves(), Saves(keep=1)
    result = loop.fit(step, State(0, 0.0), lambda k: k, max_steps=6, checkpointer=saves, save_every=5,
                      evaluate=perplexities(9.0, 7.0, 4.0, 6.0), eval_every=2, metadata={"run": "a"}, best=best)
    assert saves.steps == [2, 4, 5, 6]  # every evaluation's step too, so a resume never starts before the best
    assert best.steps == [4] and result.best == {"step": 4, "valid_perplexity": 4.0}
    assert best.saved[4] == {"run": "a", "evaluation": {"step": 4, "valid_perplexity": 4.0}}


def test_a_resumed_fit_keeps_the_best_so_far_and_drops_a_later_one():
    earlier = {"evaluation": {"step": 2, "valid_perplexity": 3.0}}
    best = Saves([2], keep=1, metadata={2: earlier})
    result = loop.fit(step, State(2, 1.0), lambda k: k, max_steps=6, evaluate=perplexities(5.0, 2.0),
                      eval_every=2, best=best)
    assert best.steps == [6] and result.best == {"step": 6, "valid_perplexity": 2.0}  # 5.0 at step 4 is no better
    future = Saves([2, 4], metadata={2: earlier, 4: {"evaluation": {"step": 4, "valid_perplexity": 1.0}}})
    result = loop.fit(step, State(2, 1.0), lambda k: k, max_steps=4, evaluate=perplexities(5.0), best=future)
    assert future.steps == [2] and result.best == earlier["evaluation"]  # step 4 was measured past the resume
    fresh = Saves([0], metadata={0: {"evaluation": {"step": 0, "valid_perplexity": 1.0}}})
    result = loop.fit(step, State(0, 0.0), lambda k: k, max_steps=1, evaluate=perplexities(8.0, 9.0), best=fresh)
    assert fresh.steps == [0] and result.best == {"step": 0, "valid_perplexity": 8.0}  # an earlier run's is dropped


def test_the_validation_loss_of_several_tasks_is_their_mean_log_perplexity():
    assert loop.validation_loss({"step": 1, "valid_perplexity/a": math.e, "valid_perplexity/b": math.e**3}) == pytest.approx(2.0)
    assert loop.validation_loss({"step": 1, "loss": 2.0}) is None


def test_the_plot_marks_measured_evaluations_only_and_smooths_the_training_loss():
    history = [{"step": 0, "valid_perplexity": 9.0}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.0},
               {"step": 3, "loss": 2.0}, {"step": 3, "valid_perplexity": 5.0}]
    fig = loop.plot_history(history, smoothing=0.5)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert sorted(lines) == ["train loss", "train loss (EMA 0.5)", "validation loss"]
    valid = lines["validation loss"]
    assert valid.get_linestyle() == "None" and valid.get_marker() == "o"  # nothing joins the two evaluations
    assert list(valid.get_xdata()) == [0, 3] and list(valid.get_ydata()) == pytest.approx([math.log(9.0), math.log(5.0)])
    assert list(lines["train loss"].get_ydata()) == [3.0, 1.0, 2.0]
    # the averages 1.5, 1.25, 1.625 over the bias corrections 1 - 0.5^k
    assert list(lines["train loss (EMA 0.5)"].get_ydata()) == pytest.approx([3.0, 5 / 3, 13 / 7])
    __import__("matplotlib.pyplot").pyplot.close(fig)


def test_smoothing_refuses_a_weight_outside_0_1():
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\), got 1.0"):
        loop.smooth([1.0], weight=1.0)


# ---- faults: a failed write or Ctrl-C names the last checkpoint, and loses none ----


def test_ctrl_c_during_a_save_lets_the_save_finish_then_stops():
    saves = Saves()
    real_save = saves.save

    def interrupted_mid_save(state, metadata=None):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives while the checkpoint is being written
        real_save(state, metadata)

    saves.save = interrupted_mid_save
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(loop.Interrupted) as stopped:
        loop.fit(step, State(0, 0.0), lambda k: k, max_steps=6, checkpointer=saves, save_every=2)
    assert (stopped.value.step, stopped.value.last_saved, saves.steps) == (2, 2, [2])
    assert signal.getsignal(signal.SIGINT) is handler  # put back after each save


def test_a_history_or_log_write_that_fails_is_one_error_naming_the_file_and_last_checkpoint(tmp_path):
    history = tmp_path / "history.jsonl"

    def board(entry):
        if entry["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tensorboard" / "events"))

    with pytest.raises(loop.WriteFailed) as failed:
        loop.fit(step, State(0, 0.0), lambda k: k, max_steps=6, checkpointer=(saves := Saves()), save_every=2,
                 history_path=history, log=board)
    assert str(failed.value) == f"writing {tmp_path / 'tensorboard' / 'events'} failed after step 3: No space left on device"
    assert failed.value.last_saved == 2 and saves.steps == [2]
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3]


def test_a_resumed_history_that_cannot_be_rewritten_is_left_whole(tmp_path, monkeypatch):
    history = tmp_path / "history.jsonl"
    loop.fit(step, State(0, 0.0), lambda k: k, max_steps=4, history_path=history)
    before = history.read_bytes()

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop.os, "replace", disk_full)
    with pytest.raises(loop.WriteFailed, match=f"writing {history} failed after step 2: No space left on device"):
        loop.fit(step, State(2, 1.0), lambda k: k, max_steps=4, history_path=history, checkpointer=Saves([2]))
    assert history.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["history.jsonl"]


def test_a_ctrl_c_that_a_callback_swallowed_still_stops_the_loop_and_prints_nothing(capsys):
    class Finalised:
        def __del__(self):  # what JAX's garbage-collection hook is to a Ctrl-C: it drops the KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)

    def step_with_a_finaliser(state, batch):
        if state.step == 2:
            Finalised()
        return step(state, batch)

    with pytest.raises(loop.Interrupted) as stopped:
        loop.fit(step_with_a_finaliser, State(0, 0.0), lambda k: k, max_steps=6)
    assert stopped.value.step == 3 and capsys.readouterr().err == ""
    assert not jlora.core.interrupts.pending()

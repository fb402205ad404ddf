"""jlora.training.tasks: several datasets in one run, each task's batches and validation as if alone."""

import numpy as np
import pytest

from jlora.training import data, tasks


class Bytes:
    eos_id, bos_id = 0, None

    def encode(self, text):
        return [b + 1 for b in text.encode()]


@pytest.fixture
def two(tmp_path):
    paths = {}
    for name, line in (("romeo", "ROMEO {}: what light through yonder window breaks?\n"),
                       ("hamlet", "HAMLET {}: to be, or not to be, that is the question.\n")):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("".join(line.format(i) for i in range(20)))
    return tasks.load_tasks(Bytes(), 16, paths, 0.2, seed=0, batch_size=8), paths


def test_each_task_loads_as_its_file_alone_would(two):
    found, paths = two
    assert [t.name for t in found] == ["romeo", "hamlet"] and tasks.stacked(found)
    for task in found:
        train, valid = data.load_splits(Bytes(), 16, [paths[task.name]], None, 0.2, 0)
        np.testing.assert_array_equal(task.train.tokens, train.tokens)
        np.testing.assert_array_equal(task.valid.tokens, valid.tokens)


def test_a_task_with_fewer_rows_than_its_share_of_a_batch_is_refused_by_name(two):
    _, paths = two
    with pytest.raises(ValueError, match=r"task romeo has \d+ training sequences of 16 tokens, fewer than its 500 rows"):
        tasks.load_tasks(Bytes(), 16, paths, 0.2, batch_size=1000)


def test_a_batch_is_each_tasks_batch_alone_in_task_order_with_adapter_ids(two):
    found, _ = two
    batch = tasks.batch_at(found, 8, seed=3, step=5)
    alone = [data.batch_at(t.train, 4, 3, 5) for t in found]
    np.testing.assert_array_equal(batch["tokens"], np.concatenate([a["tokens"] for a in alone]))
    np.testing.assert_array_equal(batch["adapter_ids"], [0, 0, 0, 0, 1, 1, 1, 1])
    share = tasks.batch_at(found, 8, seed=3, step=5, rows=slice(4, 8))  # a second process's rows
    np.testing.assert_array_equal(share["tokens"], alone[1]["tokens"])
    one = [tasks.Task("", found[0].train)]
    assert not tasks.stacked(one) and "adapter_ids" not in tasks.batch_at(one, 4, 3, 5)
    np.testing.assert_array_equal(tasks.batch_at(one, 4, 3, 5)["tokens"], alone[0]["tokens"])


def test_perplexities_take_each_tasks_adapter_and_name_the_metrics(two):
    found, _ = two
    seen = []

    def evaluate(params, adapters, batch):  # loss sum: the adapter's index per token, so ppl = exp(index)
        seen.append(adapters)
        return float(adapters["i"][0]) * batch["loss_mask"].sum(), batch["loss_mask"].sum()

    stack = {"i": np.array([[1.0], [2.0]])}
    got = tasks.perplexities(evaluate, None, stack, found, 4)
    assert got == pytest.approx({"romeo": np.e, "hamlet": np.e ** 2})
    one = tasks.perplexities(evaluate, None, {"i": np.array([0.5])}, [tasks.Task("", None, found[0].valid)], 4)
    assert one == pytest.approx({"": np.exp(0.5)})
    assert tasks.validation_metrics({"": 2.0, "a": np.e}) == pytest.approx(
        {"valid_perplexity": 2.0, "valid_perplexity/a": np.e, "valid_loss": np.log(2.0), "valid_loss/a": 1.0})

"""Training data: text, prompt/completion pairs, chats or Alpaca instructions, tokenized into fixed-length arrays and batched.

Everything here is numpy and works with any tokenizer that has ``encode(str) -> list[int]`` and
``eos_id`` / ``bos_id`` attributes (either may be ``None``). ``encode`` is expected not to add
special tokens itself; this module adds them:

- each document or example starts with ``bos_id`` (left out when it is ``None`` or equal to
  ``eos_id``, as in GPT-2, where one token marks both ends and would otherwise appear twice);
- each ends with ``eos_id`` (left out when it is ``None``).

Chat records are the exception: the chat template writes their special tokens (see :mod:`jlora.chat`).

A :class:`Dataset` holds three ``[N, seq_len]`` arrays: ``tokens`` (inputs), ``targets`` (the next
token at each position) and ``loss_mask`` (float32, 1 where the target counts towards the loss).

Batching is stateless: the batch at step ``k`` is a pure function of ``(seed, k)``, so resuming
from a checkpoint needs nothing but the step number.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from jlora.training import chat

CORPUS_DIR = Path(__file__).parents[1] / "corpus" / "shakespeare"

PathLike = str | Path
Paths = PathLike | Sequence[PathLike]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Fixed-length training sequences.

    Attributes:
      tokens: int32 ``[N, seq_len]`` model inputs.
      targets: int32 ``[N, seq_len]``; ``targets[i, t]`` is the token that follows ``tokens[i, t]``.
      loss_mask: float32 ``[N, seq_len]``; 1.0 where ``targets`` counts towards the loss, else 0.0.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [N, seq_len], got shape {self.tokens.shape}")
        for name in ("targets", "loss_mask"):
            shape = getattr(self, name).shape
            if shape != self.tokens.shape:
                raise ValueError(f"{name} has shape {shape}, tokens has {self.tokens.shape}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``indices`` as a batch dict with keys tokens, targets, loss_mask."""
        return {
            "tokens": self.tokens[indices],
            "targets": self.targets[indices],
            "loss_mask": self.loss_mask[indices],
        }


def default_corpus() -> tuple[list[Path], list[Path]]:
    """The bundled Shakespeare plays (see ``jlora/corpus/shakespeare/ATTRIBUTION.md``).

    Returns:
      ``(train_paths, valid_paths)``: sorted lists of plain-text files, whole plays, disjoint.

    Example:
      >>> train_paths, valid_paths = default_corpus()
      >>> [p.name for p in valid_paths]
      ['tempest_gut.txt', 'twelfth_night_gut.txt']
    """
    train = sorted((CORPUS_DIR / "train").glob("*.txt"))
    valid = sorted((CORPUS_DIR / "valid").glob("*.txt"))
    if not train or not valid:
        raise ValueError(
            f"bundled corpus not found under {CORPUS_DIR} (train: {len(train)} files, "
            f"valid: {len(valid)} files); was jlora installed without its package data?"
        )
    return train, valid


def pack_text(paths: Paths, tokenizer: Any, seq_len: int) -> Dataset:
    """Tokenize plain-text files and pack them into full-length sequences.

    Each file is one document: ``[bos] + encode(text) + [eos]``. Documents are concatenated and cut
    into windows of ``seq_len + 1`` tokens that overlap by one token, so every token after the first
    is a target exactly once; the leftover tail shorter than a window is dropped.

    Args:
      paths: one file or a list of files, read as UTF-8.
      tokenizer: has ``encode(str) -> list[int]``, ``eos_id`` and ``bos_id``.
      seq_len: length of each sequence.

    Returns:
      A :class:`Dataset` with ``(total_tokens - 1) // seq_len`` rows and ``loss_mask`` all ones.

    Example:
      >>> import tempfile, types
      >>> path = Path(tempfile.mkdtemp()) / "notes.txt"
      >>> _ = path.write_text("abcdefg")
      >>> tokenizer = types.SimpleNamespace(encode=lambda text: list(text.encode()), bos_id=None, eos_id=256)
      >>> data = pack_text(path, tokenizer, seq_len=3)  # 7 bytes + eos: 8 tokens, 2 rows, the tail dropped
      >>> data.tokens.tolist(), data.targets.tolist()
      ([[97, 98, 99], [100, 101, 102]], [[98, 99, 100], [101, 102, 103]])
    """
    _check_seq_len(seq_len)
    paths = _as_paths(paths)
    return _pack([_document(_read_text(p), tokenizer) for p in paths], seq_len, _names(paths))


def _pack(documents: list[np.ndarray], seq_len: int, names: str) -> Dataset:
    stream = np.concatenate(documents)
    needed = seq_len + 1
    if len(stream) < needed:
        raise ValueError(
            f"{names}: {len(stream)} tokens in total, need at least {needed} "
            f"for one sequence of seq_len={seq_len} (seq_len + 1 tokens)"
        )
    rows = (len(stream) - 1) // seq_len
    tokens = stream[: rows * seq_len].reshape(rows, seq_len)
    targets = stream[1 : rows * seq_len + 1].reshape(rows, seq_len)
    return Dataset(tokens, targets, np.ones(tokens.shape, np.float32))


def load_jsonl(paths: Paths, tokenizer: Any, seq_len: int) -> Dataset:
    """Tokenize JSONL records: one example per row, loss on what the model should write.

    Each non-blank line is a JSON object of one of these shapes (other keys are ignored); every
    line of a file has the same shape, and files of different shapes may be loaded together:

    - ``{"prompt", "completion"}`` (or ``{"input", "output"}``): ``[bos] + encode(prompt) +
      encode(completion) + [eos]``, loss on the completion and the eos.
    - ``{"messages": [{"role", "content"}, ...]}``: the conversation rendered with the tokenizer's
      chat template, loss on each assistant message's content and end-of-turn token, not on its
      role header (see :mod:`jlora.chat`).
    - ``{"instruction", "input" (optional), "output"}`` (Alpaca): with a chat template, a user
      message (the instruction, then a blank line and the input when there is one) answered by an
      assistant message of the output; without one, :data:`ALPACA_PROMPT`'s text as the prompt and
      the output as the completion. Loss on the output only.
    - ``{"text"}``: documents, packed like :func:`pack_text` packs files (loss on every token).

    An example longer than ``seq_len + 1`` tokens is truncated (its start kept, loss on the part
    that fits; a warning counts them), one whose first loss token does not fit is an error. Shorter
    ones are padded to ``seq_len`` with ``eos_id`` (or 0 when there is none), loss 0 on padding.
    Examples are not packed several to a row: the models attend causally over the whole row (no
    segment ids), so a packed example would see the ones before it.

    Args:
      paths: one ``.jsonl`` file or a list of them, read as UTF-8.
      tokenizer: has ``encode(str) -> list[int]``, ``eos_id`` and ``bos_id``; for chat records also
        ``apply_chat_template`` and ``encode_with_offsets`` (``jlora.models.Tokenizer``).
      seq_len: length of each row.

    Returns:
      A :class:`Dataset`: each file's rows in file order, one per example (text records: packed).

    Example:
      >>> import tempfile, types
      >>> path = Path(tempfile.mkdtemp()) / "pairs.jsonl"
      >>> _ = path.write_text(json.dumps({"prompt": "ab", "completion": "cd"}))
      >>> tokenizer = types.SimpleNamespace(encode=lambda text: list(text.encode()), bos_id=None, eos_id=256)
      >>> data = load_jsonl(path, tokenizer, seq_len=6)
      >>> data.tokens[0].tolist(), data.targets[0].tolist(), data.loss_mask[0].tolist()
      ([97, 98, 99, 100, 256, 256], [98, 99, 100, 256, 256, 256], [0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    """
    _check_seq_len(seq_len)
    parts = []
    for path in _as_paths(paths):
        shape, records = _read_records(path)
        if shape == "text":
            parts.append(_pack([_document(text, tokenizer) for _, text in records], seq_len, str(path)))
        else:
            parts.append(_example_rows(path, shape, records, tokenizer, seq_len))
    return Dataset(*(np.concatenate([getattr(part, name) for part in parts])
                     for name in ("tokens", "targets", "loss_mask")))


# The prompt of Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca), with and without an input.
ALPACA_PROMPT = {
    True: ("Below is an instruction that describes a task, paired with an input that provides further "
           "context. Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    False: ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}


def _example_rows(path: Path, shape: str, records: list, tokenizer: Any, seq_len: int) -> Dataset:
    """One row per record of a prompt/completion, chat or instruction file."""
    templated = getattr(tokenizer, "chat_template", None) is not None
    if shape == "chat" and not templated:
        raise ValueError(f"{path}: chat ('messages') records need a tokenizer with a chat template, and this "
                         "one has none; write them as prompt/completion records instead")
    pad_id = 0 if tokenizer.eos_id is None else tokenizer.eos_id
    tokens, targets, masks, truncated = [], [], [], 0
    for line_number, record in records:
        if shape == "instruction" and templated:
            shape_now, record = "chat", {"messages": _alpaca_messages(record)}
        else:
            shape_now = shape
        if shape_now == "chat":
            try:
                ids, is_target = chat.tokenize(record["messages"], tokenizer)
            except ValueError as error:
                raise ValueError(f"{path}:{line_number}: {error}") from None
            first = int(np.argmax(is_target))
        else:
            prompt, completion = _alpaca_pair(record) if shape == "instruction" else record
            prompt_ids = _document(prompt, tokenizer, eos=False)
            ids = np.concatenate([prompt_ids, _document(completion, tokenizer, bos=False)])
            is_target = np.arange(len(ids)) >= len(prompt_ids)
            first = len(prompt_ids)
        if not is_target.any():
            raise ValueError(f"{path}:{line_number}: the chat template wrote no assistant token to learn")
        if first > seq_len:  # the first target is ids[first], at row position first - 1
            before = " (the conversation before the first assistant token)" if shape_now == "chat" else ""
            raise ValueError(
                f"{path}:{line_number}: prompt is {first} tokens{before}, so no completion token fits in "
                f"seq_len={seq_len}; raise seq_len or shorten the prompt"
            )
        truncated += len(ids) > seq_len + 1
        ids, is_target = ids[: seq_len + 1], is_target[: seq_len + 1]
        pad = seq_len - (len(ids) - 1)
        tokens.append(np.pad(ids[:-1], (0, pad), constant_values=pad_id))
        targets.append(np.pad(ids[1:], (0, pad), constant_values=pad_id))
        masks.append(np.pad(is_target[1:], (0, pad)))
    if truncated:
        warnings.warn(f"{path}: {truncated} of {len(records)} examples are longer than seq_len + 1 = "
                      f"{seq_len + 1} tokens; each was cut to its first {seq_len + 1}", stacklevel=3)
    return Dataset(np.stack(tokens), np.stack(targets), np.stack(masks).astype(np.float32))


def _alpaca_messages(record: dict) -> list[dict]:
    content = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": content}, {"role": "assistant", "content": record["output"]}]


def _alpaca_pair(record: dict) -> tuple[str, str]:
    prompt = ALPACA_PROMPT[bool(record.get("input"))].format(**{"input": "", **record})
    return prompt, record["output"]


def load(paths: Paths, tokenizer: Any, seq_len: int) -> Dataset:
    """Load files by suffix: ``.jsonl`` with :func:`load_jsonl`, others with :func:`pack_text`.

    Args:
      paths: one file or a list of files, all ``.jsonl`` or all plain text.
      tokenizer: has ``encode(str) -> list[int]``, ``eos_id`` and ``bos_id``.
      seq_len: length of each row.

    Returns:
      A :class:`Dataset`.
    """
    paths = _as_paths(paths)
    is_jsonl = {p.suffix == ".jsonl" for p in paths}
    if len(is_jsonl) > 1:
        raise ValueError(f"{_names(paths)}: mix .jsonl and plain-text files; load them separately")
    loader = load_jsonl if is_jsonl.pop() else pack_text
    return loader(paths, tokenizer, seq_len)


def split(dataset: Dataset, valid_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a random fraction of rows for validation.

    Args:
      dataset: the rows to split.
      valid_fraction: share of rows to hold out, in (0, 1); rounded, at least one row each side.
      seed: chooses which rows; the same seed always picks the same rows.

    Returns:
      ``(train, valid)``, disjoint, each keeping the original row order.

    Example:
      >>> rows = np.arange(100, dtype=np.int32)[:, None]  # 100 rows of one token each
      >>> data = Dataset(rows, rows + 1, np.ones(rows.shape, np.float32))
      >>> train, valid = split(data, valid_fraction=0.1, seed=0)
      >>> len(train), len(valid)
      (90, 10)
      >>> sorted(train.tokens[:, 0].tolist() + valid.tokens[:, 0].tolist()) == list(range(100))
      True
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    n_valid = round(len(dataset) * valid_fraction)
    if not 1 <= n_valid < len(dataset):
        raise ValueError(
            f"valid_fraction={valid_fraction} of {len(dataset)} rows leaves {n_valid} for "
            f"validation and {len(dataset) - n_valid} for training; both need at least one"
        )
    order = np.random.default_rng(seed).permutation(len(dataset))
    valid_rows, train_rows = np.sort(order[:n_valid]), np.sort(order[n_valid:])
    return Dataset(**dataset.rows(train_rows)), Dataset(**dataset.rows(valid_rows))


def load_splits(
    tokenizer: Any,
    seq_len: int,
    train_paths: Paths | None = None,
    valid_paths: Paths | None = None,
    valid_fraction: float | None = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset | None]:
    """Training and validation data from separate files, a held-out fraction, or the default corpus.

    Args:
      tokenizer: has ``encode(str) -> list[int]``, ``eos_id`` and ``bos_id``.
      seq_len: length of each row.
      train_paths: training files (see :func:`load`); ``None`` uses :func:`default_corpus`, both
        its train and valid plays.
      valid_paths: validation files, loaded like ``train_paths``.
      valid_fraction: instead of ``valid_paths``, hold out this share of the training rows.
      seed: which rows ``valid_fraction`` holds out.

    Returns:
      ``(train, valid)``; ``valid`` is ``None`` when there are no valid files and no fraction.
    """
    if valid_paths is not None and valid_fraction is not None:
        raise ValueError("give valid_paths or valid_fraction, not both")
    if train_paths is None:
        if valid_paths is not None:
            raise ValueError("valid_paths needs train_paths; the default corpus has its own split")
        train_paths, default_valid = default_corpus()
        if valid_fraction is None:
            valid_paths = default_valid
    train = load(train_paths, tokenizer, seq_len)
    if valid_paths is not None:
        return train, load(valid_paths, tokenizer, seq_len)
    if valid_fraction is not None:
        return split(train, valid_fraction, seed)
    return train, None


def batch_at(dataset: Dataset, batch_size: int, seed: int, step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """The training batch at ``step``: a pure function of ``(seed, step)`` for a given dataset.

    Steps walk through epochs of ``len(dataset) // batch_size`` batches; each epoch visits the rows
    in its own shuffled order (seeded by ``seed`` and the epoch number) and drops the remainder.

    Args:
      dataset: the rows to draw from.
      batch_size: rows per batch, at most ``len(dataset)``.
      seed: non-negative int seeding every epoch's order.
      step: non-negative global step.
      rows: which rows of the batch to read: on several processes, this process's share
        (``jlora.distributed.process_rows``); every process shuffles the same way.

    Returns:
      ``{"tokens", "targets", "loss_mask"}``, each ``[batch_size, seq_len]`` (the ``rows`` of it).
    """
    steps_per_epoch = _steps_per_epoch(dataset, batch_size)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, index = divmod(step, steps_per_epoch)
    order = _epoch_order(len(dataset), seed, epoch)
    return dataset.rows(order[index * batch_size : (index + 1) * batch_size][rows])


def batches(
    dataset: Dataset, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from ``start_step`` on, identical to ``batch_at`` at every step.

    Args:
      dataset: the rows to draw from.
      batch_size: rows per batch, at most ``len(dataset)``.
      seed: non-negative int seeding every epoch's order.
      start_step: the step of the first batch; pass a checkpoint's step to resume exactly.

    Returns:
      An iterator of batch dicts (see :func:`batch_at`); stop it with ``itertools.islice``.

    Example:
      >>> rows = np.arange(40, dtype=np.int32).reshape(10, 4)  # 10 rows of seq_len 4
      >>> dataset = Dataset(rows, rows + 1, np.ones(rows.shape, np.float32))
      >>> it = batches(dataset, batch_size=2, seed=0, start_step=100)
      >>> next(it)["tokens"].shape
      (2, 4)
      >>> np.array_equal(next(it)["tokens"], batch_at(dataset, batch_size=2, seed=0, step=101)["tokens"])
      True
    """
    steps_per_epoch = _steps_per_epoch(dataset, batch_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    epoch, index = divmod(start_step, steps_per_epoch)
    while True:
        order = _epoch_order(len(dataset), seed, epoch)
        for i in range(index, steps_per_epoch):
            yield dataset.rows(order[i * batch_size : (i + 1) * batch_size])
        epoch, index = epoch + 1, 0


def eval_batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One in-order pass over every row, for evaluation.

    The last batch is filled up to ``batch_size`` by repeating row 0 with ``loss_mask`` zero, so all
    batches share one shape (one compilation) and every row is counted exactly once.

    Args:
      dataset: the rows to evaluate.
      batch_size: rows per batch.

    Returns:
      An iterator of ``ceil(len(dataset) / batch_size)`` batch dicts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        rows = np.arange(start, start + batch_size)
        batch = dataset.rows(np.where(rows < len(dataset), rows, 0))
        batch["loss_mask"][rows >= len(dataset)] = 0.0
        yield batch


def _steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > len(dataset):
        raise ValueError(
            f"batch_size {batch_size} is larger than the dataset ({len(dataset)} sequences); "
            f"use batch_size <= {len(dataset)} or more data"
        )
    return len(dataset) // batch_size


def _epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def _document(text: str, tokenizer: Any, bos: bool = True, eos: bool = True) -> np.ndarray:
    bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    prefix = [bos_id] if bos and bos_id is not None and bos_id != eos_id else []
    suffix = [eos_id] if eos and eos_id is not None else []
    return np.asarray(prefix + list(tokenizer.encode(text)) + suffix, dtype=np.int32)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


# Each record shape: the keys that name it (any one present) and the string fields it needs.
SHAPES = {
    "chat": (("messages",), ("messages",)),
    "instruction": (("instruction",), ("instruction", "output")),
    "prompt/completion": (("prompt", "completion"), ("prompt", "completion")),
    "text": (("text",), ("text",)),
}


def _read_records(path: Path) -> tuple[str, list[tuple[int, Any]]]:
    """The file's record shape and its ``(line_number, record)`` for each non-blank line, counting
    from 1: a text record as its string, a prompt/completion one as a ``(prompt, completion)`` pair,
    chat and instruction records as the checked dict."""
    shape, first, records = None, None, []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object, got {line[:60]!r}")
        this = _shape(record)
        if this is None:
            raise ValueError(
                f"{path}:{line_number}: a record holds 'text', 'prompt' and 'completion' (or 'input' and "
                f"'output'), 'messages', or 'instruction' and 'output'; got keys {sorted(record)}"
            )
        if shape is None:
            shape, first = this, line_number
        elif this != shape:
            raise ValueError(
                f"{path}:{line_number}: {_a(this)} record, but line {first} is {_a(shape)} record; "
                "one file holds one record shape (put the others in a file of their own)"
            )
        records.append((line_number, _checked(record, shape, f"{path}:{line_number}")))
    return shape, records


def _a(shape: str) -> str:
    return f"{'an' if shape[0] in 'aeiou' else 'a'} {shape}"


def _shape(record: dict) -> str | None:
    if "input" in record and "output" in record and "instruction" not in record:
        return "prompt/completion"  # the older spelling of a prompt/completion pair
    return next((name for name, (keys, _) in SHAPES.items() if any(k in record for k in keys)), None)


def _checked(record: dict, shape: str, where: str) -> Any:
    if shape == "chat":
        try:
            chat.check_messages(record["messages"])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        return record
    if shape == "prompt/completion":
        keys = ("prompt", "completion") if "prompt" in record or "completion" in record else ("input", "output")
        if not all(isinstance(record.get(key), str) for key in keys):
            raise ValueError(f"{where}: expected string fields 'prompt' and 'completion' "
                             f"(or 'input' and 'output'), got keys {sorted(record)}")
        return record[keys[0]], record[keys[1]]
    needed = SHAPES[shape][1] + (("input",) if shape == "instruction" and "input" in record else ())
    wrong = [key for key in needed if not isinstance(record.get(key), str)]
    if wrong:
        raise ValueError(f"{where}: {shape} records need string fields {', '.join(map(repr, needed))}; "
                         f"{', '.join(f'{k!r} is {type(record.get(k)).__name__}' for k in wrong)}")
    return record["text"] if shape == "text" else record


def _as_paths(paths: Paths) -> list[Path]:
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no data files given")
    return paths


def _names(paths: Paths) -> str:
    return ", ".join(str(p) for p in _as_paths(paths))


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")

import itertools
import json

import numpy as np
import pytest

from jlora.training import data


class ByteTokenizer:
    """One token per UTF-8 byte, so every expected array can be written out by hand."""

    def __init__(self, eos_id=256, bos_id=None):
        self.eos_id, self.bos_id = eos_id, bos_id

    def encode(self, text):
        return list(text.encode("utf-8"))


BYTES = ByteTokenizer()


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path, records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def indexed(num_rows, seq_len=2):
    """A dataset whose row i holds the value i everywhere, so a batch names its rows."""
    rows = np.repeat(np.arange(num_rows, dtype=np.int32)[:, None], seq_len, axis=1)
    return data.Dataset(rows, rows.copy(), np.ones(rows.shape, np.float32))


# --- packing text ---------------------------------------------------------------------------


def test_pack_text_exact_arrays(tmp_path):
    # "abcdefg" + eos = 8 tokens; windows of 4 overlapping by one -> 2 rows, tail (eos) dropped.
    dataset = data.pack_text(write(tmp_path / "a.txt", "abcdefg"), BYTES, seq_len=3)
    np.testing.assert_array_equal(dataset.tokens, [[97, 98, 99], [100, 101, 102]])
    np.testing.assert_array_equal(dataset.targets, [[98, 99, 100], [101, 102, 103]])
    np.testing.assert_array_equal(dataset.loss_mask, np.ones((2, 3)))
    assert dataset.tokens.dtype == np.int32 and dataset.loss_mask.dtype == np.float32
    assert (len(dataset), dataset.seq_len) == (2, 3)


def test_pack_text_separates_documents_with_eos(tmp_path):
    paths = [write(tmp_path / "a.txt", "abc"), write(tmp_path / "b.txt", "de")]
    dataset = data.pack_text(paths, BYTES, seq_len=3)  # stream: a b c EOS d e EOS
    np.testing.assert_array_equal(dataset.tokens, [[97, 98, 99], [256, 100, 101]])
    np.testing.assert_array_equal(dataset.targets, [[98, 99, 256], [100, 101, 256]])


def test_pack_text_bos_added_unless_it_is_eos(tmp_path):
    path = write(tmp_path / "a.txt", "ab")
    with_bos = data.pack_text(path, ByteTokenizer(eos_id=256, bos_id=257), seq_len=3)
    np.testing.assert_array_equal(with_bos.tokens, [[257, 97, 98]])
    np.testing.assert_array_equal(with_bos.targets, [[97, 98, 256]])
    # GPT-2 style: one id is both bos and eos, so it is written once, at the end.
    shared = data.pack_text(path, ByteTokenizer(eos_id=256, bos_id=256), seq_len=2)
    np.testing.assert_array_equal(shared.tokens, [[97, 98]])
    np.testing.assert_array_equal(shared.targets, [[98, 256]])
    no_specials = data.pack_text(path, ByteTokenizer(eos_id=None, bos_id=None), seq_len=1)
    np.testing.assert_array_equal(no_specials.tokens, [[97]])


# --- prompt / completion pairs --------------------------------------------------------------


def test_jsonl_masks_prompt_and_padding(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "ab", "completion": "cd"}, {"input": "x", "output": "yz"}],
    )
    dataset = data.load_jsonl(path, BYTES, seq_len=6)
    np.testing.assert_array_equal(
        dataset.tokens, [[97, 98, 99, 100, 256, 256], [120, 121, 122, 256, 256, 256]]
    )
    np.testing.assert_array_equal(
        dataset.targets, [[98, 99, 100, 256, 256, 256], [121, 122, 256, 256, 256, 256]]
    )
    np.testing.assert_array_equal(
        dataset.loss_mask, [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    )


def test_jsonl_truncates_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "pairs.jsonl", '\n{"prompt": "ab", "completion": "cdef"}\n\n')
    with pytest.warns(UserWarning, match=r"pairs\.jsonl: 1 of 1 examples are longer than seq_len \+ 1 = 4 tokens"):
        dataset = data.load_jsonl(path, BYTES, seq_len=3)  # a b c d | e f EOS cut off
    np.testing.assert_array_equal(dataset.tokens, [[97, 98, 99]])
    np.testing.assert_array_equal(dataset.targets, [[98, 99, 100]])
    np.testing.assert_array_equal(dataset.loss_mask, [[0, 1, 1]])


def test_jsonl_bos_is_prompt_and_pad_is_zero_without_eos(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    dataset = data.load_jsonl(path, ByteTokenizer(eos_id=None, bos_id=257), seq_len=4)
    np.testing.assert_array_equal(dataset.tokens, [[257, 97, 0, 0]])
    np.testing.assert_array_equal(dataset.targets, [[97, 98, 0, 0]])
    np.testing.assert_array_equal(dataset.loss_mask, [[0, 1, 0, 0]])


def test_alpaca_records_without_a_chat_template_use_the_alpaca_prompt(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add.", "input": "1+1", "output": "2"},
        {"instruction": "Greet.", "output": "Hi"},
        {"instruction": "Greet.", "input": "", "output": "Yo"},  # an empty input is no input, as in Alpaca
    ])
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\nAdd.\n\n### Input:\n1+1\n\n### Response:\n")
    without = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\nGreet.\n\n### Response:\n")
    seq_len = len(with_input) + 1
    dataset = data.load_jsonl(path, BYTES, seq_len)
    for row, (prompt, output) in enumerate([(with_input, "2"), (without, "Hi"), (without, "Yo")]):
        ids = list((prompt + output).encode()) + [256]
        np.testing.assert_array_equal(dataset.tokens[row], (ids[:-1] + [256] * seq_len)[:seq_len])
        np.testing.assert_array_equal(dataset.targets[row], (ids[1:] + [256] * seq_len)[:seq_len])
        expected = [0.0] * (len(prompt) - 1) + [1.0] * (len(output) + 1)  # the output and its eos
        np.testing.assert_array_equal(dataset.loss_mask[row], (expected + [0.0] * seq_len)[:seq_len])


def test_text_records_are_packed_like_text_files(tmp_path):
    records = write_jsonl(tmp_path / "docs.jsonl", [{"text": "abc"}, {"text": "de", "source": "ignored"}])
    files = [write(tmp_path / "a.txt", "abc"), write(tmp_path / "b.txt", "de")]
    from_records, from_files = data.load_jsonl(records, BYTES, 3), data.pack_text(files, BYTES, 3)
    for name in ("tokens", "targets", "loss_mask"):
        np.testing.assert_array_equal(getattr(from_records, name), getattr(from_files, name))


def test_files_of_different_shapes_load_together_in_file_order(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "cdefg"}])
    dataset = data.load([pairs, docs], BYTES, 3)
    np.testing.assert_array_equal(dataset.tokens, [[97, 98, 256], [99, 100, 101]])
    np.testing.assert_array_equal(dataset.loss_mask, [[1, 1, 0], [1, 1, 1]])  # b and eos; every text token


@pytest.mark.parametrize("record, message", [
    ({"instruction": "a"}, r"bad\.jsonl:1: instruction records need string fields 'instruction', 'output'; 'output' is NoneType"),
    ({"instruction": "a", "input": 3, "output": "b"}, r"bad\.jsonl:1: .* 'input' is int"),
    ({"messages": []}, r"bad\.jsonl:1: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "a"}]}, r"bad\.jsonl:1: messages\[0\] has role 'bot'; expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, r"bad\.jsonl:1: messages\[0\]\['content'\] is list, expected a string"),
    ({"messages": [{"role": "user"}]}, r"bad\.jsonl:1: messages\[0\] must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"bad\.jsonl:1: the conversation has no assistant message"),
])
def test_bad_instruction_and_chat_records_name_file_and_line(tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        data.load_jsonl(write_jsonl(tmp_path / "bad.jsonl", [record]), BYTES, 8)


def test_chat_records_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl: chat \('messages'\) records need a tokenizer with a chat template"):
        data.load_jsonl(path, BYTES, 8)


def test_load_dispatches_on_suffix(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    text = write(tmp_path / "a.txt", "abcd")
    np.testing.assert_array_equal(data.load(jsonl, BYTES, 2).loss_mask, [[1, 1]])
    np.testing.assert_array_equal(data.load(text, BYTES, 2).tokens, [[97, 98], [99, 100]])
    with pytest.raises(ValueError, match=r"pairs\.jsonl, .*a\.txt: mix \.jsonl and plain-text"):
        data.load([jsonl, text], BYTES, 2)


# --- batching -------------------------------------------------------------------------------


def test_batches_are_deterministic_and_seeded():
    dataset = indexed(10)
    first = [b["tokens"][:, 0] for b in itertools.islice(data.batches(dataset, 3, seed=7), 9)]
    again = [b["tokens"][:, 0] for b in itertools.islice(data.batches(dataset, 3, seed=7), 9)]
    other = [b["tokens"][:, 0] for b in itertools.islice(data.batches(dataset, 3, seed=8), 9)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_each_epoch_is_a_permutation_dropping_the_remainder():
    dataset = indexed(10)  # batch 3 -> 3 steps per epoch, 1 row left out each epoch
    rows = [b["tokens"][:, 0] for b in itertools.islice(data.batches(dataset, 3, seed=0), 9)]
    epochs = [np.concatenate(rows[i : i + 3]) for i in (0, 3, 6)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 9 and set(epoch.tolist()) <= set(range(10))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_resume_from_any_step_matches_a_fresh_run():
    dataset = indexed(10)
    fresh = list(itertools.islice(data.batches(dataset, 3, seed=5), 10))
    for step in (0, 2, 3, 4, 7):  # inside, at and across epoch boundaries
        resumed = list(itertools.islice(data.batches(dataset, 3, seed=5, start_step=step), 3))
        for offset, batch in enumerate(resumed):
            for key in ("tokens", "targets", "loss_mask"):
                np.testing.assert_array_equal(batch[key], fresh[step + offset][key])
        np.testing.assert_array_equal(
            data.batch_at(dataset, 3, seed=5, step=step)["tokens"], fresh[step]["tokens"]
        )


def test_eval_batches_cover_every_row_once_with_static_shape():
    batches = list(data.eval_batches(indexed(5), batch_size=2))
    assert [b["tokens"].shape for b in batches] == [(2, 2)] * 3
    np.testing.assert_array_equal(batches[2]["tokens"][:, 0], [4, 0])
    np.testing.assert_array_equal(batches[2]["loss_mask"], [[1, 1], [0, 0]])
    assert sum(b["loss_mask"].sum() for b in batches) == 10


# --- splits ---------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    train, valid = data.split(indexed(20), valid_fraction=0.25, seed=3)
    train_rows, valid_rows = train.tokens[:, 0].tolist(), valid.tokens[:, 0].tolist()
    assert (len(train), len(valid)) == (15, 5)
    assert sorted(train_rows + valid_rows) == list(range(20))
    assert train_rows == sorted(train_rows) and valid_rows == sorted(valid_rows)
    assert data.split(indexed(20), 0.25, seed=3)[1].tokens[:, 0].tolist() == valid_rows
    assert data.split(indexed(20), 0.25, seed=4)[1].tokens[:, 0].tolist() != valid_rows


def test_load_splits_from_files_or_fraction(tmp_path):
    train_path = write(tmp_path / "train.txt", "abcdefghi")  # 10 tokens -> 4 rows of 2
    valid_path = write(tmp_path / "valid.txt", "xyz")  # 4 tokens -> 1 row
    train, valid = data.load_splits(BYTES, 2, train_path, valid_paths=valid_path)
    assert (len(train), len(valid)) == (4, 1)
    np.testing.assert_array_equal(valid.tokens, [[120, 121]])
    train, valid = data.load_splits(BYTES, 2, train_path, valid_fraction=0.25)
    assert (len(train), len(valid)) == (3, 1)
    train, valid = data.load_splits(BYTES, 2, train_path)
    assert (len(train), valid) == (4, None)
    with pytest.raises(ValueError, match="valid_paths or valid_fraction, not both"):
        data.load_splits(BYTES, 2, train_path, valid_paths=valid_path, valid_fraction=0.5)


# --- default corpus -------------------------------------------------------------------------


def test_default_corpus_is_bundled_and_disjoint():
    train, valid = data.default_corpus()
    assert [p.name for p in train] == [
        "hamlet_gut.txt",
        "julius_caesar_gut.txt",
        "macbeth_gut.txt",
        "merchant_of_venice_gut.txt",
        "midsummer_nights_dream_gut.txt",
        "romeo_and_juliet_gut.txt",
    ]
    assert [p.name for p in valid] == ["tempest_gut.txt", "twelfth_night_gut.txt"]
    assert sum(p.stat().st_size for p in train) == 752032
    assert sum(p.stat().st_size for p in valid) == 213315
    assert (train[0].parent.parent / "ATTRIBUTION.md").is_file()


def test_default_corpus_packs_to_exact_row_counts():
    # Byte tokenizer: ASCII bytes plus one eos per play, (tokens - 1) // seq_len rows.
    train, valid = data.load_splits(BYTES, seq_len=256)
    assert (len(train), len(valid)) == ((752032 + 6 - 1) // 256, (213315 + 2 - 1) // 256)
    assert not set(map(bytes, valid.tokens.astype(np.uint8))) & set(
        map(bytes, train.tokens.astype(np.uint8))
    )


# --- errors ---------------------------------------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.txt: no such file"):
        data.pack_text(tmp_path / "nope.txt", BYTES, 4)
    with pytest.raises(ValueError, match=r"empty\.txt: file is empty"):
        data.pack_text(write(tmp_path / "empty.txt", " \n"), BYTES, 4)
    with pytest.raises(ValueError, match=r"empty\.jsonl: file is empty"):
        data.load_jsonl(write(tmp_path / "empty.jsonl", ""), BYTES, 4)
    with pytest.raises(ValueError, match=r"latin\.txt: not UTF-8 text"):
        (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
        data.pack_text(tmp_path / "latin.txt", BYTES, 4)


def test_too_short_text_says_how_many_tokens(tmp_path):
    path = write(tmp_path / "short.txt", "abcd")  # 5 tokens with eos
    with pytest.raises(
        ValueError, match=r"short\.txt: 5 tokens in total, need at least 9 .*seq_len=8"
    ):
        data.pack_text(path, BYTES, seq_len=8)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('["a", "b"]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"prompt": "a"}', r"bad\.jsonl:2: expected string fields .* got keys \['prompt'\]"),
        ('{"answer": "a"}', r"bad\.jsonl:2: a record holds 'text', 'prompt' .* got keys \['answer'\]"),
        ('{"text": "a"}', r"bad\.jsonl:2: a text record, but line 1 is a prompt/completion record; one file holds"),
        ('{"prompt": "a", "completion": 3}', r"bad\.jsonl:2: expected string fields"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", '{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        data.load_jsonl(path, BYTES, 4)


def test_prompt_filling_seq_len_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "abcdef", "completion": "g"}])
    with pytest.raises(ValueError, match=r"long\.jsonl:1: prompt is 6 tokens, .*seq_len=4"):
        data.load_jsonl(path, BYTES, 4)


def test_batch_size_and_fraction_errors():
    with pytest.raises(ValueError, match=r"batch_size 11 is larger than the dataset \(10 seq"):
        next(data.batches(indexed(10), 11, seed=0))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        data.batch_at(indexed(10), 0, seed=0, step=0)
    with pytest.raises(ValueError, match="start_step must be >= 0, got -1"):
        next(data.batches(indexed(10), 2, seed=0, start_step=-1))
    with pytest.raises(ValueError, match=r"valid_fraction must be in \(0, 1\), got 1.5"):
        data.split(indexed(10), 1.5)
    with pytest.raises(ValueError, match="leaves 0 for validation and 3 for training"):
        data.split(indexed(3), 0.1)

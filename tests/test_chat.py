"""Chat records: rendered with the chat template, loss exactly on the assistant's content and end-of-turn token."""

import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

from jlora.training import chat, data
from jlora.models.tokenizer import Tokenizer

# SmolLM2-Instruct's template (ChatML with a default system message), as its GGUF stores it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's shape: a header that ends in a blank line, the content trimmed, and no whitespace after <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def byte_tokenizer(template):
    """A byte-level tokenizer with no merges (one token per byte) plus the templates' special tokens,
    so every expected row can be written from the text."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    eos = "<|im_end|>" if "im_end" in template else "<|eot_id|>"
    return Tokenizer(backend, bos_id=backend.token_to_id("<|begin_of_text|>"), eos_id=backend.token_to_id(eos),
                     chat_template=template)


def pieces_to_row(tokenizer, pieces, seq_len):
    """The expected row, written independently of jlora.chat: each piece of text tokenized on its own,
    each marked as learned or not, shifted and padded as data.load_jsonl does."""
    ids, learn = [], []
    for text, learned in pieces:
        piece = tokenizer.backend.encode(text, add_special_tokens=False).ids
        ids += piece
        learn += [learned] * len(piece)
    ids, learn = ids[: seq_len + 1], learn[: seq_len + 1]
    pad = seq_len - (len(ids) - 1)
    eos = tokenizer.eos_id
    return ids[:-1] + [eos] * pad, ids[1:] + [eos] * pad, [float(x) for x in learn[1:]] + [0.0] * pad


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def chatml_pieces(messages):
    """ChatML written out by hand: the header and the newline after <|im_end|> are not learned."""
    pieces = []
    if messages[0]["role"] != "system":
        pieces.append(("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                       "<|im_end|>\n", False))
    for m in messages:
        learned = m["role"] == "assistant"
        pieces += [(f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>", learned), ("\n", False)]
    return pieces


@pytest.mark.parametrize("messages", [TWO_TURNS, TWO_TURNS[1:3]], ids=["system-and-two-turns", "default-system"])
def test_chat_mask_is_exactly_the_assistant_content_and_end_of_turn(tmp_path, messages):
    tokenizer = byte_tokenizer(SMOLLM2_TEMPLATE)
    seq_len = 200
    dataset = data.load_jsonl(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tokenizer, seq_len)
    tokens, targets, mask = pieces_to_row(tokenizer, chatml_pieces(messages), seq_len)
    np.testing.assert_array_equal(dataset.tokens[0], tokens)
    np.testing.assert_array_equal(dataset.targets[0], targets)
    np.testing.assert_array_equal(dataset.loss_mask[0], mask)
    learned = tokenizer.decode(dataset.targets[0][dataset.loss_mask[0] == 1])
    assert learned == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_llama3_shaped_template_learns_trimmed_content_and_eot():
    tokenizer = byte_tokenizer(LLAMA3_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Yo  "}]
    ids, is_assistant = chat.tokenize(messages, tokenizer)
    assert tokenizer.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                     "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>")
    assert tokenizer.decode(ids[is_assistant]) == "Yo<|eot_id|>"
    assert is_assistant.sum() == 3  # Y, o, <|eot_id|>


def test_long_conversation_is_truncated_with_a_warning_and_a_too_long_prompt_is_an_error(tmp_path):
    tokenizer = byte_tokenizer(SMOLLM2_TEMPLATE)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:3]}])
    seq_len = 60  # the first conversation's second answer does not fit
    with pytest.warns(UserWarning, match=r"chat\.jsonl: 1 of 2 examples are longer than seq_len \+ 1 = 61 tokens"):
        dataset = data.load_jsonl(path, tokenizer, seq_len)
    for row, messages in enumerate([TWO_TURNS, TWO_TURNS[:3]]):
        tokens, targets, mask = pieces_to_row(tokenizer, chatml_pieces(messages), seq_len)
        np.testing.assert_array_equal(dataset.tokens[row], tokens)
        np.testing.assert_array_equal(dataset.loss_mask[row], mask)
    # 40 tokens up to and including "<|im_start|>assistant\n": the first learned target sits at position 40.
    with pytest.warns(UserWarning, match="2 of 2 examples"):
        np.testing.assert_array_equal(data.load_jsonl(path, tokenizer, 40).loss_mask[:, -1], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: prompt is 40 tokens \(the conversation before the first "
                                         r"assistant token\), so no completion token fits in seq_len=39"):
        data.load_jsonl(path, tokenizer, 39)


def test_alpaca_records_with_a_chat_template_are_a_user_turn_and_an_assistant_turn(tmp_path):
    tokenizer = byte_tokenizer(SMOLLM2_TEMPLATE)
    records = [{"instruction": "Add.", "input": "1+1", "output": "2"}, {"instruction": "Greet.", "output": "Hi"}]
    dataset = data.load_jsonl(write_jsonl(tmp_path / "alpaca.jsonl", records), tokenizer, 120)
    as_chat = [[{"role": "user", "content": "Add.\n\n1+1"}, {"role": "assistant", "content": "2"}],
               [{"role": "user", "content": "Greet."}, {"role": "assistant", "content": "Hi"}]]
    for row, messages in enumerate(as_chat):
        tokens, targets, mask = pieces_to_row(tokenizer, chatml_pieces(messages), 120)
        np.testing.assert_array_equal(dataset.tokens[row], tokens)
        np.testing.assert_array_equal(dataset.loss_mask[row], mask)


def test_a_file_mixing_chat_and_pairs_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": TWO_TURNS}, {"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: a prompt/completion record, but line 1 is a chat record"):
        data.load_jsonl(path, byte_tokenizer(SMOLLM2_TEMPLATE), 64)


def test_a_conversation_opening_with_the_assistant_is_refused_with_the_line(tmp_path):
    # SmolLM2's default system message goes before the first message, not before the generation prompt.
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "Hi"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the chat template renders the conversation before "
                                         r"messages\[0\] \(an assistant message\) differently"):
        data.load_jsonl(path, byte_tokenizer(SMOLLM2_TEMPLATE), 64)


def test_template_errors_name_the_line(tmp_path):
    strict = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('roles must alternate') }}{% endif %}"
    tokenizer = byte_tokenizer(strict + SMOLLM2_TEMPLATE)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}, {"messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: chat template error: roles must alternate"):
        data.load_jsonl(path, tokenizer, 64)


def test_jinja_errors_of_a_template_are_value_errors_naming_the_line(tmp_path):
    # Rendering the empty prefix before an opening assistant message reads messages[0] of an empty list.
    tokenizer = byte_tokenizer("{% if messages[0]['role'] == 'system' %}{% endif %}" + SMOLLM2_TEMPLATE)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}, {"messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: chat template error \(UndefinedError\): .*no element 0"):
        data.load_jsonl(path, tokenizer, 64)


# TRL's ChatML with {% generation %}: what transformers' return_assistant_tokens_mask learns.
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.interop
@pytest.mark.parametrize("template", [CHATML_GENERATION, SMOLLM2_TEMPLATE], ids=["generation-tags", "smollm2"])
def test_ids_and_mask_equal_transformers_apply_chat_template(tmp_path, template):
    transformers = pytest.importorskip("transformers")
    tokenizer = byte_tokenizer(template)
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": "<|im_end|>"}))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_hf_dir(tmp_path)  # the template read from tokenizer_config.json
    for messages in [TWO_TURNS, TWO_TURNS[1:3], [TWO_TURNS[1], {"role": "assistant", "content": ""}]]:
        ids, is_assistant = chat.tokenize(messages, ours)
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=template == CHATML_GENERATION)
        assert ids.tolist() == list(expected["input_ids"])
        if template == CHATML_GENERATION:  # the {% generation %} span: content + <|im_end|>, as jlora.chat marks
            assert is_assistant.astype(int).tolist() == list(expected["assistant_masks"])

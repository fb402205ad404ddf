"""A small tokenizer wrapper over the `tokenizers` library, built from a GGUF's vocabulary or a HF directory."""

import functools
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from jlora.core import files
from jlora.core.errors import CheckpointError

# llama.cpp's `tokenizer.ggml.pre` names the regex the merges were learned with. Byte-level BPE
# vocabularies split text one of these ways before merging.
GPT2_SPLIT = ("default", "gpt2")
DIGITS_THEN_GPT2_SPLIT = ("smollm", "starcoder", "refact", "codeshell")  # every digit on its own, as HF's Digits

# Newer vocabularies name a split regex (llama.cpp's llama-vocab.cpp), then map bytes without GPT-2's regex:
# Llama 3.x groups up to three digits, Qwen2/2.5/3 splits every digit.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
REGEX_SPLITS = {"llama-bpe": LLAMA3_REGEX, "llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}

CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>


class Tokenizer:
    """Text to token ids and back, with the model's special ids and chat template.

    Attributes:
      bos_id, eos_id: special token ids (None when the model has none).
      vocab_size: number of ids, added tokens included.
      chat_template: the Jinja chat template, or None.
    """

    def __init__(self, backend, *, bos_id=None, eos_id=None, add_bos=False, chat_template=None):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) stay whole."""
        ids = self.backend.encode(text).ids
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def encode_with_offsets(self, text):
        """Token ids of `text` as the chat template wrote it (no BOS added) and each token's character span.

        Returns:
          `(ids, offsets)`: lists of equal length; `text[start:end]` is what token `ids[k]` came from,
          for `(start, end) = offsets[k]` (a character cut in two by a byte-level split is in both).

        Example:
          >>> from tokenizers import models
          >>> tokenizer = Tokenizer(Backend(models.WordLevel({"hi": 0, "there": 1}, unk_token="hi")))
          >>> tokenizer.backend.pre_tokenizer = pre_tokenizers.Whitespace()
          >>> tokenizer.encode_with_offsets("hi there")
          ([0, 1], [(0, 2), (3, 8)])
        """
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids, skip_special_tokens=False):
        """The text of `ids` (a list or 1-D array of ints)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render `[{'role': ..., 'content': ...}, ...]` with the model's chat template; returns the prompt text.

        Needs `jinja2`. Encode the result with `encode`.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; format the prompt yourself.")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as error:
            raise ImportError("apply_chat_template needs jinja2: python -m pip install jinja2") from error

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        template = _compiled(self.chat_template, ImmutableSandboxedEnvironment)
        token = lambda i: None if i is None else self.backend.id_to_token(i)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=token(self.bos_id), eos_token=token(self.eos_id),
                               raise_exception=raise_exception)

    @classmethod
    def from_gguf_metadata(cls, metadata, source="the GGUF file"):
        """A byte-level BPE tokenizer from a GGUF's `tokenizer.ggml.*` metadata (the `gpt2` tokenizer model).

        Raises:
          CheckpointError: a key it reads is missing or of the wrong type (``source`` and the key named).
          NotImplementedError: a tokenizer model or pre-tokenizer not implemented.
        """
        files.checked(metadata, GGUF_FIELDS, f"{source}: GGUF metadata", required=["tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise NotImplementedError(f"{source}: GGUF tokenizer model is {kind!r}; only byte-level BPE ('gpt2') is implemented.")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        tokens = metadata["tokenizer.ggml.tokens"]
        merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
        if any(len(merge) != 2 for merge in merges):
            raise CheckpointError(f"{source}: GGUF metadata tokenizer.ggml.merges holds an entry without a space "
                                  "(each is 'left right')")
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            if metadata.get(key) is not None and not 0 <= metadata[key] < len(tokens):
                raise CheckpointError(f"{source}: GGUF metadata {key} is {metadata[key]}, outside the "
                                      f"{len(tokens)} tokens of tokenizer.ggml.tokens")
        backend = _backend(lambda: Backend(models.BPE({token: i for i, token in enumerate(tokens)}, merges)),
                           f"{source}: GGUF metadata tokenizer.ggml.tokens/merges")
        if pre in GPT2_SPLIT:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        elif pre in DIGITS_THEN_GPT2_SPLIT:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        elif pre in REGEX_SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            known = GPT2_SPLIT + DIGITS_THEN_GPT2_SPLIT + tuple(REGEX_SPLITS)
            raise NotImplementedError(f"{source}: GGUF pre-tokenizer {pre!r} is not implemented; known: {list(known)}.")
        backend.decoder = decoders.ByteLevel()
        types = metadata.get("tokenizer.ggml.token_type") or []
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, kind in enumerate(types[:len(tokens)]) if kind == CONTROL])
        return cls(backend,
                   bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
                   eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=metadata.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, directory, config=None):
        """The tokenizer of a HF directory: tokenizer.json, else GPT-2's vocab.json + merges.txt.

        Returns:
          A Tokenizer, or None when the directory holds no tokenizer files.
        """
        directory = Path(directory)
        config = config or {}
        tokenizer_config = {}
        if (directory / "tokenizer_config.json").is_file():
            path = directory / "tokenizer_config.json"
            tokenizer_config = files.checked(files.read_json(path), {"chat_template": str | None, "bos_token": str | dict | None,
                                                                     "eos_token": str | dict | None}, path)
        if (directory / "tokenizer.json").is_file():
            backend = _backend(lambda: Backend.from_file(str(directory / "tokenizer.json")), directory / "tokenizer.json")
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            backend = _backend(lambda: Backend(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))),
                               f"{directory / 'vocab.json'} + merges.txt")
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            special = {"<|endoftext|>"} & set(backend.get_vocab())
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        else:
            return None

        def special_id(name):
            value = tokenizer_config.get(f"{name}_token")
            if isinstance(value, dict):  # older files store AddedToken dicts
                value = value.get("content")
            if isinstance(value, str) and backend.token_to_id(value) is not None:
                return backend.token_to_id(value)
            value = config.get(f"{name}_token_id")
            value = (value or [None])[0] if isinstance(value, list) else value
            return value if files.fits(value, int) and 0 <= value < backend.get_vocab_size() else None

        template = tokenizer_config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = files.read_text(directory / "chat_template.jinja")
        return cls(backend, bos_id=special_id("bos"), eos_id=special_id("eos"), chat_template=template)


# The types of the GGUF metadata keys a tokenizer is built from.
GGUF_FIELDS = {"tokenizer.ggml.model": str | None, "tokenizer.ggml.pre": str | None, "tokenizer.ggml.tokens": list[str],
               "tokenizer.ggml.merges": list[str], "tokenizer.ggml.token_type": list[int] | None,
               "tokenizer.ggml.bos_token_id": int | None, "tokenizer.ggml.eos_token_id": int | None,
               "tokenizer.ggml.add_bos_token": bool | None, "tokenizer.chat_template": str | None}


def _backend(load, source) -> Backend:
    """``load()``'s tokenizer, or one CheckpointError naming ``source`` (the tokenizers library raises its own Exception)."""
    try:
        return load()
    except Exception as error:
        raise CheckpointError(f"{source} is not a tokenizer file the tokenizers library reads: "
                              f"{files.reason(error)}") from None


@functools.lru_cache(maxsize=8)
def _compiled(chat_template, environment):
    """The template compiled once: a chat dataset renders it several times per conversation."""
    from jinja2.ext import Extension, loopcontrols

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`, rendered as its body. Templates written for
        transformers' `return_assistant_tokens_mask` mark assistant turns with it; jlora finds the
        turns by rendering prefixes (`jlora.chat`), so the tag only has to parse."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    # The same environment settings and extensions as transformers, so templates render identically.
    return environment(trim_blocks=True, lstrip_blocks=True,
                       extensions=[Generation, loopcontrols]).from_string(chat_template)

"""Conversations as training tokens: rendered with the model's chat template, loss on the assistant's turns.

A conversation is ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``. It is rendered
with the tokenizer's own chat template (as ``transformers``' ``apply_chat_template`` would), tokenized,
and each token is marked when it belongs to an assistant turn: the message's content and the
template's end-of-turn marker after it (``<|im_end|>`` in ChatML). The role header before it
(``<|im_start|>assistant\\n``) is not marked: it is the prompt the model is given at generation time,
as in TRL's ``assistant_only_loss``. Whitespace the template writes after the end-of-turn marker
(ChatML's ``\\n``) is not marked either: generation stops at the marker.

An assistant turn is found by rendering prefixes of the conversation, which works for any template
without special markers in it: the turn of message ``i`` starts where the conversation up to ``i``
rendered with ``add_generation_prompt=True`` ends, and ends where the conversation through ``i``
ends. A template that renders earlier messages differently once later ones follow (one that drops
past reasoning, say) is refused with an error, since its prefixes do not line up.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> None:
    """Raises ``ValueError`` saying what is wrong unless ``messages`` is a conversation to train on.

    Args:
      messages: a non-empty list of ``{"role", "content"}`` dicts, roles in :data:`ROLES`, contents
        strings, at least one of them an assistant message.

    Example:
      >>> check_messages([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}])
      Traceback (most recent call last):
      ...
      ValueError: messages[1] has role 'bot'; expected one of system, user, assistant
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.60}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r:.60}")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"messages[{i}]['content'] is {type(message['content']).__name__}, expected a string")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("the conversation has no assistant message, so nothing to train on")


def render(messages: Sequence[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character span of each assistant turn in it.

    Args:
      messages: a conversation (see :func:`check_messages`).
      tokenizer: has ``apply_chat_template(messages, add_generation_prompt)`` returning text.

    Returns:
      ``(text, spans)``: ``text[start:end]`` for each ``(start, end)`` in ``spans`` is one assistant
      message's content and end-of-turn marker, in order.

    Example:
      >>> import types, jinja2
      >>> chatml = jinja2.Template("{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>\\n"
      ...                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
      >>> tokenizer = types.SimpleNamespace(apply_chat_template=lambda messages, add_generation_prompt:
      ...                                   chatml.render(messages=messages, add_generation_prompt=add_generation_prompt))
      >>> text, spans = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenizer)
      >>> [text[start:end] for start, end in spans]
      ['Yo<|im_end|>']
    """
    text = _apply(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        through = _apply(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError(
                f"the chat template renders the conversation before messages[{i}] (an assistant message) "
                "differently once later messages follow, so its turns cannot be found by rendering prefixes; "
                "a conversation that opens with an assistant message, or a template that rewrites past turns, "
                "does this"
            )
        spans.append((len(prompt), len(through.rstrip())))
    return text, spans


def tokenize(messages: Sequence[dict], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and which of them belong to an assistant turn.

    A token belongs to a turn when its first character does (see :func:`render`).

    Args:
      messages: a conversation (see :func:`check_messages`).
      tokenizer: has ``apply_chat_template`` and ``encode_with_offsets(text) -> (ids, offsets)``
        (``jlora.models.Tokenizer``).

    Returns:
      ``(ids, is_assistant)``: int32 and bool arrays of equal length.
    """
    text, spans = render(messages, tokenizer)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
    is_assistant = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        is_assistant |= (starts >= start) & (starts < end)
    return np.asarray(ids, dtype=np.int32), is_assistant


def _apply(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The template's text, its Jinja errors (an undefined ``messages[0]`` of an empty prefix, say) as ValueError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise ValueError(f"chat template error ({type(error).__name__}): {error}") from None

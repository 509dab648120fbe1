"""The chat format: ChatML tokens, message checks, rendering and token ids with a loss mask.

ChatML, as SmolLM2-Instruct and Qwen use it:

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>\\n

`render_chat` writes it in Python and `CHATML_TEMPLATE` in Jinja (what a tokenizer stores and
transformers renders); tests/test_chat.py holds them equal. `ChatEncoder` gives the token ids of a
conversation segment by segment (each turn's header, content and closing token apart): the special
tokens split the text for the tokenizer anyway and byte-level BPE splits a newline from the word
after it, so the ids decode to exactly `render_chat(messages)` while every loss-mask boundary
falls on a token boundary. `<|im_end|>` closes every turn and is a chat model's eos. Every caller
that builds a prompt from messages (the facade, serve, chat, the harness, SFT/DPO/GRPO) comes here.

Text is text: a message's content is encoded as ordinary text even when it holds the string of a
special token, so typing `<|im_start|>system` in a message cannot open a system turn; only the
template's own special tokens are control tokens (`render_with_specials`, `ChatEncoder`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from modernlm.errors import UserError

# The label of a token that contributes no loss (prompt tokens, padding): PyTorch's cross_entropy
# default, and HF's. Data builds labels with it, losses skip it.
IGNORE_INDEX = -100

# ChatML, as SmolLM2 and Qwen use it; `tokenizer.train_bpe(chat_template="chatml")` stores it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
Message = dict[str, str]


# ---------------------------------------------------------------------------------------------
# Rendering and encoding


def check_messages(messages: Any, where: str) -> list[Message]:
    """Validate a conversation: a non-empty list of {"role", "content"} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i + 1} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i + 1} has role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i + 1} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def template_takes_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders `tools` and writes calls as <tool_call> (Qwen2.5's and
    Hermes' form, the one the server constrains and reads back)."""
    return bool(template) and "tools" in template and "<tool_call>" in template


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation (what `CHATML_TEMPLATE` renders)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


Spans = list[tuple[int, int]]  # (start, end) character spans of special tokens in a text


def render_with_specials(
    tokenizer: Any, render: Callable[[list[Message]], str], messages: list[Message]
) -> tuple[str, Spans | None]:
    """`render(messages)` (a chat template) and where in it the template's own special tokens are:
    `encode_with_specials` reads only those as special tokens, every content as text.

    None instead of spans when no content holds a special-token string: the whole text then
    encodes as it always has (as transformers' `apply_chat_template` encodes it). Otherwise the
    messages are rendered again with each content replaced by a marker, the text is cut at the
    markers, and the special tokens are looked for in the template's pieces only. A template that
    changes a content (trims it, say) cannot be cut so; then the message is refused.
    """
    text = render(messages)
    suspect = [i for i, m in enumerate(messages) if tokenizer.has_special_text(m["content"])]
    if not suspect:
        return text, None
    mark = "\ue000"  # a private-use character; repeated until the text does not hold it
    while mark in text:
        mark += "\ue000"
    marked = render([{**m, "content": f"{mark}{i}{mark}"} for i, m in enumerate(messages)])
    pieces = re.split(f"{mark}([0-9]+){mark}", marked)  # template, message index, template, ...
    template, contents = pieces[0::2], [*(messages[int(i)]["content"] for i in pieces[1::2]), ""]
    if "".join(t + c for t, c in zip(template, contents, strict=True)) != text:
        content = messages[suspect[0]]["content"]
        token = next(t for t in tokenizer.special_tokens if t in content)
        raise UserError(
            f"messages: message {suspect[0] + 1} holds the special token {token!r} as text, and the chat "
            "template changes message contents, so the text cannot be kept apart from the template's tokens"
        )
    # leftmost-longest, as the tokenizer finds special tokens in a text
    found = re.compile("|".join(re.escape(t) for t in sorted(tokenizer.special_tokens, key=len, reverse=True)))
    spans, at = [], 0
    for piece, content in zip(template, contents, strict=True):
        spans += [(at + m.start(), at + m.end()) for m in found.finditer(piece)]
        at += len(piece) + len(content)
    return text, spans


def encode_with_specials(tokenizer: Any, text: str, spans: Spans | None) -> list[int]:
    """Token ids of `text` with special tokens at `spans` only, the rest as text (spans None: the
    whole text as usual). `text` may run on past the rendered chat (a continuation to score)."""
    if spans is None:
        return tokenizer.encode(text)
    ids, at = [], 0
    for start, end in spans:
        ids += tokenizer.encode(text[at:start], split_special_tokens=True)
        ids.append(tokenizer.special_tokens[text[start:end]])
        at = end
    return ids + tokenizer.encode(text[at:], split_special_tokens=True)


class ChatEncoder:
    """Token ids of ChatML conversations with their loss mask, for one tokenizer.

    The tokenizer is ours (`modernlm.tokenizer.Tokenizer`) and must know both chat tokens
    (`prepare_chat_model` adds them). Contents are text: a special token's string in one is
    encoded as ordinary text (`text`).
    """

    def __init__(self, tokenizer: Any, add_bos: bool = False):
        self.tokenizer = tokenizer
        self.start_id, self.end_id = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
        if self.start_id is None or self.end_id is None:
            raise UserError(f"tokenizer: has no {IM_START} / {IM_END} tokens; prepare_chat_model adds them")
        self.newline = tokenizer.encode("\n")
        self.bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        self._headers: dict[str, list[int]] = {}

    def text(self, content: str) -> list[int]:
        """A content's ids, special-token strings in it as ordinary text."""
        return self.tokenizer.encode(content, split_special_tokens=True)

    def header(self, role: str) -> list[int]:
        if role not in self._headers:
            self._headers[role] = [self.start_id, *self.tokenizer.encode(f"{role}\n")]
        return self._headers[role]

    def encode(self, messages: Sequence[Message], train_on_all_assistant: bool = True) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels equal the ids on assistant contents + their <|im_end|>, else -100.

        train_on_all_assistant=False trains only the last assistant turn (earlier ones are context).
        """
        ids, labels = list(self.bos), [IGNORE_INDEX] * len(self.bos)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        for i, m in enumerate(messages):
            head = self.header(m["role"])
            body = [*self.text(m["content"]), self.end_id]
            trained = m["role"] == "assistant" and (train_on_all_assistant or i == last)
            ids += head + body + self.newline
            labels += [IGNORE_INDEX] * len(head) + (body if trained else [IGNORE_INDEX] * len(body))
            labels += [IGNORE_INDEX] * len(self.newline)
        return ids, labels

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the conversation so far plus the assistant header: where generation starts."""
        ids = list(self.bos)
        for m in messages:
            ids += self.header(m["role"]) + self.text(m["content"]) + [self.end_id] + self.newline
        return ids + self.header("assistant")

    def reply(self, text: str) -> list[int]:
        """Ids of one assistant reply as the model must produce it: content + <|im_end|>."""
        return [*self.text(text), self.end_id]


__all__ = [
    "CHATML_TEMPLATE", "IGNORE_INDEX", "IM_END", "IM_START", "ROLES", "ChatEncoder", "Message", "Spans",
    "template_takes_tools",
    "check_messages", "encode_with_specials", "render_chat", "render_with_specials",
]  # fmt: skip

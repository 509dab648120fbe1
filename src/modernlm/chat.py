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
"""

from __future__ import annotations

from collections.abc import Sequence
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


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation (what `CHATML_TEMPLATE` renders)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class ChatEncoder:
    """Token ids of ChatML conversations with their loss mask, for one tokenizer.

    The tokenizer is ours (`modernlm.tokenizer.Tokenizer`) and must know both chat tokens
    (`prepare_chat_model` adds them).
    """

    def __init__(self, tokenizer: Any, add_bos: bool = False):
        self.tokenizer = tokenizer
        self.start_id, self.end_id = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
        if self.start_id is None or self.end_id is None:
            raise UserError(f"tokenizer: has no {IM_START} / {IM_END} tokens; prepare_chat_model adds them")
        self.newline = tokenizer.encode("\n")
        self.bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        self._headers: dict[str, list[int]] = {}

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
            body = [*self.tokenizer.encode(m["content"]), self.end_id]
            trained = m["role"] == "assistant" and (train_on_all_assistant or i == last)
            ids += head + body + self.newline
            labels += [IGNORE_INDEX] * len(head) + (body if trained else [IGNORE_INDEX] * len(body))
            labels += [IGNORE_INDEX] * len(self.newline)
        return ids, labels

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the conversation so far plus the assistant header: where generation starts."""
        ids = list(self.bos)
        for m in messages:
            ids += self.header(m["role"]) + self.tokenizer.encode(m["content"]) + [self.end_id] + self.newline
        return ids + self.header("assistant")

    def reply(self, text: str) -> list[int]:
        """Ids of one assistant reply as the model must produce it: content + <|im_end|>."""
        return [*self.tokenizer.encode(text), self.end_id]


__all__ = [
    "CHATML_TEMPLATE", "IGNORE_INDEX", "IM_END", "IM_START", "ROLES", "ChatEncoder", "Message", "check_messages",
    "render_chat",
]  # fmt: skip

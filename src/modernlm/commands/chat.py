"""Chat with a model in the terminal: any source `modernlm.load` takes (our SFT/DPO checkpoints, HF
directories, hub ids, .gguf), in the model's own chat template (ChatML for ours), the reply
streamed as it comes, the conversation kept from turn to turn.

    modernlm chat runs/sft/checkpoints/best
    modernlm chat SmolLM2-135M-Instruct.Q4_1.gguf system="Be brief." temperature=0

Type a message and press enter; commands:
    /reset              forget the conversation (the system prompt stays)
    /system TEXT        set the system prompt (and forget the conversation)
    /temperature X      sampling temperature from now on (0 = greedy)
    /quit               leave (so do end of input and Ctrl-C at the prompt)
Ctrl-C during a reply stops it (the reply and its message are dropped). When the conversation no
longer fits the model's context, the oldest turns are dropped (the system prompt stays).

A model without a chat template (our checkpoints never SFT'd: no <|im_start|>/<|im_end|>; an HF
tokenizer without `chat_template`) continues each line you type as plain text, with no history.
HF Llama sources are converted as they load (backend=modernlm: replies stream token by token);
other architectures run in transformers (backend=transformers: the reply comes at once).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from modernlm.errors import UserError

POSITIONALS = ["model"]
FLAGS = {"--system": "system"}
OUTPUTS: dict[str, str] = {}

HELP = "/reset  /system TEXT  /temperature X  /quit"


@dataclass
class Config:
    model: str = ""  # a checkpoint or run directory, HF directory or hub id, or .gguf
    system: str = ""  # system prompt ("" = none)
    max_new_tokens: int = 256  # tokens per reply at most
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already seen; 1.0 = off
    seed: int | None = None  # sampling seed (every reply starts from it); null = not reproducible
    device: str = "cpu"  # cpu, cuda, cuda:1, mps, auto
    backend: str = "auto"  # auto (HF Llamas converted, others in transformers), modernlm, transformers


def _read(tty: bool) -> str | None:
    """The next line of input, None at the end (EOF or Ctrl-C at the prompt)."""
    try:
        if tty:
            return input("you> ")
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None
    except (EOFError, KeyboardInterrupt):
        if tty:
            print()
        return None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(cfg: Config) -> None:
    from modernlm.generation import Sampling

    if not cfg.model:
        raise UserError("model: give a model source (modernlm chat MODEL)")
    sampling = Sampling(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
    )  # fmt: skip
    from modernlm.api import load_fastest

    lm = load_fastest(cfg.model, device=cfg.device, backend=cfg.backend, what="model")
    if lm.tokenizer is None:
        raise UserError(f"model: {cfg.model} has no tokenizer, so there is no text to chat with")
    chat = lm.has_chat_template
    tty = sys.stdin.isatty()
    if tty:
        _say(f"chat with {lm.name} ({lm.kind}); {HELP}")
    if not chat:
        _say("no chat template: plain continuation of what you type")

    system = cfg.system
    history: list[dict[str, str]] = []  # user and assistant turns, oldest first
    told_overflow = False
    while (line := _read(tty)) is not None:
        if line.startswith("/"):
            name, _, arg = line.partition(" ")
            arg = arg.strip()
            if name == "/quit":
                break
            if name == "/reset":
                history.clear()
                _say("(conversation reset)")
            elif name == "/system":
                system, history = arg, []
                _say(f"(system prompt {'set' if arg else 'cleared'}; conversation reset)")
            elif name == "/temperature":
                try:
                    value = float(arg)
                    if not math.isfinite(value) or value < 0:
                        raise ValueError
                    sampling = Sampling.make(sampling, temperature=value)
                except (ValueError, UserError):
                    _say(f"/temperature takes a number >= 0, got {arg!r}")
                    continue
                _say(f"(temperature {value:g})")
            else:
                _say(f"unknown command {name}; {HELP}")
            continue
        if not line.strip():
            continue

        if chat:
            history.append({"role": "user", "content": line})
            dropped = _fit(lm, system, history, sampling.max_new_tokens)
            if dropped and not told_overflow:
                _say("(the conversation is longer than the model's context: dropping the oldest turns)")
                told_overflow = True
            if not history:
                _say("(that message alone is longer than the model's context; try a shorter one)")
                continue
            pieces = lm.stream_chat(_messages(system, history), sampling)
        else:
            pieces = lm.stream(line, sampling)
        reply = []
        try:
            for piece in pieces:
                print(piece, end="", flush=True)
                reply.append(piece)
        except KeyboardInterrupt:
            print(flush=True)
            _say("(interrupted)")
            if chat:
                history.pop()  # the message without its reply
            continue
        print(flush=True)
        if chat:
            history.append({"role": "assistant", "content": "".join(reply)})


def _messages(system: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + history


def _fit(lm: Any, system: str, history: list[dict[str, str]], max_new_tokens: int) -> bool:
    """Drop the oldest turns (the system prompt stays) until the prompt and a reply fit the
    model's context; True when any was dropped. An empty history: the last message alone is too long."""
    room = lm.max_context - max_new_tokens if lm.max_context > max_new_tokens else lm.max_context - 1
    dropped = False
    while history and len(lm.chat_prompt_ids(_messages(system, history))) > room:
        del history[: 2 if len(history) > 1 else 1]  # a user message and its reply
        dropped = True
    return dropped

"""Chat in the terminal with any source `modernlm.load` takes (our SFT/DPO checkpoints, HF dirs, hub
ids, .gguf) in the model's own chat template (ChatML for ours), replies streamed, history kept.

    modernlm chat runs/sft/checkpoints/best
    modernlm chat SmolLM2-135M-Instruct.Q4_1.gguf system="Be brief." temperature=0

    /reset              forget the conversation (the system prompt stays)
    /system TEXT        set the system prompt (and forget the conversation)
    /temperature X      sampling temperature from now on (0 = greedy)
    /quit               leave (so do end of input and Ctrl-C at the prompt)

Ctrl-C during a reply drops it and its message; when the conversation outgrows the model's context,
its oldest turns go (the system prompt stays). Without a chat template (our checkpoints before SFT,
an HF tokenizer without `chat_template`) each line is continued as plain text, with no history. HF
Llamas are converted as they load (replies stream token by token); other architectures run in
transformers (the reply comes at once).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    # weights: none (float), int8, int4, auto (a .gguf's own Q8_0 / Q4 blocks, else none); docs/model.md
    quantize: str = "auto"
    compile: bool = True  # torch.compile the decode steps where they do not run fused (CPU: fused; ours only)
    schema: str = ""  # a JSON Schema file: every reply is JSON that matches it (constrained decoding; ours only)


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


def _stream(pieces: Iterator[str]) -> str | None:
    """Print a reply as it comes; its text, or None when Ctrl-C stopped it."""
    reply = []
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
            reply.append(piece)
    except KeyboardInterrupt:
        print(flush=True)
        _say("(interrupted)")
        return None
    print(flush=True)
    return "".join(reply)


@dataclass
class Conversation:
    """What the chat has so far, and what the slash commands change."""

    lm: Any  # an api.LM with a tokenizer
    system: str  # the system prompt ("" = none)
    sampling: Any  # generation.Sampling
    history: list[dict[str, str]] = field(default_factory=list)  # user and assistant turns, oldest first
    told_overflow: bool = False  # said once that the oldest turns are being dropped

    def command(self, line: str) -> bool:
        """Run a /command; False for /quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/quit":
            return False
        if name == "/reset":
            self.history.clear()
            _say("(conversation reset)")
        elif name == "/system":
            self.system, self.history = arg, []
            _say(f"(system prompt {'set' if arg else 'cleared'}; conversation reset)")
        elif name == "/temperature":
            self.set_temperature(arg)
        else:
            _say(f"unknown command {name}; {HELP}")
        return True

    def set_temperature(self, arg: str) -> None:
        from modernlm.generation import Sampling

        try:
            value = float(arg)
            if not math.isfinite(value) or value < 0:
                raise ValueError
            self.sampling = Sampling.make(self.sampling, temperature=value)
        except (ValueError, UserError):
            _say(f"/temperature takes a number >= 0, got {arg!r}")
            return
        _say(f"(temperature {value:g})")

    def reply(self, line: str) -> None:
        """Stream the reply to `line`. With a chat template the message and its reply join the
        history (neither when Ctrl-C stops the reply); without one, `line` is continued as text."""
        if not self.lm.has_chat_template:
            _stream(self.lm.stream(line, self.sampling))
            return
        self.history.append({"role": "user", "content": line})
        if not self.fit():
            return
        reply = _stream(self.lm.stream_chat(self.messages(), self.sampling))
        if reply is None:
            self.history.pop()  # the message without its reply
        else:
            self.history.append({"role": "assistant", "content": reply})

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def fit(self) -> bool:
        """Drop the oldest turns (the system prompt stays) until the prompt and a reply fit the
        model's context; False when the last message alone is too long (then it is dropped too)."""
        lm, max_new_tokens = self.lm, self.sampling.max_new_tokens
        room = lm.max_context - max_new_tokens if lm.max_context > max_new_tokens else lm.max_context - 1
        dropped = False
        while self.history and len(lm.chat_prompt_ids(self.messages())) > room:
            del self.history[: 2 if len(self.history) > 1 else 1]  # a user message and its reply
            dropped = True
        if dropped and not self.told_overflow:
            _say("(the conversation is longer than the model's context: dropping the oldest turns)")
            self.told_overflow = True
        if not self.history:
            _say("(that message alone is longer than the model's context; try a shorter one)")
        return bool(self.history)


def main(cfg: Config) -> None:
    from modernlm.api import load_fastest
    from modernlm.constrain import Constraint
    from modernlm.generation import Sampling
    from modernlm.quant import check_quantize

    if not cfg.model:
        raise UserError("model: give a model source (modernlm chat MODEL)")
    sampling = Sampling(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed, compile=cfg.compile,
        constraint=Constraint.schema_file(cfg.schema) if cfg.schema else None,
    )  # fmt: skip
    check_quantize(cfg.quantize, "quantize", auto=True)
    lm = load_fastest(cfg.model, device=cfg.device, backend=cfg.backend, what="model", quantize=cfg.quantize)
    if lm.tokenizer is None:
        raise UserError(f"model: {cfg.model} has no tokenizer, so there is no text to chat with")
    tty = sys.stdin.isatty()
    if tty:
        _say(f"chat with {lm.name} ({lm.kind}); {HELP}")
    if not lm.has_chat_template:
        _say("no chat template: plain continuation of what you type")
    if cfg.compile and lm.kind == "modernlm" and not lm.model.fuses_steps(lm.model.new_cache(1, 1)):
        # (on a CPU the decode steps run fused in modernlm's kernels: nothing to compile)
        start = time.perf_counter()
        lm.generate("Hi", max_new_tokens=3, compile=True)  # builds the compiled decode step now
        _say(f"decode steps compiled in {time.perf_counter() - start:.0f} s (compile=false to skip)")
    conversation = Conversation(lm, cfg.system, sampling)
    while (line := _read(tty)) is not None:
        if line.startswith("/"):
            if not conversation.command(line):
                break
        elif line.strip():
            conversation.reply(line)

"""Chat in the terminal with any source `modernlm.load` takes (our SFT/DPO checkpoints, HF dirs, hub
ids, .gguf) in the model's own chat template (ChatML for ours), replies streamed, history kept.

    modernlm chat runs/sft/checkpoints/best
    modernlm chat SmolLM2-135M-Instruct.Q4_1.gguf system="Be brief." temperature=0

    /reset              forget the conversation (the system prompt stays)
    /system TEXT        set the system prompt (and forget the conversation)
    /temperature X      sampling temperature from now on (0 = greedy)
    /quit               leave (so do end of input and Ctrl-C at the prompt)

Ctrl-C during a reply drops it and its message; when the conversation outgrows the model's context,
its oldest turns go (the system prompt stays), and a reply stops where the context ends. A message
the model cannot take is one line, and the chat goes on without it; bytes that are not UTF-8 are
read as U+FFFD. A system prompt too long for the context is refused (--system: exit 2; /system: the
old one stays). Without a chat template (our checkpoints before SFT, an HF tokenizer without
`chat_template`) each line is continued as plain text, with no history. HF Llamas are converted as
they load (replies stream token by token); other architectures run in transformers (the reply comes
at once).
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
    """The next line of input, None at the end (EOF or Ctrl-C at the prompt). Bytes that are not
    UTF-8 come as U+FFFD (`valid_unicode`)."""
    from modernlm.tokenizer import valid_unicode

    try:
        if tty:
            return valid_unicode(input("you> "))
        line = sys.stdin.readline()
        return valid_unicode(line.rstrip("\r\n")) if line else None
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
            try:
                self.check_system(arg)
            except UserError as e:
                _say(f"/system: {e}; the system prompt stays as it was")
                return True
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

    def check_system(self, system: str) -> None:
        """A UserError when `system` leaves no room in the model's context for a message and a reply."""
        if not system or not self.lm.has_chat_template:
            return
        # the shortest exchange: a one-character message and a one-token reply
        shortest = self.messages([{"role": "user", "content": "x"}], system)
        used, context = len(self.lm.chat_prompt_ids(shortest)) + 1, self.lm.max_context
        if used > context:
            raise UserError(
                f"the system prompt is too long for the model's context of {context} tokens "
                f"(with the shortest message and reply it takes {used})"
            )

    def reply(self, line: str) -> None:
        """Stream the reply to `line`, cut where the model's context ends. With a chat template the
        message and its reply join the history (neither when Ctrl-C stops the reply, or a UserError
        refuses the message); without one, `line` is continued as text."""
        from modernlm.generation import prompt_ids

        if not self.lm.has_chat_template:
            ids = prompt_ids(self.lm.tokenizer, line)
            if len(ids) >= self.lm.max_context:
                _say("(that text is longer than the model's context; try a shorter one)")
                return
            _stream(self.lm.stream(line, self.budget(len(ids))))
            return
        fitted = self.fit(line)
        if fitted is None:
            return
        history, ids = fitted
        reply = _stream(self.lm.stream_chat(self.messages(history), self.budget(len(ids))))
        if reply is not None:  # (Ctrl-C: the message goes without its reply)
            self.history = [*history, {"role": "assistant", "content": reply}]

    def budget(self, prompt_tokens: int) -> Any:
        """The sampling settings with max_new_tokens cut to the context the prompt leaves: past it
        our models run on positions they were not trained for, GPT-2's learned positions end."""
        from modernlm.generation import Sampling

        left = self.lm.max_context - prompt_tokens
        if self.sampling.max_new_tokens <= left:
            return self.sampling
        return Sampling.make(self.sampling, max_new_tokens=left)

    def messages(self, history: list[dict[str, str]] | None = None, system: str | None = None) -> list[dict[str, str]]:
        """The system prompt (this one's, or `system`) and the history (this one's, or `history`)."""
        system = self.system if system is None else system
        turns = self.history if history is None else history
        return ([{"role": "system", "content": system}] if system else []) + turns

    def fit(self, line: str) -> tuple[list[dict[str, str]], list[int]] | None:
        """The history with `line` added, its oldest turns dropped (the system prompt stays) until
        the prompt and a whole reply (half the context when max_new_tokens is past it) fit the
        model's context or only `line` is left, and the prompt's token ids; None when `line` leaves
        no room for a reply (the history stays)."""
        lm, reply = self.lm, self.sampling.max_new_tokens
        if reply >= lm.max_context:  # no prompt leaves room for it: keep half the context for the reply
            reply = lm.max_context // 2  # (else every turn but the last would go, every time)
        history = [*self.history, {"role": "user", "content": line}]
        ids = lm.chat_prompt_ids(self.messages(history))
        dropped = False
        while len(history) > 1 and len(ids) + reply > lm.max_context:
            history = history[2:]  # a user message and its reply
            ids = lm.chat_prompt_ids(self.messages(history))
            dropped = True
        if len(ids) >= lm.max_context:
            _say("(that message alone is longer than the model's context; try a shorter one)")
            return None
        if dropped and not self.told_overflow:
            _say("(the conversation is longer than the model's context: dropping the oldest turns)")
            self.told_overflow = True
        return history, ids


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
    conversation = Conversation(lm, cfg.system, sampling)
    try:
        conversation.check_system(cfg.system)  # before the decode steps compile
    except UserError as e:
        raise UserError(f"system: {e}") from None
    tty = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach `_read` (as U+FFFD), not an error
        sys.stdin.reconfigure(errors="surrogateescape")
    if tty:
        _say(f"chat with {lm.name} ({lm.kind}); {HELP}")
    if not lm.has_chat_template:
        _say("no chat template: plain continuation of what you type")
    if cfg.compile and lm.kind == "modernlm" and not lm.model.fuses_steps(lm.model.new_cache(1, 1)):
        # (on a CPU the decode steps run fused in modernlm's kernels: nothing to compile)
        start = time.perf_counter()
        lm.generate("Hi", max_new_tokens=3, compile=True)  # builds the compiled decode step now
        _say(f"decode steps compiled in {time.perf_counter() - start:.0f} s (compile=false to skip)")
    if cfg.max_new_tokens >= lm.max_context:
        _say(f"(max_new_tokens={cfg.max_new_tokens} does not fit the model's context of {lm.max_context} tokens: "
             "each reply stops where the context ends)")  # fmt: skip
    while (line := _read(tty)) is not None:
        if line.startswith("/"):
            if not conversation.command(line):
                break
        elif line.strip():
            try:
                conversation.reply(line)
            except UserError as e:  # this message only (e.g. a special token's string in it): the chat goes on
                _say(f"error: {e}")

"""`modernlm.load`: one loader for every model source, and the small object it returns.

    from modernlm import load
    lm = load("runs/tiny")                            # a run directory: checkpoints/best, else the latest
    lm = load("SmolLM2-135M-Instruct.Q4_1.gguf")      # or an HF directory or hub id
    lm.generate("Once upon a time", max_new_tokens=40, temperature=0.8, seed=0)
    lm.chat([{"role": "user", "content": "What is 2 + 3?"}])  # lm.stream / lm.stream_chat: in pieces
    lm.loglikelihood("The capital of France is", " Paris")  # summed log-probability, in nats
    lm.perplexity(text)                                      # as `modernlm eval perplexity` computes it

A source means what `checkpoint.resolve_source` says; an HF source loads as transformers' own model
(`backend="transformers"`, the default: the reference) or as a ModernDecoderLM (`backend="modernlm"`).

Design notes: docs/design.md#apipy
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modernlm.chat import (
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    Message,
    Spans,
    check_messages,
    encode_with_specials,
    render_chat,
    render_with_specials,
    template_takes_tools,
)
from modernlm.checkpoint import checkpoint_label, load_model, resolve_source
from modernlm.errors import UserError
from modernlm.generation import Sampling, TextGeneration, prompt_ids
from modernlm.gguf_weights import gguf_tokenizer, load_gguf
from modernlm.hf.convert import from_hf, hf_tokenizer_to_ours, load_hf_tokenizer, load_transformers
from modernlm.hf.text import render_chat_template, wrap_hf
from modernlm.model import ModernDecoderLM
from modernlm.perplexity import evaluate_text
from modernlm.quant import check_quantize, prepare, quantize_of, quantized_weights
from modernlm.runtime import DTYPES, eval_mode, resolve_device
from modernlm.tokenizer import has_tokenizer, load_tokenizer

BACKENDS = ("auto", "modernlm", "transformers")


@dataclass(eq=False)
class LM:
    """A loaded model and its tokenizer (see the module docstring); `load` makes one."""

    model: Any  # a ModernDecoderLM (kind "modernlm") or transformers' model (kind "transformers")
    tokenizer: Any  # modernlm.tokenizer.Tokenizer, or None (token ids only)
    kind: str
    source: str  # what was given
    name: str  # a short label for tables
    checkpoint: Path | None  # the modernlm checkpoint directory the source resolved to
    device: torch.device

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def num_params(self) -> int:  # tied embeddings counted once; quantized weights too (buffers, not parameters)
        if self.kind != "modernlm":
            return sum(p.numel() for p in self.model.parameters())
        return self.model.num_params() + quantized_weights(self.model)

    @property
    def weights(self) -> str:
        """What the weights are: "int8", "int4" (quant.prepare) or the dtype."""
        q = quantize_of(self.model) if self.kind == "modernlm" else "none"
        return self.dtype if q == "none" else q

    @property
    def max_context(self) -> int:
        """Positions the model was built for (no stated maximum, as in recurrent models: 2048)."""
        c = self.model.config
        if self.kind == "modernlm":
            return c.max_seq_len
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048)

    @property
    def vocab_size(self) -> int:  # logits per position
        if self.kind == "modernlm":
            return self.model.config.vocab_size
        return int(self.model.get_output_embeddings().weight.shape[0])

    def logits_fn(self, ids: Tensor) -> Tensor:
        """[B, T] token ids -> [B, T, V] logits (eval mode, no autograd, no cache)."""
        with eval_mode(self.model), torch.no_grad():
            if self.kind == "modernlm":
                return self.model(ids.to(self.device)).logits
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise UserError(f"{self.source}: no tokenizer, so there is no text to work with")
        return self.tokenizer

    def _check(self, sampling: Sampling) -> Sampling:
        if sampling.constraint is not None and self.kind != "modernlm":
            raise UserError(f"{self.source}: constrained decoding needs backend=modernlm (not transformers')")
        if isinstance(sampling.seed, Sequence) and self.kind != "modernlm":
            raise UserError(f"{self.source}: seed as a list (one per row) needs backend=modernlm (not transformers')")
        return sampling

    def complete(self, rows: list[list[int]], sampling: Sampling) -> list[str]:
        """The text continuing each row of token ids (one left-padded batch), as `generate` gives it."""
        self._check(sampling)
        if self.kind == "modernlm":
            return [s.text for s in TextGeneration(self.model, self.tokenizer, rows, sampling).run()]
        task_model = wrap_hf(self.model, self.tokenizer, add_bos=self.tokenizer.add_bos, name=self.name)
        return task_model.complete(rows, sampling)

    def generate(
        self, prompt: str | list[str], sampling: Sampling | int | None = None, **settings: Any
    ) -> str | list[str]:
        """The continuation of `prompt` (or of each prompt of a list, as one batch), ending before
        eos or a stop string. `sampling` (or max_new_tokens) and `settings` as in `Sampling.make`;
        greedy by default."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = [prompt_ids(self._tok(), p) for p in prompts]
        texts = self.complete(rows, Sampling.make(sampling, **settings)) if rows else []
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, sampling: Sampling | int | None = None, **settings: Any) -> Iterator[str]:
        """`generate` of one prompt in pieces as they come (transformers' models: one piece at the end)."""
        return self._stream(prompt_ids(self._tok(), prompt), Sampling.make(sampling, **settings))

    def _stream(self, ids: list[int], sampling: Sampling) -> Iterator[str]:
        self._check(sampling)
        if self.kind == "modernlm":  # joined, the pieces are `complete`'s text (`stream_text`)
            for (piece,) in TextGeneration(self.model, self.tokenizer, [ids], sampling):
                if piece:
                    yield piece
        else:
            yield self.complete([ids], sampling)[0]

    @property
    def has_chat_template(self) -> bool:
        """Ours: the tokenizer has <|im_start|> and <|im_end|> (SFT adds them), or a template of its
        own (an HF model's, kept by `convert`); HF: a `chat_template`."""
        tok = self.tokenizer
        if tok is None:
            return False
        if self.checkpoint is not None and tok.chat_template in (None, CHATML_TEMPLATE):
            return all(tok.token_to_id(t) is not None for t in (IM_START, IM_END))
        return bool(tok.chat_template)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation in the model's chat template, the assistant's turn opened: ChatML for
        ours (and whenever the tokenizer has no template), else the tokenizer's Jinja template as
        transformers renders it."""
        return self._render_chat(check_messages(messages, "chat"))

    def chat_prompt_specials(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, Spans | None]:
        """`chat_prompt` and where its template's special tokens are (`chat.render_with_specials`:
        None when no content holds a special token's string). `tools` (OpenAI's list): rendered by
        a template that takes them (`chat.template_takes_tools`), with the messages as the caller
        checked them (tool turns, assistant tool_calls: serve/tools.py)."""
        checked = check_messages(messages, "chat") if tools is None else messages
        return render_with_specials(self._tok(), lambda m: self._render_chat(m, tools), checked)

    def _render_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
        tok = self._tok()
        if tools is None and tok.chat_template in (None, CHATML_TEMPLATE):
            return render_chat(messages, add_generation_prompt=True)
        if tools is not None and not template_takes_tools(tok.chat_template):
            raise UserError("tools: this model's chat template does not take them")
        special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
        extra = {"tools": tools} if tools is not None else {}
        return render_chat_template(tok.chat_template, messages, add_generation_prompt=True, **special, **extra)

    def chat(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling | int | None = None,
        *,
        response_format: Any = None,
        **settings: Any,
    ) -> str:
        """The assistant's reply to `messages` ([{"role", "content"}, ...]): `chat_prompt` tokenized
        as transformers' apply_chat_template does (the template holds every special token), every
        content as text (`chat_prompt_ids`). `response_format`, a pydantic model class or a JSON
        Schema: the reply is JSON that matches it (constrained decoding), returned as a `Reply`
        whose `.parsed` is the object (the model's instance, or the dict); a reply cut by
        max_new_tokens before the JSON is whole is a UserError. Other constraints: `settings`
        (json_schema=, json_object=True, regex=, choice=, grammar=)."""
        if response_format is None:
            return "".join(self.stream_chat(messages, sampling, **settings))
        constrained = self._check(Sampling.make(sampling, json_schema=response_format, **settings))
        (reply,) = TextGeneration(self.model, self._tok(), [self.chat_prompt_ids(messages)], constrained).run()
        return Reply.of(reply.text, response_format, cut=reply.finish == "length")

    def stream_chat(
        self, messages: list[dict[str, str]], sampling: Sampling | int | None = None, **settings: Any
    ) -> Iterator[str]:
        """`chat` in pieces as they come (transformers' models: one piece at the end)."""
        return self._stream(self.chat_prompt_ids(messages), Sampling.make(sampling, **settings))

    def chat_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """`chat_prompt` as the token ids `chat` gives the model (no bos: the template has them all).
        A content is text: a special token's string in it is encoded as ordinary text, so a message
        cannot close its turn or open another; only the template's own special tokens are read.
        `tools`: see `chat_prompt_specials`."""
        return encode_with_specials(self._tok(), *self.chat_prompt_specials(messages, tools))

    def loglikelihood(self, context: str, continuation: str) -> float:
        """log p(continuation | context), summed over the continuation's tokens, in nats. Both are
        tokenized apart (the context with the tokenizer's bos rule), as task scoring does."""
        tok = self._tok()
        ctx, cont = prompt_ids(tok, context), tok.encode(continuation)
        if not cont:
            return 0.0
        ids = torch.tensor([ctx + cont], device=self.device)
        logp = self.logits_fn(ids[:, :-1])[0, len(ctx) - 1 :].float().log_softmax(-1)
        return float(logp.gather(-1, ids[0, len(ctx) :, None]).sum())

    def perplexity(self, text: str, **options: Any) -> float:
        """Token perplexity of `text` by `modernlm eval perplexity`'s method and defaults (`options`:
        context, stride, batch_size, max_tokens, bos; see `perplexity.evaluate_text`)."""
        return evaluate_text(self, text, **options)["perplexity"]


class Reply(str):
    """A reply's text that is JSON for a schema, with `.parsed`: the pydantic model's instance, or the
    JSON value for a schema given as a dict."""

    parsed: Any

    @classmethod
    def of(cls, text: str, response_format: Any, cut: bool = False) -> Reply:
        """`cut`: the reply ended at max_new_tokens; a number it ends with may go on."""
        try:
            value = json.loads(text)
            if cut and isinstance(value, int | float) and not isinstance(value, bool):
                raise ValueError
        except ValueError:  # (json.JSONDecodeError is one)
            raise UserError(
                f"the reply ended before its JSON was complete ({len(text)} characters): raise max_new_tokens"
            ) from None
        reply = cls(text)
        validate = getattr(response_format, "model_validate", None)  # a pydantic model class
        reply.parsed = validate(value) if validate else value
        return reply


def load(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    backend: str = "auto",
    tokenizer: str = "",
    progress: bool = True,
    what: str = "",
    quantize: str = "none",
) -> LM:
    """Load a model source (see the module docstring) in eval mode on `device` ("auto": cuda when
    there is one). dtype: "float32", "bfloat16" or "float16" (None: a checkpoint's own, float32 for
    HF). backend: "auto", "modernlm" (HF Llamas converted) or "transformers" (HF sources only).
    tokenizer: another tokenizer source. progress=False: no loading bars. `what` names the option
    in errors ("init_from: ..."). quantize (ModernDecoderLM only, `quant.prepare`): "none" (float
    weights, the fast float32 decode path), "int8", "int4", or "auto": a .gguf's own Q8_0 / Q4
    weights as they are in the file (`gguf_weights`), else "none"."""

    at = f"{what}: " if what else ""
    if backend not in BACKENDS:
        raise UserError(f"{at}backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"{at}dtype must be one of {list(DTYPES)}, got {dtype!r}")
    quantize = check_quantize(quantize, f"{at}quantize", auto=True)
    src = resolve_source(source, what)
    dev = resolve_device(str(device))
    if backend == "auto" and quantize != "none" and src.kind != "modernlm":
        # quantized decoding is our engine's: an HF Llama (or .gguf) converts as it loads; "auto"
        # falls back to transformers' model as it is for other architectures (`load_fastest`)
        options = dict(device=device, dtype=dtype, tokenizer=tokenizer, progress=progress, what=what, quantize=quantize)
        return load_fastest(source, **options) if quantize == "auto" else load(source, backend="modernlm", **options)
    if quantize == "auto" and backend == "transformers":
        quantize = "none"  # auto is the fastest that applies: transformers' models decode as they are
    if quantize != "none" and backend == "transformers":
        raise UserError(f"{at}quantize={quantize} needs backend=modernlm (transformers' models decode as they are)")
    if src.kind == "modernlm":
        if backend == "transformers":
            raise UserError(f"{at}{source} is a modernlm checkpoint; backend=transformers takes HF models")
        # int8 / int4: quantized as it is read, a few rows at a time (never whole in float32)
        model = load_model(src.path, dev, "none" if quantize == "auto" else quantize, DTYPES.get(dtype))
        tok = load_tokenizer(tokenizer or src.path) if tokenizer or has_tokenizer(src.path) else None
        if tok is not None and tok.vocab_size > model.config.vocab_size:
            raise UserError(
                f"{at}{src.path}: tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}"
            )
        if quantize in ("none", "auto"):
            model = prepare(model, "none")
        return LM(model.eval(), tok, "modernlm", str(source), checkpoint_label(src.path), src.path, dev)

    dtype = dtype or "float32"
    convert = backend == "modernlm"
    model = tok = None
    if convert and quantize != "none" and "gguf_file" in src.kwargs and dtype == "float32":
        # the file's quantized blocks as they are: never expanded to float32 (None: not a file we
        # read), and its tokenizer from the same parse (None: a kind transformers builds, below)
        model, tok = load_gguf(src.path, quantize, device=dev) or (None, None)
    if model is None:
        model = load_transformers(src, dtype=dtype, device=dev, llama_only=convert, progress=progress, field=what)
        if "gguf_file" in src.kwargs and not tokenizer:  # as llama.cpp reads the file (gguf_weights)
            tok = gguf_tokenizer(src.path)
    try:
        if tok is None or tokenizer:
            tok = hf_tokenizer_to_ours(load_hf_tokenizer(tokenizer or src))
    except (OSError, ValueError, UserError) as e:  # without a tokenizer the weights still score token ids
        if not _no_tokenizer(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if tokenizer:
            raise UserError(f"{at}no usable tokenizer in {tokenizer} ({first})") from None
        print(f"warning: no usable tokenizer in {source} ({first}); weights only", file=sys.stderr)
        tok = None
    if convert and not isinstance(model, ModernDecoderLM):
        model = from_hf(model, DTYPES[dtype]).to(dev).eval()
    if convert:
        model = prepare(model, "none" if quantize == "auto" else quantize)
    path = src.path
    name = path.stem if path is not None and path.is_file() else path.name if path is not None else src.where
    return LM(model, tok, "modernlm" if convert else "transformers", str(source), name, None, dev)


def _no_tokenizer(e: BaseException) -> bool:
    """Whether an error of the HF tokenizer path means the source has no tokenizer we can use:
    transformers' own words for "no tokenizer files here", not any error on the way.

    - OSError itself (not a subclass such as PermissionError): transformers 4's "Can't load
      tokenizer for ..." when a directory has no tokenizer files; the hub's "not a valid model
      identifier" or "couldn't connect ... or find them in the cached files".
    - ValueError itself, "Couldn't instantiate the backend tokenizer ...": transformers 5 when a
      directory has no tokenizer files (nothing to build one from), or only files it cannot convert.
    - ValueError itself, "Cannot build a tokenizer from a GGUF file stating tokenizer None": a .gguf
      whose metadata has no tokenizer (tokenizer.ggml.model unset).
    - UserError: `hf_tokenizer_to_ours` on a tokenizer without a `tokenizers` backend.
    Anything else (a corrupt tokenizer.json, a bug) is an error, not a missing tokenizer."""
    if isinstance(e, UserError) or type(e) is OSError:
        return True
    return type(e) is ValueError and str(e).startswith(NO_TOKENIZER_ERRORS)


# transformers' ValueErrors that mean "no tokenizer in this source" (see `_no_tokenizer`)
NO_TOKENIZER_ERRORS = (
    "Couldn't instantiate the backend tokenizer",
    "Cannot build a tokenizer from a GGUF file stating tokenizer None",
)


def load_fastest(source: str | Path, *, backend: str = "auto", **options: Any) -> LM:
    """`load` choosing the engine that decodes fastest when backend is "auto": ours for modernlm
    checkpoints and HF Llama architectures (converted as they load), transformers' for any other
    architecture. Another backend is passed on as it is."""
    if backend == "auto" and resolve_source(source, options.get("what", "")).kind != "modernlm":
        try:
            return load(source, backend="modernlm", **options)
        except UserError:  # not a Llama architecture
            backend = "transformers"
    return load(source, backend=backend, **options)


__all__ = ["BACKENDS", "LM", "load", "load_fastest"]

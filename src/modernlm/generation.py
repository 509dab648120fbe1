"""Generation for ModernDecoderLM: KV-cache decoding, sampling, batching, streaming text.

Three layers, lowest first:
- `iter_tokens(model, idx, n)` prefills a KV cache with the prompt and yields one
  `Step(tokens (B,), logits (B, V))` per new token. Everything else is built on it.
- `generate(model, idx, n)` collects those steps into a (B, T + n) tensor (`model.generate`).
- `generate_text` / `stream_text`: strings in, strings out, with stop strings and streaming.

Greedy or sampling is one knob, `temperature`: 0 means greedy (argmax; top_k/top_p are ignored),
> 0 samples from softmax(logits / temperature). Logits go through the same steps, in the same
order, as in HF transformers: repetition penalty -> temperature -> top-k -> top-p -> sample.
`seed` drives a private `torch.Generator`, so a seeded call neither reads nor moves the global RNG;
with `seed=None` sampling uses the global RNG (so `torch.manual_seed` works as usual).

Batches of prompts of different lengths are left-padded, with `pad_mask` (B, T) False at padding;
the model never attends to padding, so each row gets the tokens it would get alone.

Past the trained context: without a window the cache is sized to prompt + max_new_tokens and RoPE
positions keep growing (quality falls off past `max_seq_len`). With `window > 0` the cache is a
rolling StreamingLLM cache (the first `sink_size` slots plus the last `window`, see
`model.KVCache`): memory and positions stay constant however long generation runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from modernlm.errors import UserError

if TYPE_CHECKING:
    from modernlm.model import KVCache, ModernDecoderLM
    from modernlm.tokenizer import Tokenizer


class Step(NamedTuple):
    tokens: Tensor  # (B,) the new token of each row; pad_token_id for rows already finished
    logits: Tensor  # (B, V) the model's raw logits that the tokens were picked from


# --------------------------------------------------------------------------------------------
# Logits processing: pure functions on (B, V) tensors
# --------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (as HF applies it): for every token already in the sequence
    (`seen` (B, V) bool), divide a positive logit by `penalty` and multiply a negative one."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too); -inf the rest."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is >= p.

    A token is dropped when the tokens ranked above it already reach p; the top token is always
    kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all better-ranked tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row (B,) from softmax(logits / temperature) after top-k / top-p."""
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Token-level generation
# --------------------------------------------------------------------------------------------


def _check_args(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    window: int,
    sink_size: int,
) -> None:
    # UserErrors: these values come straight from `modernlm generate key=value` overrides.
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if repetition_penalty <= 0:
        raise UserError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if window < 0 or sink_size < 0:
        raise UserError(f"window and sink_size must be >= 0, got {window} and {sink_size}")


def _prefill(
    model: ModernDecoderLM, idx: Tensor, cache: KVCache, pad_mask: Tensor | None
) -> Tensor:
    """Run the prompt through the model into `cache`; return the last position's logits (B, V).

    A rolling cache takes at most `chunk` new tokens per forward (the room it has beyond
    sink_size + window, less the sink token's slot; see `ModernDecoderLM.new_cache`), so a long
    prompt goes in chunks.
    """
    if not cache.rolling:
        return model(idx, cache=cache, pad_mask=pad_mask, last_only=True).logits[:, -1]
    chunk = cache.capacity - cache.sink_size - cache.window - int(model.sink is not None)
    for start in range(0, idx.size(1), chunk):
        end = start + chunk
        chunk_mask = None if pad_mask is None else pad_mask[:, start:end]
        logits = model(idx[:, start:end], cache=cache, pad_mask=chunk_mask, last_only=True).logits
    return logits[:, -1]


# model -> its compiled decoder. The value holds the model, so an entry lives as long as the
# process; only models generated from with compile=True get one.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decoder(model: ModernDecoderLM) -> torch.nn.Module:
    """`torch.compile(model)` for decode steps, built once per model.

    dynamic=True because the cache length grows by one every step: one graph then serves every
    length instead of a recompile per step. Not stored on the model itself, where it would become
    a submodule and show up in its state_dict.
    """
    if model not in _COMPILED:
        from modernlm.runtime import compile_model

        _COMPILED[model] = compile_model(model, dynamic=True)
    return _COMPILED[model]


@torch.inference_mode()
def iter_tokens(
    model: ModernDecoderLM,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    pad_mask: Tensor | None = None,
    seed: int | None = None,
    window: int = 0,
    sink_size: int = 4,
    chunk: int = 64,
    cache: KVCache | None = None,
    vocab_size: int | None = None,
    compile: bool = False,
) -> Iterator[Step]:
    """Yield one `Step` per generated token; see `generate` for the arguments.

    Stops after `max_new_tokens` steps or once every row has produced an EOS. The yielded tensors
    are inference tensors (made under `torch.inference_mode`): copy them into a normal tensor, as
    `generate` does, before using them in autograd. The model is put in eval mode meanwhile.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, window, sink_size)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(
            f"idx must be a (batch, tokens) tensor with at least one token, got {tuple(idx.shape)}"
        )
    if max_new_tokens == 0:
        return
    B, T = idx.shape
    has_sink = model.sink is not None
    if pad_mask is not None:
        pad_mask = pad_mask.to(device=idx.device, dtype=torch.bool)
        if pad_mask.shape != idx.shape:
            raise UserError(
                f"pad_mask {tuple(pad_mask.shape)} must have the shape of idx {tuple(idx.shape)}"
            )
        if not pad_mask[:, -1].all():
            raise UserError(
                "pad_mask: prompts must be left-padded (the last column is all real tokens)"
            )
        if pad_mask.all():
            pad_mask = None  # no padding after all: keep SDPA's causal fast path
    if cache is None:
        if window and chunk < 1:
            raise UserError(f"chunk must be >= 1 with a rolling cache, got {chunk}")
        # Plain cache: room for everything this call can add (the last token is never fed back).
        cache = model.new_cache(
            B, T + max_new_tokens, window=window, sink_size=sink_size, chunk=chunk
        )
    else:
        if cache.seen or cache.k[0].size(0) != B:
            raise UserError(f"cache must be fresh and hold {B} rows")
        need = T + max_new_tokens - 1 + int(has_sink)
        if not cache.rolling and cache.capacity < need:
            raise UserError(
                f"KV cache too small: {T} prompt + {max_new_tokens} new tokens need {need} "
                f"slots, the cache has {cache.capacity}; size it to prompt + max_new_tokens "
                "or use window > 0"
            )

    greedy = temperature == 0
    generator = None
    if seed is not None and not greedy:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, device=idx.device) if eos_ids else None
    pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device) if eos is not None else None
    seen = None
    if repetition_penalty != 1.0:
        vocab = model.config.vocab_size
        # One spare column collects the padding, so pad positions never count as "seen".
        real = idx if pad_mask is None else idx.masked_fill(~pad_mask, vocab)
        seen_buf = torch.zeros(B, vocab + 1, dtype=torch.bool, device=idx.device).scatter_(
            1, real, True
        )
        seen = seen_buf[:, :vocab]
    # With padding, every decode step passes a one-column all-True pad mask so the cache marks
    # the new slot valid explicitly (a rolling cache reuses slots that may have held padding).
    step_mask = (
        torch.ones(B, 1, dtype=torch.bool, device=idx.device) if pad_mask is not None else None
    )

    decode = compiled_decoder(model) if compile else model
    was_training = model.training
    model.eval()
    try:
        logits = _prefill(model, idx, cache, pad_mask)
        for i in range(max_new_tokens):
            scores = logits.float()
            if vocab_size is not None and vocab_size < scores.size(-1):
                # ids past the tokenizer's vocabulary (a padded embedding) decode to nothing
                scores = scores.clone()
                scores[:, vocab_size:] = float("-inf")
            if seen is not None:
                scores = apply_repetition_penalty(scores, seen, repetition_penalty)
            if greedy:
                tok = scores.argmax(dim=-1)
            else:
                tok = sample(scores, temperature, top_k, top_p, generator)
            if finished is not None:
                tok = tok.masked_fill(finished, pad_id)
                finished |= torch.isin(tok, eos)
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            yield Step(tok, logits)
            if i == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                return
            logits = decode(tok[:, None], cache=cache, pad_mask=step_mask, last_only=True).logits
            logits = logits[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: ModernDecoderLM,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    pad_mask: Tensor | None = None,
    seed: int | None = None,
    window: int = 0,
    sink_size: int = 4,
    chunk: int = 64,
    cache: KVCache | None = None,
    vocab_size: int | None = None,
    compile: bool = False,
) -> Tensor:
    """Continue each row of `idx` (B, T) by up to `max_new_tokens` tokens, with a KV cache.

    Args:
        temperature: 0 = greedy (the default); > 0 samples from softmax(logits / temperature).
        top_k, top_p: sampling filters; None or 0 / 1.0 switch them off.
        repetition_penalty: CTRL's penalty on tokens already in prompt + output (1.0 = off).
        eos_token_id: one id or several; a row stops at its first one, then emits `pad_token_id`
            (default: the first EOS id, else 0). Generation ends when every row has stopped.
        pad_mask: (B, T) bool, False at the left padding of shorter prompts.
        seed: reproducible sampling from a private generator; None uses the global RNG.
        window, sink_size: window > 0 selects the rolling StreamingLLM cache (sink_size + window
            slots), for generation of any length in constant memory. Keep sink_size + window +
            chunk <= max_seq_len so every position stays in the trained range. In a padded
            batch the padding takes a shorter row's first slots, so that row keeps fewer sinks.
        chunk: tokens per prefill forward in rolling mode (the prompt goes in chunks).
        cache: an empty cache to fill instead of a new one (e.g. to inspect it afterwards).
        vocab_size: generate only ids below this (a tokenizer smaller than the padded vocab).
        compile: run the one-token decode steps through `torch.compile` (built once per model,
            ~20 s on a laptop CPU, reused by later calls); same tokens, ~1.3x faster per token on
            CPU (benchmarks/RESULTS.md). The prefill stays eager.

    Returns:
        (B, T + n) tokens: the prompt as given, then n <= max_new_tokens new tokens per row (the
        EOS token included, padding after it). n < max_new_tokens only when every row stopped.
    """
    B, T = idx.shape
    out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, :T] = idx
    n = 0
    steps = iter_tokens(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        pad_mask=pad_mask, seed=seed, window=window, sink_size=sink_size, chunk=chunk, cache=cache,
        vocab_size=vocab_size, compile=compile,
    )  # fmt: skip
    for step in steps:
        out[:, T + n] = step.tokens  # `out` is a normal tensor, usable in autograd later
        n += 1
    return out[:, : T + n]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths -> (idx (B, T), pad_mask (B, T)), padded on the left."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            idx[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
            pad_mask[i, T - len(r) :] = True
    return idx.to(device), pad_mask.to(device)


# --------------------------------------------------------------------------------------------
# Text: incremental decoding, stop strings, streaming
# --------------------------------------------------------------------------------------------


class TextStream:
    """Token ids in, text pieces out: never half a character, never part of a stop string.

    Decoding token by token breaks multi-byte characters that a byte-level BPE splits across
    tokens (each part decodes to U+FFFD). So we decode a short window of recent tokens
    `ids[prefix:]` and hand out what it adds to the text already handed out, minus a trailing
    U+FFFD: lossy UTF-8 decoding marks an unfinished character with one U+FFFD at the end, which
    the next token may complete; everything before it is final. Whenever the window decodes
    cleanly it slides forward, keeping the previous piece as context (vLLM's incremental
    detokenizer does the same; the context also keeps the leading space that SentencePiece-style
    decoders strip from a first token).

    Text that could be the start of a stop string is held back until it is ruled out. Once a
    stop string appears, `text` is cut just before it and `stopped` becomes True. Joined, the
    pieces from `push` and `flush` equal `text`.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # The last prompt tokens give the first generated ones their decoding context.
        self.ids = list(context)[-4:]
        self._prefix = 0  # the decoding window is ids[_prefix:]
        self._read = len(self.ids)  # end of the window's last clean decode
        self._done = len(self._decode(self.ids))  # characters of the window already in `text`
        self.text = ""  # generated text so far (cut at a stop string once stopped)
        self._sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        window = self._decode(self.ids[self._prefix :])
        clean = final or not window.endswith("\ufffd")
        if not clean:
            window = window[:-1]  # an unfinished character: the next token may complete it
        if len(window) > self._done:
            self.text += window[self._done :]
            self._done = len(window)
        if clean:  # slide the window so decoding stays O(1) per token
            self._prefix, self._read = self._read, len(self.ids)
            self._done = len(self._decode(self.ids[self._prefix :]))

    def _release(self, final: bool) -> str:
        hits = [i for s in self.stop if (i := self.text.find(s, self._sent)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            # hold back the longest tail that a stop string begins with
            tail = self.text[self._sent :]
            hold = max(
                (k for s in self.stop for k in range(1, len(s)) if tail.endswith(s[:k])), default=0
            )
            end = len(self.text) - hold
        piece, self._sent = self.text[self._sent : end], end
        return piece

    def push(self, token: int) -> str:
        """Add one generated token; return the new text that is safe to show (maybe '')."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: return whatever is still held back."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._release(final=True)


def _text_steps(
    model: ModernDecoderLM,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    stop: str | Sequence[str] | None,
    add_bos: bool,
    **kwargs,
) -> Iterator[list[str]]:
    """Yield, per generated token, the new text of every row ('' where there is none yet)."""
    rows = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    for p, r in zip(prompts, rows, strict=True):
        if not r:
            raise UserError(
                f"prompt {p!r} encodes to no tokens (and the tokenizer has no bos token)"
            )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    streams = [TextStream(tokenizer, stops, context=r) for r in rows]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    idx, pad_mask = left_pad(rows, pad_id, device)
    eos = kwargs.pop("eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    done = [False] * len(rows)
    steps = iter_tokens(
        model, idx, max_new_tokens, eos_token_id=eos, pad_mask=pad_mask,
        vocab_size=tokenizer.vocab_size, **kwargs,
    )  # fmt: skip
    for step in steps:
        pieces = []
        for i, tok in enumerate(step.tokens.tolist()):
            if done[i]:
                pieces.append("")
            elif tok in eos_ids:
                pieces.append(streams[i].flush())
                done[i] = True
            else:
                pieces.append(streams[i].push(tok))
                done[i] = streams[i].stopped
        yield pieces
        if all(done):
            return  # every row ended on EOS or a stop string: skip the remaining steps
    yield [s.flush() for s in streams]


def generate_text(
    model: ModernDecoderLM,
    tokenizer: Tokenizer,
    prompt: str | list[str],
    max_new_tokens: int = 256,
    *,
    stop: str | Sequence[str] | None = None,
    add_bos: bool = True,
    **kwargs,
) -> str | list[str]:
    """Continue `prompt` (one string, or a list generated as one left-padded batch).

    Returns only the new text, ending before the tokenizer's EOS (or `eos_token_id`) or before
    the first stop string. `add_bos` prepends the tokenizer's bos token, if it has one. `kwargs`
    are those of `generate` (temperature, top_k, top_p, repetition_penalty, seed, window, ...).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        return []
    texts = [""] * len(prompts)
    for pieces in _text_steps(model, tokenizer, prompts, max_new_tokens, stop, add_bos, **kwargs):
        for i, piece in enumerate(pieces):
            texts[i] += piece
    return texts[0] if isinstance(prompt, str) else texts


def stream_text(
    model: ModernDecoderLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 256,
    *,
    stop: str | Sequence[str] | None = None,
    add_bos: bool = True,
    **kwargs,
) -> Iterator[str]:
    """`generate_text` for one prompt, yielding text pieces as they are produced.

    Pieces never split a character or show part of a stop string; joined, they equal what
    `generate_text` returns for the same arguments.
    """
    if not isinstance(prompt, str):
        raise UserError("stream_text takes one prompt string; use generate_text for a batch")
    for (piece,) in _text_steps(model, tokenizer, [prompt], max_new_tokens, stop, add_bos, **kwargs):
        if piece:
            yield piece


__all__ = [
    "Step",
    "TextStream",
    "apply_repetition_penalty",
    "generate",
    "generate_text",
    "iter_tokens",
    "left_pad",
    "sample",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
]

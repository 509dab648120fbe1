"""Generation for ModernDecoderLM: KV-cache decoding, sampling, batching, streaming text.

One engine from tokens to text, lowest layer first: `Sampling` (every setting of one generation, the
one dataclass every caller passes) -> `iter_tokens` (the one decoding loop: prefill a KV cache, yield
a `Step` per new token) -> `generate` (a (B, T + n) tensor) -> `TextStream`, `TextGeneration`,
`generate_text`, `stream_text` (text: never half a character, cut before a stop string or eos).

Logits go through the same steps, in the same order, as in HF transformers: repetition penalty ->
temperature (0 means greedy) -> top-k -> top-p -> sample. A seeded call samples with a private
`torch.Generator`, so it neither reads nor moves the global RNG. Left-padded batches give each row
the tokens it would get alone.

Design notes: docs/design.md#generationpy
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from modernlm.constrain import KINDS as CONSTRAINT_KEYS
from modernlm.constrain import Constraint, Guide
from modernlm.errors import UserError
from modernlm.runtime import eval_mode
from modernlm.steps import CacheSteps, graphs_on

if TYPE_CHECKING:
    from modernlm.model import KVCache, ModernDecoderLM
    from modernlm.tokenizer import Tokenizer


@dataclass
class Sampling:
    """How one generation picks its tokens and when it stops.

    temperature: 0 = greedy (the default); > 0 samples from softmax(logits / temperature).
    top_k, top_p: sampling filters; None or 0 / 1.0 switch them off.
    repetition_penalty: CTRL's penalty on tokens already in prompt + output (1.0 = off).
    stop: stop strings; the text ends before the first one (text level only).
    eos_token_id: one id or several; a row stops at its first one. None: the tokenizer's eos at the
        text level, none at the token level.
    seed: reproducible sampling from a private generator; None uses the global RNG. A list of
        seeds, one per row, gives each row its own generator: a row then samples the same tokens
        whatever batch it is in (GRPO's rollouts: batched == alone).
    window, sink_size: window > 0 selects the rolling StreamingLLM cache (sink_size + window
        slots), for generation of any length in constant memory. Keep sink_size + window + chunk
        <= max_seq_len so every position stays in the trained range. In a padded batch the
        padding takes a shorter row's first slots, so that row keeps fewer sinks.
    chunk: tokens per prefill forward in rolling mode (the prompt goes in chunks).
    compile: run the one-token decode steps through `torch.compile` where they do not run fused
        (a CPU float32 model's do: then nothing compiles): at static shapes (steps.py), replayed
        as CUDA graphs on a GPU; built once per model, reused by later calls; same tokens. The
        prefill stays eager.
    constraint: what the output must be (`constrain.Constraint`: a JSON Schema, any JSON object, a
        regex, a choice, a grammar); each row's next token is picked among those it allows.
        `make` also takes the shorthands json_schema=, json_object=True, regex=, choice=, grammar=.
    window, sink_size, chunk, compile and constraint apply to ModernDecoderLM only.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    eos_token_id: int | Sequence[int] | None = None
    seed: int | Sequence[int] | None = None
    window: int = 0
    sink_size: int = 4
    chunk: int = 64
    compile: bool = False
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        # UserErrors: these values come straight from `modernlm generate key=value` overrides.
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop or () if s)
        # types first: a float or a string here would fail deep inside torch (zeros(), topk())
        seeds = self.seed if isinstance(self.seed, Sequence) else [self.seed]
        for name, value, kind in [("max_new_tokens", self.max_new_tokens, Integral), ("top_k", self.top_k, Integral),
                                  ("window", self.window, Integral), ("sink_size", self.sink_size, Integral),
                                  ("chunk", self.chunk, Integral), ("temperature", self.temperature, Real),
                                  ("top_p", self.top_p, Real), ("repetition_penalty", self.repetition_penalty, Real),
                                  *(("seed", s, Integral) for s in seeds)]:  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                what = "an integer" if kind is Integral else "a number"
                raise UserError(f"{name} must be {what}, got {value!r}")
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # (NaN too)
            raise UserError(f"temperature must be >= 0 (0 = greedy) and finite, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise UserError(f"repetition_penalty must be > 0 (1 = off) and finite, got {self.repetition_penalty}")
        if self.window < 0 or self.sink_size < 0:
            raise UserError(f"window and sink_size must be >= 0, got {self.window} and {self.sink_size}")

    @classmethod
    def make(cls, sampling: Sampling | int | None = None, **settings: Any) -> Sampling:
        """`sampling` (a Sampling, max_new_tokens as an int, or None for the defaults) with the
        keyword `settings` replacing its fields."""
        shorthand = {k: settings.pop(k) for k in CONSTRAINT_KEYS if k in settings}
        if shorthand:
            settings["constraint"] = Constraint.of(**shorthand)
        if isinstance(sampling, Sampling):
            return dataclasses.replace(sampling, **settings) if settings else sampling
        if sampling is not None:
            settings["max_new_tokens"] = sampling
        return cls(**settings)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def transformers_kwargs(self) -> dict[str, Any]:
        """These settings as keyword arguments of transformers' `generate` (seed and stop strings
        aside). Greedy sets temperature / top_k / top_p to None and sampling sets them all, so a
        model's generation_config never adds a filter of its own."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p or 1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.eos_ids:
            kwargs["eos_token_id"] = self.eos_ids[0] if len(self.eos_ids) == 1 else self.eos_ids
        return kwargs


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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Draw one token per row (B,) from softmax(logits / temperature) after top-k / top-p; a
    list of generators draws row i with generator i."""
    scaled = logits / temperature
    overflowed = scaled.amax(dim=-1, keepdim=True).isposinf()  # (B, 1)
    if overflowed.any():
        # A row that a tiny temperature overflows to +inf (whose softmax is NaN) takes the same
        # softmax from its logits less their max, which no temperature overflows; a row whose logits
        # are +inf already (a tiny repetition penalty's) draws among those. (Rare: checked first.)
        top = logits.amax(dim=-1, keepdim=True)
        shifted = torch.where(logits == top, 0.0, (logits - top) / temperature)
        scaled = torch.where(overflowed, shifted, scaled)
    logits = scaled
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)])[:, 0]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prompt_seen(idx: Tensor, vocab: int, pad_mask: Tensor | None = None) -> Tensor:
    """(B, vocab) bool: the tokens of each prompt (padding not counted), for the repetition penalty."""
    # One spare column collects the padding, so pad positions never count as "seen".
    real = idx if pad_mask is None else idx.masked_fill(~pad_mask, vocab)
    seen = torch.zeros(idx.size(0), vocab + 1, dtype=torch.bool, device=idx.device).scatter_(1, real, True)
    return seen[:, :vocab]


def pick_tokens(
    logits: Tensor,
    s: Sampling,
    seen: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    vocab_size: int | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """The next token of each row (B,) from its raw logits (B, V), as `s` says: ids from
    `vocab_size` on masked, and those `allowed` (B, V) bool (a constraint's) says False, repetition
    penalty on `seen` (B, V), then argmax (temperature 0) or a sample. Every decoding loop picks its
    tokens here (`iter_tokens`, the server's engine)."""
    scores = logits.float()
    if vocab_size is not None and vocab_size < scores.size(-1):
        # ids past the tokenizer's vocabulary (a padded embedding) decode to nothing
        scores = scores.clone()
        scores[:, vocab_size:] = float("-inf")
    if allowed is not None:  # made on the CPU (llguidance's masks)
        scores = scores.masked_fill(~allowed.to(scores.device, non_blocking=True), float("-inf"))
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, s.repetition_penalty)
    if s.temperature == 0:
        return scores.argmax(dim=-1)
    return sample(scores, s.temperature, s.top_k, s.top_p, generator)


# --------------------------------------------------------------------------------------------
# Token-level generation
# --------------------------------------------------------------------------------------------


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


def compiled_steps(model: ModernDecoderLM) -> CacheSteps:
    """The model's compiled decode steps (steps.py), built once per model and device. They are kept
    on the model (a plain attribute, not a submodule: no state_dict entry), so they go when it goes:
    the two refer to each other, a cycle the garbage collector frees (a table keyed by the model
    would keep every model it ever compiled for the life of the process)."""
    steps = getattr(model, "_compiled_steps", None)
    if steps is None or steps.graphs != graphs_on(model.norm.weight.device):
        steps = model._compiled_steps = CacheSteps(model)
    return steps


def _new_cache(model: ModernDecoderLM, s: Sampling, batch: int, capacity: int) -> KVCache:
    """A cache for `capacity` tokens a row (or a rolling one, per `s`). Compiled steps that replay
    as CUDA graphs decode into the cache they keep: a graph replays at the addresses it recorded."""
    if s.compile and not s.window and graphs_on(model.norm.weight.device):
        return compiled_steps(model).cache_for(batch, capacity)
    return model.new_cache(batch, capacity, window=s.window, sink_size=s.sink_size, chunk=s.chunk)


@torch.inference_mode()
def iter_tokens(
    model: ModernDecoderLM,
    idx: Tensor,
    sampling: Sampling | int | None = None,
    *,
    pad_mask: Tensor | None = None,
    pad_token_id: int | None = None,
    cache: KVCache | None = None,
    vocab_size: int | None = None,
    guide: Guide | None = None,
    **settings: Any,
) -> Iterator[Step]:
    """Yield one `Step` per generated token: the one decoding loop. See `generate` for the
    arguments; `guide` holds the rows' constraint matchers (`TextGeneration` makes it from
    `sampling.constraint`, which needs the tokenizer).

    Stops after `max_new_tokens` steps or once every row has produced an EOS. The yielded tensors
    are inference tensors (made under `torch.inference_mode`): copy them into a normal tensor, as
    `generate` does, before using them in autograd. The model is put in eval mode meanwhile.
    """
    s = Sampling.make(sampling, **settings)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(
            f"idx must be a (batch, tokens) tensor with at least one token, got {tuple(idx.shape)}"
        )
    if s.constraint is not None and guide is None:
        raise UserError("a constraint needs the tokenizer: generate text (generate_text, LM.generate), not tokens")
    max_new_tokens = s.max_new_tokens
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
        if s.window and s.chunk < 1:
            raise UserError(f"chunk must be >= 1 with a rolling cache, got {s.chunk}")
        # Plain cache: room for everything this call can add (the last token is never fed back).
        cache = _new_cache(model, s, B, T + max_new_tokens)
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

    generator: torch.Generator | list[torch.Generator] | None = None
    if isinstance(s.seed, Sequence):
        if len(s.seed) != B:
            raise UserError(f"seed: a list of seeds needs one per row ({B}), got {len(s.seed)}")
        generator = [torch.Generator(device=idx.device).manual_seed(int(k)) for k in s.seed]
    elif s.seed is not None and s.temperature > 0:
        generator = torch.Generator(device=idx.device).manual_seed(s.seed)
    eos_ids = s.eos_ids
    eos = torch.tensor(eos_ids, device=idx.device) if eos_ids else None
    pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device) if eos is not None else None
    seen = prompt_seen(idx, model.config.vocab_size, pad_mask) if s.repetition_penalty != 1.0 else None
    # With padding, every decode step passes a one-column all-True pad mask so the cache marks
    # the new slot valid explicitly (a rolling cache reuses slots that may have held padding).
    step_mask = (
        torch.ones(B, 1, dtype=torch.bool, device=idx.device) if pad_mask is not None else None
    )

    # compile=True where the steps do not run fused (on a CPU they do: nothing to compile): over a
    # plain cache at static shapes (steps.py; CUDA graphs on a GPU), over a rolling one, whose slots
    # move every step, with dynamic shapes
    decode, step = model, None
    if s.compile and not (pad_mask is None and model.fuses_steps(cache)):
        if cache.rolling:
            decode = compiled_steps(model).dynamic
        else:
            step = compiled_steps(model).over(cache)
    with eval_mode(model):
        logits = _prefill(model, idx, cache, pad_mask)
        for i in range(max_new_tokens):
            allowed = guide.allowed() if guide is not None else None
            tok = pick_tokens(logits, s, seen, generator, vocab_size, allowed)
            if guide is not None:
                guide.advance(tok if finished is None else tok.masked_fill(finished, -1))
            if finished is not None:
                tok = tok.masked_fill(finished, pad_id)
                finished |= torch.isin(tok, eos)
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            yield Step(tok, logits)
            if i == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                return
            if step is not None:
                logits = step(tok)
            else:
                logits = decode(tok[:, None], cache=cache, pad_mask=step_mask, last_only=True).logits[:, -1]


def generate(
    model: ModernDecoderLM,
    idx: Tensor,
    sampling: Sampling | int | None = None,
    *,
    pad_mask: Tensor | None = None,
    pad_token_id: int | None = None,
    cache: KVCache | None = None,
    vocab_size: int | None = None,
    **settings: Any,
) -> Tensor:
    """Continue each row of `idx` (B, T) by up to `max_new_tokens` tokens, with a KV cache.

    Args:
        sampling: a `Sampling` (or max_new_tokens as an int); `settings` replace its fields
            (temperature, top_k, top_p, repetition_penalty, eos_token_id, seed, window, ...).
            A row stops at its first EOS, then emits `pad_token_id` (default: the first EOS id,
            else 0); generation ends when every row has stopped.
        pad_mask: (B, T) bool, False at the left padding of shorter prompts.
        cache: an empty cache to fill instead of a new one (e.g. to inspect it afterwards).
        vocab_size: generate only ids below this (a tokenizer smaller than the padded vocab).

    Returns:
        (B, T + n) tokens: the prompt as given, then n <= max_new_tokens new tokens per row (the
        EOS token included, padding after it). n < max_new_tokens only when every row stopped.
    """
    s = Sampling.make(sampling, **settings)
    B, T = idx.shape
    out = torch.empty(B, T + s.max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, :T] = idx
    n = 0
    steps = iter_tokens(model, idx, s, pad_mask=pad_mask, pad_token_id=pad_token_id, cache=cache, vocab_size=vocab_size)
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


class _StopMatcher:
    """Knuth-Morris-Pratt matching of one stop string against text fed a character at a time:
    `state` is the length of the longest prefix of the string that the text so far ends with.
    Amortized O(1) work per character (the state rises by at most one per character and each
    fallback lowers it), so a stream costs time linear in its text however long the stop string;
    comparing the tail with every prefix instead costs O(len(stop)^2) per token."""

    def __init__(self, stop: str):
        self.stop = stop
        # fallback[k]: the longest proper prefix of stop[:k] that stop[:k] ends with (k >= 1)
        self.fallback = [0, 0]
        for k in range(1, len(stop)):
            j = self.fallback[k]
            while j and stop[k] != stop[j]:
                j = self.fallback[j]
            self.fallback.append(j + 1 if stop[k] == stop[j] else 0)
        self.state = 0

    def feed(self, char: str) -> bool:
        """Take one character; True when the text now ends with the whole stop string."""
        stop, k = self.stop, self.state
        while k and stop[k] != char:
            k = self.fallback[k]
        if stop[k] == char:
            k += 1
        self.state = k
        return k == len(stop)


class TextStream:
    """Token ids in, text pieces out: never half a character, never part of a stop string.

    Decoding token by token breaks multi-byte characters that a byte-level BPE splits across
    tokens (each part decodes to U+FFFD). So we decode a short window of recent tokens
    and hand out what it adds to the text already handed out, minus a trailing
    U+FFFD: lossy UTF-8 decoding marks an unfinished character with one U+FFFD at the end, which
    the next token may complete; everything before it is final. Whenever the window decodes
    cleanly it slides forward, keeping the previous piece as context (vLLM's incremental
    detokenizer does the same; the context also keeps the leading space that SentencePiece-style
    decoders strip from a first token).

    Text that could be the start of a stop string is held back until it is ruled out. Once a
    stop string appears, `text` is cut just before it and `stopped` becomes True; an `eos` token
    ends the text too. Joined, the pieces from `push` and `flush` equal `text`. `ids` are the
    tokens taken (an eos not included); `finish` is None while running, then "eos", "stop" (a stop
    string) or "length" (flushed).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        context: Sequence[int] = (),
        *,
        eos: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._matchers = [_StopMatcher(s) for s in self.stop]
        self._scanned = 0  # characters of `text` the matchers have taken
        self.eos = set(eos)
        self.skip_special_tokens = skip_special_tokens
        # The last prompt tokens give the first generated ones their decoding context.
        self._window = list(context)[-4:]
        self._prefix = 0  # the decoding window is _window[_prefix:]
        self._read = len(self._window)  # end of the window's last clean decode
        self._shown = self._decode(self._window)  # the window's text already in `text`
        self.text = ""  # generated text so far (cut at a stop string once stopped)
        self._sent = 0  # characters of `text` already handed out
        self.ids: list[int] = []
        self.finish: str | None = None

    @property
    def stopped(self) -> bool:
        return self.finish == "stop"

    @property
    def done(self) -> bool:
        return self.finish is not None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> None:
        window = self._decode(self._window[self._prefix :])
        clean = final or not window.endswith("\ufffd")
        if not clean:  # an unfinished character (at most 3 of its bytes): the next token may
            # complete it. Byte-level BPE decodes it as one U+FFFD, a byte-fallback decoder (Llama 2,
            # Mistral) as one per byte: hold back up to 3 (more are invalid bytes for good)
            held = min(3, len(window) - len(window.rstrip("\ufffd")))
            window = window[: len(window) - held]
        # A byte-fallback decoder turns every byte of a run into U+FFFD when the run's end is
        # unfinished, characters already shown too: then nothing until the run decodes again.
        if len(window) > len(self._shown) and (clean or window.startswith(self._shown)):
            self.text += window[len(self._shown) :]
            self._shown = window
        if clean:  # slide the window so decoding stays O(1) per token
            self._prefix, self._read = self._read, len(self._window)
            self._shown = self._decode(self._window[self._prefix :])

    def _release(self, final: bool) -> str:
        # Feed the new characters to each stop string's matcher. Text before `_sent` holds no part
        # of a stop string (what might begin one is held back), so the first completion of each
        # is its first occurrence after `_sent`; the text is cut before the earliest-starting one.
        new, start = self.text[self._scanned :], self._scanned
        self._scanned = len(self.text)
        hits = []
        for m in self._matchers:
            for i, char in enumerate(new):
                if m.feed(char):
                    hits.append(start + i + 1 - len(m.stop))
                    break
        if hits:
            self.text, self.finish = self.text[: min(hits)], "stop"
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:  # hold back the longest tail that a stop string begins with
            end = len(self.text) - max((m.state for m in self._matchers), default=0)
        piece, self._sent = self.text[self._sent : end], end
        return piece

    def push(self, token: int) -> str:
        """Add one generated token; return the new text that is safe to show (maybe '')."""
        if self.finish is not None:
            return ""
        if token in self.eos:
            piece = self.flush()
            self.finish = "eos"
            return piece
        self.ids.append(token)
        self._window.append(token)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: return whatever is still held back."""
        if self.finish is not None:
            return ""
        self._advance(final=True)
        piece = self._release(final=True)
        self.finish = self.finish or "length"
        return piece

    def feed(self, ids: Sequence[int]) -> TextStream:
        """Push every token of `ids` (up to the end: eos or a stop string), then flush."""
        for token in ids:
            if self.finish is not None:
                break
            self.push(token)
        self.flush()
        return self


def prompt_ids(tokenizer: Tokenizer, text: str, add_bos: bool | None = None) -> list[int]:
    """`text` as a prompt. `add_bos` None follows the tokenizer's own rule (`tokenizer.add_bos`:
    ours prepend bos, an HF tokenizer does what transformers does); an empty prompt starts from bos."""
    if add_bos is None:
        add_bos = getattr(tokenizer, "add_bos", True)
    ids = tokenizer.encode(text, add_bos=add_bos)
    if not ids and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    if not ids:
        raise UserError(f"prompt {text!r} encodes to no tokens (and the tokenizer has no bos token)")
    return ids


class TextGeneration:
    """Token rows in, text out: `iter_tokens` over the left-padded batch, one `TextStream` per row.

    Iterating yields, per generated token, the new text of every row ('' where there is none yet);
    `run()` goes to the end and returns the streams (`text`, `ids`, `finish` of each row). The eos
    is `sampling.eos_token_id`, else the tokenizer's. skip_special_tokens=False keeps special
    tokens in the text (their text, as `tokenizer.decode` gives it).
    """

    def __init__(
        self,
        model: ModernDecoderLM,
        tokenizer: Tokenizer,
        rows: Sequence[Sequence[int]],
        sampling: Sampling | int | None = None,
        *,
        skip_special_tokens: bool = True,
        **settings: Any,
    ):
        s = Sampling.make(sampling, **settings)
        if s.eos_token_id is None and tokenizer.eos_id is not None:
            s = dataclasses.replace(s, eos_token_id=tokenizer.eos_id)
        if any(not r for r in rows):
            raise UserError("a prompt encodes to no tokens")
        self.model, self.tokenizer, self.rows, self.sampling = model, tokenizer, [list(r) for r in rows], s
        self.streams = [
            TextStream(tokenizer, s.stop, context=r, eos=s.eos_ids, skip_special_tokens=skip_special_tokens)
            for r in self.rows
        ]

    def __iter__(self) -> Iterator[list[str]]:
        if not self.rows:
            return
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        idx, pad_mask = left_pad(self.rows, pad_id, device)
        s, vocab = self.sampling, self.model.config.vocab_size
        guide = Guide.for_rows([s.constraint] * len(self.rows), self.tokenizer, vocab, s.eos_ids)
        steps = iter_tokens(self.model, idx, s, pad_mask=pad_mask, vocab_size=self.tokenizer.vocab_size, guide=guide)
        for step in steps:
            yield [stream.push(tok) for stream, tok in zip(self.streams, step.tokens.tolist(), strict=True)]
            if all(stream.done for stream in self.streams):
                return  # every row ended on EOS or a stop string: skip the remaining steps
        yield [stream.flush() for stream in self.streams]

    def run(self) -> list[TextStream]:
        for _ in self:
            pass
        return self.streams


def generate_text(
    model: ModernDecoderLM,
    tokenizer: Tokenizer,
    prompt: str | list[str],
    sampling: Sampling | int | None = None,
    *,
    add_bos: bool | None = None,
    **settings: Any,
) -> str | list[str]:
    """Continue `prompt` (one string, or a list generated as one left-padded batch).

    Returns only the new text, ending before the EOS or the first stop string. `sampling` (or
    max_new_tokens as an int) and `settings` as in `Sampling.make`. `add_bos` None follows the
    tokenizer's rule (see `prompt_ids`).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    rows = [prompt_ids(tokenizer, p, add_bos) for p in prompts]
    texts = [s.text for s in TextGeneration(model, tokenizer, rows, sampling, **settings).run()]
    return texts[0] if isinstance(prompt, str) else texts


def stream_text(
    model: ModernDecoderLM,
    tokenizer: Tokenizer,
    prompt: str,
    sampling: Sampling | int | None = None,
    *,
    add_bos: bool | None = None,
    **settings: Any,
) -> Iterator[str]:
    """`generate_text` for one prompt, yielding text pieces as they are produced.

    Pieces never split a character or show part of a stop string; joined, they equal what
    `generate_text` returns for the same arguments.
    """
    if not isinstance(prompt, str):
        raise UserError("stream_text takes one prompt string; use generate_text for a batch")
    rows = [prompt_ids(tokenizer, prompt, add_bos)]
    for (piece,) in TextGeneration(model, tokenizer, rows, sampling, **settings):
        if piece:
            yield piece


class StopOnText:
    """A stopping criterion for transformers' `generate` (duck-typed: called with the ids so far,
    returns (B,) bool): each row's new tokens go through its `TextStream`, and a row ends at its
    eos or stop string, as in `TextGeneration`. `start` is where the new tokens begin."""

    def __init__(self, streams: list[TextStream], start: int):
        self.streams, self.start = streams, start

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        for stream, row in zip(self.streams, input_ids[:, self.start :].tolist(), strict=True):
            for token in row[len(stream.ids) + int(stream.finish == "eos") :]:
                if stream.done:
                    break
                stream.push(token)
        return torch.tensor([s.done for s in self.streams], dtype=torch.bool, device=input_ids.device)


__all__ = [
    "Sampling",
    "Step",
    "StopOnText",
    "TextGeneration",
    "TextStream",
    "apply_repetition_penalty",
    "generate",
    "generate_text",
    "iter_tokens",
    "left_pad",
    "pick_tokens",
    "prompt_ids",
    "prompt_seen",
    "sample",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
]

"""Measuring a model past its trained context: streaming perplexity and long-generation statistics.

StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks") keeps
a rolling KV cache: the first `sink_size` tokens plus the last `window` ones, with positions taken
from the slot in the cache, so a model can read and write any length with positions it was trained
on. Whether that works depends on what the model does with the kept first tokens: models dump
attention mass there (an "attention sink"); evict them and quality collapses. This module gives
the measurements; `modernlm experiment sinks` puts them together.

Perplexity (`streaming_nll`): a long sequence goes through the model the way generation reads it,
through `model.new_cache(window=, sink_size=)`, `chunk` tokens per forward (1 = token by token), and
every target's NLL is recorded. With chunk = 1, the token at position t sees the first `sink_size`
slots, the `window` tokens before it, and itself (for a model with a learned sink token, that token
is slot 0 and counts as one of the `sink_size`); with chunk > 1, the last token of a chunk sees up
to chunk - 1 more. window = 0 is plain dense attention over the whole sequence, positions running
past the trained context. `position_buckets` averages the NLLs over spans of positions.

Generations (`segment_stats`), computed on token ids:
- repetition rate: the share of n-grams (by default 4-grams) starting in a span that already
  started at an earlier position of the same text (prompt included; overlaps count). Real text
  repeats too, and more the more history there is: compare against real text cut the same way.
- distinct-n: distinct n-grams / all n-grams inside a span (Li et al. 2016), n = 1, 2, 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from modernlm.runtime import eval_mode

if TYPE_CHECKING:
    from modernlm.model import ModernDecoderLM


@torch.inference_mode()
def streaming_nll(
    model: ModernDecoderLM,
    ids: Tensor,
    *,
    window: int = 0,
    sink_size: int = 0,
    chunk: int = 1,
    batch_size: int = 16,
) -> Tensor:
    """Per-target NLL of `ids` (B, N) read through a rolling KV cache; returns (B, N - 1) float32.

    Column j is -log p(ids[:, j + 1] | what the model sees after reading ids[:, : j + 1]); see the
    module docstring for what that is. window = 0: one dense forward over the whole sequence.
    Rows go `batch_size` at a time; the result is on the CPU.
    """
    if ids.dim() != 2 or ids.size(1) < 2:
        raise ValueError(f"ids must be (batch, tokens >= 2), got {tuple(ids.shape)}")
    if window < 0 or sink_size < 0 or chunk < 1:
        raise ValueError(f"need window >= 0, sink_size >= 0, chunk >= 1; got {window}, {sink_size}, {chunk}")
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for rows in ids.split(batch_size):
            rows = rows.to(device)
            inputs, targets = rows[:, :-1], rows[:, 1:]
            if not window:
                logits = model(inputs).logits
                out.append(_nll(logits, targets))
                continue
            cache = model.new_cache(rows.size(0), window=window, sink_size=sink_size, chunk=chunk)
            pieces = []
            for start in range(0, inputs.size(1), chunk):
                logits = model(inputs[:, start : start + chunk], cache=cache).logits
                pieces.append(_nll(logits, targets[:, start : start + chunk]))
            out.append(torch.cat(pieces, dim=1))
    return torch.cat(out).cpu()


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T, V) logits, (B, T) targets -> (B, T) float32 NLL."""
    flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return flat.view_as(targets)


def position_buckets(nll: Tensor, size: int) -> list[float]:
    """Mean NLL per span of `size` target positions.

    `nll` is (B, N - 1) as `streaming_nll` returns it: column j holds the target at position
    j + 1, so bucket k averages targets at positions [k * size, (k + 1) * size) over all rows (the
    first bucket has one target fewer per row: position 0 is never a target).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    positions = torch.arange(1, nll.size(1) + 1)
    buckets = positions // size
    return [float(nll[:, buckets == k].double().mean()) for k in range(int(buckets.max()) + 1)]


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """All n-grams of `tokens`, in order (overlapping)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct n-grams / n-grams of `tokens`; nan when it has fewer than n tokens."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(tokens: Sequence[int], n: int = 4, start: int = 0, end: int | None = None) -> float:
    """Share of the n-grams that start at positions [start, end) of `tokens` (and fit in `tokens`)
    that also start at some earlier position; nan when there are none."""
    end = len(tokens) if end is None else end
    seen: set[tuple[int, ...]] = set()
    repeated = total = 0
    for i in range(min(end, len(tokens) - n + 1)):
        gram = tuple(tokens[i : i + n])
        if i >= start:
            total += 1
            repeated += gram in seen
        seen.add(gram)
    return repeated / total if total else math.nan


def segment_stats(
    tokens: Sequence[int],
    segment: int,
    *,
    prompt_len: int = 0,
    n_segments: int | None = None,
    ngram: int = 4,
    distinct: Sequence[int] = (1, 2, 3),
) -> list[dict[str, float]]:
    """Repetition rate and distinct-n of a text's generated part, per span of `segment` positions.

    `tokens` is prompt + generation; span k covers positions [k * segment, (k + 1) * segment) of it,
    less the prompt (its first `prompt_len` tokens). Repetition looks back over the whole text.
    Returns one dict per span: {"repetition": .., "distinct_1": .., ...}.
    """
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    n_segments = n_segments if n_segments is not None else -(-len(tokens) // segment)
    stats = []
    for k in range(n_segments):
        lo, hi = max(k * segment, prompt_len), (k + 1) * segment
        row = {"repetition": repetition_rate(tokens, ngram, lo, hi)}
        for n in distinct:
            row[f"distinct_{n}"] = distinct_n(tokens[lo:hi], n)
        stats.append(row)
    return stats


def mean_stats(per_text: Sequence[Sequence[dict[str, float]]]) -> dict[str, list[float]]:
    """Average `segment_stats` of several texts: {measure: [mean over texts, per span]}."""
    keys = list(per_text[0][0])
    spans = len(per_text[0])
    return {key: [sum(text[k][key] for text in per_text) / len(per_text) for k in range(spans)] for key in keys}


__all__ = [
    "distinct_n",
    "mean_stats",
    "ngrams",
    "position_buckets",
    "repetition_rate",
    "segment_stats",
    "streaming_nll",
]

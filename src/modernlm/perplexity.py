"""Perplexity with a stated method: sliding windows over one token stream.

The method is the HF perplexity guide's ("Perplexity of fixed-length models"): windows of at most
`context` tokens start every `stride` tokens, and each window scores only the tokens the previous
one did not, so with stride < context every token but token 0 is scored exactly once.
`text_metrics` adds the numbers that compare across tokenizers: bits per byte and word-level
perplexity (lm-eval-harness's word_perplexity).

Design notes: docs/design.md#perplexitypy
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from modernlm.errors import UserError

# (input_ids [B, T]) -> logits [B, T, V]. Our model: `lambda x: model(x).logits`; HF the same.
LogitsFn = Callable[[Tensor], Tensor]


@dataclass
class NLLResult:
    nll_sum: float  # total negative log-likelihood of the scored tokens, in nats
    tokens: int  # tokens scored
    windows: int  # forward passes' windows
    context: int
    stride: int

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a sequence of `n_tokens` tokens.

    Position p is scored when the window holds p - 1 too (its prediction comes from p - 1), so
    a window never scores its own first position; together the windows score each position at
    most once, and each of 1 .. n_tokens - 1 exactly once when stride < context.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    plan: list[tuple[int, int, int]] = []
    prev_end = 1  # position 0 is never scored
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + context, n_tokens)
        plan.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return plan


@torch.no_grad()
def sliding_window_nll(
    logits_fn: LogitsFn,
    ids: Tensor | list[int],
    context: int,
    stride: int | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    bos_id: int | None = None,
    progress: bool = False,
) -> NLLResult:
    """Score every token of `ids` (1-D) once with the method in the module docstring."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if bos_id is not None:
        ids = torch.cat([torch.tensor([bos_id]), ids])
    stride = stride or context
    plan = window_plan(ids.numel(), context, stride)
    nll_sum, scored = 0.0, 0
    # Windows of equal length batch together (all but the last one or two are full).
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in plan:
        groups.setdefault(w[1] - w[0], []).append(w)

    bar = tqdm(total=len(plan), desc="perplexity", disable=not progress, unit="win")
    for length, windows in groups.items():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)  # [B, T]
            logits = logits_fn(x[:, :-1]).float()  # [B, T-1, V]: position t predicts t+1
            logp = torch.log_softmax(logits, dim=-1)
            token_logp = logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [B, T-1]
            # Target position p sits at column p - begin - 1; score those >= the window's first.
            cols = torch.arange(1, length, device=x.device)  # target offsets within the window
            first = torch.tensor([s - b for b, _, s in chunk], device=x.device)
            mask = cols[None, :] >= first[:, None]
            nll_sum -= float(token_logp[mask].double().sum())
            scored += int(mask.sum())
            bar.update(len(chunk))
    bar.close()
    return NLLResult(nll_sum=nll_sum, tokens=scored, windows=len(plan), context=context, stride=stride)


def text_metrics(result: NLLResult, text: str) -> dict[str, float]:
    """Tokenizer-independent numbers for a result over `text`: bits per byte, word perplexity."""
    n_bytes = len(text.encode("utf-8"))
    n_words = len(text.split())
    return {
        "bytes": n_bytes,
        "words": n_words,
        "bits_per_byte": result.nll_sum / math.log(2) / max(n_bytes, 1),
        "word_perplexity": math.exp(min(result.nll_sum / max(n_words, 1), 700.0)),
    }


# --------------------------------------------------------------------------------------------
# "A model" and "a text": what `modernlm eval perplexity` / `eval table` score
# --------------------------------------------------------------------------------------------
#
# A model is what `modernlm.load` returns for a modernlm checkpoint directory, a run directory
# (its best checkpoint, else its latest), an HF model directory, a hub id or a .gguf file. modernlm
# checkpoints run on our ModernDecoderLM; everything else on transformers' own model, so any
# architecture transformers knows is scored as its authors ship it, not through a conversion.

METHOD = (
    "sliding window (HF 'Perplexity of fixed-length models'): windows of `context` tokens start "
    "every `stride` tokens and score only the tokens the previous window did not; with stride == "
    "context the token starting each window has no context and is not scored (one per window), "
    "nor is the text's first token unless bos is prepended"
)


class ScoringModel(Protocol):
    """What `evaluate_text` reads of a model: the fields of `modernlm.api.LM`."""

    name: str  # short label for tables and summary lines
    source: str  # what the user gave
    kind: str  # "modernlm" (our model) or "transformers" (HF's model)
    tokenizer: Any  # modernlm.tokenizer.Tokenizer, or None (token streams only)
    num_params: int  # parameters, tied embeddings counted once
    max_context: int  # positions the model was built for (the default and largest `context`)
    vocab_size: int  # the model's output vocabulary (logits per position)
    device: torch.device
    dtype: str

    def logits_fn(self, ids: Tensor) -> Tensor: ...


def evaluate_text(
    model: ScoringModel,
    text: str,
    *,
    context: int = 0,
    stride: int = 0,
    batch_size: int = 4,
    max_tokens: int = 0,
    bos: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Score `text` with `model`; the report (a JSON-ready dict) states the method.

    context 0 = the model's max context; stride 0 = context; max_tokens > 0 scores only the first
    max_tokens tokens (bytes and words then count the text those tokens decode to).
    """
    if model.tokenizer is None:
        raise UserError(f"{model.source}: no tokenizer, so the text cannot be tokenized")
    context = context or model.max_context
    stride = stride or context
    if context < 2:
        raise UserError(f"context must be >= 2, got {context}")
    if context > model.max_context:
        raise UserError(f"context {context} is longer than {model.name}'s maximum context {model.max_context}")
    if not 1 <= stride <= context:
        raise UserError(f"stride must be in [1, context={context}], got {stride}")
    if max_tokens < 0:
        raise UserError(f"max_tokens must be >= 0 (0 = all), got {max_tokens}")
    bos_id = model.tokenizer.bos_id if bos else None
    if bos and bos_id is None:
        raise UserError(f"bos: {model.name}'s tokenizer has no bos token")
    ids = model.tokenizer.encode(text)
    text_tokens = len(ids)
    if max_tokens and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = model.tokenizer.decode(ids)  # the text these tokens cover, for bytes and words
    if len(ids) + (bos_id is not None) < 2:
        raise UserError("data: the text has fewer than 2 tokens")
    start = time.perf_counter()
    result = sliding_window_nll(
        model.logits_fn, ids, context, stride, batch_size=batch_size, device=model.device, bos_id=bos_id,
        progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    metrics = text_metrics(result, text)
    return {
        "model": model.name,
        "source": model.source,
        "kind": model.kind,
        "params": model.num_params,
        "vocab_size": model.tokenizer.vocab_size,
        "method": METHOD,
        "context": result.context,
        "stride": result.stride,
        "windows": result.windows,
        "bos": bos,
        "max_tokens": max_tokens,
        "text_tokens": text_tokens,
        "tokens_used": len(ids),
        "tokens": result.tokens,
        "unscored_tokens": len(ids) - result.tokens,  # text tokens with no context: window starts
        "nll_sum": result.nll_sum,
        "loss": result.loss,
        "perplexity": result.perplexity,
        **metrics,
        "dtype": model.dtype,
        "device": str(model.device),
        "seconds": seconds,
        "tokens_per_second": result.tokens / max(seconds, 1e-9),
    }


def summary_line(report: dict[str, Any], data: str = "") -> str:
    """The one summary line: `NAME on DATA: ppl 20.31 (loss 3.011) | 1.012 bits/byte | word ppl 58.2 |
    287,644 tokens, context 1024, stride 512`."""
    on = f" on {Path(data).name if data and not data.startswith('hub:') else data}" if data else ""
    return (
        f"{report['model']}{on}: ppl {report['perplexity']:.2f} (loss {report['loss']:.3f}) | "
        f"{report['bits_per_byte']:.3f} bits/byte | word ppl {report['word_perplexity']:.1f} | "
        f"{report['tokens']:,} tokens, context {report['context']}, stride {report['stride']}"
    )

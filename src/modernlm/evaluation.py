"""Perplexity with a stated method: sliding windows over one token stream.

The method is the HF perplexity guide's ("Perplexity of fixed-length models"): the text is one
token sequence; windows of at most `context` tokens start every `stride` tokens; each window
scores only the tokens the previous window did not, so every token is scored exactly once, each
with at least `context - stride` tokens of left context (all of them when stride == context is
not the case). stride == context gives non-overlapping windows (fast; the average token sees
context / 2 tokens). Token 0 has no left context and is not scored (as in the guide), unless a
bos token is prepended (`bos_id`), which then scores every text token.

Numbers that compare across tokenizers (`text_metrics`):
- bits per byte = total NLL in nats / ln 2 / UTF-8 bytes of the text;
- word-level perplexity = exp(total NLL / whitespace-separated words) (lm-eval-harness's
  word_perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

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
    windows together score positions 1 .. n_tokens - 1, each exactly once.
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
        plan.append((begin, end, prev_end))
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
    from tqdm import tqdm

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

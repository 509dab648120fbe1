"""Losses as pure functions on tensors, plus the `loss_fn` adapters the trainer calls.

The trainer's contract (see trainer.py): `loss_fn(model, batch) -> (loss_sum, n_tokens, metrics)`
where `loss_sum` is the *sum* of the per-token losses of this micro-batch and `n_tokens` the
number of target tokens it covers. Returning sums, not means, is what lets the trainer normalise
by the target tokens of the whole accumulation window (and of all ranks) exactly, however unevenly
padding spreads them over micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # targets with this value contribute no loss (padding, prompt tokens)


def next_token_loss(
    logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of logits (B, T, V) against already-shifted targets (B, T).

    Returns (loss_sum, n_tokens): float32 (or float64) scalar, int64 scalar. Under autocast, cross_entropy runs
    in float32, so bf16 logits lose no precision here.
    """
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    if loss_sum.dtype in (torch.float16, torch.bfloat16):  # outside autocast: sum in float32
        loss_sum = loss_sum.float()
    return loss_sum, (targets != ignore_index).sum()


def lm_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Pretraining loss_fn: batch = (inputs, targets), both (B, T); targets = inputs shifted by one.

    The MoE load-balancing loss (already weighted by the model) is a per-forward mean, so it is
    added as aux * n_tokens: after the trainer divides by the window's tokens it is the
    token-weighted mean of aux over the micro-batches, on the same footing as the LM loss.
    """
    inputs, targets = batch
    out = model(inputs)
    loss_sum, n_tokens = next_token_loss(out.logits, targets)
    metrics: dict[str, Any] = {}
    if out.aux_loss is not None:
        loss_sum = loss_sum + out.aux_loss.float() * n_tokens
        metrics["aux_loss"] = out.aux_loss.detach()
    return loss_sum, n_tokens, metrics


@torch.no_grad()
def lm_eval_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Validation loss_fn: the plain next-token loss (no MoE aux term), so val perplexity is exact."""
    inputs, targets = batch
    loss_sum, n_tokens = next_token_loss(model(inputs).logits, targets)
    return loss_sum, n_tokens, {}


__all__ = ["IGNORE_INDEX", "lm_eval_loss", "lm_loss", "next_token_loss"]

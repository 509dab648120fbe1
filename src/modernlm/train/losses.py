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

from modernlm.tokenizer import IGNORE_INDEX  # targets with this value contribute no loss


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


def lm_batch_counts(batch: tuple[Tensor, Tensor]) -> tuple[int, None]:
    """The trainer's batch_counts for pretraining windows: every input token; no examples."""
    return batch[0].numel(), None


@torch.no_grad()
def lm_eval_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Validation loss_fn: the plain next-token loss (no MoE aux term), so val perplexity is exact."""
    inputs, targets = batch
    loss_sum, n_tokens = next_token_loss(model(inputs).logits, targets)
    return loss_sum, n_tokens, {}


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    logits (B, T, V) and labels (B, T) are aligned as model inputs (labels[t] = input_ids[t] where
    trained, else ignore_index); the shift happens here: position t predicts labels[t + 1].
    Returns logps (B,) float32 and n_tokens (B,) int64.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    # log_softmax gathered at the label: the same per-token values as -cross_entropy, kept per row.
    per_token = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (per_token * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The sigmoid DPO loss (Rafailov et al. 2023) per pair, with conservative label smoothing.

    h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r))
    loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    eps (label_smoothing) is the assumed probability that a pair's labels are flipped (cDPO, as
    TRL's "sigmoid" loss had it); eps = 0 is plain DPO. Inputs are summed sequence log-probs (B,).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards being the
    implicit ones, beta * (log pi - log ref), detached (what TRL logs).
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def verifier_loss(values: Tensor, correct: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token-level verifier loss (Cobbe et al. 2021): every masked position predicts its row's label.

    values (B, T) are value logits, correct (B,) the solutions' labels (1 = correct, 0 = wrong;
    soft labels work too), mask (B, T) bool the solution tokens. Returns (the summed binary
    cross-entropy with logits over the masked positions, float32; how many there are, int64).
    Positions off the mask contribute nothing, whatever their values (inf and NaN included).
    """
    targets = correct.to(torch.float32)[:, None].expand_as(values)
    per_token = F.binary_cross_entropy_with_logits(values.float(), targets, reduction="none")
    return torch.where(mask, per_token, 0.0).sum(), mask.sum()


__all__ = [
    "IGNORE_INDEX",
    "dpo_loss",
    "lm_batch_counts",
    "lm_eval_loss",
    "lm_loss",
    "next_token_loss",
    "sequence_logps",
    "verifier_loss",
]

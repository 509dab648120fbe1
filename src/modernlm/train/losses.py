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

from modernlm.chat import IGNORE_INDEX  # targets with this value contribute no loss


def next_token_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
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


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
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
def lm_eval_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
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


# --- GRPO (reinforcement learning with verifiable rewards) ---------------------------------------
# The maths of TRL's GRPOTrainer (trl 1.16: advantages in _generate_and_score_completions, the loss in
# _compute_loss), rewritten as functions; tests/test_grpo_loss.py checks them against TRL itself.

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
ADVANTAGE_SCALES = ("group", "batch", "none")


def token_logps_and_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probability of targets (B, T) under logits (B, T, V), and the entropy (B, T).

    Both float32 whatever the logits' dtype: policy ratios exp(logp - old_logp) amplify bf16 rounding.
    One log_softmax serves both (the entropy is -sum p log p from the same tensor; it keeps its
    grad, for an entropy bonus: detach it to log it). Targets are
    aligned with the logits (position t scores targets[t]); negative targets (padding,
    IGNORE_INDEX) get log-probability 0. Sampling with a temperature? Divide the logits by it
    first, as TRL does, or the ratios compare different distributions.
    """
    logp = logits.float().log_softmax(-1)  # (B, T, V)
    valid = targets >= 0
    picked = torch.gather(logp, -1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    return torch.where(valid, picked, 0.0), entropy


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages: each reward minus its group's mean, optionally over a std.

    rewards (N,), N = groups * group_size, consecutive rows one group (the completions of one
    prompt). scale: "group" divides by the group's std + eps (TRL's scale_rewards="group"),
    "batch" by the std of the whole batch + eps (TRL's "batch"), "none" not at all (Dr. GRPO: the
    std weights prompts by difficulty). Stds are unbiased (Bessel), as TRL's nanstd; eps = 1e-4 is
    TRL's constant. Returns (advantages (N,) float32, std (N,) float32): std is the one TRL tests for
    zero to log frac_reward_zero_std = isclose(std, 0).float().mean(): per row its group's std for
    "group" and "none", the batch std for "batch"; 0 where there is only one value to spread.
    A group whose rewards are all equal gets advantage exactly 0 (and std exactly 0): TRL's float
    mean can leave a ~1e-8 residual there, which its divide by (tiny std + eps) turns into noise.
    Rewards must be finite (TRL's NaN "unscorable" rewards are not handled here).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} do not split into groups of group_size={group_size}")
    grouped = rewards.float().view(-1, group_size)  # (G, K)
    flat = (grouped == grouped[:, :1]).all(-1)  # (G,) every reward of the group equal
    advantages = torch.where(flat[:, None], 0.0, grouped - grouped.mean(-1, keepdim=True))  # (G, K)
    if scale == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else grouped.new_zeros(())
        std = std.expand(rewards.numel()).clone()  # (N,)
    else:  # "group"; for "none" only logged
        group_std = torch.where(flat, 0.0, grouped.std(-1)) if group_size > 1 else torch.zeros_like(grouped[:, 0])
        std = group_std.repeat_interleave(group_size)  # (N,)
    advantages = advantages.reshape(-1)  # (N,)
    if scale != "none":
        advantages = advantages / (std + eps)
    return advantages, std


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The clipped token-level GRPO surrogate (+ beta * k3 KL), as (loss_sum, normalizer, metrics).

    logps (B, T): the policy's log-probs of the completion tokens, with grad. old_logps (B, T): the
    sampling policy's, or None when it is the current one (TRL with num_iterations == 1: ratio 1,
    old = logps.detach()). ref_logps (B, T): the reference's, needed iff beta != 0. advantages
    (B,) (or (B, T)), mask (B, T) the completion tokens (bool or 0/1). Per token, with
    r = exp(logps - old) and A the advantage:
        loss_t = -min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * kl_t,
        kl_t = exp(ref - logps) - (ref - logps) - 1   (k3, >= 0), times r if use_bias_correction_kl.
    use_bias_correction_kl: TRL 1.16's GRPOConfig defaults it to True (DeepSeek-V3.2's unbiased KL
    gradient; it changes the gradient even on-policy, where r == 1 but dr != 0); False (ours) is
    the plain k3 penalty of DeepSeekMath's GRPO. Pass True to reproduce TRL's default.

    Our trainer backpropagates sum(loss_sum) / sum(normalizer) over the micro-batches of a window
    and all ranks, so each loss_type is a (loss_sum, normalizer) pair (normalizer int64):
    - "dapo": (sum of token losses, completion tokens). Window-global: TRL's dapo divides by
      num_items_in_batch, the tokens of the whole generation batch, rescaled to one window; the
      same thing when steps_per_generation == gradient_accumulation_steps (TRL's default).
    - "bnpo": the same pair as dapo, so the window's token mean. TRL's bnpo takes the token mean of
      each micro-batch and averages those: equal to ours when every micro-batch has the same token
      count, otherwise ours weights tokens equally where TRL weights micro-batches equally.
    - "grpo": (sum over sequences of each sequence's token mean, sequences); a sequence without a
      token counts with loss 0, as TRL's clamp(min=1). TRL averages per-micro-batch means: the same
      when micro-batches hold the same number of sequences (always, in TRL).
    - "dr_grpo": (sum of token losses / max_completion_length, sequences), i.e. the token sum over
      sequences * max_completion_length, as TRL. max_completion_length defaults to the mask's width
      T; TRL uses args.max_completion_length, so pass the generation limit to match it (and to keep
      the constant the same for micro-batches padded to different widths). TRL divides each
      micro-batch by its own sequences and averages: the same for equal micro-batch sizes.
    On one micro-batch, loss_sum / normalizer is TRL's loss for every type.
    metrics (detached, TRL's names; masked token means over this micro-batch on this rank, where
    TRL pools the ranks' tokens; both average the micro-batches of a step): "kl" (the per-token
    KL term as it enters the loss; only when beta != 0), "clip_ratio/low_mean" (r < 1 - epsilon_low
    and A < 0), "clip_ratio/high_mean" (r > 1 + epsilon_high and A > 0), "clip_ratio/region_mean"
    (either): the tokens whose gradient the clip cut. Masked positions must hold finite values.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (the reference policy's log-probs)")
    logps = logps.float()  # (B, T)
    old = logps.detach() if old_logps is None else old_logps.float()  # (B, T)
    adv = advantages.float()
    adv = adv[:, None] if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    mask = mask.bool()  # (B, T)
    ratio = torch.exp(logps - old)  # (B, T); value 1 on-policy, gradient d logps
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    metrics: dict[str, Tensor] = {}
    n_tokens = mask.sum()  # () int64
    denom = n_tokens.clamp_min(1).float()

    def masked_mean(x: Tensor) -> Tensor:
        return (torch.where(mask, x.float(), 0.0).sum() / denom).detach()

    if ref_logps is not None and beta != 0.0:
        delta = ref_logps.float() - logps  # (B, T) log(ref / pi)
        kl = torch.exp(delta) - delta - 1  # (B, T) k3 estimate of KL(pi || ref)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = masked_mean(low)
    metrics["clip_ratio/high_mean"] = masked_mean(high)
    metrics["clip_ratio/region_mean"] = masked_mean(low | high)

    per_token = torch.where(mask, per_token, 0.0)  # (B, T)
    n_seqs = torch.tensor(logps.size(0), dtype=torch.int64, device=logps.device)
    if loss_type in ("dapo", "bnpo"):
        return per_token.sum(), n_tokens, metrics
    if loss_type == "grpo":
        seq_means = per_token.sum(-1) / mask.sum(-1).clamp_min(1)  # (B,)
        return seq_means.sum(), n_seqs, metrics
    width = logps.size(1) if max_completion_length is None else max_completion_length
    return per_token.sum() / width, n_seqs, metrics


__all__ = [
    "ADVANTAGE_SCALES",
    "GRPO_LOSS_TYPES",
    "IGNORE_INDEX",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "lm_batch_counts",
    "lm_eval_loss",
    "lm_loss",
    "next_token_loss",
    "sequence_logps",
    "token_logps_and_entropy",
    "verifier_loss",
]

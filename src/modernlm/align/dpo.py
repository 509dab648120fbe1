"""Preference pairs for DPO: records -> ChatML token ids with reply masks -> batches -> the DPO loss_fn.

A pair is a prompt (a conversation ending with a user turn), a chosen and a rejected assistant
reply. Sources (`PreferenceDataConfig.format`):
- `pairs`: JSONL with {"prompt", "chosen", "rejected"} (TRL's explicit-prompt format); prompt is a
  string (one user turn) or a list of {"role", "content"} messages; chosen / rejected are strings.
- `hh_rlhf`: Anthropic HH-RLHF transcripts; the shared turns are the prompt, the last assistant
  turns chosen and rejected (`tasks.split_hh_pair`; pairs that do not split cleanly are skipped
  and counted).

Each side is encoded as ChatML prompt + reply + <|im_end|>, labels -100 over the prompt, exactly as
SFT trains replies (`chat.ChatEncoder`). A batch stacks the B chosen rows over the B rejected rows
(2B, T), so the policy scores both sides in one forward, as TRL does. The reference model's
log-probabilities can be computed once up front (`reference_logps`) and travel in the batch;
then no second model is kept during training.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modernlm.align.sft import check_val_fraction, frozen_copy, hold_out
from modernlm.chat import IGNORE_INDEX, ChatEncoder, Message, check_messages
from modernlm.data import tasks
from modernlm.data.tasks import TaskBatches
from modernlm.errors import UserError
from modernlm.files import atomic_write_json
from modernlm.runtime import Runtime, eval_mode
from modernlm.train.losses import dpo_loss, sequence_logps

PREFERENCE_FORMATS = ("pairs", "hh_rlhf")


@dataclass
class PreferenceDataConfig:
    format: str = "pairs"  # pairs ({"prompt", "chosen", "rejected"} JSONL) | hh_rlhf (transcripts)
    path: str = ""  # local .jsonl / .jsonl.gz / .json
    hf_dataset: str = ""  # hub dataset instead, e.g. Anthropic/hh-rlhf, trl-lib/ultrafeedback_binarized
    hf_config: str = ""
    hf_data_dir: str = ""  # e.g. helpful-base for Anthropic/hh-rlhf
    split: str = "train"
    system: str = ""  # a system message put before every prompt ("" = none)
    max_length: int = 512  # tokens per side (prompt + reply); the prompt is cut from the left first
    max_examples: int = 0  # keep at most N pairs (0 = all), after a seeded shuffle when shuffle=true
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.format not in PREFERENCE_FORMATS:
            raise ValueError(f"format must be one of {', '.join(PREFERENCE_FORMATS)}, got {self.format!r}")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0 (0 = all), got {self.max_examples}")


@dataclass
class DPOSettings:
    beta: float = 0.1  # strength of the KL pull to the reference (DPO's beta)
    label_smoothing: float = 0.0  # assumed share of flipped labels (cDPO); 0 = plain DPO
    precompute_ref: bool = True  # score all pairs with the reference once, then drop it
    sft_weight: float = 0.0  # + this times the chosen replies' NLL (TRL's loss_type [sigmoid, sft]; RPO)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")


@dataclass
class DPOEvalSettings:
    val_path: str = ""  # held-out pairs in data.format ("" = hold out val_fraction of the training pairs)
    val_fraction: float = 0.05  # share of pairs held out when there is no val_path
    max_examples: int = 500  # held-out pairs scored (0 = all)

    def __post_init__(self) -> None:
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0 (0 = all), got {self.max_examples}")


def _reply(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if isinstance(value, list):  # conversational: the reply as a one-message list
        msgs = check_messages(value, where)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise UserError(f"{where}: '{name}' as messages must be one assistant message")
        value = msgs[0]["content"]
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: '{name}' must be a non-empty string")
    return value


def read_pairs(cfg: PreferenceDataConfig, skipped: Counter | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {"prompt": messages, "chosen": str, "rejected": str}) per usable pair."""
    rows = tasks.source_rows(cfg.path, cfg.hf_dataset, cfg.hf_config, cfg.split, cfg.hf_data_dir)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if cfg.format == "hh_rlhf":
        for where, rec in tasks.iter_hh_rlhf(rows, skipped):
            yield where, {"prompt": system + rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
        return
    for where, row in rows:
        prompt = row.get("prompt")
        if isinstance(prompt, str) and prompt:
            msgs: list[Message] = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            msgs = check_messages(prompt, where)
        else:
            raise UserError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
        if msgs[-1]["role"] != "user":
            raise UserError(f"{where}: the prompt must end with a user message")
        yield where, {"prompt": system + msgs, "chosen": _reply(row, "chosen", where),
                      "rejected": _reply(row, "rejected", where)}  # fmt: skip


def encode_pair(encoder: ChatEncoder, pair: dict[str, Any], max_length: int) -> dict[str, Any] | None:
    """{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}; None if no reply fits.

    Both sides share the prompt. When a side is too long, the prompt is cut from the left (its end,
    next to the reply, matters most), then the reply from the right.
    """
    prompt = encoder.prompt(pair["prompt"])
    out: dict[str, Any] = {}
    replies = {side: encoder.reply(pair[side]) for side in ("chosen", "rejected")}
    longest = max(len(r) for r in replies.values())
    keep = max(0, min(len(prompt), max_length - longest))
    prompt = prompt[len(prompt) - keep :] if keep else []
    for side, reply in replies.items():
        ids = (prompt + reply)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + reply)[:max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            return None
        out[f"{side}_ids"], out[f"{side}_labels"] = ids, labels
    return out


def load_pairs(
    cfg: PreferenceDataConfig, encoder: ChatEncoder, seed: int = 0, max_examples: int | None = None
) -> tuple[list[dict[str, Any]], Counter]:
    """Encoded pairs (with "source"), and the counts of skipped pairs by reason."""
    skipped: Counter = Counter()
    records = list(read_pairs(cfg, skipped))
    if cfg.shuffle:
        order = np.random.default_rng(seed).permutation(len(records))
        records = [records[i] for i in order]
    limit = cfg.max_examples if max_examples is None else max_examples
    if limit:
        records = records[:limit]
    items = []
    for where, pair in records:
        item = encode_pair(encoder, pair, cfg.max_length)
        if item is None:
            skipped["no reply token within max_length"] += 1
            continue
        items.append({**item, "source": where})
    if not items:
        raise UserError(f"data: no usable preference pairs in {cfg.path or cfg.hf_dataset}")
    return items, skipped


def load_pair_splits(
    data: PreferenceDataConfig, ev: DPOEvalSettings, encoder: ChatEncoder, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter]:
    """(training pairs, held-out pairs, {reason: pairs skipped}). Held out are ev.val_path's pairs
    (unshuffled), else the first ev.val_fraction of the shuffled training pairs; at most ev.max_examples."""
    items, skipped = load_pairs(data, encoder, seed=seed)
    if ev.val_path:
        val_cfg = replace(data, path=ev.val_path, hf_dataset="", shuffle=False)
        val_items, _ = load_pairs(val_cfg, encoder, max_examples=ev.max_examples)
        return items, val_items, skipped
    check_val_fraction(ev.val_fraction)
    val_items, items = hold_out(items, ev.val_fraction, "no val_loss, best/ or held-out pair accuracy")
    return items, val_items[: ev.max_examples or None], skipped


def collate_pairs(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """input_ids / labels (2B, T): the B chosen rows, then the B rejected rows, right-padded, and
    lengths (2B,): each row's tokens before the padding. With precomputed reference log-probs, also
    ref_logps (2B,) in the same order."""
    rows = [(it["chosen_ids"], it["chosen_labels"]) for it in items]
    rows += [(it["rejected_ids"], it["rejected_labels"]) for it in items]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    batch = {"input_ids": input_ids, "labels": labels, "lengths": torch.tensor([len(ids) for ids, _ in rows])}
    if "ref_chosen" in items[0]:
        ref = [it["ref_chosen"] for it in items] + [it["ref_rejected"] for it in items]
        batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
    return batch


def pair_batch_counts(batch: dict[str, Tensor]) -> tuple[int, int]:
    """The trainer's batch_counts for `collate_pairs` batches: (tokens of both replies' rows before
    the padding, pairs)."""
    return int(batch["lengths"].sum()), batch["input_ids"].size(0) // 2


class PreferenceBatches(TaskBatches):
    """Endless, seeded, rank-sharded, exactly resumable batches of pairs (tasks.TaskBatches)."""

    def __next__(self) -> dict[str, Tensor]:
        return collate_pairs([self.examples[i] for i in self.next_indices()], self.pad_id)


def pair_batches(items: Sequence[dict[str, Any]], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    """One ordered pass over pairs, collated."""
    return [collate_pairs(items[i : i + batch_size], pad_id) for i in range(0, len(items), batch_size)]


def policy_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(summed reply log-probs, reply token counts) of every row, each (2B,): a row's score under `model`."""
    return sequence_logps(model(batch["input_ids"]).logits, batch["labels"])


@torch.no_grad()
def reference_logps(
    model: nn.Module, items: list[dict[str, Any]], batch_size: int, pad_id: int, device: torch.device, autocast
) -> None:
    """Score every pair with the (frozen) reference once; stores ref_chosen / ref_rejected in items."""
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate_pairs([{k: v for k, v in it.items() if not k.startswith("ref_")} for it in chunk], pad_id)
            with autocast():
                logps = policy_logps(model, {k: v.to(device) for k, v in batch.items()})[0].float().cpu()
            chosen, rejected = logps.chunk(2)
            for it, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                it["ref_chosen"], it["ref_rejected"] = c, r


def set_up_reference(
    model: nn.Module, items: list[dict[str, Any]], precompute: bool, batch_size: int, pad_id: int,
    device: torch.device, autocast,
) -> nn.Module | None:  # fmt: skip
    """The frozen reference is the model as it is now, before any update. With `precompute` every
    pair is scored by it once, now (`reference_logps`), and no second model is kept (None); else
    a frozen copy of the model, to run on every batch."""
    if precompute:
        reference_logps(model, items, batch_size, pad_id, device, autocast)
        return None
    return frozen_copy(model)


def dpo_loss_fn(
    beta: float, label_smoothing: float = 0.0, ref_model: nn.Module | None = None, sft_weight: float = 0.0
) -> Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int, dict[str, Any]]]:
    """The trainer's loss_fn for DPO: (sum of per-pair losses, number of pairs, TRL's metrics).

    The reference log-probs come from the batch (precomputed) or, with `ref_model`, from a forward
    of the frozen reference on the same batch. sft_weight > 0 adds that times the NLL of the chosen
    replies (mean over their tokens, per pair), as TRL's loss_type=["sigmoid", "sft"] with
    loss_weights=[1, sft_weight] does (RPO, Pang et al. 2024): it keeps DPO from lowering the
    chosen replies' likelihood along with the rejected ones'.
    """

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int, dict[str, Any]]:
        logps, counts = policy_logps(model, batch)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            if ref_model is None:
                raise ValueError("dpo_loss_fn: the batch has no ref_logps and no ref_model was given")
            with torch.no_grad():
                ref = policy_logps(ref_model, batch)[0]
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
        loss_sum = losses.sum()
        metrics: dict[str, Any] = {}
        if sft_weight:
            nll = -chosen.sum() / counts[: chosen.size(0)].sum().clamp_min(1)
            loss_sum = loss_sum + sft_weight * nll * chosen.size(0)
            metrics["nll/chosen"] = nll.detach()
        metrics |= {
            "rewards/chosen": r_chosen.mean(),
            "rewards/rejected": r_rejected.mean(),
            "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
            "rewards/margins": (r_chosen - r_rejected).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        return loss_sum, chosen.size(0), metrics

    return loss_fn


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module, batches: Sequence[dict[str, Tensor]], beta: float, device: torch.device, autocast
) -> dict[str, float]:
    """Held-out pair metrics of `model`.

    pair_accuracy: share of pairs whose chosen reply has the higher log-probability under the model
    (meaningful before training too); with reference log-probs in the batches, also TRL's reward
    metrics: accuracy and mean margin of the implicit rewards beta * (log pi - log ref).
    """
    with eval_mode(model):
        n, wins, reward_wins, margin, lp_c, lp_r = 0, 0.0, 0.0, 0.0, 0.0, 0.0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                chosen, rejected = policy_logps(model, batch)[0].float().chunk(2)
            n += chosen.numel()
            wins += (chosen > rejected).sum().item()
            lp_c += chosen.sum().item()
            lp_r += rejected.sum().item()
            if "ref_logps" in batch:
                ref_c, ref_r = batch["ref_logps"].chunk(2)
                m = beta * ((chosen - ref_c) - (rejected - ref_r))
                reward_wins += (m > 0).sum().item()
                margin += m.sum().item()
    out = {"pair_accuracy": wins / n, "logps/chosen": lp_c / n, "logps/rejected": lp_r / n, "n": n}
    if batches and "ref_logps" in batches[0]:
        out.update({"rewards/accuracies": reward_wins / n, "rewards/margins": margin / n})
    return out


class HeldOutPairs:
    """The held-out pairs' metrics before training (saved to `before_file`, kept across resumes) and
    after (with the reference's rewards); rank 0 scores, the other ranks report nothing. With
    `all_ranks` (a model sharded by FSDP: its forwards are collectives) every rank scores the same
    pairs, in step; rank 0 still keeps the report and writes."""

    def __init__(
        self, model: nn.Module, ref_model: nn.Module | None, items: list[dict[str, Any]], batch_size: int,
        pad_id: int, beta: float, runtime: Runtime, before_file: Path, all_ranks: bool = False,
    ):  # fmt: skip
        self.model, self.ref_model, self.items, self.batch_size = model, ref_model, items, batch_size
        self.pad_id, self.beta, self.runtime, self.before_file = pad_id, beta, runtime, before_file
        self.scores = bool(items) and (runtime.is_main or all_ranks)  # whether this rank scores
        self.report: dict[str, Any] = {}

    def _score(self) -> dict[str, float]:
        batches = pair_batches(self.items, self.batch_size, self.pad_id)
        return evaluate_pairs(self.model, batches, self.beta, self.runtime.device, self.runtime.autocast)

    def before(self, step: int) -> None:
        """Score the pairs at step 0 (and print the accuracy); on a resumed run, read those scores."""
        rt = self.runtime
        if self.scores and step == 0:
            before = self._score()
            if rt.is_main:
                self.report["before"] = before
                atomic_write_json(self.before_file, before)
                rt.print0(f"before: held-out pair accuracy {before['pair_accuracy']:.3f}")
        elif rt.is_main and self.before_file.is_file():
            self.report["before"] = json.loads(self.before_file.read_text())

    def after(self) -> dict[str, Any]:
        """The report: {"before", "after"} on rank 0 (with held-out pairs), {} elsewhere."""
        rt = self.runtime
        if self.scores:
            if self.ref_model is not None and rt.is_main:  # live reference: score the pairs with it for rewards
                reference_logps(self.ref_model, self.items, 2 * self.batch_size, self.pad_id, rt.device, rt.autocast)
            after = self._score()
            if rt.is_main:
                self.report["after"] = after
        return self.report

    def text(self) -> str:
        """The done line's part: held-out accuracies before -> after, reward accuracy and margin."""
        if "after" not in self.report:
            return ""
        a, b = self.report["after"], self.report.get("before", {}).get("pair_accuracy")
        return (
            f"; held-out pair accuracy {'' if b is None else f'{b:.3f} -> '}{a['pair_accuracy']:.3f}, "
            f"reward accuracy {a['rewards/accuracies']:.3f}, margin {a['rewards/margins']:.3f}"
        )


__all__ = [
    "DPOEvalSettings",
    "DPOSettings",
    "HeldOutPairs",
    "PreferenceBatches",
    "PreferenceDataConfig",
    "collate_pairs",
    "dpo_loss_fn",
    "encode_pair",
    "evaluate_pairs",
    "load_pair_splits",
    "load_pairs",
    "pair_batch_counts",
    "pair_batches",
    "read_pairs",
    "reference_logps",
    "set_up_reference",
]

"""Direct preference optimisation (DPO) of an SFT checkpoint against a frozen reference.

    modernlm dpo -c configs/align/dpo.yaml init_from=runs/sft
    modernlm dpo init_from=runs/sft data.format=hh_rlhf data.path=hh-rlhf/train.jsonl.gz dpo.beta=0.1
    modernlm dpo init_from=runs/sft data.path=pairs.jsonl dpo.label_smoothing=0.1   # {"prompt", "chosen", "rejected"}

INIT_FROM (an SFT checkpoint or run directory) is both the policy's starting point and the frozen
reference. With dpo.precompute_ref=true (the default) the reference scores every pair once before
training and is then dropped, so training holds one model; false keeps the reference and runs it
on every batch. The loss is the sigmoid DPO loss with conservative label smoothing
(modernlm.train.losses.dpo_loss); metrics.jsonl logs what TRL logs: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (val_... on held-out pairs).

Held-out pairs: eval.val_path, else eval.val_fraction of the data. eval.json has their metrics
before and after training: pair_accuracy (the model gives the chosen reply the higher
log-probability) and, after, the implicit-reward accuracy and mean margin against the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modernlm.align.dpo import PreferenceDataConfig
from modernlm.files import atomic_write
from modernlm.runtime import RunConfig, Runtime
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


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


@dataclass
class Config:
    init_from: str = ""  # SFT checkpoint or run directory: the policy's start and the reference
    tokenizer: str = ""  # tokenizer directory when the checkpoint has none
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    eval: DPOEvalSettings = field(default_factory=DPOEvalSettings)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0)
    )
    train: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=500, eval_every=100))
    run: RunConfig = field(default_factory=RunConfig)


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "dpo"), "dir")]


def main(cfg: Config) -> None:
    import copy

    import torch

    from modernlm.align.dpo import PreferenceBatches, dpo_loss_fn, pair_batch_counts, pair_batches, reference_logps
    from modernlm.align.sft import chat_ready
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.errors import UserError
    from modernlm.train.run import Training, fmt_loss, run_training
    from modernlm.train.trainer import Trainer

    lm = load(cfg.init_from, backend="modernlm", tokenizer=cfg.tokenizer, what="init_from")
    model, tokenizer, ckpt = chat_ready(lm)
    if cfg.data.max_length > model.config.max_seq_len:
        raise UserError(
            f"data.max_length ({cfg.data.max_length}) is longer than the model's context "
            f"({model.config.max_seq_len}, {ckpt})"
        )
    encoder = ChatEncoder(tokenizer)
    items, val_items, skipped = split_pairs(cfg, encoder)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else encoder.end_id
    bs = cfg.train.batch_size

    def build(runtime: Runtime, run_dir: Path) -> Training:
        model.to(runtime.device)
        ref_model = None
        if cfg.dpo.precompute_ref:
            # The reference is the model as loaded: score every pair now, before any update.
            reference_logps(model, items + val_items, 2 * bs, pad, runtime.device, runtime.autocast)
        else:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        loss_fn = dpo_loss_fn(cfg.dpo.beta, cfg.dpo.label_smoothing, ref_model, cfg.dpo.sft_weight)
        mine = val_items[runtime.rank :: runtime.world_size]
        train_batches = PreferenceBatches(
            items, bs, pad, seed=cfg.run.seed, rank=runtime.rank, world_size=runtime.world_size
        )
        torch.manual_seed(cfg.run.seed + runtime.rank)
        trainer = Trainer(
            model, loss_fn, train_batches, cfg.train, cfg.optim, runtime, run_dir,
            val_batches=pair_batches(mine, bs, pad) if mine else None, tokenizer=tokenizer,
            eval_perplexity=False, batch_counts=pair_batch_counts,
        )  # fmt: skip
        banner = (
            f"{model.num_params() / 1e6:.2f}M params from {ckpt}, {len(items):,} train / "
            f"{len(val_items):,} held-out pairs, beta {cfg.dpo.beta}, label smoothing "
            f"{cfg.dpo.label_smoothing}, reference {'precomputed' if ref_model is None else 'live'}"
        )
        held_out = Evaluation(cfg, model, ref_model, val_items, pad, runtime, run_dir)

        def before() -> None:
            if skipped:
                runtime.print0(f"skipped {sum(skipped.values())} pairs: {dict(skipped)}")
            held_out.before(trainer.step)

        def after(summary: dict) -> str | None:
            report = held_out.after()
            report.update(step=trainer.step, n_train=len(items), n_val=len(val_items), skipped=dict(skipped))
            if runtime.is_main:
                atomic_write(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
            return f"{summary['steps']} steps, loss {fmt_loss(summary['final_loss'])}{held_out.text()}"

        return Training(trainer, banner, before=before, after=after)

    run_training(cfg, "dpo", build)


def split_pairs(cfg: Config, encoder: Any) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(training pairs, held-out pairs, {reason: pairs skipped})."""
    from modernlm.align.dpo import load_pairs
    from modernlm.errors import UserError

    items, skipped = load_pairs(cfg.data, encoder, seed=cfg.run.seed)
    if cfg.eval.val_path:
        val_cfg = replace(cfg.data, path=cfg.eval.val_path, hf_dataset="", shuffle=False)
        val_items, _ = load_pairs(val_cfg, encoder, max_examples=cfg.eval.max_examples)
        return items, val_items, skipped
    if not 0.0 <= cfg.eval.val_fraction < 1.0:
        raise UserError(f"eval.val_fraction: must be in [0, 1), got {cfg.eval.val_fraction}")
    n_val = round(len(items) * cfg.eval.val_fraction)
    return items[n_val:], items[:n_val][: cfg.eval.max_examples or None], skipped


class Evaluation:
    """The held-out pairs' metrics before training (eval_before.json, kept across resumes) and
    after (with the reference's rewards); rank 0 scores, the other ranks report nothing."""

    def __init__(self, cfg: Config, model: Any, ref_model: Any, val_items: list[dict], pad: int, runtime: Runtime,
                 run_dir: Path):  # fmt: skip
        self.cfg, self.model, self.ref_model, self.val_items, self.pad = cfg, model, ref_model, val_items, pad
        self.runtime, self.before_file = runtime, run_dir / "eval_before.json"
        self.report: dict[str, Any] = {}

    def _score(self) -> dict[str, float]:
        from modernlm.align.dpo import evaluate_pairs, pair_batches

        rt, bs = self.runtime, self.cfg.train.batch_size
        batches = pair_batches(self.val_items, bs, self.pad)
        return evaluate_pairs(self.model, batches, self.cfg.dpo.beta, rt.device, rt.autocast)

    def before(self, step: int) -> None:
        if not self.runtime.is_main:
            return
        if self.val_items and step == 0:
            self.report["before"] = self._score()
            atomic_write(self.before_file, json.dumps(self.report["before"], indent=2) + "\n")
            self.runtime.print0(f"before: held-out pair accuracy {self.report['before']['pair_accuracy']:.3f}")
        elif self.before_file.is_file():
            self.report["before"] = json.loads(self.before_file.read_text())

    def after(self) -> dict[str, Any]:
        if self.runtime.is_main and self.val_items:
            if self.ref_model is not None:  # live reference: score the held-out pairs with it for rewards
                from modernlm.align.dpo import reference_logps

                rt = self.runtime
                reference_logps(self.ref_model, self.val_items, 2 * self.cfg.train.batch_size, self.pad, rt.device,
                                rt.autocast)  # fmt: skip
            self.report["after"] = self._score()
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

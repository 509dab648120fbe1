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

from modernlm.align.dpo import PreferenceDataConfig
from modernlm.files import atomic_write
from modernlm.runtime import RunConfig
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

    from modernlm.align.dpo import (
        PreferenceBatches,
        dpo_loss_fn,
        evaluate_pairs,
        load_pairs,
        pair_batches,
        reference_logps,
    )
    from modernlm.align.sft import ChatEncoder, load_chat_model
    from modernlm.config import save_config
    from modernlm.errors import UserError
    from modernlm.runtime import cleanup, setup_runtime
    from modernlm.train.trainer import Trainer

    model, tokenizer, ckpt = load_chat_model(cfg.init_from, cfg.tokenizer)
    if cfg.data.max_length > model.config.max_seq_len:
        raise UserError(
            f"data.max_length ({cfg.data.max_length}) is longer than the model's context "
            f"({model.config.max_seq_len}, {ckpt})"
        )
    encoder = ChatEncoder(tokenizer)
    items, skipped = load_pairs(cfg.data, encoder, seed=cfg.run.seed)
    if cfg.eval.val_path:
        val_cfg = replace(cfg.data, path=cfg.eval.val_path, hf_dataset="", shuffle=False)
        val_items, _ = load_pairs(val_cfg, encoder, max_examples=cfg.eval.max_examples)
    else:
        if not 0.0 <= cfg.eval.val_fraction < 1.0:
            raise UserError(f"eval.val_fraction: must be in [0, 1), got {cfg.eval.val_fraction}")
        n_val = round(len(items) * cfg.eval.val_fraction)
        val_items, items = items[:n_val], items[n_val:]
        val_items = val_items[: cfg.eval.max_examples or None]

    cfg.run.name = cfg.run.name or "dpo"
    runtime = setup_runtime(cfg.run)
    try:
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        model.to(runtime.device)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else encoder.end_id
        bs = cfg.train.batch_size
        ref_model = None
        if cfg.dpo.precompute_ref:
            # The reference is the model as loaded: score every pair now, before any update.
            reference_logps(model, items + val_items, 2 * bs, pad, runtime.device, runtime.autocast)
        else:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        loss_fn = dpo_loss_fn(cfg.dpo.beta, cfg.dpo.label_smoothing, ref_model, cfg.dpo.sft_weight)
        mine = val_items[runtime.rank :: runtime.world_size]
        val_batches = pair_batches(mine, bs, pad) if mine else None
        train_batches = PreferenceBatches(
            items, bs, pad, seed=cfg.run.seed, rank=runtime.rank, world_size=runtime.world_size
        )
        torch.manual_seed(cfg.run.seed + runtime.rank)
        trainer = Trainer(
            model, loss_fn, train_batches, cfg.train, cfg.optim, runtime, run_dir,
            val_batches=val_batches, tokenizer=tokenizer, eval_perplexity=False,
        )  # fmt: skip
        trainer.maybe_resume()
        held_out = pair_batches(val_items, bs, pad)
        report: dict = {}
        before_file = run_dir / "eval_before.json"
        if runtime.is_main:
            save_config(cfg, run_dir / "config.yaml")
            if skipped:
                runtime.print0(f"skipped {sum(skipped.values())} pairs: {dict(skipped)}")
            runtime.print0(
                f"dpo: {model.num_params() / 1e6:.2f}M params from {ckpt}, {len(items):,} train / "
                f"{len(val_items):,} held-out pairs, beta {cfg.dpo.beta}, label smoothing "
                f"{cfg.dpo.label_smoothing}, reference {'precomputed' if ref_model is None else 'live'} -> {run_dir}"
            )
            if val_items and trainer.step == 0:
                report["before"] = evaluate_pairs(model, held_out, cfg.dpo.beta, runtime.device, runtime.autocast)
                atomic_write(before_file, json.dumps(report["before"], indent=2) + "\n")
                runtime.print0(f"before: held-out pair accuracy {report['before']['pair_accuracy']:.3f}")
            elif before_file.is_file():
                report["before"] = json.loads(before_file.read_text())
        summary = trainer.train()
        if runtime.is_main:
            if val_items:
                if ref_model is not None:  # live reference: score the held-out pairs with it for rewards
                    reference_logps(ref_model, val_items, 2 * bs, pad, runtime.device, runtime.autocast)
                    held_out = pair_batches(val_items, bs, pad)
                report["after"] = evaluate_pairs(model, held_out, cfg.dpo.beta, runtime.device, runtime.autocast)
            report.update(step=trainer.step, n_train=len(items), n_val=len(val_items), skipped=dict(skipped))
            atomic_write(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
            line = f"done: {summary['steps']} steps, loss {summary['final_loss']:.4f}"
            if "after" in report:
                a = report["after"]
                b = report.get("before", {}).get("pair_accuracy")
                line += (
                    f"; held-out pair accuracy {'' if b is None else f'{b:.3f} -> '}{a['pair_accuracy']:.3f}, "
                    f"reward accuracy {a['rewards/accuracies']:.3f}, margin {a['rewards/margins']:.3f}"
                )
            runtime.print0(f"{line} -> {run_dir}")
    finally:
        cleanup(runtime)

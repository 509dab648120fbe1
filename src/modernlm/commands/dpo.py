"""Direct preference optimisation (DPO) of an SFT checkpoint against a frozen reference.

    modernlm dpo -c configs/align/dpo.yaml init_from=runs/sft
    modernlm dpo init_from=runs/sft data.format=hh_rlhf data.path=hh-rlhf/train.jsonl.gz dpo.beta=0.1
    modernlm dpo init_from=runs/sft data.path=pairs.jsonl dpo.label_smoothing=0.1   # {"prompt", "chosen", "rejected"}

INIT_FROM (an SFT checkpoint or run directory) is both the policy's start and the frozen reference.
dpo.precompute_ref=true (the default) scores every pair with the reference once before training and
drops it; false keeps it and runs it on every batch. The loss is sigmoid DPO with conservative label
smoothing (modernlm.train.losses.dpo_loss); metrics.jsonl logs what TRL logs: rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (val_... held out).
Held-out pairs (eval.val_path, else eval.val_fraction of the data) are scored before and after
training in eval.json: pair_accuracy (the chosen reply has the higher log-probability) and, after,
the implicit-reward accuracy and mean margin against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modernlm.align.dpo import DPOEvalSettings, DPOSettings, PreferenceDataConfig
from modernlm.runtime import RunConfig
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


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
    import torch

    from modernlm.align import dpo
    from modernlm.align.sft import chat_pad_id, chat_ready, check_max_length
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.train.run import fmt_loss, training_run
    from modernlm.train.trainer import Trainer

    lm = load(cfg.init_from, backend="modernlm", tokenizer=cfg.tokenizer, what="init_from")
    model, tokenizer, ckpt = chat_ready(lm)
    check_max_length(cfg.data.max_length, model, ckpt)
    encoder = ChatEncoder(tokenizer)
    items, val_items, skipped = dpo.load_pair_splits(cfg.data, cfg.eval, encoder, seed=cfg.run.seed)
    pad, bs = chat_pad_id(encoder), cfg.train.batch_size

    with training_run(cfg, "dpo") as run:
        rt = run.runtime
        model.to(rt.device)
        ref_model = dpo.set_up_reference(model, items + val_items, cfg.dpo.precompute_ref, 2 * bs, pad, rt.device,
                                         rt.autocast)  # fmt: skip
        loss_fn = dpo.dpo_loss_fn(cfg.dpo.beta, cfg.dpo.label_smoothing, ref_model, cfg.dpo.sft_weight)
        mine = val_items[rt.rank :: rt.world_size]  # [] on some ranks: they still join every eval
        train_batches = dpo.PreferenceBatches(items, bs, pad, seed=cfg.run.seed, rank=rt.rank, world_size=rt.world_size)
        torch.manual_seed(cfg.run.seed + rt.rank)
        trainer = Trainer(
            model, loss_fn, train_batches, cfg.train, cfg.optim, rt, run.run_dir,
            val_batches=dpo.pair_batches(mine, bs, pad) if val_items else None, tokenizer=tokenizer,
            perplexity=False, batch_counts=dpo.pair_batch_counts,
        )  # fmt: skip
        run.start(trainer, (
            f"{model.num_params() / 1e6:.2f}M params from {ckpt}, {len(items):,} train / "
            f"{len(val_items):,} held-out pairs, beta {cfg.dpo.beta}, label smoothing "
            f"{cfg.dpo.label_smoothing}, reference {'precomputed' if ref_model is None else 'live'}"
        ))  # fmt: skip
        if skipped:
            rt.print0(f"skipped {sum(skipped.values())} pairs: {dict(skipped)}")
        held_out = dpo.HeldOutPairs(model, ref_model, val_items, bs, pad, cfg.dpo.beta, rt,
                                    run.run_dir / "eval_before.json", all_ranks=trainer.sharded)  # fmt: skip
        held_out.before(trainer.step)
        summary = trainer.train()
        report = held_out.after()
        report.update(step=trainer.step, n_train=len(items), n_val=len(val_items), skipped=dict(skipped))
        run.write_eval(report)
        run.done(summary, f"{summary['steps']} steps, loss {fmt_loss(summary['final_loss'])}{held_out.text()}")

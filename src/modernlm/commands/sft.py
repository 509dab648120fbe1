"""Supervised finetuning (instruction tuning) of a modernlm checkpoint on chats, in ChatML.

    modernlm sft -c configs/align/sft.yaml init_from=runs/pretrain-tiny
    modernlm sft init_from=runs/pretrain data.format=alpaca data.path=alpaca_data.json data.pack=true
    modernlm sft init_from=runs/pretrain data.format=chat data.path=chats.jsonl   # {"messages": [...]} per line

INIT_FROM is a pretrain checkpoint or run directory (its best checkpoint). The chat tokens
<|im_start|> / <|im_end|> are added to tokenizer and embedding when missing, and <|im_end|> becomes
the eos: it closes every reply, so the model learns to stop there (modernlm.align.sft). The loss is
on the assistant replies only; data.pack=true packs several examples per row, each attending only
to itself. Validation: eval.val_path, else eval.val_fraction of the records; at the end the model
answers eval.generate held-out prompts greedily. Writes run.out_dir/run.name/: config.yaml,
metrics.jsonl, summary.json, checkpoints/ (chat-ready tokenizer included), eval.json (eos_rate:
the share of replies ending with <|im_end|>), samples.md (the replies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modernlm.align.sft import SFTDataConfig, SFTEvalSettings
from modernlm.runtime import RunConfig
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


@dataclass
class Config:
    init_from: str = ""  # pretrain checkpoint or run directory
    tokenizer: str = ""  # tokenizer directory when the checkpoint has none
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    eval: SFTEvalSettings = field(default_factory=SFTEvalSettings)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20, min_lr_ratio=0.1))
    train: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=500, eval_every=100))
    run: RunConfig = field(default_factory=RunConfig)


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "sft"), "dir")]


def main(cfg: Config) -> None:
    import torch

    from modernlm.align import sft
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.train.run import fmt_loss, prompt_sampler, training_run
    from modernlm.train.trainer import Trainer

    lm = load(cfg.init_from, backend="modernlm", tokenizer=cfg.tokenizer, what="init_from")
    model, tokenizer, ckpt = sft.chat_ready(lm)
    encoder = ChatEncoder(tokenizer, add_bos=cfg.data.add_bos)
    sft.check_max_length(cfg.data.max_length, model, ckpt)
    examples, val_examples, conversations = sft.load_sft_splits(cfg.data, cfg.eval, encoder, seed=cfg.run.seed)
    pad = sft.chat_pad_id(encoder)

    with training_run(cfg, "sft") as run:
        rt = run.runtime
        train_batches = sft.SFTBatches(
            examples, cfg.train.batch_size, pad, pack=cfg.data.pack, max_length=cfg.data.max_length,
            seed=cfg.run.seed, rank=rt.rank, world_size=rt.world_size,
        )  # fmt: skip
        mine = val_examples[rt.rank :: rt.world_size]  # [] on some ranks: they still join every eval
        torch.manual_seed(cfg.run.seed + rt.rank)
        trainer = Trainer(
            model, sft.sft_loss, train_batches, cfg.train, cfg.optim, rt, run.run_dir,
            val_batches=sft.eval_sft_batches(mine, cfg.train.batch_size, pad) if val_examples else None,
            tokenizer=tokenizer, batch_counts=sft.sft_batch_counts,
            flops_per_token=model.flops_per_token(cfg.data.max_length),
            sample_fn=prompt_sampler(tokenizer, cfg.train.sample_prompts, cfg.train.sample_tokens),
        )  # fmt: skip
        run.start(trainer, (
            f"{model.num_params() / 1e6:.2f}M params from {ckpt}, {len(examples):,} train / "
            f"{len(val_examples):,} val examples ({sft.reply_tokens(examples):,} reply tokens), "
            f"{len(train_batches.examples):,} rows{' (packed)' if cfg.data.pack else ''}"
        ))  # fmt: skip
        summary = trainer.train()
        text = f"{summary['steps']} steps, val_loss {fmt_loss(summary['final_val_loss'])}"
        # greedy replies to the held-out prompts: eval.json, samples.md (rank 0); a sharded model
        # generates on every rank, the same replies, as its forwards are collectives
        if rt.is_main or trainer.sharded:
            report = {"step": trainer.step, "val_loss": summary["final_val_loss"], "n_val": len(val_examples)}
            report |= sft.reply_report(model, encoder, conversations, cfg.eval.max_new_tokens,
                                       run.run_dir / "samples.md" if rt.is_main else None, trainer.step)  # fmt: skip
            run.write_eval(report)
            text += f", replies ending with <|im_end|>: {report['eos_rate']:.0%}" if "eos_rate" in report else ""
        run.done(summary, text)

"""Supervised finetuning (instruction tuning) of a modernlm checkpoint on chats, in ChatML.

    modernlm sft -c configs/align/sft.yaml init_from=runs/pretrain-tiny
    modernlm sft init_from=runs/pretrain data.format=alpaca data.path=alpaca_data.json data.pack=true
    modernlm sft init_from=runs/pretrain data.format=chat data.path=chats.jsonl   # {"messages": [...]} per line

INIT_FROM is a pretrain checkpoint or run directory (its best checkpoint); the architecture comes
from it. The chat tokens <|im_start|> / <|im_end|> are added to the tokenizer (and rows to the
embedding) when missing, and <|im_end|> becomes the eos token: it closes every reply, so the model
learns to emit it and generation stops there. The loss is on the assistant replies (and their
<|im_end|>) only. data.pack=true packs several examples per row of data.max_length tokens, each
attending only to itself.

Validation: data.val_path (same format), else val_fraction of the records held out. At the end the
model answers eval.generate held-out prompts greedily: eval.json records how many replies ended
with <|im_end|> (eos_rate) and samples.md shows them. Writes run.out_dir/run.name/: config.yaml,
metrics.jsonl, summary.json, checkpoints/ (chat-ready tokenizer included), eval.json, samples.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from modernlm.align.sft import SFTDataConfig
from modernlm.files import atomic_write
from modernlm.runtime import RunConfig
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


@dataclass
class SFTEvalSettings:
    val_path: str = ""  # held-out file in data.format ("" = hold out val_fraction of the training records)
    val_fraction: float = 0.05  # share of records held out when there is no val_path
    max_examples: int = 200  # validation examples scored for val_loss (0 = all)
    generate: int = 16  # held-out prompts answered greedily at the end (eos_rate, samples.md); 0 = none
    max_new_tokens: int = 128  # reply budget for those answers


@dataclass
class Config:
    init_from: str = ""  # pretrain checkpoint or run directory
    tokenizer: str = ""  # tokenizer directory when the checkpoint has none
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    eval: SFTEvalSettings = field(default_factory=SFTEvalSettings)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20, min_lr_ratio=0.1))
    train: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=500, eval_every=100))
    run: RunConfig = field(default_factory=RunConfig)


def split_records(cfg: Config, seed: int) -> tuple[SFTDataConfig, SFTDataConfig | None, float]:
    """The training source, the validation source (or None: hold out a fraction), that fraction."""
    if cfg.eval.val_path:
        return cfg.data, replace(cfg.data, path=cfg.eval.val_path, hf_dataset="", max_examples=0), 0.0
    if not 0.0 <= cfg.eval.val_fraction < 1.0:
        from modernlm.errors import UserError

        raise UserError(f"eval.val_fraction: must be in [0, 1), got {cfg.eval.val_fraction}")
    return cfg.data, None, cfg.eval.val_fraction


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "sft"), "dir")]


def main(cfg: Config) -> None:
    import torch

    from modernlm.align.sft import (
        ChatEncoder,
        SFTBatches,
        eval_sft_batches,
        generate_replies,
        load_chat_model,
        load_sft_examples,
        read_sft_records,
        sft_loss,
    )
    from modernlm.config import save_config
    from modernlm.runtime import cleanup, setup_runtime
    from modernlm.train.trainer import Trainer

    model, tokenizer, ckpt = load_chat_model(cfg.init_from, cfg.tokenizer)
    encoder = ChatEncoder(tokenizer, add_bos=cfg.data.add_bos)
    if cfg.data.max_length > model.config.max_seq_len:
        from modernlm.errors import UserError

        raise UserError(
            f"data.max_length ({cfg.data.max_length}) is longer than the model's context "
            f"({model.config.max_seq_len}, {ckpt})"
        )
    train_cfg, val_cfg, fraction = split_records(cfg, cfg.run.seed)
    examples = load_sft_examples(train_cfg, encoder, seed=cfg.run.seed)
    if val_cfg is not None:
        val_examples = load_sft_examples(replace(val_cfg, shuffle=False), encoder)
    else:
        n_val = round(len(examples) * fraction)
        val_examples, examples = examples[:n_val], examples[n_val:]
    if cfg.eval.max_examples:
        val_examples = val_examples[: cfg.eval.max_examples]
    # The raw held-out conversations, for the generation check at the end.
    held_out = {ex["source"] for ex in val_examples}
    val_src = val_cfg or train_cfg
    conversations = [m for where, m in read_sft_records(val_src) if where in held_out][: cfg.eval.generate]

    cfg.run.name = cfg.run.name or "sft"
    runtime = setup_runtime(cfg.run)
    try:
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else encoder.end_id
        train_batches = SFTBatches(
            examples, cfg.train.batch_size, pad, pack=cfg.data.pack, max_length=cfg.data.max_length,
            seed=cfg.run.seed, rank=runtime.rank, world_size=runtime.world_size,
        )  # fmt: skip
        mine = val_examples[runtime.rank :: runtime.world_size]
        val_batches = eval_sft_batches(mine, cfg.train.batch_size, pad) if mine else None
        torch.manual_seed(cfg.run.seed + runtime.rank)
        trainer = Trainer(
            model, sft_loss, train_batches, cfg.train, cfg.optim, runtime, run_dir,
            val_batches=val_batches, tokenizer=tokenizer,
            flops_per_token=model.flops_per_token(cfg.data.max_length),
        )  # fmt: skip
        trainer.maybe_resume()  # before writing config.yaml: a mismatched resume must not overwrite it
        if runtime.is_main:
            save_config(cfg, run_dir / "config.yaml")
            n_tokens = sum(sum(t != -100 for t in ex["labels"]) for ex in examples)
            runtime.print0(
                f"sft: {model.num_params() / 1e6:.2f}M params from {ckpt}, {len(examples):,} train / "
                f"{len(val_examples):,} val examples ({n_tokens:,} reply tokens), "
                f"{len(train_batches.examples):,} rows{' (packed)' if cfg.data.pack else ''} -> {run_dir}"
            )
        summary = trainer.train()
        if runtime.is_main:
            report = {"step": trainer.step, "val_loss": summary["final_val_loss"], "n_val": len(val_examples)}
            if conversations:
                prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
                replies = generate_replies(model, encoder, prompts, cfg.eval.max_new_tokens)
                report["eos_rate"] = sum(r["stopped"] for r in replies) / len(replies)
                report["n_generated"] = len(replies)
                write_samples(run_dir / "samples.md", trainer.step, prompts, replies)
            atomic_write(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            eos = f", replies ending with <|im_end|>: {report['eos_rate']:.0%}" if "eos_rate" in report else ""
            runtime.print0(
                f"done: {summary['steps']} steps, val_loss {fmt(summary['final_val_loss'])}{eos} -> {run_dir}"
            )
    finally:
        cleanup(runtime)


def write_samples(path: Path, step: int, prompts: list, replies: list[dict]) -> None:
    """Append the held-out prompts and the model's replies to samples.md (rewritten atomically)."""
    lines = [f"## step {step}: replies to held-out prompts (greedy)\n"]
    for conv, reply in zip(prompts, replies, strict=True):
        user = next((m["content"] for m in reversed(conv) if m["role"] == "user"), "")
        end = "" if reply["stopped"] else " *(no <|im_end|> within the budget)*"
        lines.append(f"**user:** {user}\n\n**assistant:** {reply['text']}{end}\n")
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write(path, old + "\n".join(lines) + "\n")

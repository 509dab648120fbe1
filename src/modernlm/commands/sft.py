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
from typing import Any

from modernlm.align.sft import SFTDataConfig
from modernlm.files import atomic_write
from modernlm.runtime import RunConfig, Runtime
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


def split_records(cfg: Config) -> tuple[SFTDataConfig, SFTDataConfig | None, float]:
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

    from modernlm.align.sft import SFTBatches, chat_ready, eval_sft_batches, sft_batch_counts, sft_loss
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.train.run import Training, fmt_loss, prompt_sampler, run_training
    from modernlm.train.trainer import Trainer

    lm = load(cfg.init_from, backend="modernlm", tokenizer=cfg.tokenizer, what="init_from")
    model, tokenizer, ckpt = chat_ready(lm)
    encoder = ChatEncoder(tokenizer, add_bos=cfg.data.add_bos)
    if cfg.data.max_length > model.config.max_seq_len:
        from modernlm.errors import UserError

        raise UserError(
            f"data.max_length ({cfg.data.max_length}) is longer than the model's context "
            f"({model.config.max_seq_len}, {ckpt})"
        )
    examples, val_examples, conversations = load_examples(cfg, encoder)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else encoder.end_id

    def build(runtime: Runtime, run_dir: Path) -> Training:
        train_batches = SFTBatches(
            examples, cfg.train.batch_size, pad, pack=cfg.data.pack, max_length=cfg.data.max_length,
            seed=cfg.run.seed, rank=runtime.rank, world_size=runtime.world_size,
        )  # fmt: skip
        mine = val_examples[runtime.rank :: runtime.world_size]
        val_batches = eval_sft_batches(mine, cfg.train.batch_size, pad) if mine else None
        torch.manual_seed(cfg.run.seed + runtime.rank)
        trainer = Trainer(
            model, sft_loss, train_batches, cfg.train, cfg.optim, runtime, run_dir,
            val_batches=val_batches, tokenizer=tokenizer, batch_counts=sft_batch_counts,
            flops_per_token=model.flops_per_token(cfg.data.max_length),
            sample_fn=prompt_sampler(tokenizer, cfg.train.sample_prompts, cfg.train.sample_tokens),
        )  # fmt: skip
        n_tokens = sum(sum(t != -100 for t in ex["labels"]) for ex in examples)
        banner = (
            f"{model.num_params() / 1e6:.2f}M params from {ckpt}, {len(examples):,} train / "
            f"{len(val_examples):,} val examples ({n_tokens:,} reply tokens), "
            f"{len(train_batches.examples):,} rows{' (packed)' if cfg.data.pack else ''}"
        )

        def after(summary: dict) -> str | None:
            if not runtime.is_main:
                return None
            report = {"step": trainer.step, "val_loss": summary["final_val_loss"], "n_val": len(val_examples)}
            report |= reply_check(model, encoder, conversations, cfg.eval.max_new_tokens, run_dir, trainer.step)
            atomic_write(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
            eos = f", replies ending with <|im_end|>: {report['eos_rate']:.0%}" if "eos_rate" in report else ""
            return f"{summary['steps']} steps, val_loss {fmt_loss(summary['final_val_loss'])}{eos}"

        return Training(trainer, banner, after=after)

    run_training(cfg, "sft", build)


def load_examples(cfg: Config, encoder: Any) -> tuple[list[dict], list[dict], list[list[dict]]]:
    """(training examples, validation examples, the raw held-out conversations to answer at the end)."""
    from modernlm.align.sft import load_sft_examples, read_sft_records

    train_cfg, val_cfg, fraction = split_records(cfg)
    examples = load_sft_examples(train_cfg, encoder, seed=cfg.run.seed)
    if val_cfg is not None:
        val_examples = load_sft_examples(replace(val_cfg, shuffle=False), encoder)
    else:
        n_val = round(len(examples) * fraction)
        val_examples, examples = examples[:n_val], examples[n_val:]
    if cfg.eval.max_examples:
        val_examples = val_examples[: cfg.eval.max_examples]
    held_out = {ex["source"] for ex in val_examples}
    conversations = [m for where, m in read_sft_records(val_cfg or train_cfg) if where in held_out]
    return examples, val_examples, conversations[: cfg.eval.generate]


def reply_check(
    model: Any, encoder: Any, conversations: list[list[dict]], max_new_tokens: int, run_dir: Path, step: int
) -> dict[str, Any]:
    """Greedy replies to the held-out prompts: eos_rate and n_generated for eval.json; the replies
    go to samples.md. {} without conversations."""
    from modernlm.align.sft import generate_replies

    if not conversations:
        return {}
    prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
    replies = generate_replies(model, encoder, prompts, max_new_tokens)
    write_samples(run_dir / "samples.md", step, prompts, replies)
    return {"eos_rate": sum(r["stopped"] for r in replies) / len(replies), "n_generated": len(replies)}


def write_samples(path: Path, step: int, prompts: list, replies: list[dict]) -> None:
    """Append the held-out prompts and the model's replies to samples.md (rewritten atomically)."""
    lines = [f"## step {step}: replies to held-out prompts (greedy)\n"]
    for conv, reply in zip(prompts, replies, strict=True):
        user = next((m["content"] for m in reversed(conv) if m["role"] == "user"), "")
        end = "" if reply["stopped"] else " *(no <|im_end|> within the budget)*"
        lines.append(f"**user:** {user}\n\n**assistant:** {reply['text']}{end}\n")
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write(path, old + "\n".join(lines) + "\n")

"""GRPO: reinforcement learning with verifiable rewards, from an SFT or DPO checkpoint.

    modernlm grpo runs/dpo data.path=gsm/train.jsonl eval.path=gsm/val.jsonl
    modernlm grpo runs/sft data.hf_dataset=openai/gsm8k eval.hf_dataset=openai/gsm8k eval.split=test \\
        grpo.group_size=16 grpo.loss_type=grpo grpo.beta=0.04
    modernlm grpo -c configs/align/grpo.yaml init_from=runs/sft

INIT_FROM is a chat model (an SFT or DPO checkpoint, or its run directory: its best checkpoint).
Each rollout samples grpo.group_size replies to grpo.prompts_per_rollout training problems with
the KV-cache decoder, rewards each by the answer checker (1 for a right strict "#### N", plus
grpo.format_reward for the form), normalises the rewards within each group, and trains on the
clipped surrogate (grpo.loss_type as TRL's: grpo, dapo, dr_grpo, bnpo; optional k3 KL to the start
model, grpo.beta) for grpo.num_iterations passes (modernlm.align.grpo). metrics.jsonl logs what
TRL's GRPOTrainer logs: reward, reward_std, frac_reward_zero_std, kl, clip_ratio/*, entropy,
completions/mean_length (min, max, clipped_ratio); and at every eval val_accuracy, the greedy
accuracy on the held-out problems (eval.*), with val_loss = 1 - val_accuracy, so checkpoints/best
is the most accurate model there. Report held-out numbers on other problems than eval's: those
chose the checkpoint. Resumable like every stage, the current rollout and the prompt order included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modernlm.align.grpo import GRPOSettings
from modernlm.files import atomic_write
from modernlm.runtime import RunConfig, Runtime
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


@dataclass
class ProblemSource:
    path: str = ""  # GSM8K JSONL: {"question", "answer": "... #### N"}
    hf_dataset: str = ""  # or a hub dataset with GSM8K's fields, e.g. openai/gsm8k
    hf_config: str = ""  # its config ("" = main for openai/gsm8k)
    split: str = "train"
    skip: int = 0  # leave out the first N problems (e.g. held out from the same split for eval)
    max_problems: int = 0  # then the first N problems (0 = all)

    def given(self) -> bool:
        return bool(self.path or self.hf_dataset)


@dataclass
class Config:
    init_from: str = ""  # the chat model to start from (SFT or DPO checkpoint / run dir); also the KL reference
    tokenizer: str = ""  # tokenizer directory when the checkpoint has none
    data: ProblemSource = field(default_factory=ProblemSource)  # training problems
    eval: ProblemSource = field(default_factory=lambda: ProblemSource(split="test", max_problems=200))
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    eval_batch_size: int = 64  # held-out problems per greedy generate call
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
    )
    train: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=200, batch_size=16, eval_every=25))
    run: RunConfig = field(default_factory=RunConfig)


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "grpo"), "dir")]


def check(cfg: Config) -> None:
    """The config's own mistakes, before anything loads."""
    from modernlm.errors import UserError

    if not cfg.init_from:
        raise UserError("init_from: give the chat model to start from (an SFT or DPO checkpoint or run directory)")
    if not cfg.data.given():
        raise UserError("data.path: give the training problems (GSM8K JSONL), or data.hf_dataset")
    n = cfg.grpo.prompts_per_rollout * cfg.grpo.group_size
    if n % cfg.train.batch_size:
        raise UserError(f"train.batch_size ({cfg.train.batch_size}) must divide a rollout: grpo.prompts_per_rollout "
                        f"x grpo.group_size = {n} sequences")  # fmt: skip
    if cfg.eval_batch_size <= 0:
        raise UserError(f"eval_batch_size: must be positive, got {cfg.eval_batch_size}")
    # before the model loads (the Runtime, which knows the ranks, comes later)
    if cfg.train.parallel == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank samples its own rollouts, a different number of decode steps each: a sharded
        # model's forward would wait for ranks that already stopped
        raise UserError("train.parallel=fsdp: grpo samples on every rank; use train.parallel=ddp under torchrun")


def load_problems(src: ProblemSource, encoder: Any, max_prompt: int) -> list[dict[str, Any]]:
    """[{"prompt": chat prompt ids, "target", "question"}] of a source; prompts longer than
    max_prompt tokens are a UserError naming the problem (a rollout needs room to answer)."""
    from modernlm.align.verifier import chat_prompt, read_problems
    from modernlm.errors import UserError

    out = []
    limit = src.skip + src.max_problems if src.max_problems else 0
    for p in read_problems(src.path, limit, hf_dataset=src.hf_dataset, hf_config=src.hf_config,
                           split=src.split)[src.skip :]:  # fmt: skip
        prompt = chat_prompt(encoder, p["question"])
        if len(prompt) > max_prompt:
            raise UserError(f"{p['source']}: the question takes {len(prompt)} tokens, over the {max_prompt} the "
                            "model's context leaves beside grpo.max_new_tokens; lower grpo.max_new_tokens")  # fmt: skip
        out.append({"prompt": prompt, "target": p["target"], "question": p["question"]})
    return out


def main(cfg: Config) -> None:
    import copy

    import torch

    from modernlm.align.grpo import (
        Rollouts,
        greedy_accuracy_fn,
        grpo_loss_fn,
        problem_batches,
        rollout_batch_counts,
    )
    from modernlm.align.sft import chat_ready
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.errors import UserError
    from modernlm.train.run import Training, run_training
    from modernlm.train.tracking import read_metrics
    from modernlm.train.trainer import Trainer

    check(cfg)
    lm = load(cfg.init_from, backend="modernlm", tokenizer=cfg.tokenizer, what="init_from")
    model, tokenizer, ckpt = chat_ready(lm)
    encoder = ChatEncoder(tokenizer)
    room = model.config.max_seq_len - cfg.grpo.max_new_tokens
    if room < 8:
        raise UserError(f"grpo.max_new_tokens ({cfg.grpo.max_new_tokens}) leaves no room for a prompt in the "
                        f"model's context ({model.config.max_seq_len})")  # fmt: skip
    problems = load_problems(cfg.data, encoder, room)
    held_out = load_problems(cfg.eval, encoder, room) if cfg.eval.given() else []
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else encoder.end_id
    s = cfg.grpo

    def build(runtime: Runtime, run_dir: Path) -> Training:
        model.to(runtime.device)
        # The reference is the start model, frozen; only kept when the KL term needs it.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if s.beta > 0 else None
        torch.manual_seed(cfg.run.seed + runtime.rank)
        rollouts = Rollouts(
            model, tokenizer, problems, s, batch_size=cfg.train.batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps, eos_id=encoder.end_id, pad_id=pad, seed=cfg.run.seed,
            rank=runtime.rank, world_size=runtime.world_size, ref_model=ref_model, autocast=runtime.autocast,
        )  # fmt: skip
        mine = held_out[runtime.rank :: runtime.world_size]
        accuracy = greedy_accuracy_fn(model, tokenizer, encoder.end_id, s.max_new_tokens)
        trainer = Trainer(
            model, grpo_loss_fn(s), rollouts, cfg.train, cfg.optim, runtime, run_dir,
            val_batches=problem_batches(mine, cfg.eval_batch_size) if mine else None, eval_loss_fn=accuracy,
            tokenizer=tokenizer, eval_perplexity=False, batch_counts=rollout_batch_counts,
        )  # fmt: skip
        banner = (
            f"{model.num_params() / 1e6:.2f}M params from {ckpt}, {len(problems):,} train / {len(held_out):,} "
            f"held-out problems, {s.prompts_per_rollout} x {s.group_size} completions per rollout, loss "
            f"{s.loss_type}, beta {s.beta}"
        )

        def after(summary: dict) -> str:
            records = [r for r in read_metrics(run_dir) if "val_accuracy" in r]
            report: dict[str, Any] = {"step": trainer.step, "n_train": len(problems), "n_val": len(held_out)}
            if records:
                report.update(before=records[0]["val_accuracy"], after=records[-1]["val_accuracy"],
                              best=max(r["val_accuracy"] for r in records))  # fmt: skip
            if runtime.is_main:
                atomic_write(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
            text = f"{summary['steps']} steps"
            if records:
                text += f"; held-out greedy accuracy {report['before']:.3f} -> {report['after']:.3f}"
                text += f" (best {report['best']:.3f})"
            return text

        return Training(trainer, banner, after=after)

    run_training(cfg, "grpo", build)

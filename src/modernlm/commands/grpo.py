"""GRPO: reinforcement learning with verifiable rewards, from an SFT or DPO checkpoint.

    modernlm grpo runs/dpo data.path=gsm/train.jsonl eval.path=gsm/val.jsonl
    modernlm grpo runs/sft data.hf_dataset=openai/gsm8k eval.hf_dataset=openai/gsm8k eval.split=test \\
        grpo.group_size=16 grpo.loss_type=grpo grpo.beta=0.04
    modernlm grpo -c configs/align/grpo.yaml init_from=runs/sft

INIT_FROM is a chat model (an SFT or DPO checkpoint, or its run directory). Each rollout samples
grpo.group_size replies to grpo.prompts_per_rollout training problems, rewards each by the answer
checker and trains on the clipped surrogate (grpo.loss_type as TRL's; optional k3 KL to the start
model, grpo.beta), grpo.num_iterations passes (modernlm.align.grpo). metrics.jsonl logs what TRL's
GRPOTrainer logs and, at every eval, val_accuracy: the greedy accuracy on the held-out problems
(eval.*), with val_loss = 1 - val_accuracy, so checkpoints/best is the most accurate model there;
report held-out numbers on other problems. Resumable, the current rollout and prompt order included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from modernlm.align.grpo import GRPOSettings, ProblemSource
from modernlm.runtime import RunConfig
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


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


def main(cfg: Config) -> None:
    import torch

    from modernlm.align import grpo
    from modernlm.align.sft import chat_pad_id, chat_ready, frozen_copy
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.train.run import training_run
    from modernlm.train.trainer import Trainer

    check(cfg)
    lm = load(cfg.init_from, backend="modernlm", tokenizer=cfg.tokenizer, what="init_from")
    model, tokenizer, ckpt = chat_ready(lm)
    encoder, s = ChatEncoder(tokenizer), cfg.grpo
    room = grpo.prompt_room(model, s.max_new_tokens)
    problems = grpo.load_problems(cfg.data, encoder, room)
    held_out = grpo.load_problems(cfg.eval, encoder, room) if cfg.eval.given() else []

    with training_run(cfg, "grpo") as run:
        rt = run.runtime
        model.to(rt.device)
        ref_model = frozen_copy(model) if s.beta > 0 else None  # the start model; only the KL term needs it
        torch.manual_seed(cfg.run.seed + rt.rank)
        rollouts = grpo.Rollouts(
            model, tokenizer, problems, s, batch_size=cfg.train.batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps, eos_id=encoder.end_id, pad_id=chat_pad_id(encoder),
            seed=cfg.run.seed, rank=rt.rank, world_size=rt.world_size, ref_model=ref_model, autocast=rt.autocast,
        )  # fmt: skip
        mine = held_out[rt.rank :: rt.world_size]  # [] on some ranks: they still join every eval
        trainer = Trainer(
            model, grpo.grpo_loss_fn(s), rollouts, cfg.train, cfg.optim, rt, run.run_dir,
            val_batches=grpo.problem_batches(mine, cfg.eval_batch_size) if held_out else None,
            eval_loss_fn=grpo.greedy_accuracy_fn(model, tokenizer, encoder.end_id, s.max_new_tokens),
            tokenizer=tokenizer, perplexity=False, batch_counts=grpo.rollout_batch_counts,
        )  # fmt: skip
        run.start(trainer, (
            f"{model.num_params() / 1e6:.2f}M params from {ckpt}, {len(problems):,} train / {len(held_out):,} "
            f"held-out problems, {s.prompts_per_rollout} x {s.group_size} completions per rollout, loss "
            f"{s.loss_type}, beta {s.beta}"
        ))  # fmt: skip
        summary = trainer.train()
        accuracy = grpo.held_out_accuracy(run.run_dir)
        run.write_eval({"step": trainer.step, "n_train": len(problems), "n_val": len(held_out)} | accuracy)
        text = f"{summary['steps']} steps"
        if accuracy:
            text += f"; held-out greedy accuracy {accuracy['before']:.3f} -> {accuracy['after']:.3f}"
            text += f" (best {accuracy['best']:.3f})"
        run.done(summary, text)

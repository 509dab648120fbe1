"""GRPO: reinforcement learning with verifiable rewards on GSM8K-format word problems.

One rollout: `prompts_per_rollout` problems (this rank's share, in a seeded order), `group_size`
completions of each (one seeded generator per completion: the same tokens whatever batch it is
sampled in), each rewarded by the answer checker: 1 when the reply's strict final "#### N" equals
the gold number, plus `format_reward` for a finished reply of that form. Advantages are the rewards
normalised within their group (`losses.group_advantages`). The trainer steps through the rollout's
micro-batches `num_iterations` times on the clipped token-level surrogate with an optional k3 KL to
the start model (`losses.grpo_loss`, TRL's loss types); when a rollout outlives one optimizer step,
the sampling policy's log-probs (`old_logps`) give the importance ratio, as in TRL. `Rollouts`'
state (prompt order, rollouts drawn, the current rollout's micro-batches and how many were used)
goes into every checkpoint: a run killed mid-rollout resumes with the same samples and losses.

Shapes: B sequences of a micro-batch, T their padded length (prompt + completion), V vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modernlm.align.verifier import chat_prompt, label_solution, read_problems
from modernlm.chat import ChatEncoder
from modernlm.data.tasks import TaskBatches
from modernlm.errors import UserError
from modernlm.eval.metrics import extract_strict
from modernlm.generation import Sampling, TextGeneration
from modernlm.runtime import eval_mode
from modernlm.train.losses import group_advantages, grpo_loss, token_logps_and_entropy
from modernlm.train.tracking import read_metrics

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")


@dataclass
class GRPOSettings:
    group_size: int = 8  # completions per prompt (G)
    prompts_per_rollout: int = 8  # prompts per rollout, per rank: a rollout is prompts * group_size sequences
    num_iterations: int = 1  # passes over each rollout (TRL's num_iterations; > 1 reuses samples off-policy)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"  # TRL's normalisations
    epsilon: float = 0.2  # clip range below (and above, unless epsilon_high)
    epsilon_high: float | None = None  # clip range above (DAPO's clip-higher); null = epsilon
    beta: float = 0.0  # k3 KL penalty to the start model (0 = none, no reference kept)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide advantages by the std (none: Dr. GRPO)
    temperature: float = 1.0  # sampling temperature of the rollouts (and of the loss's log-probs, as TRL)
    top_k: int = 0  # rollouts' top-k (0 = off)
    max_new_tokens: int = 128  # completion budget
    format_reward: float = 0.0  # added to a finished reply that ends in "#### N", right or wrong

    def __post_init__(self) -> None:
        for name in ("group_size", "prompts_per_rollout", "num_iterations", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"grpo.{name}: must be an int >= 1, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise UserError(f"grpo.group_size: needs >= 2 completions to compare, got {self.group_size}")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"grpo.loss_type: one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise UserError(f"grpo.scale_rewards: group, batch or none, got {self.scale_rewards!r}")
        if self.temperature <= 0:
            raise UserError(f"grpo.temperature: rollouts sample, so it must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:  # here, not at the first rollout after the loading
            raise UserError(f"grpo.top_k: must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError("grpo.epsilon / grpo.epsilon_high: must be >= 0")
        if self.beta < 0:
            raise UserError(f"grpo.beta: must be >= 0, got {self.beta}")


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass
class ProblemSource:
    path: str = ""  # GSM8K JSONL: {"question", "answer": "... #### N"}
    hf_dataset: str = ""  # or a hub dataset with GSM8K's fields, e.g. openai/gsm8k
    hf_config: str = ""  # its config ("" = main for openai/gsm8k)
    split: str = "train"
    skip: int = 0  # leave out the first N problems (e.g. held out from the same split for eval)
    max_problems: int = 0  # then the first N problems (0 = all)

    def __post_init__(self) -> None:
        # a ValueError: the config loader names the section (data., eval., rl.data. in a pipeline)
        for name in ("skip", "max_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def given(self) -> bool:
        return bool(self.path or self.hf_dataset)


def prompt_room(model: nn.Module, max_new_tokens: int) -> int:
    """The tokens a prompt may take in the model's context beside a max_new_tokens completion."""
    room = model.config.max_seq_len - max_new_tokens
    if room < 8:
        raise UserError(f"grpo.max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                        f"model's context ({model.config.max_seq_len})")  # fmt: skip
    return room


def load_problems(src: ProblemSource, encoder: ChatEncoder, max_prompt: int) -> list[dict[str, Any]]:
    """[{"prompt": chat prompt ids, "target", "question"}] of a source; prompts longer than
    max_prompt tokens are a UserError naming the problem (a rollout needs room to answer)."""
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


# ---------------------------------------------------------------------------------------------
# Rewards


def answer_reward(reply: str, target: str, finished: bool, format_reward: float = 0.0) -> tuple[float, bool]:
    """(reward, correct): correct when the reply's last "#### N" is the gold number (strict: a
    number elsewhere in the text does not count); format_reward more for a finished reply with one."""
    answer = extract_strict(reply)
    correct = answer is not None and answer == target
    return float(correct) + (format_reward if answer is not None and finished else 0.0), correct


def rollout_seed(seed: int, rollout: int, row: int) -> int:
    """The seed of one completion: distinct for every (run seed, rollout, row), the same on resume."""
    digest = hashlib.sha256(f"grpo:{seed}:{rollout}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_completions(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], seeds: Sequence[int], s: GRPOSettings,
    eos_id: int,
) -> list[tuple[list[int], str, bool]]:  # fmt: skip
    """One completion per prompt, each with its own seed: [(ids incl. the eos if it ended, text, finished)]."""
    sampling = Sampling(s.max_new_tokens, temperature=s.temperature, top_k=s.top_k or None, eos_token_id=eos_id,
                        seed=list(seeds))  # fmt: skip
    out = []
    for stream in TextGeneration(model, tokenizer, prompts, sampling, skip_special_tokens=False).run():
        finished = stream.finish == "eos"
        out.append((list(stream.ids) + ([eos_id] if finished else []), stream.text, finished))
    return out


# ---------------------------------------------------------------------------------------------
# Rollouts: the trainer's batches


def collate_rollout(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded prompt + completion rows -> a micro-batch. Position t of `completion_mask` (B, T-1)
    marks the logits at t that predict a completion token (input t + 1)."""
    T = max(len(r["prompt"]) + len(r["completion"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    for i, r in enumerate(rows):
        seq = list(r["prompt"]) + list(r["completion"])
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(r["prompt"]) - 1 : len(seq) - 1] = True
    return {
        "input_ids": ids,
        "completion_mask": mask,
        "advantages": torch.tensor([r["advantage"] for r in rows], dtype=torch.float32),
        "input_tokens": sum(len(r["prompt"]) + len(r["completion"]) for r in rows),  # host ints: batch_counts
        "examples": len(rows),
    }


class Rollouts:
    """GRPO's training batches (`trainer.Batches`): draws a rollout when the last one is used up,
    then yields its micro-batches, `num_iterations` passes over them.

    problems: [{"prompt": ids, "target": gold number}]; model: the policy (bare, it is sampled);
    ref_model: the frozen start model when beta > 0. Every micro-batch carries the rollout's
    statistics (`stats`), which the loss_fn logs.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        problems: list[dict[str, Any]],
        s: GRPOSettings,
        *,
        batch_size: int,
        grad_accum_steps: int,
        eos_id: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        ref_model: nn.Module | None = None,
        autocast: Callable[[], Any] | None = None,
    ):
        n = s.prompts_per_rollout * s.group_size
        if n % batch_size:
            raise UserError(
                f"train.batch_size ({batch_size}) must divide a rollout's grpo.prompts_per_rollout x "
                f"grpo.group_size = {n} sequences"
            )
        self.model, self.tokenizer, self.problems, self.s = model, tokenizer, problems, s
        self.batch_size, self.eos_id, self.pad_id, self.ref_model = batch_size, eos_id, pad_id, ref_model
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.autocast = autocast
        # TaskBatches keeps the prompt order and its position; only its indices are used.
        self.order = TaskBatches(problems, s.prompts_per_rollout, pad_id, seed, rank, world_size)
        # The trainer takes grad_accum_steps micro-batches per optimizer step and a rollout yields
        # `per_rollout` in a row, so rollouts start at multiples of per_rollout and steps at multiples
        # of grad_accum_steps. Some rollout straddles a step (its later micro-batches then meet a
        # policy updated since it was sampled, and need the sampler's log-probs for the ratio)
        # unless every step boundary is a rollout boundary: TRL's
        # `gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0`.
        per_rollout = (n // batch_size) * s.num_iterations
        self.off_policy = grad_accum_steps % per_rollout != 0
        self.rollouts = 0  # rollouts drawn
        self.micro_batches: list[dict[str, Any]] = []  # the current rollout's
        self.used = 0  # micro-batches taken from it (over all its passes)

    def __iter__(self) -> Rollouts:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.used >= len(self.micro_batches) * self.s.num_iterations:
            self.micro_batches, self.used = self.draw(), 0
        batch = self.micro_batches[self.used % len(self.micro_batches)]
        self.used += 1
        return batch

    @torch.no_grad()
    def draw(self) -> list[dict[str, Any]]:
        """Sample, reward and score the next rollout; returns its micro-batches."""
        s, G = self.s, self.s.group_size
        picked = self.order.next_indices()
        prompts = [self.problems[i]["prompt"] for i in picked for _ in range(G)]
        base = (self.rollouts * self.world_size + self.rank) * len(prompts)
        seeds = [rollout_seed(self.seed, self.rollouts, base + j) for j in range(len(prompts))]
        self.rollouts += 1
        autocast = self.autocast or contextlib.nullcontext
        with eval_mode(self.model), autocast():
            done = sample_completions(self.model, self.tokenizer, prompts, seeds, s, self.eos_id)
        rewards, correct = [], []
        for k, (_, text, finished) in enumerate(done):
            r, c = answer_reward(text, self.problems[picked[k // G]]["target"], finished, s.format_reward)
            rewards.append(r)
            correct.append(c)
        reward_t = torch.tensor(rewards, dtype=torch.float32)
        advantages, _ = group_advantages(reward_t, G, s.scale_rewards)
        lengths = torch.tensor([len(ids) for ids, _, _ in done], dtype=torch.float32)
        stats = {
            "reward": reward_t.mean(),
            "reward_std": reward_t.view(-1, G).std(dim=1).mean(),  # TRL: the mean of the groups' stds
            "frac_reward_zero_std": (reward_t.view(-1, G).std(dim=1) == 0).float().mean(),
            "rewards/correct": torch.tensor(correct, dtype=torch.float32).mean(),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": torch.tensor([not f for _, _, f in done], dtype=torch.float32).mean(),
        }
        rows = [{"prompt": p, "completion": ids, "advantage": float(a)}
                for p, (ids, _, _), a in zip(prompts, done, advantages.tolist(), strict=True)]  # fmt: skip
        batches = [collate_rollout(rows[i : i + self.batch_size], self.pad_id)
                   for i in range(0, len(rows), self.batch_size)]  # fmt: skip
        device = next(self.model.parameters()).device
        for b in batches:
            b["stats"] = stats
            for name, model, needed in (("old_logps", self.model, self.off_policy),
                                        ("ref_logps", self.ref_model, s.beta > 0)):  # fmt: skip
                if needed and model is not None:
                    with eval_mode(model), autocast():
                        logps, _ = completion_logps(model, b["input_ids"].to(device), s.temperature)
                    b[name] = logps.float().cpu()
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict(), "rollouts": self.rollouts, "used": self.used,
                "micro_batches": self.micro_batches}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
        self.rollouts, self.used, self.micro_batches = state["rollouts"], state["used"], state["micro_batches"]


# ---------------------------------------------------------------------------------------------
# The loss and the held-out accuracy


def completion_logps(model: nn.Module, input_ids: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token log-probs (B, T-1) of input t+1 given inputs <= t, and the entropy, from logits /
    temperature (the distribution the rollouts sampled, as TRL scores them)."""
    logits = model(input_ids[:, :-1]).logits  # (B, T-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logps_and_entropy(logits, input_ids[:, 1:])


def grpo_loss_fn(s: GRPOSettings) -> Callable[[nn.Module, dict[str, Any]], tuple[Tensor, Any, dict[str, Any]]]:
    """The trainer's loss_fn over a rollout micro-batch (see `Rollouts`)."""
    eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Any, dict[str, Any]]:
        mask = batch["completion_mask"]
        logps, entropy = completion_logps(model, batch["input_ids"], s.temperature)
        loss_sum, normalizer, metrics = grpo_loss(
            logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"], mask,
            loss_type=s.loss_type, epsilon_low=s.epsilon, epsilon_high=eps_high, beta=s.beta,
            max_completion_length=s.max_new_tokens,
        )  # fmt: skip
        metrics = {**metrics, **batch["stats"]}
        metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
        return loss_sum, normalizer, metrics

    return loss_fn


def rollout_batch_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(input tokens, sequences) of a CPU micro-batch, for the trainer's throughput."""
    return batch["input_tokens"], batch["examples"]


def greedy_accuracy_fn(
    model: nn.Module, tokenizer: Any, eos_id: int, max_new_tokens: int
) -> Callable[[nn.Module, dict[str, Any]], tuple[Tensor, int, dict[str, Any]]]:
    """The trainer's eval loss_fn on held-out problems {"prompts", "targets"}: greedy answers, right
    when the last number is the gold one (as the pipeline's answer_accuracy); val_loss = the error
    rate, so checkpoints/best is the most accurate model on these problems."""

    def eval_fn(_: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, int, dict[str, Any]]:
        sampling = Sampling(max_new_tokens, eos_token_id=eos_id)
        streams = TextGeneration(model, tokenizer, batch["prompts"], sampling, skip_special_tokens=False).run()
        right = [label_solution(st.text, t)[1] for st, t in zip(streams, batch["targets"], strict=True)]
        n = len(right)
        device = next(model.parameters()).device
        accuracy = torch.tensor(sum(right) / n, device=device)
        return torch.tensor(float(n - sum(right)), device=device), n, {"accuracy": accuracy}

    return eval_fn


def problem_batches(problems: Sequence[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Held-out problems as the eval fn's batches (prompt ids and gold numbers)."""
    return [{"prompts": [p["prompt"] for p in problems[i : i + batch_size]],
             "targets": [p["target"] for p in problems[i : i + batch_size]]}
            for i in range(0, len(problems), batch_size)]  # fmt: skip


def held_out_accuracy(run_dir: Path) -> dict[str, float]:
    """The greedy held-out accuracy of a run's evaluations (metrics.jsonl's val_accuracy): the first
    ("before", at step 0 unless resumed past it), the last ("after") and the best; {} without any."""
    records = [r for r in read_metrics(run_dir) if "val_accuracy" in r]
    if not records:
        return {}
    return {"before": records[0]["val_accuracy"], "after": records[-1]["val_accuracy"],
            "best": max(r["val_accuracy"] for r in records)}  # fmt: skip


__all__ = [
    "GRPOSettings",
    "ProblemSource",
    "Rollouts",
    "answer_reward",
    "collate_rollout",
    "completion_logps",
    "greedy_accuracy_fn",
    "grpo_loss_fn",
    "held_out_accuracy",
    "load_problems",
    "problem_batches",
    "prompt_room",
    "rollout_batch_counts",
    "rollout_seed",
    "sample_completions",
]

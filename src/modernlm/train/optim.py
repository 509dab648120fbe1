"""AdamW with sensible parameter groups, and the learning-rate schedule as a pure function.

- `build_optimizer(model, cfg)`: AdamW that decays only matrices that are not embeddings (nanoGPT,
  OLMo). With `name: muon`, Muon (modded-nanogpt, Moonshot's "Muon is Scalable") takes the hidden
  matrices and AdamW the rest; Muon's step is rescaled to AdamW's update RMS, so one `lr` and one
  schedule drive both.
- `lr_at(step, cfg, num_steps)`: linear warmup, then cosine / WSD / constant down to a floor. Pure,
  so it can be unit-tested and plotted (nanoGPT's `get_lr`).

Design notes: docs/design.md#trainoptimpy
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon for hidden matrices + AdamW for the rest
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # floor of the decay, as a fraction of lr
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # shape after warmup
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps to lr
    decay_fraction: float = 0.2  # WSD only: final fraction of the steps spent decaying linearly
    weight_decay: float = 0.1  # decoupled (AdamW) decay, on non-embedding matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # Adam moments
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping
    fused: bool | None = None  # fused AdamW kernel; None = on when every parameter is on CUDA
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_lr_scale: float = 1.0  # Muon's learning rate as a multiple of lr (the schedule scales both)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")


def lr_at(step: int, cfg: OptimConfig, num_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `num_steps` steps.

    warmup:   lr * (step + 1) / warmup_steps for step < warmup_steps
    cosine:   floor + (lr - floor) * (1 + cos(pi * p)) / 2, p = progress through the post-warmup steps
    wsd:      lr until the last decay_fraction of the steps, then linear to the floor
              (warmup-stable-decay, MiniCPM / "Scaling Laws and Compute-Optimal Training Beyond
              Fixed Training Durations"): the stable phase can be extended without restarting.
    constant: lr
    floor = lr * min_lr_ratio; the value holds at the floor past num_steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(num_steps - cfg.warmup_steps, 1)
        p = min((step - cfg.warmup_steps) / span, 1.0)
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    # wsd
    decay_steps = max(round(cfg.decay_fraction * num_steps), 1)
    decay_start = max(num_steps - decay_steps, cfg.warmup_steps)
    if step < decay_start:
        return cfg.lr
    p = min((step - decay_start) / max(num_steps - decay_start, 1), 1.0)
    return cfg.lr + (floor - cfg.lr) * p


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (1-D params and embeddings).

    Only trainable parameters are included; a parameter shared between modules (the tied
    embedding / LM head) appears once, and counts as an embedding.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() de-duplicates shared tensors
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embedding_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def decayed_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters `build_optimizer` applies weight decay to (for logs and tests)."""
    decayed = {
        id(p) for g in param_groups(model, 1.0) if g["weight_decay"] > 0 for p in g["params"]
    }
    return [n for n, p in model.named_parameters() if id(p) in decayed]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, fused when every parameter is on CUDA (one kernel per step);
    with cfg.name == "muon", Muon takes the decayed matrices (see the module docstring)."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = cfg.fused
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    if cfg.name == "muon":
        # Muon takes the hidden matrices: the decayed group, less the output layer (modded-nanogpt
        # keeps it on AdamW); a tied LM head is the embedding table, already in the other group.
        lm_head = getattr(model, "lm_head", None)
        head = {id(p) for p in lm_head.parameters()} if isinstance(lm_head, nn.Module) else set()
        decayed = {id(p) for g in param_groups(model, 1.0) if g["weight_decay"] > 0 for p in g["params"]}
        matrices = [p for p in params if id(p) in decayed and id(p) not in head]
        taken = {id(p) for p in matrices}
        rest = [dict(g, params=[p for p in g["params"] if id(p) not in taken]) for g in groups]
        rest = [g for g in rest if g["params"]]
        muon = Muon(
            [{"params": matrices, "lr_scale": cfg.muon_lr_scale}], lr=cfg.lr * cfg.muon_lr_scale,
            weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
        )  # fmt: skip
        adamw = torch.optim.AdamW(rest, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
        return OptimizerChain(muon, adamw)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise the matrix g (U S V^T -> about U V^T) with the quintic
    Newton-Schulz iteration of Keller Jordan's Muon (coefficients tuned for speed, not to converge:
    singular values land in about [0.7, 1.2], which trains as well)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype or g.dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: Nesterov momentum (as an EMA), the update orthogonalised by
    `newton_schulz`, decoupled weight decay, and the step scaled by 0.2 * sqrt(max(rows, cols)) to
    AdamW's update RMS. The iterations run in bfloat16 on CUDA and in float32 elsewhere."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters, got shape {tuple(p.grad.shape)}")
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu)  # Nesterov: look one momentum step ahead
                ns_dtype = torch.bfloat16 if p.is_cuda else torch.float32
                update = newton_schulz(update, group["ns_steps"], dtype=ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class OptimizerChain(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one: what the trainer, the LR
    schedule (`param_groups`), GradScaler and checkpoints see. Muon + AdamW is the use."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.defaults: dict = {}
        self.state = {}  # per-parameter state lives in the inner optimizers
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def param_groups(self) -> list[dict]:  # the inner optimizers' own dicts: set_lr reaches them
        return [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {f"optimizer_{i}": opt.state_dict() for i, opt in enumerate(self.optimizers)}

    def load_state_dict(self, state_dict: dict) -> None:
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(state_dict[f"optimizer_{i}"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to `lr` times the group's "lr_scale" (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


__all__ = [
    "Muon",
    "OptimConfig",
    "OptimizerChain",
    "build_optimizer",
    "decayed_parameter_names",
    "lr_at",
    "param_groups",
    "set_lr",
]

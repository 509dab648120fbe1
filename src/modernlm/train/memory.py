"""Training memory: activation checkpointing of the transformer blocks, and the peak memory a run logs.

Activation checkpointing (`train.activation_checkpointing`: `none`, `selective` = every other block,
`full` = every block) keeps only a checkpointed block's input and recomputes its activations in the
backward. The Trainer applies it before torch.compile and DDP / FSDP (torchtitan's order); only the
blocks' `forward` changes, so checkpoints are the same with and without it.
`peak_memory_bytes` / `reset_peak_memory` give metrics.jsonl's `peak_mem_mib`: on CUDA the caching
allocator's peak, elsewhere the process's peak resident set size.

Design notes (what each mode saves, measured): docs/design.md#trainmemorypy
"""

from __future__ import annotations

import sys
import types
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM

ACMode = Literal["none", "full", "selective"]
AC_MODES: tuple[str, ...] = get_args(ACMode)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Make the transformer blocks of `model` recompute their activations in the backward (in place;
    returns `model`). mode: none | full (every block) | selective (every other block).

    The blocks are the `layers` of every ModernDecoderLM in `model`: the model itself, a verifier's
    backbone, the base model of a modernlm LoRA. A transformers model (LoRA finetuning) gets its own
    activation checkpointing instead (`_hf_activation_checkpointing`). Other models are refused.
    """
    if mode not in AC_MODES:
        raise UserError(f"train.activation_checkpointing: expected one of {', '.join(AC_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    stacks = [m.layers for m in model.modules() if isinstance(m, ModernDecoderLM)]
    if stacks:
        for layers in stacks:
            for i, block in enumerate(layers):
                if mode == "full" or i % 2 == 1:
                    block.forward = types.MethodType(_checkpointed_forward, block)
        return model
    _hf_activation_checkpointing(model, mode)
    return model


def _hf_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """A transformers model's own activation checkpointing (PEFT's wrappers pass the attribute
    through to the model they wrap): every layer, or every other one where transformers can
    (`activation_checkpointing_enable(every_n_layers=...)`; older ones have only the all-layers
    `gradient_checkpointing_enable`). It also turns the model's KV cache off while training."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    legacy = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None and legacy is None:
        raise UserError(
            f"train.activation_checkpointing={mode}: {type(model).__name__} has no transformer blocks to "
            "checkpoint (modernlm or transformers models); use train.activation_checkpointing=none"
        )
    if enable is None and mode == "selective":
        raise UserError(
            "train.activation_checkpointing=selective: this transformers version checkpoints all layers or "
            "none; use full or none"
        )
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, every_n_layers=1 if mode == "full" else 2)
        else:
            legacy(gradient_checkpointing_kwargs=kwargs)
    except ValueError as e:  # a model class without checkpointing support
        why = str(e).strip().splitlines()[0].rstrip(".")
        raise UserError(
            f"train.activation_checkpointing={mode}: {why}; use train.activation_checkpointing=none"
        ) from None


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward under torch.utils.checkpoint, installed as the block's own `forward`.

    Only in training with gradients on: evaluation and generation (no_grad, or a KV cache that a
    recompute would write twice) run the plain forward. use_reentrant=False is the variant that
    works with DDP, FSDP2, torch.compile and keyword arguments; the RNG state is saved and restored
    so dropout draws the same masks in the recompute and the gradients are the same as without AC.
    """
    forward = type(block).forward  # the class's: the block's real forward
    if not (block.training and torch.is_grad_enabled()):
        return forward(block, *args, **kwargs)
    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)


def is_checkpointed(block: nn.Module) -> bool:
    """Whether `apply_activation_checkpointing` made `block` recompute in the backward."""
    forward = block.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


# ---- peak memory -----------------------------------------------------------------------------


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the peak of tensor memory allocated on `device` since the last `reset_peak_memory`.
    Elsewhere: the peak resident set size of the process so far (0 where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (CUDA; the process RSS peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


__all__ = [
    "AC_MODES",
    "ACMode",
    "apply_activation_checkpointing",
    "is_checkpointed",
    "peak_memory_bytes",
    "reset_peak_memory",
]

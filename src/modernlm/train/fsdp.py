"""FSDP2 (`train.parallel=fsdp`): parameters, gradients and optimizer state sharded over the ranks.

`shard_model` applies `fully_shard` to each transformer block and then to the root, as torchtitan
does, so peak memory holds one block whole. Checkpoints go through `torch.distributed.checkpoint`
(each rank writes its own shards; the full weights are gathered once, on rank 0, for the usual
model.safetensors), and DCP reshards on load, so a run resumes on another number of ranks. One
process without a process group runs the model unsharded but writes the same checkpoint format.
Needs torch >= 2.6 (where `fully_shard` became public), checked only when train.parallel=fsdp.

Design notes: docs/design.md#trainfsdppy
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from modernlm.errors import UserError
from modernlm.runtime import Runtime, warn_once

if TYPE_CHECKING:
    from torch.distributed.checkpoint import CheckpointException

DISTRIBUTED_DIR = "distributed"  # a checkpoint's DCP shards (model + optimizer), one file per rank


def fsdp_api() -> Any:
    """torch.distributed.fsdp, where it has FSDP2's `fully_shard` (torch >= 2.6)."""
    try:
        from torch.distributed import fsdp
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise UserError(
            f"train.parallel=fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
            f"{torch.__version__}: upgrade torch or use train.parallel=ddp"
        ) from None
    return fsdp


def check_fsdp(runtime: Runtime, optim_name: str) -> None:
    """One-line UserErrors for what FSDP here does not support."""
    fsdp_api()
    if runtime.dtype == torch.float16:
        # fp16 needs a loss scaler that understands sharded gradients; bf16 needs none.
        raise UserError("train.parallel=fsdp: run.dtype=float16 is not supported; use run.dtype=bfloat16")
    if optim_name == "muon":
        # Muon orthogonalises whole matrices; a rank holds only a slice of each.
        raise UserError("train.parallel=fsdp: optim.name=muon needs whole matrices; use optim.name=adamw")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units sharded (and compiled) one by one: the transformer blocks (`model.layers`)."""
    layers = getattr(model, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def sharding() -> bool:
    """Whether there is a process group to shard over (torchrun with several ranks, or a caller's)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shard_model(model: nn.Module, runtime: Runtime, *, cpu_offload: bool = False) -> nn.Module:
    """Compile (run.compile) and fully_shard each block, then the root; in place, returns the model.
    Activation checkpointing, if any, must already be applied. No process group: compile only."""
    fsdp = fsdp_api()
    if runtime.compile:
        # as runtime.compile_model: MoE routing's data-dependent shapes stay in the graph
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        for block in blocks(model):
            block.compile()  # in place: the block keeps its name in the state dict
    if cpu_offload and (not sharding() or runtime.device.type == "cpu"):
        where = "in one process (nothing is sharded)" if not sharding() else "on the CPU (it is there already)"
        warn_once(f"train.fsdp_cpu_offload: ignored {where}")
        cpu_offload = False
    if not sharding():
        return model
    mp = fsdp.MixedPrecisionPolicy()
    if runtime.device.type == "cuda" and runtime.dtype == torch.bfloat16:
        # bf16 compute and all-gathers, fp32 gradient reduction (the sum of many bf16 gradients
        # would lose the small ones); the sharded weights and optimizer state stay fp32.
        mp = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = fsdp.CPUOffloadPolicy() if cpu_offload else fsdp.OffloadPolicy()
    for block in blocks(model):
        fsdp.fully_shard(block, mp_policy=mp, offload_policy=offload)
    fsdp.fully_shard(model, mp_policy=mp, offload_policy=offload)
    return model


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients on this backward (the last micro-batch), or accumulate them locally."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule (not in one process)
        model.set_requires_gradient_sync(sync)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (in-place ops on it change the DTensor); a tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """A DTensor's whole value on every rank (e.g. the gradient norm); a tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# ---- checkpoints -------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes one process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Write model + optimizer state to `path` with torch.distributed.checkpoint: collective, each
    rank writes its own shards, rank 0 the metadata last (a directory without .metadata is unread)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    path.mkdir(parents=True, exist_ok=True)
    with _quiet():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load model + optimizer state from a `save_sharded` directory, resharded to this run's ranks
    (sharded or plain model, any number of ranks). A directory that does not fit this run (other
    shapes or keys, a missing file) is a UserError on every rank; any other error propagates."""
    # Decided together: a rank that raised alone (say, on a node without the file) would leave the
    # others waiting in dcp.load's collectives.
    missing = _ranks_where(not (path / ".metadata").is_file())
    if missing:
        where = f" on rank {', '.join(map(str, missing))}" if sharding() else ""
        raise UserError(
            f"cannot resume from {path.parent}: {path.name}/.metadata is missing{where} (an incomplete checkpoint)"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:  # (a BaseException, not an Exception)
        # DCP gathers every rank's errors and raises the same CheckpointException on each: every
        # rank decides alike here, none is left in a collective.
        misfit = _misfit(e)
        if not misfit:
            raise  # an I/O error, a bug: not the user's, with its traceback
        raise UserError(f"cannot resume from {path.parent}: its {path.name}/ does not fit this run ({misfit})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _misfit(e: CheckpointException) -> str:
    """The first rank's error, if every rank's says the checkpoint does not fit this run; else "".
    DCP's planner raises ValueError "Size mismatch ..." (other shapes) and RuntimeError "Missing key
    ..." (another model or optimizer), its reader FileNotFoundError (a shard file missing). Bugs
    raise ValueError and RuntimeError too: only these messages count."""
    errors = [error for error, _ in e.failures.values()]
    known = [
        isinstance(x, FileNotFoundError)
        or (isinstance(x, (ValueError, RuntimeError)) and str(x).startswith(("Size mismatch", "Missing key")))
        for x in errors
    ]
    return str(errors[0]).strip().splitlines()[0] if errors and all(known) else ""


def _ranks_where(flag: bool) -> list[int]:
    """The ranks where `flag` holds (a collective under a process group; [0] or [] without)."""
    if not sharding():
        return [0] if flag else []
    flags = [False] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, flag)  # objects: no tensor device to pick (gloo or NCCL)
    return [rank for rank, f in enumerate(flags) if f]


class FullWeights:
    """What save_model_fn receives under FSDP: the model, whose `state_dict()` is the full weights
    gathered to rank 0 on the CPU (every other attribute, e.g. `config`, is the model's)."""

    def __init__(self, model: nn.Module, state: dict[str, Tensor]):
        self._model, self._state = model, state

    def state_dict(self) -> dict[str, Tensor]:
        return self._state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def full_weights(model: nn.Module) -> Any:
    """The model with its full weights for save_model_fn: gathered (collective; rank 0 gets them,
    on the CPU) when sharded, the model itself in one process."""
    if not sharding():
        return model

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return FullWeights(model, state)


__all__ = [
    "DISTRIBUTED_DIR",
    "FullWeights",
    "blocks",
    "check_fsdp",
    "fsdp_api",
    "full",
    "full_weights",
    "load_sharded",
    "local",
    "save_sharded",
    "set_grad_sync",
    "shard_model",
    "sharding",
]

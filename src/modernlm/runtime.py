"""Where and how a run executes: device, precision, seeding, DDP, rank-0 printing, peak FLOPs.

`setup_runtime(cfg)` turns the `run:` config section into a `Runtime`: it reads torchrun's
RANK / WORLD_SIZE / LOCAL_RANK, starts the process group (nccl on GPU, gloo on CPU), picks the
device and the autocast dtype. Everything else asks the `Runtime`, never the environment.

Devices: `auto` = cuda, else Apple's mps, else cpu. The autocast dtype: `auto` = bf16 on GPUs that
have it, else fp16 on CUDA; float32 on the CPU and on mps (whose 16-bit op coverage is still
partial: 16-bit there is an explicit choice, allowed where this torch can train in it).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from modernlm.errors import UserError


@dataclass
class RunConfig:
    out_dir: str = "runs"  # parent of the run directory
    name: str = ""  # run directory = out_dir/name; "" = the command's name (e.g. pretrain)
    seed: int = 1337  # seeds python, numpy and torch (per rank: seed + rank after model init)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto = cuda, else mps (Apple), else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
        "auto"  # autocast dtype; auto = bf16 on GPUs that have it, else fp16 on CUDA, fp32 on CPU and mps
    )
    compile: bool = False  # torch.compile the model
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look the GPU up (no MFU on CPU)
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed


# Dense bf16/fp16 tensor-core peak FLOP/s per device, from the vendors' datasheets (no sparsity).
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "RTX 3060": 51e12,
    "V100": 125e12,
    "T4": 65e12,
}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    compile: bool = False
    peak_flops: float = 0.0  # per device; 0 = unknown (no MFU)
    tensorboard: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast around forward and loss; a no-op in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print0(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)


def setup_runtime(cfg: RunConfig) -> Runtime:
    """Resolve device/dtype, join the process group under torchrun, seed everything."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    kind = auto_device() if cfg.device == "auto" else cfg.device
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device: cuda requested but no CUDA device is available (use run.device=cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("run.device: mps requested but this torch / Mac has no MPS (use run.device=cpu)")
    if kind == "mps" and world_size > 1:
        raise UserError("run.device: mps trains in one process (one Apple GPU, no NCCL); run without torchrun")
    use_cuda = kind == "cuda"
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # TF32 matmuls: free speed for fp32 parts on Ampere+, precision is ample for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(kind)

    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None
        )

    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    return Runtime(
        device=device,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        compile=cfg.compile,
        peak_flops=cfg.peak_flops or lookup_peak_flops(device, dtype),
        tensorboard=cfg.tensorboard,
    )


def auto_device() -> str:
    """The device type "auto" means: cuda, else mps (Apple silicon), else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(device: str) -> torch.device:
    """ "auto" -> `auto_device()`; anything else as torch reads it."""
    if device == "auto":
        return torch.device(auto_device())
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device: {device!r} requested but MPS is not available")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU, and mps (see the module docstring)
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("run.dtype: float16 autocast needs a GPU; use bfloat16 or float32 on CPU")
    if device.type == "mps" and dtype != torch.float32:
        problem = mps_autocast_problem(dtype)
        if problem:
            raise UserError(f"run.dtype: {name} on mps {problem}; use run.dtype=float32")
    return dtype


def mps_autocast_problem(dtype: torch.dtype) -> str:
    """Why this torch cannot train in `dtype` autocast on mps; "" when it can. Autocast on mps came
    in torch 2.5 (float16) and 2.6 (bfloat16, which Metal has from macOS 14); float16 also needs
    loss scaling, whose GradScaler runs on mps from torch 2.8."""
    need = (2, 8) if dtype == torch.float16 else (2, 6)
    if torch.__version__ < need:
        return f"needs torch >= {need[0]}.{need[1]} (this is {torch.__version__})"
    if dtype == torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        return "needs macOS 14 or newer"
    return ""


def lookup_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of this GPU from PEAK_FLOPS (bf16/fp16 numbers; fp32 runs report MFU against
    them too, as everyone compares against the tensor-core peak). 0 when unknown or on CPU."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup(runtime: Runtime) -> None:
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- RNG state, as plain types and tensors so torch.load(weights_only=True) can read it --------


def rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()  # dropout on mps draws from its own generator
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


_warned: set[str] = set()


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: freed pages are reused, only later
        return None


def release_freed_memory() -> None:
    """Collect, then ask glibc to hand its free heap pages back to the system. After a load frees
    many temporaries (a .gguf reader's ~100k small arrays; a quantizer's float copies) glibc keeps
    the pages, which count as the process's memory from then on: 0.3-0.8 GB more, varying from run
    to run, under a quantized SmolLM2."""
    gc.collect()
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@contextlib.contextmanager
def short_lived_buffers():
    """`with short_lived_buffers():` a load that makes and frees many large temporaries (a
    quantizer's chunks of float rows) gives each one over 128 KiB pages of its own, returned as
    soon as it is freed. glibc's default raises that threshold to the size of the largest block
    freed so far, after which such blocks come from heaps it keeps: a quantized SmolLM2's load
    then peaked at 0.48-0.88 GB over eight runs, at 0.47 GB in every run with this (RESULTS.md).
    On exit the thresholds are set where glibc's own rule leaves them after such a load (large
    blocks reused, not mapped afresh per forward: held at 128 KiB, a 4-bit model's prefill of 16
    prompts took 8-10 s where it takes 5-6), and the free pages are handed back."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling for its own rule (64-bit)
            libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)  # twice it, as that rule sets
        release_freed_memory()


def warn_once(message: str) -> None:
    """A warning that could repeat every step is shown once per process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`with eval_mode(model):` runs the block with the model in eval mode (dropout off) and puts
    back the training mode it had on entry, on normal exit and on an exception alike."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def compile_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """torch.compile, set up so the whole forward is one graph (no break per layer).

    MoE routing has data-dependent shapes (which tokens chose expert e); letting dynamo capture
    such ops keeps it in the graph instead of breaking at every expert of every layer.
    """
    import torch._dynamo  # here, not at the top: importing it costs a process ~70 MB (a server that never compiles)

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, **kwargs)


__all__ = [
    "PEAK_FLOPS",
    "RunConfig",
    "Runtime",
    "auto_device",
    "cleanup",
    "compile_model",
    "eval_mode",
    "lookup_peak_flops",
    "mps_autocast_problem",
    "resolve_device",
    "resolve_dtype",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "setup_runtime",
    "warn_once",
]

"""The decoding kernels of decode.cpp, built on first use, and their fallbacks.

    from modernlm import kernels
    if kernels.available():                      # builds once per machine (~1 min), then loads
        y = kernels.linear_q8(x, qp, sp)         # x (M, K) float32 -> (M, N), weights in pack_q8's form

The ops are registered as `torch.ops.modernlm.*` with shape functions, so `torch.compile` treats each
as one opaque call. They run on the CPU, in float32, for inference; callers check `usable(x)` and
fall back to PyTorch's own ops elsewhere (CUDA, bfloat16, autograd). The build needs a C++ compiler
(one call, ~20 s, cached); where it fails, decoding still works, slower, and one line says why.
MODERNLM_KERNELS=0 switches them off (to compare, or to rule them out).

Design notes: docs/design.md#kernels
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("modernlm.kernels")
_SOURCE = Path(__file__).with_name("decode.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried; "why": the failure


def available() -> bool:
    """True once the kernels are built and loaded (built here on the first call of the process)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
    return bool(_state["ok"])


def _build() -> bool:
    if os.environ.get("MODERNLM_KERNELS", "1") == "0":
        _state["why"] = "MODERNLM_KERNELS=0"
        return False
    if hasattr(torch.ops.modernlm, "linear_q8"):  # loaded already (another copy of this module)
        return True
    try:
        torch.ops.load_library(str(library()))
    except Exception as e:  # no compiler, a compiler error: decode with PyTorch's ops
        why = str(e).strip().splitlines()
        _state["why"] = why[-1][:300] if why else type(e).__name__
        log.warning("modernlm: decoding kernels unavailable (%s); using PyTorch's ops", _state["why"])
        return False
    _register_fakes()
    return True


def compile_command(out: Path, march: str = "native", source: Path = _SOURCE) -> list[str]:
    """The one compiler call that builds decode.cpp (or `source`, another version of it) into `out`
    (`c++`, or $CXX): only a C++17 compiler is needed, and PyTorch's own headers. `march` picks the
    instructions (tests build the AVX2 and portable paths with it)."""
    torch_dir = Path(torch.__file__).parent
    include = torch_dir / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include")]  # fmt: skip
    libs = ["-L", str(torch_dir / "lib"), "-lc10", "-ltorch_cpu"]
    return [os.environ.get("CXX", "c++"), *flags, str(source), "-o", str(out), *libs]


def library() -> Path:
    """decode.cpp built into a shared library, once per source, torch and compiler: cached in
    $MODERNLM_KERNELS_DIR, else ~/.cache/modernlm/kernels."""
    command = compile_command(Path("OUT"))
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), torch.__version__.encode(), " ".join(command).encode()]))
    where = Path(os.environ.get("MODERNLM_KERNELS_DIR") or Path.home() / ".cache" / "modernlm" / "kernels")
    library = where / f"modernlm_decode-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    where.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")  # another process may be building it too
    done = subprocess.run(compile_command(partial), capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
        raise RuntimeError(f"{command[0]} failed: {errors[0] if errors else done.returncode}")
    os.replace(partial, library)  # whole or absent: a killed build leaves no half library
    return library


def why_not() -> str:
    """Why `available()` is False ('' when it is True or was not asked)."""
    return str(_state.get("why", ""))


def usable(x: Tensor) -> bool:
    """Whether the kernels can run on activations x: CPU float32, outside autograd, built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and available()


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (no data is touched)."""

    def rows_by(x: Tensor, n: int) -> Tensor:
        return x.new_empty(x.size(0), n)

    torch.library.register_fake("modernlm::linear_f32")(lambda x, w: rows_by(x, w.size(0)))
    torch.library.register_fake("modernlm::linear_q8")(lambda x, qp, sp: rows_by(x, 16 * qp.size(0)))
    torch.library.register_fake("modernlm::linear_q4")(lambda x, q, s, m: rows_by(x, q.size(0)))
    torch.library.register_fake("modernlm::paged_attention")(lambda q, k, v, t, n, scale: torch.empty_like(q))
    torch.library.register_fake("modernlm::decode_layers")(lambda x, *rest: torch.empty_like(x))


def linear_f32(x: Tensor, w: Tensor) -> Tensor:
    return torch.ops.modernlm.linear_f32(x, w)


def linear_q8(x: Tensor, qp: Tensor, sp: Tensor) -> Tensor:
    """x (M, K) float32 times Q8_0 weights in quant.pack_q8's form -> (M, 16 G); x rounded to 8 bits."""
    return torch.ops.modernlm.linear_q8(x, qp, sp)


def linear_q4(x: Tensor, q: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    return torch.ops.modernlm.linear_q4(x, q, scales, mins)


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, table: Tensor, lengths: Tensor, scale: float) -> Tensor:
    return torch.ops.modernlm.paged_attention(q, k_pool, v_pool, table, lengths, scale)


# a linear layer's kind in decode_layers' layout: float32 w; Q8_0 packed (qp, sp); Q4_1 (q, scales, mins)
F32, Q8, Q4 = 0, 1, 2


def decode_layers(x: Tensor, weights: list[Tensor], layout: list[int], cos: Tensor, sin: Tensor, k_pools: list[Tensor],
                  v_pools: list[Tensor], table: Tensor, lengths: Tensor, n_head: int, eps: float) -> Tensor:
    """One decode step through every layer, x (B, C) -> (B, C), writing each row's new key and value
    into the pools; see decode.cpp for the layout (ModernDecoderLM._step_weights builds it)."""
    return torch.ops.modernlm.decode_layers(x, weights, layout, cos, sin, k_pools, v_pools, table, lengths, n_head, eps)

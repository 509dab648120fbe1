"""The decoding kernels of decode.cpp, built on first use, and their fallbacks.

    from modernlm import kernels
    if kernels.available():                      # builds once per machine (~1 min), then loads
        y = kernels.linear_q8(x, q, scales)      # x (M, K) float32 -> (M, N)

The ops are registered as `torch.ops.modernlm.*` with shape functions, so `torch.compile` treats each
as one opaque call. They run on the CPU, in float32, for inference; callers check `usable(x)` and
fall back to PyTorch's own ops elsewhere (CUDA, bfloat16, autograd). The build needs a C++ compiler
and ninja (the `ninja` package); where it fails, decoding still works, slower, and one line says why.
MODERNLM_KERNELS=0 switches them off (to compare, or to rule them out).

Design notes: docs/design.md#kernels
"""

from __future__ import annotations

import logging
import os
import sys
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
    path = list(sys.path)
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-march=native", "-fopenmp"]
        cpp_extension.load(
            name="modernlm_decode", sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=False,
        )  # fmt: skip
    except Exception as e:  # no compiler, no ninja, a compiler error: decode with PyTorch's ops
        why = str(e).strip().splitlines()
        _state["why"] = why[-1] if why else type(e).__name__
        log.warning("modernlm: decoding kernels unavailable (%s); using PyTorch's ops", _state["why"])
        return False
    finally:
        # cpp_extension imports setuptools, which puts its vendored packages on sys.path: they would
        # then pass for installed distributions (importlib.metadata) in this process
        sys.path[:] = path
    _register_fakes()
    return True


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
    torch.library.register_fake("modernlm::linear_q8")(lambda x, q, s: rows_by(x, q.size(0)))
    torch.library.register_fake("modernlm::linear_q4")(lambda x, q, s, m: rows_by(x, q.size(0)))
    torch.library.register_fake("modernlm::paged_attention")(lambda q, k, v, t, n, scale: torch.empty_like(q))


def linear_f32(x: Tensor, w: Tensor) -> Tensor:
    return torch.ops.modernlm.linear_f32(x, w)


def linear_q8(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    return torch.ops.modernlm.linear_q8(x, q, scales)


def linear_q4(x: Tensor, q: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    return torch.ops.modernlm.linear_q4(x, q, scales, mins)


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, table: Tensor, lengths: Tensor, scale: float) -> Tensor:
    return torch.ops.modernlm.paged_attention(q, k_pool, v_pool, table, lengths, scale)

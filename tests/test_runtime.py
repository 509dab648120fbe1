"""runtime helpers: eval_mode, resolve_device."""

from __future__ import annotations

import pytest
import torch

from modernlm.errors import UserError
from modernlm.runtime import eval_mode, resolve_device


def test_eval_mode_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training and model[1].training

    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training and model[1].training  # restored on an exception too

    model.eval()
    with eval_mode(model):
        assert not model.training
    assert not model.training  # a model that was in eval mode stays in it


def test_eval_mode_nests():
    model = torch.nn.Linear(2, 2)
    with eval_mode(model):
        with eval_mode(model):
            assert not model.training
        assert not model.training  # the inner block restores the outer block's (eval) mode
    assert model.training


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(UserError, match="device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


CHURN = r"""
import ctypes, os, sys
from modernlm.runtime import _glibc, short_lived_buffers
libc = _glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

def churn():
    # what a quantizer's load does: a large block freed (glibc then serves blocks up to its size
    # from the heap), then many 1 MiB chunks made and freed while later allocations stay
    big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
    blocks = [libc.malloc(1 << 20) for _ in range(64)]
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    kept = libc.malloc(1 << 20)  # after the chunks in the heap: they are not its top, to be trimmed
    ctypes.memset(kept, 1, 1 << 20)
    held = rss()
    for b in blocks:
        libc.free(b)
    returned = held - rss()
    libc.free(kept)
    return returned

if sys.argv[1] == "during":
    with short_lived_buffers():
        print(churn() >> 20)
elif sys.argv[1] == "after":
    with short_lived_buffers():
        pass
    print(churn() >> 20)
else:
    print(churn() >> 20)
"""


@pytest.mark.parametrize("when, returns", [("glibc's own rule", False), ("during", True), ("after", False)])
def test_short_lived_buffers_return_each_large_block_as_it_is_freed(when, returns):
    """Under `short_lived_buffers` glibc maps every block over 128 KiB apart, so 64 MiB of chunks
    freed go back to the system at once; under glibc's own rule (before, and after the block: a
    forward's large buffers are then reused, not mapped afresh) they stay the process's memory."""
    import subprocess
    import sys

    from modernlm.runtime import _glibc

    if _glibc() is None:
        pytest.skip("not glibc")
    done = subprocess.run([sys.executable, "-c", CHURN, when], capture_output=True, text=True, check=True)
    returned_mib = int(done.stdout)
    assert returned_mib >= 60 if returns else returned_mib <= 4, returned_mib

"""Shared fixtures: tiny model configs (CPU, milliseconds) and the path to ../shared/data; under CI,
a skip that does not say it needs CUDA fails the run (the hooks at the end)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

from modernlm.model import ModelConfig

# pytester: tests/test_ci_skips.py runs inner pytest sessions to test the CI hooks below.
pytest_plugins = ["pytester"]

# A test runner started as a background job of a non-interactive shell inherits SIGINT ignored, and
# so would every subprocess a test starts: the interrupt tests (tests/test_interrupt.py) need Ctrl-C
# to be a real Ctrl-C, in this process and in the `modernlm` processes they signal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The project's datasets live beside the checkout (../shared/data); tests read, never copy, them.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(**overrides) -> ModelConfig:
    kw = dict(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32)
    kw.update(overrides)
    return ModelConfig(**kw)


# The variants every model-level invariant is checked on.
VARIANTS = {
    "mha": dict(n_kv_head=4),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "untied": dict(tie_embeddings=False),
    "moe": dict(n_expert=4, n_expert_per_token=2, moe_layers=[1]),
    "sink": dict(attn_sink=True),
}


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant_config(request) -> ModelConfig:
    return tiny_config(**VARIANTS[request.param])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


# Tiny models run faster on one thread: with two, synchronisation costs more than the matmuls.
torch.set_num_threads(1)


# ---- CI: no silent skips ---------------------------------------------------------------------------
# A skip hides missing proof: a package the lock should have, data that is not where the test looks,
# a browser CI could not install. Under CI (the environment variable CI=true, as CI services set it)
# such a skip fails the run instead, naming its reason; only a skip whose reason says it needs CUDA
# stays a skip (CI has no GPU: tests/test_gpu.py's "needs CUDA"). Without CI skips stay skips.
# Tested in tests/test_ci_skips.py.
CI_ALLOWED_SKIP = re.compile(r"\bCUDA\b")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _fail_a_silent_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not _in_ci():
        return  # xfail reports are "skipped" too: they are not skips
    where, reason = "", str(report.longrepr)
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        path, line, reason = report.longrepr
        where = f" ({path}:{line})"
    reason = reason.removeprefix("Skipped: ")
    if CI_ALLOWED_SKIP.search(reason):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, which fails the run: {reason}{where}\n"
        "(in CI only a skip whose reason says it needs CUDA may skip; install what the test needs)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_a_silent_skip(report)  # pytest.skip in a test or fixture, skip/skipif marks
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_a_silent_skip(report)  # a module-level pytest.importorskip / pytest.skip(allow_module_level)
    return report

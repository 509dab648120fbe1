"""Shared fixtures: tiny model configs (CPU, milliseconds) and the path to ../shared/data."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from modernlm.model import ModelConfig

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

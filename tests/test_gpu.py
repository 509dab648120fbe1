"""CUDA checks (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modernlm.model import ModernDecoderLM
from modernlm.runtime import compile_model
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_flash_sdpa_matches_math_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = ModernDecoderLM(tiny_config(d_model=128, n_head=2, n_kv_head=1)).cuda().to(torch.bfloat16)
    idx = torch.randint(0, 64, (2, 32), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = model(idx).logits.float()
    with sdpa_kernel(SDPBackend.MATH):
        math = model(idx).logits.float()
    torch.testing.assert_close(flash, math, rtol=0.02, atol=0.02)


def test_bf16_autocast_and_compile_match_eager():
    model = ModernDecoderLM(tiny_config(n_expert=4, moe_layers=[1])).cuda()
    idx = torch.randint(0, 64, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(idx).logits.float()
        compiled = compile_model(model)(idx).logits.float()
        loss = F.cross_entropy(compiled.flatten(0, 1), idx.flatten())
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

"""Each building block against its textbook formula, written out naively."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modernlm.model import Attention, ModernDecoderLM, RMSNorm, SwiGLU
from tests.conftest import tiny_config


def test_rmsnorm_matches_formula():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_swiglu_matches_formula():
    ffn = SwiGLU(16, 48)
    x = torch.randn(4, 16)
    w_gate, w_up = ffn.w_gate_up.weight.chunk(2)  # stacked [gate; up] by rows
    gate, up = x @ w_gate.T, x @ w_up.T
    expected = (gate * torch.sigmoid(gate) * up) @ ffn.w_down.weight.T
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)


def test_attention_matches_naive_softmax_with_gqa():
    cfg = tiny_config(n_head=4, n_kv_head=2)
    model = ModernDecoderLM(cfg)
    attn: Attention = model.layers[0].attn
    B, T, H, K, D = 2, 7, 4, 2, cfg.head_dim
    x = torch.randn(B, T, cfg.d_model)
    cos, sin = model.rope(0, T)

    def rope(t):  # rotate-half RoPE, written out
        t1, t2 = t[..., : D // 2], t[..., D // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    wq, wk, wv = attn.wqkv.weight.split([H * D, K * D, K * D])  # stacked [q; k; v] by rows
    q = rope((x @ wq.T).view(B, T, H, D).transpose(1, 2))
    k = rope((x @ wk.T).view(B, T, K, D).transpose(1, 2))
    v = (x @ wv.T).view(B, T, K, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)  # query head h uses kv head h // 2
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, H * D) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, (cos, sin)), y, rtol=1e-5, atol=1e-6)

"""ModernDecoderLM invariants: causality, cache == full forward, GQA == MHA, RoPE, MoE, sinks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modernlm.model import ModelConfig, ModernDecoderLM, MoE, apply_rope
from tests.conftest import tiny_config


def make(cfg: ModelConfig) -> ModernDecoderLM:
    return ModernDecoderLM(cfg).eval()


def test_shapes_and_finite(variant_config):
    model = make(variant_config)
    out = model(torch.randint(0, 64, (3, 11)))
    assert out.logits.shape == (3, 11, 64)
    assert torch.isfinite(out.logits).all()
    assert (out.aux_loss is not None) == (variant_config.n_expert > 0)


def test_causality(variant_config):
    """Changing token t never changes the logits before t."""
    model = make(variant_config)
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 64
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4  # ...and does change the later ones


def test_kv_cache_decode_equals_full_forward(variant_config):
    model = make(variant_config)
    idx = torch.randint(0, 64, (2, 20))
    full = model(idx).logits
    cache = model.new_cache(2, 20)
    pieces = [model(idx[:, :7], cache=cache).logits]  # prefill
    pieces.append(model(idx[:, 7:10], cache=cache).logits)  # a multi-token chunk after the prefill
    pieces += [model(idx[:, t : t + 1], cache=cache).logits for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)


def test_rolling_cache_without_eviction_equals_plain_cache(variant_config):
    """Keys cached before RoPE and rotated by slot give the same result while nothing is evicted."""
    model = make(variant_config)
    idx = torch.randint(0, 64, (2, 12))
    full = model(idx).logits
    cache = model.new_cache(2, 0, window=64, sink_size=4, chunk=4)
    pieces = [model(idx[:, t : t + 4], cache=cache).logits for t in range(0, 12, 4)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)


def test_rolling_cache_memory_is_flat():
    cfg = tiny_config(max_seq_len=16)
    model = make(cfg)
    cache = model.new_cache(1, 0, window=8, sink_size=4, chunk=1)
    start = cache.memory_bytes()
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(4 * cfg.max_seq_len):
            logits = model(token, cache=cache).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            assert cache.length <= 4 + 8
    assert cache.memory_bytes() == start
    assert cache.seen == 4 * cfg.max_seq_len
    assert torch.isfinite(logits).all()


def test_left_padding_equals_unpadded(variant_config):
    model = make(variant_config)
    idx = torch.randint(0, 64, (2, 12))
    pad_mask = torch.ones(2, 12, dtype=torch.bool)
    pad_mask[0, :5] = False
    padded = model(idx, pad_mask=pad_mask).logits
    torch.testing.assert_close(padded[0, 5:], model(idx[:1, 5:]).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[1], model(idx[1:]).logits[0], rtol=0, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals the MHA model whose K/V heads are copies of the shared ones."""
    gqa = make(tiny_config(n_kv_head=2))
    mha = make(tiny_config(n_kv_head=4))
    state = gqa.state_dict()
    D = gqa.config.head_dim
    for key in list(state):
        if key.endswith("attn.wqkv.weight"):
            q, k, v = state[key].view(4 + 2 + 2, D, -1).split([4, 2, 2])  # heads of q, k, v
            # kv head j serves query heads 2j and 2j+1
            state[key] = torch.cat([q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)]).flatten(0, 1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(mha(idx).logits, gqa(idx).logits, rtol=0, atol=1e-6)


def test_explicit_n_kv_head_equal_n_head_is_mha():
    assert tiny_config(n_kv_head=0).n_kv_head == 4
    a = make(tiny_config(n_kv_head=4))
    b = make(tiny_config(n_kv_head=0))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(a(idx).logits, b(idx).logits)


def test_rope_depends_only_on_relative_position():
    model = make(tiny_config())
    D = model.config.head_dim
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m: int, n: int) -> float:
        cq, sq = model.rope(m, 1)
        ck, sk = model.rope(n, 1)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(7, 7) == pytest.approx((q * k).sum().item(), abs=1e-5)  # no rotation at distance 0
    assert abs(score(5, 2) - score(6, 2)) > 1e-4
    # rotation preserves norms
    c, s = model.rope(9, 1)
    assert apply_rope(q, c, s).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rope_matches_complex_formulation():
    """Rotate-half RoPE == multiplying (x_i, x_{i+D/2}) pairs by e^{i pos theta_i} (Su et al.)."""
    model = make(tiny_config())
    D, T = model.config.head_dim, 6
    x = torch.randn(1, 1, T, D)
    cos, sin = model.rope(0, T)
    theta = 10000.0 ** (-torch.arange(0, D, 2).float() / D)  # (D/2,)
    angles = torch.arange(T).float()[:, None] * theta  # (T, D/2)
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-5)


def test_moe_sends_each_token_to_exactly_k_experts_and_mixes_them():
    cfg = tiny_config(n_expert=4, n_expert_per_token=2)
    moe = MoE(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    probs, weights, experts = moe.route(x.view(-1, cfg.d_model))
    assert experts.shape == (10, 2)
    assert all(len(set(row.tolist())) == 2 for row in experts)  # k distinct experts per token
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))
    out, aux = moe(x)
    flat = x.view(-1, cfg.d_model)
    manual = torch.stack(
        [sum(weights[n, j] * moe.experts[int(experts[n, j])](flat[n]) for j in range(2)) for n in range(10)]
    )
    torch.testing.assert_close(out.view(-1, cfg.d_model), manual, rtol=1e-5, atol=1e-6)
    # Switch-Transformer balancing loss, by hand: E * sum_e (share of assignments) * (mean prob)
    E = cfg.n_expert
    share = [sum(int(e == i) for e in experts.flatten().tolist()) / 20 for i in range(E)]
    mean_prob = [probs[:, i].mean().item() for i in range(E)]
    assert aux.item() == pytest.approx(E * sum(f * p for f, p in zip(share, mean_prob, strict=False)), rel=1e-5)


def test_moe_aux_loss_is_one_when_routing_is_uniform_and_reaches_the_output():
    cfg = tiny_config(n_expert=4, n_expert_per_token=1, moe_aux_loss_coef=0.5)
    model = make(cfg)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.ffn.router.weight)  # every expert equally likely
    out = model(torch.randint(0, 64, (2, 8)))
    # 2 MoE layers, each aux == 1 under uniform probabilities, times the coefficient
    assert out.aux_loss.item() == pytest.approx(2 * 0.5 * 1.0, rel=1e-6)


def test_moe_layers_selects_layers():
    model = make(tiny_config(n_expert=4, moe_layers=[1]))
    assert [layer.is_moe for layer in model.layers] == [False, True]


def test_sink_token_is_learned_and_used():
    model = make(tiny_config(attn_sink=True))
    idx = torch.randint(0, 64, (2, 8))
    before = model(idx).logits
    with torch.no_grad():
        model.sink.add_(1.0)
    assert (model(idx).logits - before).abs().max() > 1e-4
    model.train()
    F.cross_entropy(model(idx).logits.flatten(0, 1), idx.flatten()).backward()
    assert model.sink.grad is not None and model.sink.grad.abs().sum() > 0


def test_dropout_only_in_training():
    model = make(tiny_config(dropout=0.5, attn_dropout=0.5))
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(model(idx).logits, model(idx).logits)
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)


def test_init_rules():
    cfg = tiny_config(n_layer=8, d_model=128, n_head=4, init_std=0.02)
    model = ModernDecoderLM(cfg)
    assert model.layers[0].attn.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].attn.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.layers[0].ffn.w_down.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(128))
    assert model.lm_head.weight is model.tok_emb.weight


def test_param_count_and_flops():
    cfg = tiny_config(n_kv_head=2, tie_embeddings=False)
    model = ModernDecoderLM(cfg)
    C, V, D, F_ = cfg.d_model, cfg.vocab_size, cfg.head_dim, cfg.d_ff
    per_layer = C * (4 + 2 * 2) * D + 4 * D * C + 3 * C * F_ + 2 * C
    expected = 2 * V * C + cfg.n_layer * per_layer + C
    assert model.num_params() == expected
    assert model.num_params(exclude_embedding=True) == expected - V * C
    T = 16
    assert model.flops_per_token(T) == 6 * (expected - V * C) + 12 * cfg.n_layer * cfg.n_head * D * T
    moe = ModernDecoderLM(tiny_config(n_expert=4, n_expert_per_token=1))
    expert = sum(p.numel() for p in moe.layers[0].ffn.experts[0].parameters())
    assert moe.num_params() - moe.num_params(active=True) == cfg.n_layer * 3 * expert


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="n_expert_per_token"):
        ModelConfig(n_expert=2, n_expert_per_token=3)
    assert ModelConfig(d_model=256).d_ff == 704  # 8/3 * 256 = 682.7 -> next multiple of 64


@pytest.mark.parametrize("variant", ["gqa", "sink", "moe"])
def test_torch_compile_traces_without_graph_breaks(variant):
    import torch._dynamo

    from tests.conftest import VARIANTS

    torch._dynamo.reset()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True  # what compile_model sets
    model = ModernDecoderLM(tiny_config(**VARIANTS[variant]))
    explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 16)))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_bf16_autocast_close_to_fp32_and_trains():
    model = ModernDecoderLM(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    ref = model(idx).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx).logits
        loss = F.cross_entropy(out.float().flatten(0, 1), idx.flatten())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

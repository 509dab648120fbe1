"""optim.py: the LR schedule against hand-computed values, AdamW groups, and parity with torch.optim.AdamW."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modernlm.model import ModernDecoderLM
from modernlm.train.optim import (
    OptimConfig,
    build_optimizer,
    decayed_parameter_names,
    lr_at,
    newton_schulz,
    set_lr,
)
from tests.conftest import tiny_config


def sched(**kw) -> OptimConfig:
    base = dict(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    base.update(kw)
    return OptimConfig(**base)


def test_warmup_is_linear_and_reaches_peak():
    cfg = sched(schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(4, cfg, 110) == pytest.approx(0.5)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)


def test_cosine_start_midpoint_end_and_floor():
    cfg = sched(schedule="cosine")
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    # midpoint of the 100 decay steps: floor + (peak - floor) * (1 + cos(pi/2)) / 2
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert lr_at(35, cfg, 110) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)  # holds at the floor past the end


def test_wsd_plateau_then_linear_decay_to_floor():
    cfg = sched(
        schedule="wsd", decay_fraction=0.2
    )  # 110 steps: decay over the last 22, from step 88
    assert lr_at(50, cfg, 110) == pytest.approx(1.0)
    assert lr_at(87, cfg, 110) == pytest.approx(1.0)
    assert lr_at(88, cfg, 110) == pytest.approx(1.0)
    assert lr_at(99, cfg, 110) == pytest.approx(0.55)  # half-way through the decay
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(200, cfg, 110) == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert lr_at(0, sched(schedule="constant", warmup_steps=0), 10) == 1.0
    assert lr_at(99, sched(schedule="constant"), 10) == 1.0
    assert lr_at(0, sched(schedule="cosine", warmup_steps=0), 100) == pytest.approx(1.0)


def test_decay_groups_skip_norms_embeddings_and_sink():
    model = ModernDecoderLM(
        tiny_config(attn_sink=True, n_expert=2, n_expert_per_token=1, moe_layers=[1])
    )
    decayed = set(decayed_parameter_names(model))
    expected = {n for n, p in model.named_parameters() if p.ndim == 2 and n != "tok_emb.weight"}
    assert decayed == expected
    assert "layers.0.attn.wqkv.weight" in decayed and "layers.1.ffn.router.weight" in decayed
    assert not any("norm" in n for n in decayed)
    assert "tok_emb.weight" not in decayed and "sink" not in decayed
    # tied: the LM head is the embedding, named once, not decayed
    assert "lm_head.weight" not in decayed


def test_untied_lm_head_is_decayed_but_embedding_is_not():
    decayed = set(decayed_parameter_names(ModernDecoderLM(tiny_config(tie_embeddings=False))))
    assert "lm_head.weight" in decayed and "tok_emb.weight" not in decayed


def test_build_optimizer_matches_torch_adamw_configured_by_hand():
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(tie_embeddings=False))
    reference = copy.deepcopy(model)
    cfg = OptimConfig(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ours = build_optimizer(model, cfg)

    named = dict(reference.named_parameters())
    decay = [p for n, p in named.items() if p.ndim >= 2 and n != "tok_emb.weight"]
    no_decay = [p for n, p in named.items() if p.ndim < 2 or n == "tok_emb.weight"]
    theirs = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        for m, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            m(idx).logits.square().mean().backward()
            opt.step()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    # and the step really changed the weights (so the comparison is not vacuous)
    assert not torch.equal(
        model.tok_emb.weight, ModernDecoderLM(tiny_config(tie_embeddings=False)).tok_emb.weight
    )


def test_fused_is_auto_off_on_cpu():
    opt = build_optimizer(ModernDecoderLM(tiny_config()), OptimConfig())
    assert not opt.defaults.get("fused")


def test_invalid_values_rejected():
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=2)


def _loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=g)
    return model(x).logits.float().square().mean()


def test_newton_schulz_orthogonalises():
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(newton_schulz(g, dtype=dtype).float())
        assert 0.6 < s.min() and s.max() < 1.3  # about U V^T: every singular value near 1
    s = torch.linalg.svdvals(newton_schulz(g.T))
    assert 0.6 < s.min() and s.max() < 1.3


def test_muon_takes_hidden_matrices_and_matches_torch_muon_plus_adamw(monkeypatch):
    import modernlm.train.optim as optim

    # torch.optim.Muon always iterates in bfloat16; ours does so on CUDA only: compare in bf16
    float32_ns = optim.newton_schulz
    monkeypatch.setattr(optim, "newton_schulz", lambda g, steps, dtype=None: float32_ns(g, steps, dtype=torch.bfloat16))
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(tie_embeddings=False, attn_sink=True))
    ref = copy.deepcopy(model)
    cfg = OptimConfig(name="muon", lr=0.02, weight_decay=0.1, betas=(0.9, 0.95))
    opt = build_optimizer(model, cfg)
    muon_params = opt.optimizers[0].param_groups[0]["params"]
    muon_names = {n for n, p in model.named_parameters() if any(p is q for q in muon_params)}
    # hidden matrices only: not the embedding, not the output layer, not norms or the sink
    assert muon_names == {n for n in decayed_parameter_names(model) if n != "lm_head.weight"}
    assert all(".w" in n for n in muon_names)
    # the same steps by hand with torch's optimizers
    named = dict(ref.named_parameters())
    muon = torch.optim.Muon(
        [named[n] for n in sorted(muon_names, key=list(named).index)],
        lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    decay = [named["lm_head.weight"]]
    no_decay = [p for n, p in named.items() if n not in muon_names and n != "lm_head.weight"]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=0.02, betas=(0.9, 0.95)
    )
    for step in range(3):
        for m, optimizers in ((model, [opt]), (ref, [muon, adamw])):
            _loss(m, step).backward()
            for o in optimizers:
                o.step()
                o.zero_grad()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_muon_chain_lr_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config())
    opt = build_optimizer(model, OptimConfig(name="muon", lr=0.01))
    set_lr(opt, 0.005)
    assert {g["lr"] for o in opt.optimizers for g in o.param_groups} == {0.005}
    _loss(model).backward()
    opt.step()
    other_model = copy.deepcopy(model)
    other = build_optimizer(other_model, OptimConfig(name="muon", lr=0.01))
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save + torch.load would
    set_lr(other, 0.005)
    for m, o in ((model, opt), (other_model, other)):
        o.zero_grad()
        _loss(m, 1).backward()
        o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), other_model.named_parameters(), strict=True):
        assert torch.equal(p, q), n

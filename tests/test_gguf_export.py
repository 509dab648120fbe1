"""gguf_export / `modernlm convert --to gguf`: what llama.cpp reads, checked without llama.cpp.

transformers reads .gguf files too (its own GGUF loader, which undoes llama.cpp's q/k row order):
our f32 file gives our logits through it exactly, its f16 file the logits of our weights rounded
to f16, and its tokenizer our token ids. The file's own fields are compared with the tokenizer's
(every token string and type, the special ids, the merges, the template) and the q/k rows with
llama.cpp's `permute` written out in numpy. Mutations show the tests can fail: a file written with
the rows in our order, or with a special id off by one. tests/test_gguf_llama_cpp.py runs the files
in llama.cpp itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modernlm import gguf_weights, kernels
from modernlm.chat import CHATML_TEMPLATE, IM_END
from modernlm.checkpoint import save_model
from modernlm.hf import gguf_export
from modernlm.hf.gguf_export import modelfile, write_gguf
from modernlm.model import ModelConfig, ModernDecoderLM
from modernlm.tokenizer import train_bpe
from tests.quant_util import round_inputs_like
from tests.test_gguf_weights import llama_cpp_permute

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
WORDS = 12_000  # lines of WikiText-2 train the tokenizer is trained on (~1 MB, a few seconds)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE as `modernlm tokenizer train` makes it (ChatML tokens and template)."""
    path = ROOT.parent / "shared/data/wikitext-2/wiki.train.tokens"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    with open(path, encoding="utf-8") as f:
        lines = [next(f) for _ in range(WORDS)]
    return train_bpe(lines, 1000)


def tiny(vocab: int, **overrides) -> ModernDecoderLM:
    """GQA, head_dim 32 != d_model / n_head (so the file says key_length), a vocab padded past the
    tokenizer's (the file keeps the tokenizer's rows); init_std 0.2 makes the logits far apart (no
    near-ties in greedy checks)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=32, max_seq_len=128,
               init_std=0.2) | overrides  # fmt: skip
    return ModernDecoderLM(ModelConfig(**cfg)).eval()


def logits(model, ids: list[int], n_vocab: int | None = None) -> torch.Tensor:
    """(T, V) logits; with n_vocab, of the tokenizer's ids only (what the file keeps of the head)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out)[0, :, :n_vocab]


def reader(path: Path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def hf_from(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


TEXT = "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building."


@pytest.mark.hf
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_reads_our_logits(tmp_path, tokenizer, tied):
    model = tiny(1088, tie_embeddings=tied)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, "f32")
    ids = tokenizer.encode(TEXT, add_bos=True)
    theirs = hf_from(path)(torch.tensor([ids])).logits[0].detach()
    assert theirs.shape == (len(ids), tokenizer.vocab_size)
    torch.testing.assert_close(theirs, logits(model, ids, tokenizer.vocab_size), rtol=0, atol=2e-5)  # measured: 0


@pytest.mark.hf
def test_f16_file_is_our_weights_rounded(tmp_path, tokenizer):
    model = tiny(1088)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, "f16")
    _, tensors = reader(path)
    assert {t.tensor_type.name for n, t in tensors.items() if "norm" not in n} == {"F16"}
    assert {t.tensor_type.name for n, t in tensors.items() if "norm" in n} == {"F32"}
    rounded = tiny(1088)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    ids = tokenizer.encode(TEXT, add_bos=True)
    theirs = hf_from(path)(torch.tensor([ids])).logits[0].detach()
    torch.testing.assert_close(theirs, logits(rounded, ids, tokenizer.vocab_size), rtol=0, atol=2e-5)


def test_q_and_k_rows_are_in_llama_cpps_order(tmp_path, tokenizer):
    """attn_q / attn_k hold llama.cpp's `permute` of HF's q_proj / k_proj; v and the rest as they are."""
    model = tiny(1088)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, "f32")
    _, tensors = reader(path)
    c = model.config
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    for i, block in enumerate(model.layers):
        wq, wk, wv = np.split(block.attn.wqkv.weight.detach().numpy(), [q, q + kv])
        assert np.array_equal(np.asarray(tensors[f"blk.{i}.attn_q.weight"].data), llama_cpp_permute(wq, c.n_head))
        assert np.array_equal(np.asarray(tensors[f"blk.{i}.attn_k.weight"].data), llama_cpp_permute(wk, c.n_kv_head))
        assert np.array_equal(np.asarray(tensors[f"blk.{i}.attn_v.weight"].data), wv)
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd for the head


@pytest.mark.hf
def test_rows_in_our_order_would_fail(tmp_path, tokenizer, monkeypatch):
    """The mutation the logits test catches: q/k written without llama.cpp's permutation."""
    model = tiny(1088)
    identity = lambda n_rows, n_head: torch.arange(n_rows)  # noqa: E731
    monkeypatch.setattr(gguf_export, "unpermute_rows", identity)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, "f32")
    ids = tokenizer.encode(TEXT, add_bos=True)
    theirs = hf_from(path)(torch.tensor([ids])).logits[0].detach()
    assert (theirs - logits(model, ids, tokenizer.vocab_size)).abs().max() > 0.1


def test_tokenizer_fields(tmp_path, tokenizer):
    model = tiny(1088)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, "f32")
    fields, _ = reader(path)
    T = gguf.TokenType
    n = tokenizer.vocab_size
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == n == fields["llama.vocab_size"]  # not the model's padded 1088
    assert tokens == [tokenizer.backend.id_to_token(i) for i in range(n)]
    specials = tokenizer.special_tokens
    assert {tokens[i] for i, t in enumerate(types) if t == T.CONTROL} == set(specials)
    assert all(types[i] == T.NORMAL for i in range(n) if tokens[i] not in specials)
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_id == tokens.index("<|endoftext|>")
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id == tokens.index("<|pad|>")
    assert fields["tokenizer.ggml.eot_token_id"] == tokens.index(IM_END)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert fields["tokenizer.chat_template"] == CHATML_TEMPLATE
    c = model.config
    keys = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "rope.dimension_count", "context_length"]  # fmt: skip
    values = [c.n_layer, c.d_model, c.d_ff, c.n_head, c.n_kv_head, c.head_dim, c.head_dim, c.max_seq_len]
    assert [fields[f"llama.{k}"] for k in keys] == values
    assert fields["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)


@pytest.mark.hf
def test_transformers_tokenizer_equals_ours(tmp_path, tokenizer, shared_data):
    """The file's tokenizer, as transformers builds it from the fields, on 2,000 lines of WikiText-2
    test (text the tokenizer was not trained on) and the special tokens in text."""
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    write_gguf(tiny(1088), tokenizer, path, "f32")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    with open(shared_data / "wikitext-2/wiki.test.raw", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:2000]
    lines.append("<|im_start|>user\nhi<|im_end|>\n<|endoftext|>")
    assert [theirs.encode(x, add_special_tokens=False) for x in lines] == [tokenizer.encode(x) for x in lines]


@pytest.mark.hf
def test_the_files_tokenizer_loads_back_as_transformers_reads_it(tmp_path, tokenizer, shared_data):
    """load_gguf's own reading of the tokenizer fields (ours: bos first, ChatML) is transformers'."""
    from modernlm.hf.convert import hf_tokenizer_to_ours, load_hf_tokenizer
    from tests.test_gguf_weights import same_tokenizer

    path = tmp_path / "m.gguf"
    write_gguf(tiny(1088), tokenizer, path, "q8_0")
    _, back = gguf_weights.load_gguf(path, "auto")
    with open(shared_data / "wikitext-2/wiki.test.raw", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:2000]
    assert back.add_bos and back.chat_template == CHATML_TEMPLATE
    same_tokenizer(back, hf_tokenizer_to_ours(load_hf_tokenizer(str(path))), lines)
    assert [back.encode(x) for x in lines] == [tokenizer.encode(x) for x in lines]


ODD_SPECIALS = ("<|end of turn|>", "\u2039|\u65e5\u672c|>")  # a space, CJK: outside GPT-2's byte alphabet
ODD_TEXT = "a<|end of turn|>b \u2039|\u65e5\u672c|> c my token d <|im_start|>"


def odd_tokenizer():
    """A trained BPE with special tokens in characters outside GPT-2's byte alphabet and an added
    (not special) token with a space: llama.cpp keeps each whole (tests/test_gguf_llama_cpp.py)."""
    from tokenizers import AddedToken

    from modernlm.tokenizer import DEFAULT_SPECIAL_TOKENS

    tok = train_bpe(["The tower is 324 metres tall, my friend. " * 20, "a b c d"], 600,
                    special_tokens=[*DEFAULT_SPECIAL_TOKENS, *ODD_SPECIALS])  # fmt: skip
    tok.backend.add_tokens([AddedToken("my token", special=False)])
    return tok


def test_special_tokens_outside_the_byte_alphabet_come_back_whole(tmp_path):
    """ours -> .gguf -> ours: "<|end of turn|>" and a CJK special were dropped on the way back (each
    became several ids), and the added "my token" never came out."""
    tok = odd_tokenizer()
    path = tmp_path / "m.gguf"
    write_gguf(tiny(608), tok, path, "f32")
    _, back = gguf_weights.load_gguf(path, "auto")
    assert set(ODD_SPECIALS) <= set(back.special_tokens)
    ids = tok.encode(ODD_TEXT)
    assert back.encode(ODD_TEXT) == ids and {tok.token_to_id(t) for t in (*ODD_SPECIALS, "my token")} <= set(ids)
    assert back.decode(tok.encode(ODD_TEXT)) == ODD_TEXT


NUMERALS = "x1y22z333 \u00bc \u00bd \u0663\u0664 \u2460\u2461 \u00b2\u00b3 \u2153 In 1999, 42 cats"


def test_smollm2s_split_of_each_digit_goes_to_gguf_and_back(tmp_path):
    """A tokenizer that splits each \\p{N} character alone, then as GPT-2 (SmolLM2's Digits + ByteLevel:
    llama.cpp's "smollm") is written as "smollm" (it was "gpt-2", which llama.cpp runs without the
    digit split) and read back with the split, on our path and transformers' (both dropped it)."""
    from tokenizers import pre_tokenizers

    from modernlm import load

    tok = train_bpe(["The tower is 324 metres tall in 1999, \u00bc \u00bd \u2460. " * 20], 400)
    gpt2_ids = tok.encode(NUMERALS)
    tok.backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ids = tok.encode(NUMERALS)
    assert ids != gpt2_ids  # so reading it back with GPT-2's split alone would fail the test
    path = tmp_path / "m.gguf"
    write_gguf(tiny(400), tok, path, "f32")
    assert reader(path)[0]["tokenizer.ggml.pre"] == "smollm"
    _, back = gguf_weights.load_gguf(path, "auto")
    assert back.encode(NUMERALS) == ids
    assert load(path, quantize="none", progress=False).tokenizer.encode(NUMERALS) == ids
    # and ours -> .gguf -> ours -> .gguf: the split read back is still "smollm"
    assert gguf_export._pre_tokenizer(back, "tokenizer") == "smollm"


def test_q8_0_file(tmp_path, tokenizer, monkeypatch):
    """Matrices in Q8_0 (a row length not a multiple of 32 in f16), norms in f32; read back by
    gguf_weights, the logits of our weights rounded by gguf's Q8_0 (llama.cpp's rounding)."""
    model = tiny(1088, d_ff=200)  # ffn_down's rows are 200 long: no whole blocks
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, path, "q8_0")
    _, tensors = reader(path)
    kinds = {n: t.tensor_type.name for n, t in tensors.items()}
    assert {k for n, k in kinds.items() if "norm" in n} == {"F32"}
    assert {k for n, k in kinds.items() if "ffn_down" in n} == {"F16"}
    assert {k for n, k in kinds.items() if "norm" not in n and "ffn_down" not in n} == {"Q8_0"}
    rounded, Q8 = tiny(1088, d_ff=200), gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2 and "w_down" not in name:  # row blocks: the q/k row order does not matter
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), Q8), Q8)))
            elif p.dim() == 2:
                p.copy_(p.half().float())
    ids = tokenizer.encode(TEXT, add_bos=True)
    loaded, _ = gguf_weights.load_gguf(path, "auto")
    rounded = round_inputs_like(rounded, loaded)  # q8 layers round their inputs to Q8_0 too
    monkeypatch.setattr(kernels, "usable", lambda x: False)  # PyTorch's ops on both sides (no rounding flips)
    back, n = logits(loaded, ids), tokenizer.vocab_size
    torch.testing.assert_close(back, logits(rounded, ids, n), rtol=0, atol=1e-4)  # measured: ~1e-5
    assert (back - logits(model, ids, n)).abs().max() > 1e-3  # and they are rounded


@pytest.mark.hf
def test_byte_tokenizer(tmp_path):
    """The byte tokenizer has no merges: the file holds an empty list (llama.cpp requires the key),
    and transformers reads the file's tokenizer to our ids."""
    from transformers import AutoTokenizer

    from modernlm.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    write_gguf(tiny(320), tok, tmp_path / "b.gguf", "f32")
    fields, _ = reader(tmp_path / "b.gguf")
    assert fields["tokenizer.ggml.merges"] == [] and len(fields["tokenizer.ggml.tokens"]) == tok.vocab_size
    text = "héllo wörld ✓ 日本\n\n  x<|endoftext|>"
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file="b.gguf").encode(text, add_special_tokens=False) == (
        tok.encode(text))


def test_a_chat_model_file_adds_no_bos(tmp_path, tokenizer):
    """llama.cpp adds bos to chat prompts too; a chat model's (eos <|im_end|>) file says false, so its
    chats get the ids `LM.chat_prompt_ids` gives (no bos)."""
    assert gguf_export.add_bos_of(tokenizer) is True
    chat_tok = train_bpe(["a small text for a small tokenizer"] * 3, 300)
    chat_tok.eos_token = IM_END
    path = tmp_path / "chat.gguf"
    write_gguf(tiny(320), chat_tok, path, "f32")
    fields, _ = reader(path)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    im_end = chat_tok.token_to_id(IM_END)
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == im_end


def test_modelfile(tokenizer):
    text = modelfile(tokenizer, "sft.gguf", 1024)
    assert text.splitlines()[1] == "FROM ./sft.gguf"
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # Ollama's Go template of CHATML_TEMPLATE: each message, then the assistant's turn opened
    assert template == ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                        "<|im_start|>assistant\n")  # fmt: skip
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER num_ctx 1024" in text
    tokenizer_without = train_bpe(["some text"] * 3, 300, chat_template=None)
    assert "TEMPLATE" not in modelfile(tokenizer_without, "m.gguf", 64)  # Ollama reads the file's own


# ---- the command ---------------------------------------------------------------------------------


def convert(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modernlm", "convert", *argv], capture_output=True, text=True)


@pytest.mark.hf
def test_convert_to_gguf_command(tmp_path, tokenizer):
    """The one command: a checkpoint -> .gguf + Modelfile; modernlm reads the file back to the same logits."""
    from modernlm import load

    model = tiny(1088)
    save_model(model, tmp_path / "ckpt", tokenizer)
    out = tmp_path / "export" / "tiny.gguf"
    r = convert(str(tmp_path / "ckpt"), str(out), "--to", "gguf", "--type", "f32")
    assert r.returncode == 0, r.stderr
    assert "GGUF f32" in r.stdout and "ollama create" in r.stdout
    assert (tmp_path / "export" / "tiny.Modelfile").read_text().splitlines()[1] == "FROM ./tiny.gguf"
    ids = tokenizer.encode(TEXT, add_bos=True)
    back = load(out)  # transformers' GGUF path, converted to ours
    ours = logits(model, ids, tokenizer.vocab_size)
    torch.testing.assert_close(back.logits_fn(torch.tensor([ids]))[0], ours, rtol=0, atol=2e-5)
    assert back.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    again = convert(str(tmp_path / "ckpt"), str(out), "--to", "gguf")
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_convert_to_gguf_user_errors(tmp_path, tokenizer):
    """One line, exit 2, before any weight is written: no .gguf suffix, a model or tokenizer llama.cpp
    cannot run."""
    save_model(tiny(1088), tmp_path / "ok", tokenizer)
    moe = ModernDecoderLM(ModelConfig(vocab_size=1088, d_model=32, n_layer=1, n_head=2, n_expert=2))
    save_model(moe, tmp_path / "moe", tokenizer)
    other = train_bpe(["some text here"] * 3, 300)
    from tokenizers import pre_tokenizers

    split = [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    other.backend.pre_tokenizer = pre_tokenizers.Sequence(split)
    save_model(tiny(320), tmp_path / "other", other)
    save_model(tiny(320), tmp_path / "bare", None)
    cases = {
        ("ok", "out.bin"): "should end in .gguf",
        ("moe", "out.gguf"): "MoE",
        ("other", "out.gguf"): "no pre-tokenizer equal",
        ("bare", "out.gguf"): "no tokenizer",
    }
    for (src, dst), message in cases.items():
        r = convert(str(tmp_path / src), str(tmp_path / dst), "--to", "gguf")
        assert r.returncode == 2, (src, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / dst).exists()


@pytest.mark.hf
def test_progress_false_draws_no_bar_for_a_file_transformers_reads(tmp_path, tokenizer, capfd):
    """transformers' .gguf reader draws its own tqdm bar, which disable_progress_bar() missed:
    `load(..., progress=False)` printed "Converting and de-quantizing GGUF tensors" all the same."""
    from modernlm import load

    path = tmp_path / "m.gguf"
    write_gguf(tiny(1088), tokenizer, path, "f32")
    capfd.readouterr()
    load(path, backend="transformers", progress=False)
    assert "GGUF tensors" not in capfd.readouterr().err
    load(path, backend="transformers", progress=True)
    assert "GGUF tensors" in capfd.readouterr().err  # (what the check above would see)

"""`modernlm convert --to gguf` in llama.cpp itself: the same token ids, greedy tokens and chat replies.

llama.cpp's `llama-server` (built from PyPI's llama-cpp-python sdist by benchmarks/llama_cpp.py when
it is not in ~/.cache/modernlm/llama-cpp: ~6 minutes on 2 cores, once) serves files exported by the
command from a tiny model with a BPE trained on WikiText-2 train, through benchmarks/check_gguf.py's
checks: `/tokenize` against our tokenizer on 2,000 lines of WikiText-2 test and 500 of the demo's
synthetic data, greedy `/completion` of 20 prompts against `generate`, and for a chat model (eos
<|im_end|>, as SFT makes it) `/v1/chat/completions --jinja` against `LM.chat`. The weights are
random with init_std 0.2 (logits far apart) and llama.cpp's KV cache is float32 (its default, f16,
moves logprobs by ~5e-3 and flips near-ties; float32: ~4e-6).
The demo's own SFT model and SmolLM2 are checked by the same script (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from modernlm import load
from modernlm.chat import IM_END
from modernlm.checkpoint import save_model
from modernlm.data import synthetic
from tests.test_gguf_export import tiny

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import check_gguf  # noqa: E402
import llama_cpp  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def llama_server():
    """llama-server, built when missing (before any server's start-up clock); without cmake or a
    compiler a skip that says so (under CI, a failure: .ci/run installs them)."""
    from modernlm.errors import UserError

    try:
        return llama_cpp.tool("llama-server")
    except UserError as e:
        pytest.skip(f"no llama.cpp: {e}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tokenizer `modernlm tokenizer train` makes from 2 MB of WikiText-2 train."""
    corpus = ROOT.parent / "shared/data/wikitext-2/wiki.train.tokens"
    if not corpus.is_file():
        pytest.skip(f"shared data not found at {corpus}")
    out = tmp_path_factory.mktemp("tok")
    cmd = [sys.executable, "-m", "modernlm", "tokenizer", "train", str(corpus), "--out", str(out),
           "vocab_size=2000", "max_bytes=2000000"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    from modernlm.tokenizer import load_tokenizer

    return load_tokenizer(out)


def export(tmp: Path, model, tokenizer) -> tuple[object, Path]:
    save_model(model, tmp / "ckpt", tokenizer)
    check_gguf.export(str(tmp / "ckpt"), tmp / "model.gguf", "f32")
    return load(tmp / "ckpt"), tmp / "model.gguf"


def demo_lines(n: int) -> list[str]:
    """Lines of the demo's synthetic data: stories, questions and worked solutions."""
    rng, cfg, lines = random.Random(0), synthetic.SyntheticConfig(), []
    while len(lines) < n:
        p = synthetic.draw_problem(rng, cfg)
        lines += [synthetic.story_text(p, rng, cfg), synthetic.question_text(p), synthetic.solution_text(p)]
    return lines[:n]


def test_llama_cpp_tokenizes_and_decodes_as_we_do(tmp_path, trained):
    lm, path = export(tmp_path, tiny(2048), trained)
    wiki = check_gguf.text_lines(ROOT.parent / "shared/data/wikitext-2/wiki.test.raw", 2000)
    specials = ["<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b <|pad|>", " \n\n  x\t y  "]
    with llama_cpp.serving(path, ["-t", "2", "-np", "1", "-c", "128", *check_gguf.F32_KV]) as (_, url, _model_id):
        for name, lines in (("WikiText-2 test", wiki), ("demo data", demo_lines(500)), ("specials", specials)):
            r = check_gguf.tokenization(url, lm.tokenizer, lines)
            assert r["equal"] == r["total"], (name, r["first"])
        prompts = check_gguf.prompts_from(ROOT.parent / "shared/data/wikitext-2/wiki.test.raw", 20, words=8)
        g = check_gguf.greedy(url, lm, prompts, 32)
    assert g["equal"] == g["total"] == 20, g["rows"]
    assert all(r["ours"] > 0 for r in g["rows"])


def test_byte_tokenizer_in_llama_cpp(tmp_path):
    """The byte tokenizer (no merges; TinyShakespeare's in the README) in llama.cpp."""
    from modernlm.tokenizer import byte_tokenizer

    lm, path = export(tmp_path, tiny(320), byte_tokenizer())
    lines = check_gguf.text_lines(ROOT.parent / "shared/data/tinyshakespeare/input.txt", 500) + ["héllo ✓ 日本"]
    with llama_cpp.serving(path, ["-t", "2", "-np", "1", "-c", "128", *check_gguf.F32_KV]) as (_, url, _model_id):
        r = check_gguf.tokenization(url, lm.tokenizer, lines)
        g = check_gguf.greedy(url, lm, ["ROMEO:", "First Citizen:", "KING"], 32)
    assert r["equal"] == r["total"], r["first"]
    assert g["equal"] == g["total"], g["rows"]


def test_special_tokens_outside_the_byte_alphabet_in_llama_cpp_and_back(tmp_path):
    """Special tokens with a space or CJK in them, and an added token with a space: llama.cpp reads
    each whole from our file, and so does our own reading of the file (it dropped them)."""
    from modernlm.gguf_weights import load_gguf
    from tests.test_gguf_export import ODD_TEXT, odd_tokenizer

    lm, path = export(tmp_path, tiny(608), odd_tokenizer())
    lines = [ODD_TEXT, "The tower<|end of turn|>", "my tokens, my token."]
    with llama_cpp.serving(path, ["-t", "2", "-np", "1", "-c", "128", *check_gguf.F32_KV]) as (_, url, _model_id):
        r = check_gguf.tokenization(url, lm.tokenizer, lines)
    assert r["equal"] == r["total"], r["first"]
    back = load_gguf(path, "auto")[1]
    assert [back.encode(x) for x in lines] == [lm.tokenizer.encode(x) for x in lines]


def test_llama_cpp_chats_as_modernlm_chat(tmp_path, trained):
    """A chat model's file: llama-server's Jinja rendering of our template, no bos added, the reply
    ending at <|im_end|>: the same replies as LM.chat."""
    trained.eos_token = IM_END  # what SFT's prepare_chat_model does
    try:
        lm, path = export(tmp_path, tiny(2048, n_layer=3), trained)
    finally:
        trained.eos_token = "<|endoftext|>"
    assert lm.tokenizer.eos_token == IM_END and lm.has_chat_template
    messages = [f"Tell me about {w}." for w in ("the tower", "rivers", "a cat", "1,063 ft", "  spaces  ")]
    messages += [line[:80] for line in demo_lines(15)]
    settings = ["-t", "2", "-np", "1", "-c", "128", "--jinja", *check_gguf.F32_KV]
    with llama_cpp.serving(path, settings) as (_, url, model_id):
        c = check_gguf.chats(url, model_id, lm, messages, 24)
    assert c["equal"] == c["total"] == 20, [r for r in c["rows"] if r["ours"] != r["llama.cpp"]]


def test_smollm2s_tokenizer_is_llama_cpps(tmp_path):
    """SmolLM2's .gguf says "smollm" (each \\p{N} character alone, then GPT-2's split): llama.cpp's ids
    are ours on both load paths, on WikiText-2 and on numerals outside ASCII (¼ ② ٣ ², which GPT-2's
    split alone joins to their neighbours: transformers' GGUF loader, and ours before, did)."""
    from modernlm.commands.eval_table import default_baseline
    from tests.test_gguf_export import NUMERALS

    path = Path(default_baseline())
    if not path.is_file():
        pytest.skip(f"SmolLM2's .gguf not found at {path}")
    lms = [load(path, progress=False), load(path, quantize="none", progress=False)]
    lines = check_gguf.text_lines(ROOT.parent / "shared/data/wikitext-2/wiki.test.raw", 500) + [NUMERALS]
    with llama_cpp.serving(path, ["-t", "2", "-np", "1", "-c", "128"]) as (_, url, _model_id):
        for lm in lms:
            r = check_gguf.tokenization(url, lm.tokenizer, lines)
            assert r["equal"] == r["total"], r["first"]

"""Byte-level BPE training, special tokens, and agreement with transformers' tokenizers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from modernlm.chat import CHATML_TEMPLATE
from modernlm.cli import run_command
from modernlm.data.corpus import SourceConfig, read_source
from modernlm.errors import UserError
from modernlm.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    ByteTokenizer,
    Tokenizer,
    byte_tokenizer,
    load_tokenizer,
    train_bpe,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _documents(name: str, documents: str = "auto") -> list[str]:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    return list(read_source(SourceConfig(path=str(path), documents=documents)))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    # real text of two kinds: TinyStories paragraphs and (raw, untokenized) WikiText articles
    return (
        _documents("tinystories/tinystories_train_prefix.txt")
        + _documents("wikitext-2/wiki.valid.raw")[:20]
    )


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return train_bpe(corpus, 1000)


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x1F),
        (0xA0, 0x2FF),
        (0x400, 0x4FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F6FF),
        (0x0300, 0x036F),
        (0xE000, 0xE0FF),
        (0x10000, 0x1007F),
    ]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_vocab_size_and_special_tokens(bpe):
    assert bpe.vocab_size == 1000
    # special tokens take the first ids, in order; <|endoftext|> is bos and eos
    assert [bpe.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 0, 1)
    ids = bpe.encode("Hi<|im_start|>user\nhello<|im_end|><|endoftext|>")
    assert [i for i in ids if i < 4] == [2, 3, 0]  # each special token is one id, never split
    assert bpe.decode(ids) == "Hi<|im_start|>user\nhello<|im_end|><|endoftext|>"
    assert bpe.decode(ids, skip_special_tokens=True) == "Hiuser\nhello"


def test_roundtrip_on_real_text(bpe, corpus):
    held_out = _documents("wikitext-2/wiki.test.raw")[:5] + _documents(
        "tinystories/tinystories_sample.txt"
    )
    for text in corpus[:50] + held_out:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
    # it learned something: real text takes well under one token per byte
    text = "\n".join(held_out)
    assert len(bpe.encode(text)) < 0.5 * len(text.encode())


def test_roundtrip_on_arbitrary_unicode(bpe):
    rng = random.Random(0)
    for n in (1, 5, 50, 500):
        for _ in range(10):
            text = _random_unicode(rng, n)
            assert bpe.decode(bpe.encode(text)) == text
    for text in [
        "",
        " ",
        "\r\n\t  x",
        "naïve café ½ ∑ 🤖 日本語 \u200b\ufeff",
        "a\x00b",
        "  leading and trailing  ",
    ]:
        assert bpe.decode(bpe.encode(text)) == text


def test_save_load_roundtrip(bpe, corpus, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == bpe.vocab_size and loaded.chat_template == CHATML_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
    )
    for text in corpus[:20]:
        assert loaded.encode(text) == bpe.encode(text)


def test_train_bpe_options(corpus):
    tok = train_bpe(
        corpus[:200],
        300,
        special_tokens=["<s>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        chat_template=None,
    )
    assert tok.vocab_size == 300
    assert (tok.token_to_id("<s>"), tok.token_to_id("</s>"), tok.pad_id) == (
        0,
        1,
        1,
    )  # pad falls back to eos
    assert tok.chat_template is None
    with pytest.raises(UserError, match="vocab_size 200 is too small"):
        train_bpe(corpus[:10], 200)


def test_tokenizer_train_command(tmp_path, capsys):
    src = DATA / "tinystories" / "tinystories_train_prefix.txt"
    if not src.is_file():
        pytest.skip("shared data not found")
    assert (
        run_command(
            "tokenizer train",
            [str(src), "--out", str(tmp_path / "tok"), "vocab_size=512", "max_bytes=100000"],
        )
        == 0
    )
    assert "vocab 512" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 512 and tok.eos_id == 0
    assert run_command("tokenizer train", [str(src)]) == 2
    assert "out: give an output directory" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n\n")
    assert (
        run_command("tokenizer train", [str(tmp_path / "blank.txt"), f"out={tmp_path / 'x'}"]) == 2
    )
    assert "blank.txt: no documents" in capsys.readouterr().err
    # an empty file found mid-corpus, while the trainer is consuming the documents
    (tmp_path / "a.txt").write_text("some text\n\nmore text\n")
    glob = str(tmp_path / "*.txt")
    assert run_command("tokenizer train", [glob, f"out={tmp_path / 'y'}", "vocab_size=300"]) == 2
    assert "blank.txt: no documents" in capsys.readouterr().err


@pytest.mark.hf
def test_gpt2_files_match_transformers(corpus):
    transformers = pytest.importorskip("transformers")
    path = DATA / "gpt2-tokenizer"
    ours = load_tokenizer(path)
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(path))
    texts = (
        corpus[:30]
        + _documents("wikitext-2/wiki.test.raw")[:3]
        + ["  two spaces, 🤖 and <|endoftext|> inside"]
    )
    for text in texts:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.vocab_size == len(ref) == 50257 and ours.eos_id == ref.eos_token_id == 50256


@pytest.mark.hf
def test_hf_tokenizer_dirs_work_both_ways(bpe, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    # ours -> transformers
    bpe.save(tmp_path / "ours")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    for text in corpus[:20]:
        assert ref.encode(text, add_special_tokens=False) == bpe.encode(text)
    assert (ref.eos_token_id, ref.bos_token_id, ref.pad_token_id) == (
        bpe.eos_id,
        bpe.bos_id,
        bpe.pad_id,
    )
    chat = [{"role": "user", "content": "hi"}]
    assert ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    # any transformers tokenizer directory with a tokenizer.json -> ours
    gpt2 = transformers.GPT2TokenizerFast.from_pretrained(str(DATA / "gpt2-tokenizer"))
    gpt2.save_pretrained(str(tmp_path / "hf"))
    loaded = load_tokenizer(tmp_path / "hf")
    for text in corpus[:20]:
        assert loaded.encode(text) == gpt2.encode(text)
    assert loaded.eos_id == gpt2.eos_token_id


# ---- the byte tokenizer --------------------------------------------------------------------


def test_byte_tokenizer_ids_are_byte_values_and_text_round_trips():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == 256 + len(DEFAULT_SPECIAL_TOKENS)
    text = "Hello, wörld!\n\tFirst Citizen: €5 \x00\x7f 🙂"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("ab", add_bos=True) == [tok.bos_id, 97, 98]


def test_byte_tokenizer_round_trips_any_bytes():
    tok = byte_tokenizer()
    rng = random.Random(0)
    samples = [bytes(range(256)), b"\xff\xfe\xc3(", b"\xed\xa0\x80", b""]  # invalid UTF-8 included
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(50)]
    for data in samples:
        ids = tok.encode_bytes(data)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(data)
        assert tok.decode_bytes(ids) == data


def test_byte_tokenizer_special_tokens_are_single_ids_and_survive_save_and_load(tmp_path):
    tok = byte_tokenizer()
    eot = tok.eos_id
    assert eot == tok.bos_id == 256 and tok.pad_id == 257
    assert tok.encode("a<|endoftext|>b") == [97, eot, 98]
    assert tok.token_to_id("<|im_start|>") == 258
    assert tok.decode([104, 105, eot], skip_special_tokens=True) == "hi"
    assert tok.decode_bytes([104, eot]) == b"h<|endoftext|>"
    tok.save(tmp_path / "byte")
    loaded = load_tokenizer(tmp_path / "byte")
    assert isinstance(loaded, ByteTokenizer)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert loaded.encode("Ünïcode\n") == list("Ünïcode\n".encode())
    # a trained BPE is not mistaken for the byte tokenizer
    bpe = train_bpe(["abababab cdcdcd"] * 20, 300, min_frequency=1)
    bpe.save(tmp_path / "bpe")
    assert not isinstance(load_tokenizer(tmp_path / "bpe"), ByteTokenizer)


@pytest.mark.hf
def test_byte_tokenizer_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    byte_tokenizer().save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "To be, or not to be: ünïcode"
    assert ref.encode(text, add_special_tokens=False) == list(text.encode())
    assert ref.eos_token_id == 256

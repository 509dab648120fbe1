"""Generation: KV-cache decoding against full recomputation, sampling filters against
hand-computed values (and HF's processors), batching, the rolling cache, text streaming and
`modernlm generate`."""

from __future__ import annotations

import math

import pytest
import torch

from modernlm.errors import UserError
from modernlm.generation import (
    Sampling,
    TextStream,
    apply_repetition_penalty,
    generate,
    generate_text,
    iter_tokens,
    left_pad,
    sample,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from modernlm.model import ModernDecoderLM
from tests.conftest import VARIANTS, tiny_config


def tiny_model(
    variant: str = "mha", vocab_size: int = 64, seed: int = 0, max_seq_len: int = 32
) -> ModernDecoderLM:
    torch.manual_seed(seed)
    # init_std 0.1 (not 0.02) spreads the logits so float rounding cannot flip an argmax
    cfg = tiny_config(
        **VARIANTS[variant], vocab_size=vocab_size, init_std=0.1, max_seq_len=max_seq_len
    )
    return ModernDecoderLM(cfg).eval()


def greedy_without_cache(model: ModernDecoderLM, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: recompute the full forward over the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(idx).logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
    return idx


# ---- KV cache == full forward ------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_full_recompute(variant):
    model = tiny_model(variant, max_seq_len=16)
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    # 6 + 14 tokens runs past max_seq_len=16: the plain cache is sized to prompt + new tokens
    out = generate(model, idx, 14)
    assert out.shape == (2, 20)
    torch.testing.assert_close(out, greedy_without_cache(model, idx, 14), rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_full_forward(variant):
    model = tiny_model(variant)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    steps = list(iter_tokens(model, idx, 12, temperature=1.0, seed=0))
    seq = torch.cat([idx, torch.stack([s.tokens for s in steps], dim=1)], dim=1)
    with torch.no_grad():
        full = model(seq).logits  # (B, T, V)
    for i, step in enumerate(steps):
        # step i's logits come from the position just before generated token i
        torch.testing.assert_close(step.logits, full[:, idx.size(1) - 1 + i], rtol=0, atol=1e-5)


def test_generated_ids_are_usable_in_autograd():
    model = tiny_model()
    out = generate(model, torch.tensor([[1, 2, 3]]), 4)
    assert not out.is_inference()
    model(out).logits.sum().backward()  # would raise for an inference tensor saved for backward


def test_generate_keeps_training_mode():
    model = tiny_model().train()
    generate(model, torch.tensor([[1, 2]]), 3)
    assert model.training


# ---- batching with left padding -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mha", "gqa", "sink"])
def test_padded_batch_equals_each_prompt_alone(variant):
    model = tiny_model(variant)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 8, 5)]
    idx, pad_mask = left_pad(prompts, pad_id=0)
    assert pad_mask.sum(1).tolist() == [3, 8, 5] and pad_mask[:, -1].all()
    batch_steps = list(iter_tokens(model, idx, 10, pad_mask=pad_mask))
    batch_tokens = torch.stack([s.tokens for s in batch_steps], dim=1)
    for row, prompt in enumerate(prompts):
        alone = list(iter_tokens(model, torch.tensor([prompt]), 10))
        assert batch_tokens[row].tolist() == [s.tokens.item() for s in alone]
        for b, a in zip(batch_steps, alone, strict=True):
            torch.testing.assert_close(b.logits[row], a.logits[0], rtol=0, atol=1e-5)


def test_pad_mask_must_be_left_padding():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 0]])
    with pytest.raises(UserError, match="left-padded"):
        generate(model, idx, 2, pad_mask=torch.tensor([[True, True, False]]))


# ---- rolling (StreamingLLM) cache past the trained context ----------------------------------


@pytest.mark.parametrize("variant", ["mha", "sink"])
def test_rolling_cache_constant_memory_past_context(variant):
    model = tiny_model(variant, max_seq_len=16)
    max_len = model.config.max_seq_len
    window, sink, chunk = 8, 2, 4
    cache = model.new_cache(1, 0, window=window, sink_size=sink, chunk=chunk)
    bytes0, shape0, ptr0 = cache.memory_bytes(), cache.k[0].shape, cache.k[0].data_ptr()
    prompt = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(4))  # > chunk
    n = 4 * max_len
    steps = 0
    for step in iter_tokens(
        model, prompt, n, temperature=1.0, seed=0, window=window, sink_size=sink, cache=cache
    ):
        steps += 1
        assert torch.isfinite(step.logits).all()
        assert cache.length <= sink + window
        assert cache.memory_bytes() == bytes0
        assert all(
            k.shape == shape0 and v.shape == shape0 for k, v in zip(cache.k, cache.v, strict=True)
        )
        assert cache.k[0].data_ptr() == ptr0  # the same buffers, never reallocated
    assert steps == n
    # seen: prompt, sink token, all generated tokens but the last; far past the context
    assert cache.seen == 10 + int(model.sink is not None) + n - 1 > 4 * max_len
    assert cache.length == sink + window


@pytest.mark.parametrize("variant", ["mha", "gqa", "sink"])
def test_rolling_cache_without_eviction_equals_plain(variant):
    model = tiny_model(variant)
    prompt = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    plain = list(iter_tokens(model, prompt, 12))
    # window 100 >> 11 + 12: nothing is evicted; the prompt still goes in chunks of 4
    rolling = list(iter_tokens(model, prompt, 12, window=100, sink_size=4, chunk=4))
    assert [s.tokens.tolist() for s in rolling] == [s.tokens.tolist() for s in plain]
    for r, p in zip(rolling, plain, strict=True):
        torch.testing.assert_close(r.logits, p.logits, rtol=0, atol=1e-5)


def test_too_small_plain_cache_is_a_clear_error():
    model = tiny_model()
    cache = model.new_cache(1, 8)
    with pytest.raises(UserError, match="KV cache too small"):
        generate(model, torch.tensor([[1, 2, 3, 4]]), 10, cache=cache)


# ---- sampling ---------------------------------------------------------------------------------


def test_seed_reproducible_and_independent_of_global_rng():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, idx, 20, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not used
    torch.manual_seed(999)  # moving the global RNG changes nothing
    b = generate(model, idx, 20, temperature=1.0, seed=7)
    c = generate(model, idx, 20, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, idx, 20))  # it really sampled (not greedy)


def test_top_k_1_equals_greedy():
    model = tiny_model("gqa")
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    sampled = generate(model, idx, 15, temperature=1.3, top_k=1, seed=0)
    assert torch.equal(sampled, generate(model, idx, 15))


def test_top_p_filter_hand_example():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative 0.5, 0.8, 0.95, 1.0
    keep = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert keep(0.9) == [False, True, True, True]  # 0.5+0.3 < 0.9 <= 0.5+0.3+0.15
    assert keep(0.7) == [False, True, False, True]  # 0.5 < 0.7 <= 0.8
    assert keep(0.4) == [False, True, False, False]  # the top token alone reaches 0.4
    assert keep(0.01) == [False, True, False, False]  # the top token is always kept
    assert keep(1.0) == [True, True, True, True]
    assert torch.equal(top_p_filter(logits, 0.9)[0, 1:], logits[0, 1:])  # kept logits unchanged


def test_top_k_filter_hand_example():
    logits = torch.tensor([[1.0, 4.0, -2.0, 3.0, 0.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[float("-inf"), 4.0, float("-inf"), 3.0, float("-inf")]]
    assert torch.equal(top_k_filter(logits, 10), logits)  # k > vocab keeps everything


def test_repetition_penalty_hand_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    # seen positive: 2 / 2 = 1; seen negative: -1 * 2 = -2; unseen unchanged
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0, 0.0]]


def test_repetition_penalty_in_generation_matches_the_formula():
    model = tiny_model()
    prompts = [[5, 9, 5], [7]]
    idx, pad_mask = left_pad(prompts, pad_id=9)  # the pad id 9 must not count as seen in row 1
    steps = list(iter_tokens(model, idx, 8, repetition_penalty=1.8, pad_mask=pad_mask))
    rows = [list(p) for p in prompts]
    for step in steps:
        for r in range(2):
            expected = step.logits[r].clone()
            for t in set(rows[r]):  # by hand, token by token
                expected[t] = expected[t] / 1.8 if expected[t] > 0 else expected[t] * 1.8
            assert step.tokens[r].item() == expected.argmax().item()
            rows[r].append(step.tokens[r].item())
    plain = generate(model, idx, 8, pad_mask=pad_mask)[:, idx.size(1) :].tolist()
    assert [
        r[len(p) :] for r, p in zip(rows, prompts, strict=True)
    ] != plain  # the penalty changed something


@pytest.mark.hf
def test_processors_match_hf():
    pytest.importorskip("transformers")
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), hf)
    for p in (0.3, 0.75, 0.95):
        hf = TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(hf))
    assert torch.equal(top_k_filter(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))


# ---- EOS ---------------------------------------------------------------------------------------


def _stopped(row: list[int], eos: set[int], pad: int) -> list[int]:
    """`row` cut after its first EOS and padded back to its length."""
    k = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
    return row[: k + 1] + [pad] * (len(row) - k - 1)


def test_eos_stops_each_row_then_pads():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3], [7, 8, 9]])
    n = 12
    ref = generate(model, idx, n)[:, 3:].tolist()
    eos0, eos1 = ref[0][3], ref[1][6]
    out = generate(model, idx, n, eos_token_id=eos0, pad_token_id=0)[:, 3:].tolist()
    assert out[0] == _stopped(ref[0], {eos0}, 0) != ref[0]
    assert out[1] == _stopped(ref[1], {eos0}, 0)
    # several EOS ids; once both rows have stopped, generation ends early
    both = generate(model, idx, n, eos_token_id=[eos0, eos1], pad_token_id=0)[:, 3:].tolist()
    expected = [_stopped(r, {eos0, eos1}, 0) for r in ref]
    last = max(next(i for i, t in enumerate(r) if t in (eos0, eos1)) for r in ref)
    assert len(both[0]) == last + 1 < n
    assert both == [r[: last + 1] for r in expected]


# ---- text: tokenizer, streaming, stop strings ------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "A café serves crème brûlée and naïve jalapeño piñatas. ",
    "日本語のテキストと中文文本。 ",
    "Emoji time: 🙂 🚀 🎉 and more text. ",
    "hello world, hello there, hello again.\n\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from modernlm.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    return Tokenizer(backend, bos_token="<|bos|>", eos_token="<|eos|>")


@pytest.fixture(scope="module")
def text_model(tokenizer):
    return tiny_model("gqa", vocab_size=tokenizer.vocab_size, seed=1)


def test_text_stream_never_splits_characters(tokenizer):
    # € and 🦀 are not in the corpus: their bytes are separate tokens
    text = "prix 12€ 🦀 ok 日本"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # token-by-token decoding breaks
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == stream.text
    assert sum(bool(p) for p in pieces) > 5  # it really streamed


def test_text_stream_random_token_sequences(tokenizer):
    # any token sequence, valid UTF-8 or not, after any prompt: pieces add up to one decode
    import random

    text = "".join(CORPUS) + "€🦀"
    for trial in range(300):
        rng = random.Random(trial)
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 25))]
        start = rng.randrange(len(text))
        context = tokenizer.encode(text[start : start + rng.randrange(12)], add_bos=True)
        stream = TextStream(tokenizer, context=context)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True), (trial, ids)


def test_text_stream_with_a_byte_fallback_tokenizer():
    """Llama 2 / Mistral style: a character outside the vocabulary is its UTF-8 bytes as <0xNN>
    tokens, and the ByteFallback decoder writes one U+FFFD per byte of an unfinished one. Streamed
    token by token, the text equals decoding every token at once (it was '� ���� a')."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    from modernlm.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["\u2581", "a", "b", "\u2581a", "ab"]:
        vocab[piece] = len(vocab)
    backend = Backend(models.BPE(vocab, [("\u2581", "a"), ("a", "b")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", add_bos=True)
    ids = [i for i in tok.encode("ab \u65e5\u672c a") if i != tok.bos_id]
    assert sum(backend.id_to_token(i).startswith("<0x") for i in ids) == 6  # two characters of 3 bytes
    stream = TextStream(tok, context=[tok.bos_id])
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    # (after the context's <s>, the decoder's Strip leaves the word's leading space: " ab")
    assert "".join(pieces) == stream.text == " ab \u65e5\u672c a"


def test_text_stream_stop_strings(tokenizer):
    stream = TextStream(tokenizer, stop=["\n\n", "END"])
    pieces = []
    for i in tokenizer.encode("one\ntwo EN three\n\nfour END"):
        pieces.append(stream.push(i))
        # text that might begin a stop string is never shown early
        assert not "".join(pieces).endswith(("\n", "E", "EN"))
    pieces.append(stream.flush())
    assert stream.stopped
    assert "".join(pieces) == stream.text == "one\ntwo EN three"
    assert stream.push(tokenizer.encode("x")[0]) == ""  # nothing after a stop


def _quadratic_stop_reference(increments: list[str], stop: list[str]) -> tuple[list[str], str, str]:
    """TextStream's stop-string rule as it was first written (the pieces, the text, the finish of
    pushing each increment of text, then flushing): the earliest stop string found in the unsent
    text cuts it; otherwise the longest unsent tail that a stop string begins with is held back,
    found by trying every prefix (O(len(stop)^2) per token)."""
    stop = [s for s in stop if s]
    text, sent, pieces, finish = "", 0, [], "length"
    for inc in [*increments, None]:
        text += inc or ""
        hits = [i for s in stop if (i := text.find(s, sent)) >= 0]
        if hits:
            text, finish = text[: min(hits)], "stop"
            end = len(text)
        elif inc is None:
            end = len(text)
        else:
            tail = text[sent:]
            end = len(text) - max((k for s in stop for k in range(1, len(s)) if tail.endswith(s[:k])), default=0)
        pieces.append(text[sent:end])
        sent = end
        if finish == "stop":
            break
    return pieces, text, finish


def test_text_stream_stop_strings_match_the_quadratic_reference():
    # Random token sequences and stop strings over a 3-letter alphabet (so partial matches,
    # overlapping and nested stop strings are common); tokens of 1 to 3 characters.
    import random

    from modernlm.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    words = ["a", "b", "c", "ab", "bca", "aa"]
    tok.backend.add_tokens(words[3:])
    ids = {w: tok.token_to_id(w) if len(w) > 1 else tok.encode(w)[0] for w in words}
    stopped = 0
    for trial in range(2000):
        rng = random.Random(trial)
        seq = [rng.choice(words) for _ in range(rng.randrange(0, 30))]
        stop = ["".join(rng.choice("abc") for _ in range(rng.randrange(0, 7))) for _ in range(rng.randrange(0, 4))]
        stream = TextStream(tok, stop=stop)
        pieces = []
        for w in seq:
            pieces.append(stream.push(ids[w]))
            if stream.done:
                break
        if not stream.done:
            pieces.append(stream.flush())
        assert (pieces, stream.text, stream.finish) == _quadratic_stop_reference(seq, stop), (trial, seq, stop)
        stopped += stream.stopped
    assert 300 < stopped < 1700  # both outcomes well covered


def test_text_stream_long_stop_strings_cost_linear_time():
    # Four 5,000-character stop strings that the text keeps partly matching (held back all along):
    # 2,000 tokens took 17 ms here (2 shared cores); `_quadratic_stop_reference` on the same text
    # took 7.0 s. 1 s leaves a wide margin for a loaded machine and still fails the quadratic rule.
    import time

    from modernlm.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    stop = ["a" * 4999 + "b", "ab" * 2499 + "ac", "a" * 2500 + "c" * 2500, "ba" * 2500]
    start = time.perf_counter()
    stream = TextStream(tok, stop=stop)
    pieces = [stream.push(i) for i in tok.encode("a" * 2000)]
    assert pieces == [""] * 2000  # all of it could begin the first stop string
    assert stream.flush() == "a" * 2000 and not stream.stopped
    assert time.perf_counter() - start < 1.0


def _decode_until_eos(tokenizer, ids: list[int]) -> str:
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}])
def test_generate_text_matches_token_generation(tokenizer, text_model, sampling):
    prompt = "A café"
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    out = generate(text_model, ids, 40, eos_token_id=tokenizer.eos_id, **sampling)
    expected = _decode_until_eos(tokenizer, out[0, ids.size(1) :].tolist())
    assert generate_text(text_model, tokenizer, prompt, 40, **sampling) == expected
    pieces = list(stream_text(text_model, tokenizer, prompt, 40, **sampling))
    assert "".join(pieces) == expected
    assert len(pieces) > 3


def test_streamed_text_equals_decoding_all_tokens(tokenizer, text_model):
    # hot sampling from a random model: multi-byte characters split across tokens, and invalid
    # byte sequences, both occur; the pieces must still add up to decoding all tokens at once
    prompt = "日本"
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    seen_multibyte = False
    for seed in range(3):
        out = generate(
            text_model, ids, 40, temperature=1.5, seed=seed, eos_token_id=tokenizer.eos_id
        )
        expected = _decode_until_eos(tokenizer, out[0, ids.size(1) :].tolist())
        pieces = list(stream_text(text_model, tokenizer, prompt, 40, temperature=1.5, seed=seed))
        assert "".join(pieces) == expected
        seen_multibyte |= any(ord(c) > 127 and c != "\ufffd" for c in expected)
    assert seen_multibyte


def test_generate_text_stop_string(tokenizer, text_model):
    full = generate_text(text_model, tokenizer, "hello", 40, temperature=1.0, seed=5)
    assert len(full) > 12
    stop = full[8:11]
    cut = full[: full.find(stop)]
    assert (
        generate_text(text_model, tokenizer, "hello", 40, temperature=1.0, seed=5, stop=[stop])
        == cut
    )
    streamed = "".join(
        stream_text(text_model, tokenizer, "hello", 40, temperature=1.0, seed=5, stop=stop)
    )
    assert streamed == cut


def test_generate_text_batch_equals_single(tokenizer, text_model):
    prompts = ["The quick brown fox", "日本", "hello world, hello"]
    batch = generate_text(text_model, tokenizer, prompts, 20)
    assert batch == [generate_text(text_model, tokenizer, p, 20) for p in prompts]


def test_generate_text_stops_on_eos(tokenizer, text_model):
    prompt = "The quick"
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    ref = generate(text_model, ids, 10)[0, ids.size(1) :].tolist()
    eos = ref[4]  # pretend the 5th generated token is EOS
    expected = tokenizer.decode(ref[: ref.index(eos)])
    assert generate_text(text_model, tokenizer, prompt, 10, eos_token_id=eos) == expected


# ---- the `modernlm generate` command ----------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from modernlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.parametrize("stream", ["true", "false"])
def test_cli_generate(tmp_path, capsys, tokenizer, text_model, stream):
    from modernlm.checkpoint import save_model

    save_model(text_model, tmp_path / "ckpt", tokenizer)
    args = ["generate", str(tmp_path / "ckpt"), "prompt=A café", "max_new_tokens=15"]
    assert _cli([*args, "temperature=0", f"stream={stream}"]) == 0
    expected = generate_text(text_model, tokenizer, "A café", 15)
    assert capsys.readouterr().out == expected + "\n"
    assert _cli([*args, "temperature=0", f"stream={stream}", "quantize=auto"]) == 0  # ours: auto is float
    assert capsys.readouterr().out == expected + "\n"
    assert _cli([*args, "temperature=1.0", "top_k=20", "seed=4", f"stream={stream}"]) == 0
    options = dict(temperature=1.0, top_k=20, seed=4)
    expected = generate_text(text_model, tokenizer, "A café", 15, **options)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_generate_prompt_bytes_that_are_not_utf8_become_u_fffd(tmp_path, capsys, tokenizer, text_model):
    from modernlm.checkpoint import save_model

    save_model(text_model, tmp_path / "ckpt", tokenizer)
    import os

    prompt = os.fsdecode(b"\xff\xfeab")  # as Python reads such bytes from the command line: lone surrogates
    assert _cli(["generate", str(tmp_path / "ckpt"), f"prompt={prompt}", "max_new_tokens=5", "temperature=0"]) == 0
    assert capsys.readouterr().out == generate_text(text_model, tokenizer, "\ufffd\ufffdab", 5) + "\n"


def test_cli_generate_errors(tmp_path, capsys):
    assert _cli(["generate", "prompt=hi"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert _cli(["generate", str(tmp_path / "nope"), "prompt=hi"]) == 2
    assert "nope" in capsys.readouterr().err
    assert _cli(["generate", str(tmp_path), "prompt=hi"]) == 2  # a directory, but no checkpoint
    assert "config.json" in capsys.readouterr().err


def test_cli_generate_bad_option(tmp_path, capsys, tokenizer, text_model):
    from modernlm.checkpoint import save_model

    save_model(text_model, tmp_path, tokenizer)
    assert _cli(["generate", str(tmp_path), "prompt=hi", "top_p=1.5"]) == 2
    assert capsys.readouterr().err.startswith("modernlm generate: error: top_p must be in (0, 1]")


def test_vocab_size_limits_generated_ids():
    # a model whose embedding is padded past the tokenizer's vocabulary must not emit those ids
    model = tiny_model()
    out = generate(model, torch.tensor([[1, 2, 3]]), 40, temperature=3.0, seed=0, vocab_size=10)
    assert out[0, 3:].max() < 10
    assert (
        generate(model, torch.tensor([[1, 2, 3]]), 40, temperature=3.0, seed=0)[0, 3:].max() >= 10
    )


@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["cpu", "cuda-graph-calls"])
def test_compiled_decode_gives_the_same_tokens(monkeypatch, graphs):
    """generate(compile=True) runs decode steps through torch.compile (Inductor) at static shapes:
    the same greedy tokens, a left-padded batch's included; once a call of one row, of more and
    of a padded batch has compiled, calls at other batches and capacities compile nothing. With
    `graphs`, through a GPU's calls (mode "reduce-overhead", a kept cache at static addresses, step
    marks; Inductor records no CUDA graph on a CPU)."""
    from torch._dynamo.utils import counters

    from modernlm import steps
    from modernlm.generation import generate as gen

    if graphs:
        monkeypatch.setattr(steps, "graph_devices", ("cuda", "cpu"))
    torch._dynamo.reset()  # what earlier tests compiled counts toward the forward's recompile limit
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(n_kv_head=2)).eval()
    assert not model.fuses_steps(model.new_cache(1, 1))  # head_dim 8: the kernels do not take it
    prompt = torch.randint(0, 64, (3, 5))
    padded, pad_mask = left_pad([[1, 2, 3, 4], [5, 6], [7]], 0)
    before = counters["stats"]["unique_graphs"]
    try:
        for idx, mask in ((prompt[:2], None), (prompt[:1], None), (padded, pad_mask)):
            assert torch.equal(gen(model, idx, 12, pad_mask=mask, compile=True), gen(model, idx, 12, pad_mask=mask))
        compiled = counters["stats"]["unique_graphs"]
        assert compiled - before == 3  # more rows, one, padded: each step one whole graph (no break)
        saved = torch._dynamo.config.error_on_recompile
        torch._dynamo.config.error_on_recompile = True
        try:
            for idx, mask, n in ((prompt, None, 20), (prompt[:1, :2], None, 9), (padded[:2], pad_mask[:2], 25)):
                assert torch.equal(gen(model, idx, n, pad_mask=mask, compile=True), gen(model, idx, n, pad_mask=mask))
        finally:
            torch._dynamo.config.error_on_recompile = saved
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        model.__dict__.pop("_compiled_steps", None)


def test_sampling_takes_only_finite_settings_and_a_tiny_temperature_samples_its_limit():
    """NaN passed every `x < 0` check, and a temperature of 1e-45 overflowed the logits to inf,
    whose softmax is NaN (torch.multinomial raised). The limit of softmax(x / T) as T -> 0 is the
    argmax; a row already +inf (a repetition penalty of 1e-300's) draws among its +inf tokens."""
    for settings in ({"temperature": math.nan}, {"temperature": math.inf}, {"repetition_penalty": math.nan},
                     {"repetition_penalty": math.inf}, {"top_p": math.nan}):  # fmt: skip
        with pytest.raises(UserError, match=next(iter(settings))):
            Sampling(**settings)
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 10
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 1e-45, generator=g), logits.argmax(-1))
    assert torch.equal(sample(logits, 1e-30, top_k=5, top_p=0.5, generator=g), logits.argmax(-1))
    overflowed = logits.clone()
    overflowed[:, 7] = overflowed[:, 9] = math.inf
    drawn = sample(overflowed, 1.0, generator=g)
    assert set(drawn.tolist()) == {7, 9}
    same = sample(logits, 0.7, generator=torch.Generator().manual_seed(1))  # untouched where nothing overflows
    probs = (logits / 0.7).softmax(-1)
    assert torch.equal(same, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)).squeeze(-1))


def test_sampling_settings_of_the_wrong_type_are_named():
    """max_new_tokens=2.5 failed in torch.zeros, top_k=2.5 in torch.topk, seed=1.5 in manual_seed:
    each is a UserError naming the field (numpy's integers are integers)."""
    import numpy as np

    for settings, name in [({"max_new_tokens": 2.5}, "max_new_tokens"), ({"max_new_tokens": "5"}, "max_new_tokens"),
                           ({"top_k": 2.5}, "top_k"), ({"seed": 1.5}, "seed"), ({"seed": [1, "2"]}, "seed"),
                           ({"temperature": "0.7"}, "temperature"), ({"window": True}, "window")]:  # fmt: skip
        with pytest.raises(UserError, match=f"^{name} must be an? "):
            Sampling(**settings)
    assert Sampling(max_new_tokens=np.int64(3), seed=[np.int32(1), 2], temperature=np.float32(0.5)).max_new_tokens == 3

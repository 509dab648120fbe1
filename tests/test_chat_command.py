"""`modernlm chat`: replies are `LM.chat` of the running history (streamed: `LM.stream_chat` joins
to `LM.chat`), /reset and /system restart it, /temperature is validated, a model without a chat
template continues plain text, an overlong conversation drops its oldest turns, and on a terminal
the prompt and the streamed reply show."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from modernlm import load
from tests.serve_util import chat_checkpoint as _checkpoint

GREEDY = ["temperature=0", "max_new_tokens=8"]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", chat=True)


def _chat(args: list[str], lines: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modernlm", "chat", *args],
        input="".join(f"{line}\n" for line in lines).encode(),
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def _replies(out: bytes) -> str:
    return out.decode("utf-8")


def test_stream_chat_joins_to_chat(chat_ckpt):
    lm = load(chat_ckpt)
    messages = [{"role": "user", "content": "hello"}]
    pieces = list(lm.stream_chat(messages, 12, temperature=0))
    assert "".join(pieces) == lm.chat(messages, max_new_tokens=12)


def test_replies_follow_the_history_and_reset(chat_ckpt):
    lm = load(chat_ckpt)
    hello = {"role": "user", "content": "hello"}
    r1 = lm.chat([hello], 8)
    r2 = lm.chat([hello, {"role": "assistant", "content": r1}, {"role": "user", "content": "again"}], 8)
    r3 = lm.chat([{"role": "user", "content": "hi"}], 8)
    r4 = lm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], 8)
    assert len({r1, r2, r3, r4}) == 4  # each reply depends on its history
    lines = ["hello", "again", "/reset", "hi", "/temperature abc", "/system Be brief.", "hi", "/quit", "never"]
    done = _chat([str(chat_ckpt), *GREEDY], lines)
    assert done.returncode == 0, done.stderr.decode()
    assert _replies(done.stdout) == "".join(f"{r}\n" for r in (r1, r2, r3, r4))
    errors = [line for line in done.stderr.decode().splitlines() if "/temperature" in line]
    assert errors == ["/temperature takes a number >= 0, got 'abc'"]
    assert "no chat template" not in done.stderr.decode()


def test_system_option_and_eof_exit(chat_ckpt):
    lm = load(chat_ckpt)
    expected = lm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], 8)
    done = _chat([str(chat_ckpt), "--system", "Be brief.", *GREEDY], ["hello"])  # EOF, no /quit
    assert done.returncode == 0, done.stderr.decode()
    assert _replies(done.stdout) == expected + "\n"


def test_no_chat_template_is_plain_continuation(tmp_path):
    ckpt = _checkpoint(tmp_path / "base", chat=False)
    lm = load(ckpt)
    expected = [lm.generate(text, 8) for text in ("Once upon a", "The quick")]
    assert expected[0] != expected[1]
    done = _chat([str(ckpt), *GREEDY], ["Once upon a", "The quick", "/quit"])
    assert done.returncode == 0, done.stderr.decode()
    assert "no chat template: plain continuation of what you type" in done.stderr.decode()
    assert _replies(done.stdout) == "".join(f"{r}\n" for r in expected)


def test_overflow_drops_the_oldest_turns_once(tmp_path):
    ckpt = _checkpoint(tmp_path / "short", chat=True, max_seq_len=40)
    lines = ["Once upon a time there was", "The quick brown fox", "In 1999 the committee", "hello"]
    done = _chat([str(ckpt), *GREEDY], lines)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode().count("dropping the oldest turns") == 1
    assert done.stdout.decode().count("\n") >= len(lines)


@pytest.fixture(scope="module")
def gpt2_chat(tmp_path_factory):
    """A tiny random GPT-2 (learned positions: 64, none past them) with GPT-2's tokenizer and a ChatML
    template that trims each content (so a content holding a special token's string is refused)."""
    import transformers

    from modernlm.chat import CHATML_TEMPLATE
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "gpt2-tokenizer").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    path = tmp_path_factory.mktemp("gpt2") / "chat"
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "gpt2-tokenizer"))
    tok.chat_template = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2, vocab_size=tok.vocab_size)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.hf
def test_a_non_llama_hf_model_chats_with_replies_cut_at_its_context(gpt2_chat):
    """Default settings (backend and quantize auto) run GPT-2 in transformers; max_new_tokens past its
    64 positions: each reply is the reply with the budget its prompt leaves, said once."""
    lm = load(gpt2_chat, progress=False)
    expected = []
    for text in ("hello", "again"):  # (100 new tokens never fit with a turn before: each message alone)
        messages = [{"role": "user", "content": text}]
        expected.append(lm.chat(messages, max_new_tokens=64 - len(lm.chat_prompt_ids(messages))))
    done = _chat([str(gpt2_chat), "temperature=0", "max_new_tokens=100"], ["hello", "again"])
    assert done.returncode == 0, done.stderr.decode()
    assert _replies(done.stdout) == "".join(f"{r}\n" for r in expected)
    assert done.stderr.decode().count("max_new_tokens=100 does not fit the model's context of 64 tokens") == 1


def test_a_budget_past_the_context_keeps_the_turns_that_fit(chat_ckpt):
    """max_new_tokens >= the context (the chat default, 256, on a 256-token model): the turns that
    fit in half the context stay (every turn but the last went, every time), and the reply is cut
    where the context ends."""
    from modernlm.commands.chat import Conversation
    from modernlm.generation import Sampling

    lm = load(chat_ckpt)
    assert lm.max_context == 256
    talk = Conversation(lm, "", Sampling(max_new_tokens=256))
    talk.history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    history, ids = talk.fit("again")
    assert history == [*talk.history, {"role": "user", "content": "again"}] and len(ids) < 128
    assert talk.budget(len(ids)).max_new_tokens == 256 - len(ids)
    talk.history *= 20  # ~500 tokens of turns: the oldest go until the rest fits in half the context
    history, ids = talk.fit("again")
    kept = len(history) - 1
    one_more = [*talk.history[-kept - 2 :], history[-1]]
    assert 0 < kept < 40 and len(ids) <= 128 < len(lm.chat_prompt_ids(talk.messages(one_more)))


@pytest.mark.hf
def test_a_refused_message_is_one_line_and_the_chat_goes_on(gpt2_chat):
    """A UserError for one message (a special token's string in a content the template trims): one
    line, the message is not kept: the chat goes on as if it had not been sent."""
    args = [str(gpt2_chat), "temperature=0", "max_new_tokens=5"]
    done = _chat(args, ["hello", "what is <|endoftext|>? ", "hi"])
    assert done.returncode == 0, done.stderr.decode()
    unsent = _chat(args, ["hello", "hi"])
    assert _replies(done.stdout) == _replies(unsent.stdout) and _replies(done.stdout).count("\n") == 2
    errors = [line for line in done.stderr.decode().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds the special token '<|endoftext|>'" in errors[0], errors


def test_bytes_that_are_not_utf8_are_replacement_characters(chat_ckpt):
    lm = load(chat_ckpt)
    hello = {"role": "user", "content": "hello"}
    bad = {"role": "user", "content": "\ufffd\ufffd bad bytes"}  # as Ollama reads them: U+FFFD each
    r1 = lm.chat([hello], 8)
    r2 = lm.chat([hello, {"role": "assistant", "content": r1}, bad], 8)
    done = subprocess.run(
        [sys.executable, "-m", "modernlm", "chat", str(chat_ckpt), *GREEDY],
        input=b"hello\n\xff\xfe bad bytes\n", capture_output=True, timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert _replies(done.stdout) == f"{r1}\n{r2}\n"


def test_a_system_prompt_too_long_for_the_context_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "short", chat=True, max_seq_len=40)
    long = "You are a very helpful assistant who always answers with great care and detail."
    done = _chat([str(ckpt), "--system", long, *GREEDY], ["hi"])
    assert done.returncode == 2
    err = done.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modernlm chat: error: system: the system prompt is too long"), err
    # In the chat, /system refuses it and keeps the one before.
    lm = load(ckpt)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = lm.chat(messages, min(8, 40 - len(lm.chat_prompt_ids(messages))))  # (the reply stops at 40 tokens)
    done = _chat([str(ckpt), "--system", "Be brief.", *GREEDY], [f"/system {long}", "hi"])
    assert done.returncode == 0, done.stderr.decode()
    assert _replies(done.stdout) == expected + "\n"
    assert "/system: the system prompt is too long" in done.stderr.decode()


def test_terminal_shows_the_prompt_and_the_streamed_reply(chat_ckpt):
    expected = load(chat_ckpt).chat([{"role": "user", "content": "hello"}], max_new_tokens=8)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modernlm", "chat", str(chat_ckpt), *GREEDY],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    os.close(slave)
    reads: list[bytes] = []

    def read_until(marker: bytes, count: int, timeout: float = 120) -> bytes:
        end = time.monotonic() + timeout
        while b"".join(reads).count(marker) < count and time.monotonic() < end:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    reads.append(os.read(master, 4096))
                except OSError:
                    break
        return b"".join(reads)

    try:
        assert b"you> " in read_until(b"you> ", 1)
        before = len(reads)
        os.write(master, b"hello\n")
        shown = read_until(b"you> ", 2).decode("utf-8", "replace").replace("\r\n", "\n")
        assert "hello\n" + expected + "\nyou> " in shown
        assert len(reads) - before >= 1
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_gguf_two_turns_are_its_chat():
    from tests.test_api import _smol_gguf

    gguf = _smol_gguf()
    # as `modernlm chat` loads it: our engine on the file's Q4_1 blocks, whose 8-bit head rounds its
    # input as llama.cpp's does (the first reply then opens "L'Étoile, la Marseillaise", as
    # llama-server's on this file; transformers' float model says "The capital of France is Paris.")
    lm = load(gguf, backend="modernlm", quantize="auto", progress=False)
    first = [{"role": "user", "content": "What is the capital of France?"}]
    r1 = lm.chat(first, 16)
    second = [*first, {"role": "assistant", "content": r1}, {"role": "user", "content": "And of Italy?"}]
    r2 = lm.chat(second, 16)
    done = _chat([str(gguf), "temperature=0", "max_new_tokens=16"], [first[0]["content"], second[-1]["content"]], 600)
    assert done.returncode == 0, done.stderr.decode()
    assert _replies(done.stdout) == f"{r1}\n{r2}\n"

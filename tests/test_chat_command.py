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

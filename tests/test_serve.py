"""`modernlm serve` through the official `openai` client against a live server on 127.0.0.1: the
answers equal `modernlm.load`'s own generation (greedy and seeded sampling), streamed text joins to
the whole text, stop strings and n behave, usage counts the tokens, logprobs are the model's own
log-softmax, errors come in OpenAI's shape, concurrent clients get what they get alone, a short
request is decoded in the same forwards as a long one and answered first, a client that
disconnects frees its place, and the command fails in one line on a bad address."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from modernlm import load  # noqa: E402
from tests.serve_util import chat_checkpoint, serving  # noqa: E402

USER = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(chat_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt"))


@pytest.fixture(scope="module")
def slow_lm(lm):
    """The same model, 20 ms per forward: a request that is still running when the test looks."""
    slow = load(lm.checkpoint)
    forward = slow.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    slow.model.forward = slow_forward
    return slow


@pytest.fixture(scope="module")
def url(lm):
    # a float32 cache, as the references here (generate, the model's log-softmax) keep
    with serving(lm, max_batch=4, kv_dtype="float32") as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list(client, lm):
    models = client.models.list().data
    assert [m.id for m in models] == [lm.name]
    assert client.models.retrieve(lm.name).id == lm.name


def test_chat_equals_the_facade_streamed_or_not(client, lm):
    reply = client.chat.completions.create(model=lm.name, messages=USER, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == lm.chat(USER, 12)
    chunks = list(
        client.chat.completions.create(
            model=lm.name,
            messages=USER,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_equal_generate(client, lm):
    for prompt in ("Once upon", "The quick brown fox jumps over the lazy"):
        out = client.completions.create(model=lm.name, prompt=prompt, max_tokens=10, temperature=0)
        assert out.choices[0].text == lm.generate(prompt, 10)
        ids = lm.tokenizer.encode(prompt, add_bos=lm.tokenizer.add_bos)
        assert out.usage.prompt_tokens == len(ids)
    # several prompts, and token ids, in one request
    prompts = ["Once upon", "In 1999 the"]
    out = client.completions.create(model=lm.name, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == lm.generate(prompts, 6)
    ids = lm.tokenizer.encode("Once upon", add_bos=True)
    out = client.completions.create(model=lm.name, prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == lm.generate("Once upon", 6)


def test_finish_reason_and_usage(client, lm):
    out = client.chat.completions.create(model=lm.name, messages=USER, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(lm.chat_prompt_ids(USER))
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    # a reply that ends at eos counts its tokens, the eos included: as many as the engine alone took
    from modernlm.generation import TextGeneration

    long = client.chat.completions.create(model=lm.name, messages=USER, max_tokens=200, temperature=0)
    alone = TextGeneration(lm.model, lm.tokenizer, [lm.chat_prompt_ids(USER)], 200).run()[0]
    assert long.choices[0].finish_reason == ("length" if alone.finish == "length" else "stop")
    assert long.usage.completion_tokens == len(alone.ids) + (alone.finish == "eos")


def test_stop_strings_streamed_and_not(client, lm):
    full = lm.generate("Once upon", 30)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2 and stop.strip(), full
    cut = full[: full.index(stop)]
    out = client.completions.create(model=lm.name, prompt="Once upon", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=lm.name, prompt="Once upon", max_tokens=30, temperature=0, stop=stop, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == cut  # no piece showed the stop string, or a part of it past the cut


def test_seeded_sampling_reproduces_and_n_choices(client, lm):
    kw = dict(model=lm.name, prompt="Once upon", max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) > 1
    # choice i is sampled with seed + i, exactly as `generate` samples alone
    assert texts == [lm.generate("Once upon", 12, temperature=1.0, seed=7 + i) for i in range(3)]
    streamed = ["", "", ""]
    for c in client.completions.create(**kw, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == texts
    chat = client.chat.completions.create(model=lm.name, messages=USER, max_tokens=12, temperature=0.8, seed=3)
    assert chat.choices[0].message.content == lm.chat(USER, 12, temperature=0.8, seed=3)


def test_logprobs_are_the_models_log_softmax(client, lm):
    out = client.completions.create(model=lm.name, prompt="Once upon", max_tokens=6, temperature=0, logprobs=3)
    ids = lm.tokenizer.encode("Once upon", add_bos=True)
    lp = out.choices[0].logprobs
    gen = lm.tokenizer.encode(out.choices[0].text)
    full = torch.tensor([ids + gen])
    ref = lm.logits_fn(full)[0, len(ids) - 1 : -1].float().log_softmax(-1)  # (new, V)
    assert len(lp.token_logprobs) == len(gen) == 6
    for t, (token_id, logprob) in enumerate(zip(gen, lp.token_logprobs, strict=True)):
        assert logprob == pytest.approx(float(ref[t, token_id]), abs=1e-4)
        top = ref[t].topk(3)
        assert sorted(lp.top_logprobs[t].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
    chat = client.chat.completions.create(
        model=lm.name, messages=USER, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 for e in content)
    assert bytes(b for e in content for b in e.bytes).decode() == chat.choices[0].message.content
    prompt = lm.chat_prompt_ids(USER)
    gen = lm.tokenizer.encode(chat.choices[0].message.content)
    ref = lm.logits_fn(torch.tensor([prompt + gen]))[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    assert [e.logprob for e in content] == pytest.approx([float(ref[t, i]) for t, i in enumerate(gen)], abs=1e-4)


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_errors_in_openais_shape(client, lm, url):
    e = _error(lambda: client.chat.completions.create(model=lm.name, messages=USER, temperature=5))
    assert e.status_code == 400 and e.body["param"] == "temperature" and "temperature" in e.body["message"]
    assert e.body["type"] == "invalid_request_error"
    e = _error(lambda: client.completions.create(model=lm.name, prompt="x", max_tokens=0))
    assert e.status_code == 400 and e.body["param"] == "max_tokens"
    e = _error(lambda: client.chat.completions.create(model=lm.name, messages=[{"role": "robot", "content": "x"}]))
    assert e.status_code == 400 and e.body["param"] == "messages[0].role"
    e = _error(lambda: client.completions.create(model=lm.name, prompt="x", stop=["a"] * 5))
    assert e.status_code == 400 and e.body["param"] == "stop"
    e = _error(lambda: client.completions.create(model=lm.name, prompt="x", frequency_penalty=0.5))
    assert e.status_code == 400 and e.body["param"] == "frequency_penalty"
    e = _error(lambda: client.completions.create(model="gpt-4", prompt="x"))
    assert e.status_code == 404 and e.body["code"] == "model_not_found"
    too_long = "the cat " * 400  # far past the 256-token context
    e = _error(lambda: client.chat.completions.create(model=lm.name, messages=[{"role": "user", "content": too_long}]))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded" and e.body["param"] == "messages"
    e = _error(lambda: client.completions.create(model=lm.name, prompt="x", max_tokens=300))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    # unknown fields are ignored, as OpenAI does
    out = client.completions.create(
        model=lm.name, prompt="Once upon", max_tokens=3, temperature=0, extra_body={"no_such_field": 1}
    )
    assert out.choices[0].text == lm.generate("Once upon", 3)
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_api_key_body_size_and_timeout(slow_lm):
    lm = slow_lm
    with serving(lm, api_key="secret", max_body_bytes=2000, request_timeout=0.5) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        e = _error(lambda: wrong.models.list())
        assert e.status_code == 401 and e.body["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert right.models.list().data[0].id == lm.name
        assert httpx.get(f"{url}/health").status_code == 200  # no key needed
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/v1/nothing").status_code == 401  # every other route needs it
        e = _error(lambda: right.completions.create(model=lm.name, prompt="x" * 5000))
        assert e.status_code == 413
        e = _error(
            lambda: right.completions.create(
                model=lm.name, prompt="Once", max_tokens=200, temperature=0, extra_body={"ignore_eos": True}
            )
        )  # 200 x 20 ms
        assert e.status_code == 504 and "longer than 0.5 s" in e.body["message"]
        deadline = time.monotonic() + 5  # and the engine let it go
        while httpx.get(f"{url}/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["running"] == 0


def test_a_full_queue_is_refused_with_503(slow_lm):
    lm = slow_lm
    with serving(lm, max_batch=1, max_queue=0) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        busy = client.completions.create(
            model=lm.name, prompt="Once", max_tokens=240, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(busy))  # it holds the only row
        e = _error(lambda: client.completions.create(model=lm.name, prompt="x", max_tokens=2))
        assert e.status_code == 503 and e.response.headers.get("retry-after") == "1"
        busy.close()


def test_concurrent_clients_get_what_they_get_alone(lm):
    prompts = [" ".join(["Once upon a time there was a cat"] * (1 + i % 5))[: 5 + 7 * i] for i in range(16)]
    lengths = [4 + (5 * i) % 23 for i in range(16)]
    alone = [lm.generate(p, n) for p, n in zip(prompts, lengths, strict=True)]
    with serving(lm, max_batch=16) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)

        def ask(i: int) -> str:
            stream = i % 2 == 0
            out = client.completions.create(
                model=lm.name, prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=stream
            )
            return "".join(c.choices[0].text for c in out if c.choices) if stream else out.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, range(16)))
        engine_steps = httpx.get(f"{url}/health").json()
    assert got == alone
    assert engine_steps["running"] == 0 and engine_steps["waiting"] == 0


def test_requests_are_decoded_together_and_a_short_one_finishes_first(lm):
    """Batching through the server: a 3-token request sent while a 250-token one streams is decoded
    in the same forwards and answered while the long one still runs. A forward pre-hook on the
    model records the rows of each decode forward (one token per row) and holds the
    engine at two points, so no timing matters: in the long request's first decode step until the
    short one is seen waiting (/health), and at its 20th until the client has the short answer. A
    one-request-at-a-time server keeps the short request waiting behind the long one's 250 tokens
    and decodes one row per forward."""
    served = load(lm.checkpoint)  # a model of its own: the hook stays off the module's server
    rows: list[int] = []
    holding, queued, answered = threading.Event(), threading.Event(), threading.Event()

    def decode_rows(module, args, kwargs) -> None:
        if args[0].size(1) == 1:  # a decode step: both prompts are 2 tokens, prefilled in one forward
            rows.append(args[0].size(0))
            if len(rows) == 1:  # the long request's first step: past its admission
                holding.set()
                queued.wait(30)
            elif len(rows) == 20:
                answered.wait(30)

    handle = served.model.register_forward_pre_hook(decode_rows, with_kwargs=True)
    try:
        with serving(served, max_batch=4) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
            long = pool.submit(lambda: client.completions.create(
                model=served.name, prompt="Once", max_tokens=250, temperature=0, stream=True,
                extra_body={"ignore_eos": True}))  # fmt: skip
            assert holding.wait(30)  # the long request has its row; the engine waits in its first step
            short = pool.submit(lambda: client.completions.create(
                model=served.name, prompt="Once upon", max_tokens=3, temperature=0))  # fmt: skip
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health").json()["waiting"] != 1:  # queued: the engine is held
                assert time.monotonic() < deadline, "the short request never reached the engine"
                time.sleep(0.01)
            queued.set()
            answer = short.result(timeout=60)
            steps_then, running_then = len(rows), httpx.get(f"{url}/health").json()["running"]
            answered.set()
            long_text = "".join(c.choices[0].text for c in long.result(timeout=60) if c.choices)
    finally:
        queued.set()
        answered.set()
        handle.remove()
    assert answer.choices[0].text == lm.generate("Once upon", 3) and answer.usage.completion_tokens == 3
    assert running_then == 1 and 3 <= steps_then <= 20  # answered while the long request was mid-way
    # One decode forward per step, 249 of them (the prefill gives the long one's first token); the
    # short request's prefill fills a second row after step 1, its two decode steps are 2 and 3.
    assert rows == [1] + [2] * 2 + [1] * 246
    assert long_text == lm.generate("Once", 250, eos_token_id=())  # what it gets alone


def test_a_client_that_disconnects_frees_its_row(slow_lm):
    lm = slow_lm
    with serving(lm, max_batch=1, max_queue=4) as url:
        body = {
            "model": lm.name,
            "prompt": "Once",
            "max_tokens": 250,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # the connection is closed mid-stream: the next request gets the row
        t0 = time.monotonic()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        out = client.completions.create(model=lm.name, prompt="Once upon", max_tokens=3, temperature=0)
        assert out.choices[0].text == lm.generate("Once upon", 3)
        assert time.monotonic() - t0 < 4  # not after the 250 x 20 ms the gone client asked for
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health").json()
        assert (health["status"], health["running"], health["waiting"], health["kv_blocks_used"]) == ("ok", 0, 0, 0)


def test_no_chat_template_means_completions_only(tmp_path):
    plain = load(chat_checkpoint(tmp_path / "plain", chat=False))
    with serving(plain) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        e = _error(lambda: client.chat.completions.create(model=plain.name, messages=USER))
        assert e.status_code == 400 and "/v1/completions" in e.body["message"]
        assert client.completions.create(model=plain.name, prompt="Once", max_tokens=3, temperature=0).choices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_and_refuses_a_taken_port(lm, tmp_path):
    port = _free_port()
    env = {**os.environ, "MODERNLM_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modernlm", "serve", str(lm.checkpoint), f"port={port}", "log_format=json"],
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        banner = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}" in banner and "API key required" in banner
        deadline = time.monotonic() + 240  # the decode steps compile before the port opens (compile=true)
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        raw = client.completions.with_raw_response.create(model=lm.name, prompt="Once upon", max_tokens=4,
                                                          temperature=0)  # fmt: skip
        assert raw.parse().choices[0].text == lm.generate("Once upon", 4)
        taken = subprocess.run(
            [sys.executable, "-m", "modernlm", "serve", str(lm.checkpoint), f"port={port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode == 2 and taken.stderr.count("\n") == 1 and "port" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        proc.terminate()  # SIGTERM: the engine and the HTTP server stop, exit 0
        assert proc.wait(timeout=30) == 0
    # log_format=json: the access lines on stderr, one JSON object each
    logged = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    (access,) = [e for e in logged if e["logger"] == "modernlm.serve.access" and e["path"] == "/v1/completions"]
    assert access["status"] == 200 and access["request_id"] == raw.headers["x-request-id"]
    for args in ([str(tmp_path / "nope")], [str(lm.checkpoint), "allowed_hosts=[http://a.lan]"]):
        refused = subprocess.run([sys.executable, "-m", "modernlm", "serve", *args], capture_output=True, text=True,
                                 timeout=60)  # fmt: skip
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "allowed_hosts: 'http://a.lan' is not a host name" in refused.stderr


def test_the_page_is_served(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text
    assert json.loads(httpx.get(f"{url}/v1/nothing").text)["error"]["code"] == "not_found"


# ---- closed to web pages, logged, observable ---------------------------------------------------


def _eventually(check, seconds: float = 5.0):
    """`check()`'s first truthy value: the access line and the request metrics are written just
    after the answer's last byte, so a client can see the answer a moment before them."""
    deadline = time.monotonic() + seconds
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def test_a_forged_host_is_refused_and_loopback_names_are_answered(url, lm):
    """DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1 sends its own
    name in Host; only loopback names (and allowed_hosts) are answered."""
    port = _port(url)
    forged = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                           default_headers={"Host": "attacker.example"})  # fmt: skip
    e = _error(lambda: forged.completions.create(model=lm.name, prompt="Once", max_tokens=2))
    assert e.status_code == 403 and e.body["code"] == "host_not_allowed" and "attacker.example" in e.body["message"]
    for host in (f"attacker.example:{port}", "localhost.attacker.example", "127.0.0.1.nip.io", "[::2]", "[::1",
                 "localhost:x", "local host", ""):  # fmt: skip
        for path in ("/", "/v1/models", "/health", "/metrics"):
            r = httpx.get(f"{url}{path}", headers={"Host": host})
            assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (host, path)
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", "app.localhost", "127.1.2.3",
                 "[::1]", f"[::1]:{port}", "localhost."):  # fmt: skip
        r = httpx.get(f"{url}/v1/models", headers={"Host": host})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == lm.name, host


def test_allowed_hosts_and_cors_origins(lm, url):
    # by default: no other host, and no CORS answer to another origin's preflight or request
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in httpx.get(f"{url}/v1/models", headers={"Origin": "http://app.example"}).headers
    with serving(lm, allowed_hosts=["MyHost.lan", "[fd00::1]"], cors_origins=["http://app.example"]) as served:
        port = _port(served)
        for host in (f"myhost.lan:{port}", "MYHOST.LAN", f"[fd00::1]:{port}", "localhost"):
            assert httpx.get(f"{served}/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("other.lan", "myhost.lan.attacker.example", "[fd00::2]"):
            assert httpx.get(f"{served}/v1/models", headers={"Host": host}).status_code == 403, host
        r = httpx.options(f"{served}/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "content-type" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(f"{served}/v1/chat/completions", headers=preflight | {"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        client = openai.OpenAI(base_url=f"{served}/v1", api_key="x", max_retries=0,
                               default_headers={"Origin": "http://app.example"})  # fmt: skip
        raw = client.completions.with_raw_response.create(model=lm.name, prompt="Once", max_tokens=2, temperature=0)
        assert raw.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-request-id" in raw.headers["access-control-expose-headers"]
        assert raw.parse().choices[0].text == lm.generate("Once", 2)
    with serving(lm, allowed_hosts=["*"]) as served:
        assert httpx.get(f"{served}/v1/models", headers={"Host": "anything.example"}).status_code == 200


def test_only_json_bodies_start_a_generation(url, lm):
    """What a page on another site may send without a preflight (a form, text/plain) is refused
    before any forward runs."""
    forwards = []
    handle = lm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    body = json.dumps({"model": lm.name, "prompt": "Once upon", "max_tokens": 3, "temperature": 0})
    try:
        for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "text/plain; charset=utf-8"},
                        {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "multipart/form-data"},
                        {"Content-Type": "application/jsonx"}, {}):  # fmt: skip
            r = httpx.post(f"{url}/v1/completions", content=body, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", headers
        r = httpx.post(f"{url}/v1/chat/completions", data={"model": lm.name, "messages": "hi"})  # a form
        assert r.status_code == 415
        assert forwards == []
        json_type = {"Content-Type": "Application/JSON; charset=utf-8"}
        r = httpx.post(f"{url}/v1/completions", content=body, headers=json_type)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == lm.generate("Once upon", 3)
        assert forwards
    finally:
        handle.remove()


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}  # fmt: skip


def test_metrics_count_requests_tokens_and_the_engine(lm):
    with serving(lm, max_batch=2) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        before = _scrape(url)
        chat = client.chat.completions.create(model=lm.name, messages=USER, max_tokens=5, temperature=0)
        pieces = list(client.completions.create(model=lm.name, prompt="Once upon", max_tokens=7, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
        assert len(lm.tokenizer.encode("".join(c.choices[0].text for c in pieces if c.choices))) == 7
        _error(lambda: client.completions.create(model=lm.name, prompt="x", temperature=5))

        def requests(route: str, status: str, m: dict) -> float:
            return m.get(("modernlm_requests_total", (("method", "POST"), ("route", route), ("status", status))), 0)

        after = _eventually(lambda: (m := _scrape(url)) and requests("/v1/completions", "400", m) and m)
        assert requests("/v1/chat/completions", "200", after) - requests("/v1/chat/completions", "200", before) == 1
        assert requests("/v1/completions", "200", after) - requests("/v1/completions", "200", before) == 1
        assert requests("/v1/completions", "400", after) - requests("/v1/completions", "400", before) == 1

        def delta(name: str, labels: tuple = ()) -> float:
            return after[(name, labels)] - before.get((name, labels), 0)

        prompt = len(lm.tokenizer.encode("Once upon", add_bos=lm.tokenizer.add_bos))
        assert delta("modernlm_prompt_tokens_total") == chat.usage.prompt_tokens + prompt
        assert delta("modernlm_completion_tokens_total") == chat.usage.completion_tokens + 7
        assert delta("modernlm_time_to_first_token_seconds_count") == 2
        for route, count in (("/v1/chat/completions", 1), ("/v1/completions", 2)):
            assert delta("modernlm_request_duration_seconds_count", (("route", route),)) == count
        ttft = delta("modernlm_time_to_first_token_seconds_sum")
        assert 0 < ttft <= sum(delta("modernlm_request_duration_seconds_sum", (("route", r),))
                               for r in ("/v1/chat/completions", "/v1/completions"))  # fmt: skip
        # the engine's numbers, read at the scrape: what /health says at rest
        health = httpx.get(f"{url}/health").json()
        engine = {"running": "modernlm_running_sequences", "waiting": "modernlm_waiting_sequences",
                  "kv_cache_bytes": "modernlm_kv_cache_budget_bytes", "kv_blocks_used": "modernlm_kv_blocks_used",
                  "kv_blocks_free": "modernlm_kv_blocks_free", "kv_blocks_cached": "modernlm_kv_blocks_cached",
                  "prefix_hit_tokens": "modernlm_prefix_cache_hit_tokens_total"}  # fmt: skip
        assert {key: after[(name, ())] for key, name in engine.items()} == {key: health[key] for key in engine}
        assert health["running"] == health["waiting"] == 0


def test_request_ids_and_the_access_log(url, lm, caplog, monkeypatch):
    import modernlm.serve.app as app_module
    from modernlm.serve.http import JSONFormatter

    caplog.set_level(logging.INFO, logger="modernlm.serve.access")
    engine_ids = []
    make_request = app_module.Request
    monkeypatch.setattr(app_module, "Request", lambda *a, **kw: engine_ids.append(kw["id"]) or make_request(*a, **kw))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                           default_headers={"x-request-id": "trace-42"})  # fmt: skip
    raw = client.completions.with_raw_response.create(model=lm.name, prompt="Once", max_tokens=2, temperature=0, n=2)
    assert raw.headers["x-request-id"] == "trace-42" and engine_ids == ["trace-42"]
    assert raw.parse().id.startswith("cmpl-")  # OpenAI's own ids stay as they are
    generated = set()
    for given in (None, "has space", "x" * 129, "quote\"d", "é"):
        headers = {} if given is None else {"x-request-id": given.encode()}
        rid = httpx.get(f"{url}/health", headers=headers).headers["x-request-id"]
        assert len(rid) == 32 and int(rid, 16) >= 0 and rid not in generated, given
        generated.add(rid)
    assert httpx.get(f"{url}/v1/models", headers={"Host": "attacker.example", "x-request-id": "r-403"}).headers[
        "x-request-id"] == "r-403"  # fmt: skip

    def lines(rid: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "modernlm.serve.access" and r.access["request_id"] == rid]

    assert _eventually(lambda: lines("trace-42") and lines("r-403"))
    (record,) = lines("trace-42")
    fields = record.access
    assert {k: fields[k] for k in ("method", "path", "status", "request_id")} == {
        "method": "POST", "path": "/v1/completions", "status": 200, "request_id": "trace-42"}  # fmt: skip
    assert fields["client"].startswith("127.0.0.1:") and 0 < fields["duration_s"] < 60
    assert record.getMessage().startswith(f'{fields["client"]} "POST /v1/completions" 200 ')
    assert record.getMessage().endswith(" id=trace-42")
    as_json = json.loads(JSONFormatter().format(record))  # log_format=json: the same fields, one object a line
    assert as_json == fields | {"time": as_json["time"], "level": "INFO", "logger": "modernlm.serve.access",
                                "message": record.getMessage()}  # fmt: skip
    assert [r.access["status"] for r in lines("r-403")] == [403]
    httpx.get(f"{url}/x%0A127.0.0.1:1%20%22GET%20/%22%20200", headers={"x-request-id": "forge"})  # a decoded newline
    (forge,) = _eventually(lambda: lines("forge"))
    assert "\n" not in forge.getMessage() and forge.access["path"].startswith("/x%0A") and forge.access["status"] == 404
    assert all(len(lines(rid)) == 1 for rid in generated)  # one line a request


def test_a_route_error_is_logged_and_answered_with_the_request_id(url, lm, caplog, monkeypatch):
    import modernlm.serve.app as app_module

    def boom(*args, **kwargs):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(lm, "chat_prompt_ids", boom)  # what /v1/chat/completions calls to tokenize
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                           default_headers={"x-request-id": "fault-1"})  # fmt: skip
    e = _error(lambda: client.chat.completions.create(model=lm.name, messages=USER, max_tokens=2))
    assert e.status_code == 500 and e.body["type"] == "server_error" and "fault-1" in e.body["message"]
    assert "secret" not in e.response.text and e.response.headers["x-request-id"] == "fault-1"
    (record,) = [r for r in caplog.records if r.name == "modernlm.serve" and "fault-1" in r.getMessage()]
    assert record.levelno == logging.ERROR and isinstance(record.exc_info[1], RuntimeError)
    assert "secret detail" in caplog.text and "Traceback" in caplog.text
    # a streamed answer whose headers are gone: the error comes as an event, logged the same way
    monkeypatch.setattr(app_module, "logprobs_json", boom)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                           default_headers={"x-request-id": "fault-2"})  # fmt: skip
    with pytest.raises(openai.APIError) as info:
        list(client.completions.create(model=lm.name, prompt="Once", max_tokens=3, logprobs=1, stream=True))
    assert "fault-2" in info.value.message and "secret" not in info.value.message
    (record,) = [r for r in caplog.records if r.name == "modernlm.serve" and "fault-2" in r.getMessage()]
    assert isinstance(record.exc_info[1], RuntimeError)
    assert client.completions.create(model=lm.name, prompt="Once", max_tokens=2, temperature=0).choices  # still up


def test_serve_settings_from_the_command_line():
    from modernlm.commands.serve import Config, exposure_warnings
    from modernlm.config import load_config
    from modernlm.errors import UserError

    for given in ("allowed_hosts=[a.lan,B.lan]", "allowed_hosts=a.lan,B.lan"):
        assert load_config(Config, overrides=[given]).allowed_hosts == ["a.lan", "B.lan"]
    cfg = load_config(Config, overrides=["cors_origins=[http://localhost:3000]", "kv_cache_bytes=1e9",
                                         "log_format=json", "access_log=false", "prefix_cache=off"])  # fmt: skip
    assert (cfg.cors_origins, cfg.kv_cache_bytes, cfg.log_format, cfg.access_log, cfg.prefix_cache) == (
        ["http://localhost:3000"], 10**9, "json", False, False)  # fmt: skip
    for bad, name in (("allowed_hosts=http://a.lan", "allowed_hosts"), ("allowed_hosts=a.lan:8000", "allowed_hosts"),
                      ("allowed_hosts=[a b]", "allowed_hosts"), ("cors_origins=app.example", "cors_origins"),
                      ("cors_origins=http://app.example/", "cors_origins"), ("kv_cache_bytes=-1", "kv_cache_bytes"),
                      ("kv_block_size=0", "kv_block_size"), ("prefill_chunk=0", "prefill_chunk"),
                      ("log_format=xml", "log_format")):  # fmt: skip
        with pytest.raises(UserError) as info:
            load_config(Config, overrides=[bad])
        assert str(info.value).startswith(name) and "\n" not in str(info.value), bad
    (warning, note) = exposure_warnings("0.0.0.0", "", [])
    assert "warning" in warning and "api_key" in warning and "allowed_hosts" in note
    assert exposure_warnings("::", "k", ["h"]) == []
    assert all(exposure_warnings(h, "", []) == [] for h in ("127.0.0.1", "localhost", "::1", "[::1]"))


@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_served_equals_transformers():
    """The real model: SmolLM2-135M-Instruct served from its .gguf (converted, our engine) answers
    4 concurrent chats with transformers' own greedy replies (`load(gguf)`, the transformers
    backend), counts the prompt tokens of transformers' chat template, and streams the same text."""
    import transformers

    from tests.test_api import _smol_gguf

    gguf = _smol_gguf()
    reference = load(gguf, progress=False)  # transformers' model and generate
    served = load(gguf, backend="modernlm", progress=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    questions = ["What is the capital of France?", "Name a color.", "What is 2 + 3?", "Say hello in Spanish."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    expected = [reference.chat(c, 16) for c in chats]
    with serving(served, max_batch=4) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)

        def ask(i: int):
            return client.chat.completions.create(model=served.name, messages=chats[i], max_tokens=16, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(4)))
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=served.name, messages=chats[0], max_tokens=16, temperature=0, stream=True
            )
            if c.choices
        )
    assert [r.choices[0].message.content for r in replies] == expected
    assert streamed == expected[0]
    for chat, r in zip(chats, replies, strict=True):
        ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert r.usage.prompt_tokens == len(ids)

"""The cases that kept `modernlm serve` from being left running, each through the `openai` client
or plain HTTP against a live server: a burst of chats that name no max_tokens holds only the KV
memory its tokens fill and gives it all back; a second chat turn reuses the first turn's cached
blocks and says the same; huge stop strings are refused at once, and the largest allowed ones
leave a neighbour's speed alone; a request whose prefill fails gets a 500 naming its request id
while the others are answered. (The forged Host, text/plain POSTs and /metrics are in
test_serve.py; a typed `<|im_start|>` in test_text_is_text.py; the engine's invariants in
test_serve_engine.py.)"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")

from modernlm import load  # noqa: E402
from tests.serve_util import SCRIPT_WORDS, chat_checkpoint, script_checkpoint, serving  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(chat_checkpoint(tmp_path_factory.mktemp("serve-hard") / "ckpt", max_seq_len=1024))


def client_for(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def test_a_burst_of_chats_without_max_tokens_holds_what_it_fills_and_gives_it_back(tmp_path):
    """16 concurrent chats that name no max_tokens (so each may run to the context's end, 512
    tokens here) and get short replies, as on the chat page: the KV blocks in use never exceed what
    the admitted sequences' tokens fill, rounded up to a block each (the old cache gave every row
    room for prompt + max_tokens and kept it), and once they are answered every block is back."""
    lm = load(script_checkpoint(tmp_path / "script"))  # replies "<script>alert(1)</script>", then eos
    with serving(lm, max_batch=16, kv_block_size=16) as url:
        client = client_for(url)
        base = httpx.get(f"{url}/health").json()
        peaks = []

        def chat(i: int):
            messages = [{"role": "user", "content": f"Story {i}: once upon a time"}]
            return client.chat.completions.create(model=lm.name, messages=messages, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(chat, i) for i in range(16)]
            while not all(f.done() for f in futures):
                peaks.append(httpx.get(f"{url}/health").json()["kv_blocks_used"])
                time.sleep(0.01)
            answers = [f.result() for f in futures]
        after = httpx.get(f"{url}/health").json()
    tokens = sum(a.usage.prompt_tokens + a.usage.completion_tokens for a in answers)
    bound = tokens // 16 + 2 * 16  # every token in a block, a partly filled block and one more per chat
    assert max(peaks) <= bound, (max(peaks), bound)
    assert base["kv_blocks_used"] == after["kv_blocks_used"] == 0
    assert after["kv_blocks_free"] + after["kv_blocks_cached"] == after["kv_blocks_total"]
    assert all(a.choices[0].message.content == "".join(SCRIPT_WORDS) for a in answers)
    old = 16 * lm.max_context  # the old SlotCache's slots: 16 rows of prompt + max_tokens, the context's end
    assert max(peaks) * 16 < old / 4


def test_a_second_chat_turn_reuses_the_first_and_says_the_same(lm):
    """Turn 2 starts with turn 1's prompt and reply: the prefix cache holds all their full blocks
    (/metrics and /health count the hit tokens), and the reply equals the reply of a server
    without the cache."""
    first = [{"role": "user", "content": "Once upon a time there was a little cat who lived in a big house. " * 4}]
    replies, hits = {}, {}
    for prefix_cache in (True, False):
        with serving(lm, prefix_cache=prefix_cache) as url:
            client = client_for(url)
            a1 = client.chat.completions.create(model=lm.name, messages=first, max_tokens=20, temperature=0)
            second = [*first, {"role": "assistant", "content": a1.choices[0].message.content},
                      {"role": "user", "content": "And then?"}]  # fmt: skip
            before = httpx.get(f"{url}/health").json()["prefix_hit_tokens"]
            a2 = client.chat.completions.create(model=lm.name, messages=second, max_tokens=20, temperature=0)
            hits[prefix_cache] = httpx.get(f"{url}/health").json()["prefix_hit_tokens"] - before
            replies[prefix_cache] = (a1.choices[0].message.content, a2.choices[0].message.content)
    assert replies[True] == replies[False]
    assert hits[False] == 0
    assert hits[True] >= (a1.usage.prompt_tokens // 16) * 16 > 0  # at least turn 1's prompt, in whole blocks


def test_huge_stop_strings_are_refused_at_once_and_allowed_ones_leave_a_neighbour_its_speed(lm):
    """Four 200,000-character stop strings (what once took 416 s and starved every other request)
    get a 400 naming `stop` at once. Four stop strings of the largest allowed length (1,000
    characters) cost a neighbour little: its 200 tokens take well under twice as long beside that
    request as beside a request with no stop strings."""
    with serving(lm, max_batch=4) as url:
        client = client_for(url)
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=lm.name, prompt="Once", max_tokens=5, stop=["ab" * 100_000] * 4)
        assert time.monotonic() - t0 < 5 and e.value.body["param"] == "stop"

        def neighbour_time(stop: list[str]) -> float:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                other = pool.submit(lambda: client.completions.create(
                    model=lm.name, prompt="The quick", max_tokens=400, temperature=0, stop=stop or None,
                    extra_body={"ignore_eos": True}))  # fmt: skip
                t = time.monotonic()
                client.completions.create(model=lm.name, prompt="Once", max_tokens=200, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
                took = time.monotonic() - t
                other.result()
            return took

        stops = [c * 1000 for c in "qzxj"]  # never in the text, so each is held against every character
        plain = min(neighbour_time([]) for _ in range(2))
        beside = min(neighbour_time(stops) for _ in range(2))
    assert beside < 2 * plain, (beside, plain)


def test_a_failing_prefill_fails_its_request_alone(lm, caplog):
    """Fault injection through HTTP: the prefill of prompts holding a poison token raises. That
    request gets a 500 naming its x-request-id, no internals, and the log has the traceback; the
    concurrent requests get what they get alone, and the server keeps serving."""
    served = load(lm.checkpoint)  # a model of its own for the hook
    poison = served.tokenizer.encode(" zebra")[-1]

    def hook(module, args, kwargs) -> None:
        if args[0].size(1) > 1 and (args[0] == poison).any():
            raise RuntimeError("injected prefill fault")

    handle = served.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with serving(served, max_batch=4) as url, concurrent.futures.ThreadPoolExecutor(4) as pool:
            body = {"model": served.name, "prompt": "Once upon a zebra", "max_tokens": 8, "temperature": 0}
            bad = pool.submit(httpx.post, f"{url}/v1/completions", json=body, headers={"x-request-id": "poisoned-1"},
                              timeout=60)  # fmt: skip
            client = client_for(url)
            good = [pool.submit(client.completions.create, model=served.name, prompt=p, max_tokens=8, temperature=0)
                    for p in ("Once upon", "The quick brown", "In 1999")]  # fmt: skip
            r = bad.result()
            answers = [g.result().choices[0].text for g in good]
            again = client.completions.create(model=served.name, prompt="Once upon", max_tokens=8, temperature=0)
    finally:
        handle.remove()
    assert r.status_code == 500 and "poisoned-1" in r.json()["error"]["message"]
    assert "injected" not in r.text and r.headers["x-request-id"] == "poisoned-1"
    assert "injected prefill fault" in caplog.text and "poisoned-1" in caplog.text
    assert answers == [lm.generate(p, 8) for p in ("Once upon", "The quick brown", "In 1999")]
    assert again.choices[0].text == answers[0]


def test_a_token_pick_that_fails_fails_its_request_alone_and_a_tiny_temperature_is_greedy(lm, caplog, monkeypatch):
    """A temperature of 1e-45 (or a repetition penalty of 1e-300) overflows the logits to inf, whose
    softmax is NaN: it used to fail every request in flight. Now it takes the limit, which is the
    greedy text. And a pick that does fail (injected: the seed 666's) fails its own request alone,
    while the others get what they get alone."""
    import modernlm.serve.engine as engine

    pick = engine.pick_tokens

    def poisoned(logits, s, *args, **kwargs):
        if s.seed == 666:
            raise RuntimeError("injected pick fault")
        return pick(logits, s, *args, **kwargs)

    prompts = ("Once upon", "The quick brown", "In 1999")
    with serving(lm, max_batch=4) as url, concurrent.futures.ThreadPoolExecutor(4) as pool:
        client = client_for(url)
        tiny = client.completions.create(model=lm.name, prompt=prompts[0], max_tokens=8, temperature=1e-45)
        assert tiny.choices[0].text == lm.generate(prompts[0], 8)
        penalized = client.completions.create(model=lm.name, prompt=prompts[1], max_tokens=8, temperature=1,
                                              extra_body={"repetition_penalty": 1e-300})  # fmt: skip
        assert penalized.choices[0].finish_reason in ("stop", "length")
        monkeypatch.setattr(engine, "pick_tokens", poisoned)
        body = {"model": lm.name, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1, "seed": 666}
        bad = pool.submit(httpx.post, f"{url}/v1/completions", json=body, headers={"x-request-id": "poisoned-2"},
                          timeout=60)  # fmt: skip
        good = [pool.submit(client.completions.create, model=lm.name, prompt=p, max_tokens=8, temperature=0)
                for p in prompts]  # fmt: skip
        r = bad.result()
        answers = [g.result().choices[0].text for g in good]
    assert r.status_code == 500 and "poisoned-2" in r.json()["error"]["message"] and "injected" not in r.text
    assert "injected pick fault" in caplog.text and "engine error" not in caplog.text
    assert answers == [lm.generate(p, 8) for p in prompts]


def test_bodies_that_are_not_text_nest_too_deep_or_hold_non_finite_numbers_get_400(lm):
    """JSON's "\\ud800" (a lone surrogate: no text), a body nested past Python's stack, and NaN,
    Infinity or 1e999 where a number goes are the client's mistakes: a 400 each, never a 500."""

    def chat(content: str = "hi", **fields) -> str:  # json.dumps writes "\\ud800", NaN and Infinity
        return json.dumps({"model": lm.name, "messages": [{"role": "user", "content": content}], "max_tokens": 2,
                           **fields})  # fmt: skip

    with serving(lm) as url:

        def post(text: str, route: str = "chat/completions") -> httpx.Response:
            return httpx.post(f"{url}/v1/{route}", content=text.encode(), headers={"content-type": "application/json"},
                              timeout=60)  # fmt: skip

        for route, text in [("chat/completions", chat("\ud800")),
                            ("completions", json.dumps({"model": lm.name, "prompt": "a\udfffb", "max_tokens": 2})),
                            ("completions", json.dumps({"model": "\ud800", "prompt": "a"})),
                            ("chat/completions", "[" * 100_000 + "]" * 100_000)]:  # fmt: skip
            r = post(text, route)
            assert r.status_code == 400 and "JSON" in r.json()["error"]["message"], (text[:60], r.text[:200])
        for field, value in [("temperature", math.nan), ("top_p", math.nan), ("repetition_penalty", math.nan),
                             ("temperature", math.inf), ("repetition_penalty", -math.inf)]:  # fmt: skip
            r = post(chat(**{field: value}))
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
        r = post(chat().replace('"max_tokens": 2', '"max_tokens": 2, "temperature": 1e999'))
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        assert post(chat("hi \U0001f600")).status_code == 200  # (json.dumps writes the pair "\\ud83d\\ude00")


def test_more_choices_than_the_server_ever_takes_are_a_400_not_a_busy_503(lm):
    """n x prompts above max_batch + max_queue can never be taken: a 503 "try again" sent clients
    retrying in vain (the openai client does). A 400 naming the field, before any tokenizing."""
    with serving(lm, max_batch=2, max_queue=2) as url:
        client = client_for(url)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=lm.name, messages=[{"role": "user", "content": "hi"}], n=5)
        assert e.value.body["param"] == "n" and "at most 4" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=lm.name, prompt=["a"] * 100_000, max_tokens=1)
        assert e.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=lm.name, prompt=["a", "b", "c"], n=2, max_tokens=1)
        assert e.value.body["param"] == "prompt"
        out = client.completions.create(model=lm.name, prompt=["Once upon", "In 1999"], n=2, max_tokens=4,
                                        temperature=0)  # fmt: skip
        assert [c.text for c in out.choices] == [lm.generate(p, 4) for p in ("Once upon", "In 1999") for _ in "ab"]


def test_streamed_logprobs_have_the_offsets_of_the_whole_response(lm):
    """/v1/completions' text_offset counts each token's own text (as vLLM does), streamed or not;
    streamed, it went by the text of each chunk, which differs where a token is part of a
    character (the sampled texts here hold such tokens: checked)."""
    differs = 0
    with serving(lm) as url:
        client = client_for(url)
        for seed in range(12):
            settings = dict(model=lm.name, prompt="The", max_tokens=12, temperature=1.5, seed=seed, logprobs=1)
            whole = client.completions.create(**settings).choices[0]
            chunks = [c.choices[0] for c in client.completions.create(**settings, stream=True) if c.choices]
            offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
            assert "".join(c.text for c in chunks) == whole.text
            assert offsets == whole.logprobs.text_offset, seed
            differs += len(whole.text) != sum(len(t) for t in whole.logprobs.tokens)
    assert differs, "no text held a piece of a character: the case is not tested"

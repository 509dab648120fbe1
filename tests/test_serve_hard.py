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

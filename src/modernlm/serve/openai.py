"""OpenAI's API, as data: request bodies in (validated field by field), responses and stream chunks out.

`parse(kind, body, ctx)` turns the JSON body of /v1/chat/completions (kind "chat") or
/v1/completions (kind "completion") into a `Job`: token prompts, a `Sampling`, n, logprobs and the
streaming options. A bad value raises `APIError(400, ..., param=FIELD)`, which the app answers in
OpenAI's error shape: {"error": {"message", "type", "param", "code"}}. Fields OpenAI has and this
server does not implement are refused by name when they would change the result (a
frequency_penalty, functions, ...); unknown fields are ignored, as OpenAI does. `response_format`
(json_object, json_schema) constrains the output (`constrain.py`), as does vLLM's
`structured_outputs` (and its older guided_json, guided_regex, ...); an unusable schema is a 400.
`tools` / `tool_choice` and tool messages: serve/tools.py.

`Choice` gathers one choice's text, tokens and finish reason from the engine's events; `response`
and `chunk` shape them as OpenAI does (chat.completion / text_completion, and their chunks).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from modernlm.chat import template_takes_tools
from modernlm.constrain import Constraint
from modernlm.errors import UserError
from modernlm.generation import Sampling, prompt_ids
from modernlm.serve.engine import Done, Piece, TokenInfo
from modernlm.serve.tools import ToolError, Tools, chatml_messages, native_messages, parse_tools, tool_calls
from modernlm.tokenizer import token_bytes

MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 1000  # characters per stop string (the text held back while one may be forming)
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Context:
    """What a request is checked against: the served model and the server's caps."""

    lm: Any  # modernlm.api.LM
    model_name: str
    max_tokens: int  # the largest max_tokens a request may ask for
    max_n: int
    max_sequences: int  # the most choices (prompts x n) one request may have: the engine's batch + queue
    kv_tokens: int | None = None  # the most tokens the engine's KV cache holds for one sequence


@dataclass
class Job:
    kind: str  # "chat" or "completion"
    prompts: list[list[int]]  # token ids of each prompt (chat: one)
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: each token's logprob and its top k
    tools: Tools | None = None  # chat: the request's tools (a reply may be calls)

    @property
    def calls(self) -> bool:
        """Whether a reply may be tool calls (tools given, tool_choice not "none")."""
        return self.tools is not None and self.tools.choice != "none"


# ---- reading fields ------------------------------------------------------------------------------


def _number(body: dict, name: str, default: float | None, lo: float, hi: float, *, open_lo: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"{name} must be a number, got {json.dumps(value)}", name)
    if not math.isfinite(value) or value < lo or value > hi or (open_lo and value == lo):  # NaN fails no comparison
        span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise APIError(400, f"{name} must be in {span}, got {value}", name)
    return value


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {json.dumps(value)}", name)
    if not lo <= value <= hi:
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _unsupported(body: dict) -> None:
    """Refuse, by name, fields that would change the result and that this server does not do."""
    checks = {
        "frequency_penalty": lambda v: v not in (None, 0),
        "presence_penalty": lambda v: v not in (None, 0),
        "logit_bias": lambda v: bool(v),
        "functions": lambda v: bool(v),
        "echo": lambda v: bool(v),
        "suffix": lambda v: bool(v),
    }
    for name, bad in checks.items():
        if bad(body.get(name)):
            raise APIError(400, f"{name} is not supported by this server", name)
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise APIError(400, "best_of is not supported by this server (use n)", "best_of")


def _constraint(body: dict, tools: Tools | None) -> Constraint | None:
    """The one constraint of vLLM's structured_outputs, response_format or the tools (two are a 400);
    its output ends at eos, so not with ignore_eos."""
    calls = tools.constraint() if tools is not None else None
    if calls is not None:
        try:
            calls.check()  # the functions' parameters: a schema this cannot follow is the client's
        except UserError as e:
            raise APIError(400, f"tools: {e}", "tools") from None
    given = [(c, name) for c, name in [_structured_outputs(body) or (None, ""), (_response_format(body),
             "response_format"), (calls, "tools")] if c is not None]  # fmt: skip
    if len(given) > 1:
        (_, first), (_, then) = given[:2]
        unless = ' (unless tool_choice is "none")' if then == "tools" else ""
        raise APIError(400, f"{first} cannot be used with {then}{unless}", first)
    if given and _boolean(body, "ignore_eos"):
        raise APIError(400, f"ignore_eos cannot be used with {given[0][1]} (its output ends at eos)", "ignore_eos")
    return given[0][0] if given else None


def _response_format(body: dict) -> Constraint | None:
    """OpenAI's response_format as a constraint: text (none), json_object, or json_schema with its
    schema; a schema or type this cannot follow is a 400 naming it."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "response_format must be an object with a type", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        constraint = Constraint.json_object()
    elif kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                           "response_format.json_schema.schema")  # fmt: skip
        constraint = Constraint.json_schema(spec["schema"])
    else:
        raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {json.dumps(kind)}",
                       "response_format.type")  # fmt: skip
    try:
        constraint.check()
    except UserError as e:
        raise APIError(400, f"response_format: {e}", "response_format") from None
    return constraint


VLLM_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
              "json_object": "json_object"}  # fmt: skip
GUIDED = ("json", "regex", "choice", "grammar")  # vLLM's older guided_* fields (no guided_json_object)
VLLM_TYPES = {"json_schema": (dict, str), "regex": str, "choice": list, "grammar": str, "json_object": bool}


def _structured_outputs(body: dict) -> tuple[Constraint, str] | None:
    """vLLM's extension, for the clients written for it: `structured_outputs` {"json": schema} (or
    regex, choice, grammar (Lark, or GBNF when it has "::="), json_object) and the older fields
    guided_json, guided_regex, guided_choice, guided_grammar; (the constraint, its field) or None."""
    given, spec = [], body.get("structured_outputs")
    if spec is not None:
        if not isinstance(spec, dict):
            raise APIError(400, "structured_outputs must be an object", "structured_outputs")
        given += [(f"structured_outputs.{k}", VLLM_KINDS[k], v) for k, v in spec.items() if k in VLLM_KINDS]
    given += [(f"guided_{k}", VLLM_KINDS[k], body[f"guided_{k}"]) for k in GUIDED if f"guided_{k}" in body]
    given = [(name, kind, value) for name, kind, value in given if value is not None and value is not False]
    if not given:
        return None
    if len(given) > 1:
        raise APIError(400, f"give one constraint, got {', '.join(name for name, _, _ in given)}", given[1][0])
    ((name, kind, value),) = given
    if not isinstance(value, VLLM_TYPES[kind]) or kind == "choice" and not all(isinstance(o, str) for o in value):
        shape = {"json_schema": "a JSON Schema", "choice": "a list of strings", "json_object": "true"}
        raise APIError(400, f"{name} must be {shape.get(kind, 'a string')}", name)
    if kind == "grammar" and isinstance(value, str) and "::=" in value:
        value = Constraint.grammar(value, syntax="gbnf")
    try:
        constraint = Constraint.of(**{kind: value})
        assert constraint is not None
        constraint.check()
    except UserError as e:
        raise APIError(400, f"{name}: {e}", name) from None
    return constraint, name


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters, got {longest}", "stop")
    return tuple(s for s in stop if s)


def _messages(body: dict, tools: Tools | None) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    if not all(isinstance(m, dict) for m in messages):
        bad = next(i for i, m in enumerate(messages) if not isinstance(m, dict))
        raise APIError(400, f"messages[{bad}] must be an object with role and content", f"messages[{bad}]")
    try:  # tool calls and results as ChatML turns, the tools' system text first (serve/tools.py)
        messages = chatml_messages(messages, tools)
    except ToolError as e:
        raise APIError(400, str(e), e.param) from None
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be system, developer, user or assistant, got {json.dumps(role)}",
                           f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _completion_prompts(body: dict, lm: Any, n: int, ctx: Context) -> list[list[int]]:
    prompt = body.get("prompt")
    bad = APIError(400, "prompt must be a string, a list of strings, or token ids", "prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]  # one prompt as token ids
    _fits(len(prompt) * n, ctx, "prompt")  # before any tokenizing
    rows = []
    for p in prompt:
        if isinstance(p, str):
            rows.append(prompt_ids(lm.tokenizer, p))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < lm.tokenizer.vocab_size for t in p):
                raise APIError(400, f"prompt: token ids must be in [0, {lm.tokenizer.vocab_size})", "prompt")
            rows.append(list(p))
        else:
            raise bad
    return rows


def _fits(choices: int, ctx: Context, param: str) -> None:
    """A request of more choices than the engine ever takes at once is the client's mistake (a 400),
    not a busy server's 503, which a client retries in vain."""
    if choices > ctx.max_sequences:
        raise APIError(400, f"this request asks for {choices} choices (prompts x n) and this server takes at most "
                       f"{ctx.max_sequences} in one request (max_batch + max_queue)", param)


def parse(kind: str, body: Any, ctx: Context) -> Job:
    """Check the body of a chat ("chat") or completions ("completion") request; see the module docstring."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required (GET /v1/models lists it)", "model")
    if model != ctx.model_name:
        raise APIError(404, f"The model `{model}` does not exist (this server has `{ctx.model_name}`)", "model",
                       code="model_not_found")
    _unsupported(body)
    n = _integer(body, "n", 1, 1, ctx.max_n)
    lm = ctx.lm
    tools, native = None, False
    if kind == "chat":
        try:
            tools = parse_tools(body)
            native = tools is not None and tools.choice != "none" and template_takes_tools(lm.tokenizer.chat_template)
            if native:  # the model's own template renders the tools and the tool turns
                raw = body.get("messages")
                if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
                    raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
                messages = native_messages(raw)
                calls = [m.get("tool_calls") for m in messages]
                if lm.tokenizer.has_special_text(json.dumps([tools.openai(), calls], ensure_ascii=False)):
                    raise ToolError("a special token's text in tools or a tool call cannot be kept as text", "tools")
        except ToolError as e:
            raise APIError(400, str(e), e.param) from None
        _fits(n, ctx, "n")
        if not native:
            messages = _messages(body, tools)
        if not lm.has_chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            prompts = [lm.chat_prompt_ids(messages, tools.openai() if native else None)]
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        logprobs = (top or 0) if _boolean(body, "logprobs") else None
        if top is not None and logprobs is None:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    else:
        prompts = _completion_prompts(body, lm, n, ctx)
        max_name = "max_tokens"
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    max_tokens = _integer(body, max_name, None, 1, ctx.max_tokens)
    context = lm.max_context
    longest = max(len(p) for p in prompts)
    field_name = "messages" if kind == "chat" else "prompt"
    if longest >= context or (max_tokens is not None and longest + max_tokens > context):
        asked = f"{longest} in the {field_name}" + (f" and {max_tokens} in the completion" if max_tokens else "")
        raise APIError(400, f"This model's maximum context length is {context} tokens; you asked for {asked}. "
                       f"Reduce the length of the {field_name} or {max_name}.", field_name,
                       code="context_length_exceeded")
    if ctx.kv_tokens is not None and longest + 1 > ctx.kv_tokens:
        raise APIError(400, f"The {field_name} has {longest} tokens and this server's KV cache holds {ctx.kv_tokens} "
                       "(kv_cache_bytes)", field_name, code="context_length_exceeded")
    if max_tokens is None:  # OpenAI: chats run to the context's end, completions 16 tokens
        max_tokens = min(ctx.max_tokens, context - longest, 16 if kind == "completion" else context)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    include_usage = _boolean(options or {}, "include_usage")
    top_k = _integer(body, "top_k", None, -1, 1 << 30)
    sampling = Sampling(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, open_lo=True),
        top_k=top_k if top_k and top_k > 0 else None,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 2, open_lo=True),
        stop=_stop(body),
        seed=_integer(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        eos_token_id=() if _boolean(body, "ignore_eos") else None,
        constraint=_constraint(body, tools),
    )
    return Job(kind, prompts, sampling, n, stream, include_usage, logprobs, tools)


# ---- shaping responses ---------------------------------------------------------------------------


@dataclass
class Choice:
    """One choice's events gathered: its text, tokens, finish reason."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, event: Piece | Done) -> None:
        if isinstance(event, Piece):
            self.text += event.text
            self.tokens += event.tokens
        else:
            self.finish_reason, self.completion_tokens = event.finish_reason, event.completion_tokens


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token's text as logprobs show it (a piece of a character shows as U+FFFD)."""
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


def logprobs_json(kind: str, tokenizer: Any, tokens: list[TokenInfo], offset: int = 0) -> dict[str, Any]:
    """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: {tokens,
    token_logprobs, top_logprobs, text_offset}: a token's offset is `offset` plus the lengths of the
    tokens before it, each's `token_text` (as vLLM counts them)."""
    text = functools.partial(token_text, tokenizer)
    if kind == "chat":
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            return {"token": text(token_id), "logprob": logprob, "bytes": list(token_bytes(tokenizer, token_id))}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(text(t.id))
    return {
        "tokens": [text(t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def response(job: Job, rid: str, created: int, model: str, choices: list[Choice], tokenizer: Any) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    prompt_tokens = sum(len(p) for p in job.prompts)
    out = []
    for c in choices:
        lp = logprobs_json(job.kind, tokenizer, c.tokens) if job.logprobs is not None else None
        if job.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = c.finish_reason
            if job.calls and (calls := tool_calls(c.text)):
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                finish = "tool_calls" if finish == "stop" else finish
            out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    obj = "chat.completion" if job.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": out,
            "usage": usage(prompt_tokens, choices), "system_fingerprint": None}


def chunk(job: Job, rid: str, created: int, model: str, choices: list[dict[str, Any]],
          usage_: dict[str, int] | None = None) -> str:
    """One Server-Sent Event of a streamed response ("data: {json}\\n\\n")."""
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    data: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if job.include_usage:
        data["usage"] = usage_
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def chunk_choice(job: Job, index: int, text: str | None, logprobs: dict | None, finish: str | None,
                 role: bool = False, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A choice of a chunk: chat's `delta` ({"role"} first, then {"content"} or {"tool_calls"}, {} at
    the end) or completions' `text`."""
    if job.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

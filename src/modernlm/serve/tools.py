"""Tool calls in OpenAI's chat API: `tools` and `tool_choice` in, `tool_calls` out, `role: tool` back in.

A model's chat template that takes `tools` and writes calls as <tool_call> (`chat.template_takes_tools`:
Qwen2.5's, Hermes') renders them itself, with the messages as OpenAI sends them (`native_messages`).
Any other template, ChatML included, has no place for them, so this server writes them as those
models are trained to read them (the convention most small open models know), in a system message
before the conversation:

    # Tools
    You may call one or more functions to assist with the user query.
    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
    </tools>
    For each function call, return a json object with function name and arguments within
    <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

An assistant turn that called tools is written back as its <tool_call> blocks, and a `role: tool`
message as a user turn holding <tool_response>...</tool_response>. The reply is constrained
(`constrain.Constraint.grammar`, Lark with llguidance's %json; a function's parameters take no keys
beyond their properties, as in OpenAI's strict mode): `required` -> one call to any of the
tools, a named function -> a call to it, `auto` -> a call or text that does not start with "<",
`none` -> free text and no tools in the prompt. A reply that is a call comes back as
`message.tool_calls` with finish_reason "tool_calls"; streamed, text goes out as it comes, a call
when it is complete.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from modernlm.constrain import Constraint, closed, rebased

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 64
HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)


class ToolError(ValueError):
    """A bad tools / tool_choice / tool message: (message, the field)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict[str, Any], ...]  # {"name", "description", "parameters"}
    choice: str  # "auto", "none", "required", or a function's name

    def openai(self) -> list[dict[str, Any]]:
        """The tools in OpenAI's shape, as chat templates read them."""
        return [{"type": "function", "function": f} for f in self.functions]

    def prompt(self) -> str:
        """The system text that lists the tools (the convention in the module docstring)."""
        lines = [json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in self.functions]
        return HEADER + "\n".join(lines) + FOOTER

    def constraint(self) -> Constraint | None:
        """What the reply may be (module docstring); None for "none"."""
        if self.choice == "none":
            return None
        names = [f["name"] for f in self.functions] if self.choice in ("auto", "required") else [self.choice]
        # each function's parameters under $defs, their own $refs rebased there: a "#/$defs/X" of a
        # pydantic model's schema means the parameters' root, not this wrapper's
        defs = {f"f{i}": rebased(closed(f["parameters"]), f"#/$defs/f{i}")
                for i, f in enumerate(self.functions) if f["name"] in names}  # fmt: skip
        calls = [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                  "properties": {"name": {"const": f["name"]}, "arguments": {"$ref": f"#/$defs/f{i}"}}}
                 for i, f in enumerate(self.functions) if f["name"] in names]  # fmt: skip
        schema = {"$defs": defs, "anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
        call = f'"{OPEN}\\n" call_json "\\n{CLOSE}"\ncall_json: %json {json.dumps(schema)}'
        if self.choice == "auto":  # a call, or text that does not start like one
            return Constraint.grammar(f"start: call | TEXT\nTEXT: /[^<][\\s\\S]*/\ncall: {call}")
        return Constraint.grammar(f"start: {call}")


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """The request's tools and tool_choice (OpenAI's shapes), checked; None when there are none."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {MAX_TOOLS} functions", "tools")
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f'tools[{i}] must be {{"type": "function", "function": {{"name", ...}}}}', f"tools[{i}]")
        params = f.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON Schema object",
                            f"tools[{i}].function.parameters")  # fmt: skip
        functions.append({"name": f["name"], "description": f.get("description") or "", "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("tools: two functions have the same name", "tools")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        f = choice.get("function") if choice.get("type") == "function" else None
        name = f.get("name") if isinstance(f, dict) else None
        if name not in names:
            raise ToolError(f"tool_choice names no function in tools: {json.dumps(choice)}", "tool_choice")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise ToolError('tool_choice must be "auto", "none", "required" or {"type": "function", ...}',
                        "tool_choice")  # fmt: skip
    return Tools(tuple(functions), choice)


def chatml_messages(messages: list[dict[str, Any]], tools: Tools | None) -> list[dict[str, str]]:
    """OpenAI's messages (assistant tool_calls, role tool) as plain system / user / assistant ones,
    with the tools' system text first (merged into a leading system message)."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), _text(m.get("content"))
        if role == "tool":
            if not isinstance(content, str):
                raise ToolError(f"messages[{i}].content of a tool message must be text", f"messages[{i}].content")
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif role == "assistant" and m.get("tool_calls"):
            if not isinstance(content, str | None):
                raise ToolError(f"messages[{i}].content must be text", f"messages[{i}].content")
            out.append({"role": "assistant", "content": (content or "") + _calls_text(m["tool_calls"], i)})
        else:
            out.append(m)
    if tools is not None and tools.choice != "none":
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools.prompt()}
        else:
            out.insert(0, {"role": "system", "content": tools.prompt()})
    return out


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's messages for a template that takes tools: roles system (developer), user, assistant
    and tool; content text (text parts joined; none for an assistant's calls); an assistant's
    tool_calls with their arguments as objects, as chat templates read them."""
    out = []
    for i, m in enumerate(messages):
        where, role, content = f"messages[{i}]", m.get("role"), m.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise ToolError(f"{where}.role must be system, developer, user, assistant or tool, got {json.dumps(role)}",
                            f"{where}.role")  # fmt: skip
        content = _text(content)
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["content"] = content or ""
            message["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                      "arguments": json.loads(c["function"].get("arguments") or "{}")}}
                                     for c in _checked_calls(m["tool_calls"], i)]  # fmt: skip
        if role == "tool" and m.get("tool_call_id"):
            message["tool_call_id"] = str(m["tool_call_id"])
        if not isinstance(message["content"], str):
            raise ToolError(f"{where}.content must be a string", f"{where}.content")
        out.append(message)
    return out


def _text(content: Any) -> Any:
    """A message's content with its text parts joined (OpenAI's [{"type": "text", "text"}, ...])."""
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return content


def _checked_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    _calls_text(calls, i)  # the same checks (a list of named functions, JSON arguments)
    return calls


def _calls_text(calls: Any, i: int) -> str:
    if not isinstance(calls, list):
        raise ToolError(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
    blocks, where = [], f"messages[{i}].tool_calls"
    for call in calls:
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ToolError(f"{where}: each needs a function with a name", where)
        try:
            arguments = json.loads(f.get("arguments") or "{}")  # not a string (an object): a TypeError
        except (json.JSONDecodeError, TypeError):
            raise ToolError(f"{where}: arguments must be JSON text (a string)", where) from None
        blocks.append(f"{OPEN}\n{json.dumps({'name': f['name'], 'arguments': arguments})}\n{CLOSE}")
    return "\n".join(blocks)


def _no(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # NaN, Infinity: Python's json reads them


class _Number(str):
    """A number as the model wrote it: read back as a float, 1e999 would be written out as Infinity,
    which is no JSON, and 0.1000000000000000055 would change."""


def _json(value: Any) -> str:
    """JSON text of a value read with its numbers kept as `_Number`s."""
    if isinstance(value, _Number):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The reply's calls in OpenAI's shape, when it is <tool_call> blocks and nothing else; else None.
    A call starts the reply: text that starts with a space took tool_choice auto's text branch, which
    no schema constrains."""
    rest, calls = text.rstrip(), []
    while rest.startswith(OPEN):
        end = rest.find(CLOSE)
        if end < 0:
            return None
        try:
            call = json.loads(rest[len(OPEN) : end], parse_int=_Number, parse_float=_Number, parse_constant=_no)
        except (json.JSONDecodeError, ValueError):
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = _json(call.get("arguments", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments}})  # fmt: skip
        rest = rest[end + len(CLOSE) :].strip()
    return calls if calls and not rest else None


class CallStream:
    """A streamed reply that may be a call: text passes through once it cannot be one; a reply that
    starts like a call is held back until it ends (`done` then gives its calls)."""

    def __init__(self) -> None:
        self.held = ""
        self.text = False  # the reply is text: everything passes

    def push(self, piece: str) -> str:
        if self.text:
            return piece
        self.held += piece
        if self.held and not OPEN.startswith(self.held[: len(OPEN)]):  # (a call starts the reply)
            self.text, out, self.held = True, self.held, ""
            return out
        return ""

    def done(self) -> tuple[str, list[dict[str, Any]] | None]:
        """(text still held, the calls) at the end of the reply."""
        calls = tool_calls(self.held) if not self.text else None
        return ("", calls) if calls else (self.held, None)

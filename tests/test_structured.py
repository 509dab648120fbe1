"""Constrained decoding (constrain.py): every kind of constraint, in generate, chat, the engine and the
server, against what the constraint says (pydantic validation, re.fullmatch, json.loads) and the
invariants: constrained and free requests in one batch each get what they get alone; a reply cut
by max_tokens ends "length", never presented as complete. The model is a tiny random one (sharp
logits: without a constraint its text is not JSON); SmolLM2 is in tests/test_structured_smollm2.py.
"""

from __future__ import annotations

import concurrent.futures
import enum
import json
import re
import subprocess
import sys
from typing import Optional

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
from pydantic import BaseModel, Field  # noqa: E402

from modernlm import load  # noqa: E402
from modernlm.constrain import Constraint  # noqa: E402
from modernlm.errors import UserError  # noqa: E402
from modernlm.generation import Sampling, TextGeneration, prompt_ids  # noqa: E402
from tests.serve_util import chat_checkpoint, serving  # noqa: E402


class Color(enum.StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Part(BaseModel):
    label: str = Field(max_length=12)
    weight: int = Field(ge=0, le=10)  # a float: this random model writes digits without end


class Thing(BaseModel):
    """Nested, with an enum, bounded numbers, an optional field and a bounded array."""

    name: str = Field(max_length=16)
    count: int = Field(ge=1, le=99)
    color: Color
    fragile: bool
    note: Optional[str] = Field(default=None, max_length=10)  # noqa: UP045 (pydantic reads it either way)
    parts: list[Part] = Field(max_length=2)


USER = [{"role": "user", "content": "Describe the cat in the house."}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(chat_checkpoint(tmp_path_factory.mktemp("structured") / "ckpt"))


def test_constraint_values_and_their_errors():
    closed = json.loads(Constraint.json_schema(Thing).source)  # a model's objects take no other keys
    assert closed["additionalProperties"] is False and closed["$defs"]["Part"]["additionalProperties"] is False
    assert "additionalProperties" not in json.loads(Constraint.json_schema(Thing.model_json_schema()).source)
    assert Constraint.json_schema(json.dumps({"type": "object"})) == Constraint.json_schema({"type": "object"})
    assert len({Constraint.regex("a+"), Constraint.regex("a+"), Constraint.choice(["a"])}) == 2  # values
    assert Constraint.of() is None and Constraint.of(json_object=True) == Constraint.json_object()
    with pytest.raises(UserError, match="give one constraint"):
        Constraint.of(regex="a", choice=["b"])
    for bad, kind in [(Constraint.regex("(unclosed"), "regex"),
                      (Constraint.json_schema({"type": "object", "properties": {"a": {"type": "str"}}}), "json_schema"),
                      (Constraint.grammar("start: undefined_rule"), "grammar"),
                      (Constraint.grammar('root ::= "a" (', syntax="gbnf"), "grammar")]:  # fmt: skip
        with pytest.raises(UserError) as e:
            bad.check()
        assert str(e.value).startswith(kind) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="json_schema: not valid JSON"):
        Constraint.json_schema("{nope")
    with pytest.raises(UserError, match="choice"):
        Constraint.choice([])
    # empty values are constraints too (they were dropped, and the text ran free): {} is the schema
    # of any JSON value, "" the regex of the empty text, [] no choice at all, "ab" no list of choices
    assert Constraint.of(json_schema={}) == Constraint.json_schema({})
    assert Constraint.of(regex="") == Constraint.regex("")
    for spec in ({"choice": []}, {"choice": "ab"}):
        with pytest.raises(UserError, match="choice"):
            Constraint.of(**spec)


def test_a_tokenizer_made_after_another_was_freed_gets_matchers_over_its_own_vocabulary():
    """Compiled grammars are cached per tokenizer and grammar: a tokenizer made after an earlier one
    was freed (CPython often gives the new one the freed one's address) gets masks over its own
    vocabulary, those an uncached llguidance matcher over it gives, never the earlier one's."""
    import gc

    import llguidance as llg
    import torch

    from modernlm.constrain import Guide
    from modernlm.tokenizer import train_bpe

    words = Constraint.regex("[a-z]+ [a-z]+")
    for size in (300, 290, 280):
        first = train_bpe(["the cat sat on the mat by the door", "a dog ran far away"] * 20, size + 40)
        Guide.for_rows([words], first, first.vocab_size, [first.eos_id]).allowed()
        del first
        gc.collect()
        tok = train_bpe(["zebra quartz jumps vexingly", "lorem ipsum dolor sit amet"] * 20, size)
        got = Guide.for_rows([words], tok, tok.vocab_size, [tok.eos_id]).allowed()[0]
        ll_tok = llg.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=[tok.eos_id])
        want = Guide([llg.LLMatcher(ll_tok, words.to_llguidance(), log_level=0)], tok.vocab_size).allowed()[0]
        assert torch.equal(got, want) and 0 < int(want.sum()) < tok.vocab_size


def test_every_kind_in_generate_and_chat(lm):
    free = lm.chat(USER, max_new_tokens=60)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # without a constraint this model does not write JSON
    reply = lm.chat(USER, max_new_tokens=200, response_format=Thing)
    assert isinstance(reply.parsed, Thing) and Thing.model_validate_json(reply) == reply.parsed
    assert isinstance(json.loads(lm.chat(USER, max_new_tokens=200, json_object=True)), dict)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", lm.generate("Call", 20, regex=r"[0-9]{3}-[0-9]{4}"))
    assert lm.generate("The cat is", 10, choice=["red", "green", "blue"]) in ("red", "green", "blue")
    assert re.fullmatch(r"(yes|no) [0-9]+", lm.generate("Is it?", 20, grammar='start: ("yes" | "no") " " /[0-9]+/'))
    gbnf = lm.generate("Count:", 20, constraint=Constraint.grammar('root ::= "n=" [0-9] [0-9]?', syntax="gbnf"))
    assert re.fullmatch(r"n=[0-9]{1,2}", gbnf)
    sampled = lm.chat(USER, max_new_tokens=200, response_format=Thing, temperature=1.0, seed=3)
    assert isinstance(sampled.parsed, Thing)  # sampling picks among the allowed tokens too


def test_an_empty_schema_still_makes_json(lm):
    """json_schema={} (any JSON value) was taken for no constraint: the reply was free text."""
    with pytest.raises(json.JSONDecodeError):  # the model's own text is not JSON
        json.loads(lm.generate("The cat", 40))
    json.loads(lm.generate("The cat", 40, json_schema={}))


def test_a_reply_cut_by_max_tokens_ends_length_and_is_not_complete(lm):
    ids = lm.chat_prompt_ids(USER)
    (stream,) = TextGeneration(lm.model, lm.tokenizer, [ids], Sampling.make(6, json_schema=Thing)).run()
    assert stream.finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(stream.text)
    with pytest.raises(UserError, match="raise max_new_tokens"):
        lm.chat(USER, max_new_tokens=6, response_format=Thing)


def test_a_batch_of_constrained_rows_equals_each_alone(lm):
    prompts = ["Once upon a time", "The quick brown fox", "In 1999 the committee", "A cat"]
    s = Sampling.make(200, json_schema=Thing)
    rows = [prompt_ids(lm.tokenizer, p) for p in prompts]
    batched = [x.text for x in TextGeneration(lm.model, lm.tokenizer, rows, s).run()]
    alone = [TextGeneration(lm.model, lm.tokenizer, [r], s).run()[0].text for r in rows]
    assert batched == alone and all(Thing.model_validate_json(t) for t in batched)


def test_server_response_format_through_openais_client(lm):
    """parse() with a nested pydantic model; json_object streamed; constrained and free requests
    at once each get what they get alone; a schema it cannot follow is a 400 naming it."""
    with serving(lm, max_batch=8, kv_dtype="float32") as url:  # the cache of lm.chat, its reference
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        out = client.chat.completions.parse(model=lm.name, messages=USER, response_format=Thing, max_tokens=200,
                                            temperature=0)  # fmt: skip
        assert out.choices[0].finish_reason == "stop"
        assert out.choices[0].message.parsed == lm.chat(USER, max_new_tokens=200, response_format=Thing).parsed
        stream = client.chat.completions.create(model=lm.name, messages=USER, max_tokens=200, temperature=0,
                                                response_format={"type": "json_object"}, stream=True)  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == lm.chat(USER, max_new_tokens=200, json_object=True) and isinstance(json.loads(text), dict)

        messages = [[{"role": "user", "content": f"Thing number {i} in the house."}] for i in range(8)]
        alone = [lm.chat(m, max_new_tokens=60, **({"json_schema": Thing} if i % 2 else {})) for i, m in
                 enumerate(messages)]  # fmt: skip

        def ask(i: int) -> str:
            fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "thing",
                   "schema": Thing.model_json_schema()}}} if i % 2 else {}  # fmt: skip
            r = client.chat.completions.create(model=lm.name, messages=messages[i], max_tokens=60, temperature=0,
                                               **fmt)  # fmt: skip
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(8))) == alone

        thing = {"type": "json_schema", "json_schema": {"name": "thing", "schema": Thing.model_json_schema()}}
        cut = client.chat.completions.create(model=lm.name, messages=USER, max_tokens=5, temperature=0,
                                             response_format=thing)  # fmt: skip
        assert cut.choices[0].finish_reason == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(cut.choices[0].message.content)
        with pytest.raises(openai.LengthFinishReasonError):  # the client's own check of a cut reply
            client.chat.completions.parse(model=lm.name, messages=USER, response_format=Thing, max_tokens=5)

        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
               "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}  # fmt: skip
        no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
        for fmt, param in [(bad, "response_format"), ({"type": "xml"}, "response_format.type"),
                           (no_schema, "response_format.json_schema.schema")]:
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=lm.name, messages=USER, response_format=fmt)
            assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=lm.name, messages=USER, response_format={"type": "json_object"},
                                           extra_body={"ignore_eos": True})  # fmt: skip
        assert e.value.body["param"] == "ignore_eos"


def test_generate_and_chat_commands_take_a_schema_file(lm, tmp_path):
    schema = tmp_path / "thing.json"
    schema.write_text(json.dumps(Thing.model_json_schema()))
    cmd = [sys.executable, "-m", "modernlm", "generate", str(lm.checkpoint), "prompt=A cat", "temperature=0",
           "max_new_tokens=200", f"schema={schema}", "stream=false"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Thing.model_validate_json(r.stdout.strip())
    chat = [sys.executable, "-m", "modernlm", "chat", str(lm.checkpoint), "temperature=0", "compile=false",
            f"schema={schema}"]  # fmt: skip
    r = subprocess.run(chat, input="Describe the cat in the house.\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Thing.model_validate_json(r.stdout.strip())
    (tmp_path / "bad.json").write_text('{"type": "object",\n  "properties": }')
    for bad, message in [("bad.json", "line 2"), ("missing.json", "cannot read")]:
        r = subprocess.run([*cmd[:-2], f"schema={tmp_path / bad}"], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- tools ----------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"]}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]  # fmt: skip


def test_tool_calls_are_read_and_written_by_the_convention():
    from modernlm.serve.tools import CallStream, chatml_messages, parse_tools, tool_calls

    tools = parse_tools({"tools": TOOLS, "tool_choice": "required"})
    rendered = chatml_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tools)
    assert rendered[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get_time"' in rendered[0]["content"]
    calls = tool_calls('<tool_call>\n{"name": "get_time", "arguments": {"zone": 2}}\n</tool_call>')
    assert calls[0]["function"] == {"name": "get_time", "arguments": '{"zone": 2}'}
    assert calls[0]["id"].startswith("call_")
    assert tool_calls("<tool_call>\n{broken\n</tool_call>") is None and tool_calls("plain text") is None
    back = chatml_messages([{"role": "assistant", "content": None, "tool_calls": calls},
                            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "12:00"}], None)  # fmt: skip
    assert back == [{"role": "assistant", "content": '<tool_call>\n{"name": "get_time", "arguments": {"zone": 2}}\n'
                     "</tool_call>"}, {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>"}]
    stream = CallStream()
    assert stream.push("<tool") == ""
    assert stream.push('_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>') == ""
    assert stream.done()[1][0]["function"]["name"] == "get_time"
    text = CallStream()
    assert text.push("<b") == "<b" and text.push("old") == "old" and text.done() == ("", None)


@pytest.fixture(scope="module")
def long_lm(tmp_path_factory):
    """The tiny model with room for the tools' system text (~800 of its tokens)."""
    return load(chat_checkpoint(tmp_path_factory.mktemp("tools") / "ckpt", max_seq_len=2048))


def test_server_tools_and_tool_choice(long_lm):
    """Two functions: a named tool_choice calls that one, "required" one of them, with arguments
    that validate against its parameters; streamed too; a follow-up `role: tool` message is taken."""
    lm = long_lm
    schema_of = {"get_weather": WEATHER, "get_time": TIME}
    with serving(lm, max_batch=4) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)

        def ask(**settings):
            return client.chat.completions.create(model=lm.name, messages=USER, tools=TOOLS, max_tokens=150,
                                                  temperature=0, **settings)  # fmt: skip

        for choice, names in [({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
                              ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
                              ("required", {"get_time", "get_weather"})]:  # fmt: skip
            r = ask(tool_choice=choice)
            (call,) = r.choices[0].message.tool_calls
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
            assert call.function.name in names
            arguments = json.loads(call.function.arguments)
            assert set(arguments) <= set(schema_of[call.function.name]["properties"])
            assert set(schema_of[call.function.name]["required"]) <= set(arguments)  # every required argument
            if call.function.name == "get_time":
                assert -12 <= arguments["zone"] <= 14
            else:
                assert arguments["unit"] in ("celsius", "fahrenheit") and len(arguments["city"]) <= 12
        assert arguments == json.loads(ask(tool_choice="required").choices[0].message.tool_calls[0].function.arguments)

        none = ask(tool_choice="none")
        assert none.choices[0].message.tool_calls is None and none.choices[0].message.content

        chunks = list(ask(tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True))
        deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(deltas) == 1 and deltas[0][0].function.name == "get_time"
        assert json.loads(deltas[0][0].function.arguments)["zone"] in range(-12, 15)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        call = ask(tool_choice="required").choices[0].message.tool_calls[0]
        follow = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21"}]  # fmt: skip
        reply = client.chat.completions.create(model=lm.name, messages=follow, tools=TOOLS, tool_choice="none",
                                               max_tokens=20, temperature=0)  # fmt: skip
        assert reply.choices[0].message.content

        for settings, param in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                                ({"tool_choice": "sometimes"}, "tool_choice"),
                                ({"response_format": {"type": "json_object"}}, "response_format")]:  # fmt: skip
            with pytest.raises(openai.BadRequestError) as e:
                ask(**settings)
            assert e.value.body["param"] == param, e.value.body


def test_tool_turns_in_openais_other_shapes_and_what_cannot_be_a_tool_is_a_400(long_lm):
    """Content as text parts, in a tool result and beside an assistant's calls, reads as the same
    text (it was refused, or a 500); a parameters schema this cannot follow, arguments that are not
    JSON text and a tool_choice function that is not an object are 400s naming the field (were 500s)."""
    lm = long_lm
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": 2}'}}

    def turns(tool_content, assistant_content, call=call):
        return [*USER, {"role": "assistant", "content": assistant_content, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": tool_content}]  # fmt: skip

    def parts(text):
        return [{"type": "text", "text": text[:3]}, {"type": "text", "text": text[3:]}]

    with serving(lm) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)

        def ask(messages, **settings):
            settings = {"tools": TOOLS, "tool_choice": "none", **settings}
            return client.chat.completions.create(model=lm.name, messages=messages, max_tokens=8, temperature=0,
                                                  **settings).choices[0].message.content  # fmt: skip

        assert ask(turns(parts("12:00"), parts("Let me see."))) == ask(turns("12:00", "Let me see."))
        bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}]  # fmt: skip
        object_arguments = dict(call, function={"name": "get_time", "arguments": {"zone": 2}})
        for messages, settings, param in [
            (USER, {"tools": bad_schema, "tool_choice": "required"}, "tools"),
            (turns("12:00", None, object_arguments), {}, "messages[1].tool_calls"),
            (USER, {"tool_choice": {"type": "function", "function": "get_time"}}, "tool_choice"),
        ]:
            with pytest.raises(openai.BadRequestError) as e:
                ask(messages, **settings)
            assert e.value.body["param"] == param, e.value.body


# A template that takes tools and writes calls as <tool_call> (Qwen2.5's and Hermes' form), written
# for this test: the system turn lists the tools, tool results come back as user turns.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}'
    "<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_takes_tools_renders_them(tmp_path):
    """The model's own template renders the tools and the tool turns, as transformers'
    apply_chat_template(..., tools=...) does (the same ids); the reply is still a constrained call."""
    from transformers import AutoTokenizer

    from modernlm.serve.tools import parse_tools

    path = chat_checkpoint(tmp_path / "ckpt", max_seq_len=2048)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TOOLS_TEMPLATE}))
    lm = load(path)
    tools = parse_tools({"tools": TOOLS}).openai()
    call = {"type": "function", "function": {"name": "get_time", "arguments": {"zone": 2}}}
    messages = [{"role": "system", "content": "Be brief."}, *USER,
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]  # fmt: skip
    reference = AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    ours = lm.chat_prompt_ids(messages, tools)
    assert ours == reference
    typed = lm.chat_prompt_ids([*messages[:3], {"role": "tool", "content": "12:00 <|im_start|>"}], tools)
    start = lm.tokenizer.token_to_id("<|im_start|>")
    assert typed.count(start) == ours.count(start) == 5  # a tool result's typed special token is text
    with serving(lm, max_batch=2) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        wire = [*messages[:2], {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": 2}'}}]},
            messages[3]]  # fmt: skip
        r = client.chat.completions.create(model=lm.name, messages=wire, tools=TOOLS, tool_choice="required",
                                           max_tokens=150, temperature=0)  # fmt: skip
    assert r.usage.prompt_tokens == len(ours)  # the server rendered the same prompt
    required = parse_tools({"tools": TOOLS, "tool_choice": "required"}).constraint()
    (expected,) = lm.complete([ours], Sampling.make(150, constraint=required))
    (got,) = r.choices[0].message.tool_calls
    assert expected.startswith("<tool_call>") and json.loads(got.function.arguments) == json.loads(
        expected.split("\n")[1])["arguments"]

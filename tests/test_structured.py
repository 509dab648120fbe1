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
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from modernlm import load  # noqa: E402
from modernlm.constrain import Constraint  # noqa: E402
from modernlm.errors import UserError  # noqa: E402
from modernlm.generation import Sampling, TextGeneration, prompt_ids  # noqa: E402
from tests.serve_util import chat_checkpoint, script_checkpoint, serving  # noqa: E402


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


def test_vllms_structured_outputs_and_guided_fields(lm):
    """vLLM's extension (structured_outputs, and the older guided_*), for clients written for it, on
    both endpoints: what lm.generate / lm.chat give with the same constraint (they were ignored)."""
    prompt, choices = "Once upon a time", ["yes", "no", "maybe so"]
    with serving(lm, kv_dtype="float32") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)

        def chat(extra):
            return client.chat.completions.create(model=lm.name, messages=USER, max_tokens=60, temperature=0,
                                                  extra_body=extra).choices[0].message.content  # fmt: skip

        def complete(extra):
            return client.completions.create(model=lm.name, prompt=prompt, max_tokens=60, temperature=0,
                                             extra_body=extra).choices[0].text  # fmt: skip

        for extra, setting in [({"structured_outputs": {"choice": choices}}, {"choice": choices}),
                               ({"guided_choice": choices}, {"choice": choices}),
                               ({"structured_outputs": {"regex": "[a-c]{2,5}"}}, {"regex": "[a-c]{2,5}"}),
                               ({"guided_json": Part.model_json_schema()}, {"json_schema": Part.model_json_schema()}),
                               ({"structured_outputs": {"json_object": True}}, {"json_object": True}),
                               ({"guided_grammar": 'root ::= "ab" | "cd"'},
                                {"grammar": Constraint.grammar('root ::= "ab" | "cd"', syntax="gbnf")})]:  # fmt: skip
            text = chat(extra)
            assert text == lm.chat(USER, max_new_tokens=60, **setting), extra
            assert complete(extra) == lm.generate(prompt, 60, **setting), extra
        assert chat({"guided_choice": choices}) in choices and re.fullmatch("[a-c]{2,5}", complete(
            {"guided_regex": "[a-c]{2,5}"}))  # fmt: skip
        for extra, param in [({"guided_choice": "yes"}, "guided_choice"),
                             ({"structured_outputs": {"regex": "(", }}, "structured_outputs.regex"),
                             ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                             ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
                             ({"structured_outputs": ["a"]}, "structured_outputs")]:  # fmt: skip
            with pytest.raises(openai.BadRequestError) as e:
                chat(extra)
            assert e.value.body["param"] == param, e.value.body


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
    # tool_choice auto's text branch is anything not starting with "<", so a reply that starts with a
    # space is text, which no schema constrained: never read as a call (it was, of any function)
    spaced = ' <tool_call>\n{"name": "rm", "arguments": {"path": "/"}}\n</tool_call>'
    assert tool_calls(spaced) is None and tool_calls("\n" + spaced[1:]) is None
    text = CallStream()
    assert text.push(" ") == " " and text.push(spaced[1:]) == spaced[1:] and text.done() == ("", None)
    # arguments as the model wrote its numbers: 1e999 read as a float came out as Infinity, no JSON
    numbers = '{"v": 1e999, "w": 0.1000000000000000055, "n": 123456789012345678901234567890, "x": [-0.0, 2E-3]}'
    (call,) = tool_calls(f'<tool_call>\n{{"name": "get_time", "arguments": {numbers}}}\n</tool_call>')
    assert call["function"]["arguments"] == numbers
    json.loads(call["function"]["arguments"], parse_constant=lambda c: pytest.fail(f"{c} is no JSON"))
    assert tool_calls('<tool_call>\n{"name": "get_time", "arguments": {"v": NaN}}\n</tool_call>') is None


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the strict schema's additionalProperties: false
    city: str = Field(max_length=12)
    country: str = Field(max_length=12)


class Ship(BaseModel):
    """Ship a parcel (a nested model: its schema refers to $defs)."""

    model_config = ConfigDict(extra="forbid")
    to: Address
    weight_kg: int = Field(ge=0, le=50)


class Tree(BaseModel):
    """A recursive model."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(max_length=8)
    child: Optional[Tree]  # noqa: UP045


class Forecast(BaseModel):  # the allOf schema below, as pydantic says it
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


FORECAST = {"type": "object", "allOf": [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]},
    {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["days"]}]}


def test_tool_parameters_with_refs_and_allof_mean_what_they_say(lm):
    """A call's arguments are accepted by the constraint exactly when pydantic validates them. The
    parameters' $refs ("#/$defs/...", "#") mean the parameters' own root (they were read from the
    call's wrapper: a 400 for every pydantic_function_tool with a nested model, and "#" took the
    wrapper's shape), and an allOf is its branches together (closed apart, nothing matched: a 400)."""
    import llguidance as llg

    from modernlm.serve.tools import parse_tools

    tools = [openai.pydantic_function_tool(Ship), openai.pydantic_function_tool(Tree),
             {"type": "function", "function": {"name": "Forecast", "parameters": FORECAST}}]  # fmt: skip
    grammar = parse_tools({"tools": tools, "tool_choice": "required"}).constraint().to_llguidance()
    tok = lm.tokenizer
    ll = llg.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=[tok.eos_id])

    def accepted(name: str, arguments: str) -> bool:
        call = json.dumps({"name": name, "arguments": json.loads(arguments)}, separators=(",", ":"))
        m = llg.LLMatcher(ll, grammar, log_level=0)
        m.consume_tokens(tok.encode(f"<tool_call>\n{call}\n</tool_call>", add_bos=False))
        return not m.is_error() and m.is_accepting()

    def valid(model: type[BaseModel], arguments: str) -> bool:
        try:
            model.model_validate_json(arguments, strict=True)
        except ValueError:
            return False
        return True

    cases = [(Ship, '{"to": {"city": "Lisbon", "country": "PT"}, "weight_kg": 3}'),
             (Ship, '{"to": {"city": "Lisbon"}, "weight_kg": 3}'), (Ship, '{"to": {"city": "Lisbon", "country": '
             '"PT"}, "weight_kg": 60}'), (Ship, '{"to": {"city": "L", "country": "P", "x": 1}, "weight_kg": 1}'),
             (Tree, '{"label": "root", "child": {"label": "leaf", "child": null}}'),
             (Tree, '{"label": "root", "child": {"name": "Tree", "arguments": {"label": "x", "child": null}}}'),
             (Forecast, '{"city": "Paris", "days": 3}'), (Forecast, '{"city": "Paris"}'),
             (Forecast, '{"city": "Paris", "days": 3, "x": 1}'),
             (Forecast, '{"city": "Paris", "days": 9}')]  # fmt: skip
    verdicts = [(model.__name__, arguments, accepted(model.__name__, arguments)) for model, arguments in cases]
    assert verdicts == [(model.__name__, arguments, valid(model, arguments)) for model, arguments in cases]
    assert [v for _, _, v in verdicts] == [True, False, False, False, True, False, True, False, False, False]


def test_a_reply_that_starts_with_a_space_is_text_even_when_it_reads_like_a_call(tmp_path):
    """tool_choice auto, a model whose reply is ' <tool_call>' + a call of a function not in tools:
    text, as the grammar's text branch took it, streamed and not (it came back as that call)."""
    words = [" ", "<tool_call>\n", '{"name": "rm", "arguments": {"path": "/"}}', "\n</tool_call>"]
    lm = load(script_checkpoint(tmp_path / "script", words, max_seq_len=2048))
    with serving(lm) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        settings = {"model": lm.name, "messages": USER, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
        r = client.chat.completions.create(**settings).choices[0]
        assert (r.finish_reason, r.message.tool_calls, r.message.content) == ("stop", None, "".join(words))
        chunks = [c.choices[0] for c in client.chat.completions.create(**settings, stream=True) if c.choices]
        assert not any(c.delta.tool_calls for c in chunks)
        assert "".join(c.delta.content or "" for c in chunks) == "".join(words)


def test_a_number_cut_by_max_new_tokens_is_not_a_whole_reply(tmp_path):
    """A top-level number parses however many of its digits came: a reply that ended at
    max_new_tokens is not taken for whole (chat returned 12 for 123456)."""
    lm = load(script_checkpoint(tmp_path / "digits", ["12", "34", "56"]))
    number = {"type": "integer"}
    whole = lm.chat(USER, 20, response_format=number)
    assert (whole, whole.parsed) == ("123456", 123456)
    for n in (1, 2, 3):  # the third token is the last digit: a fourth could still be one
        with pytest.raises(UserError, match="raise max_new_tokens"):
            lm.chat(USER, n, response_format=number)


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

"""SmolLM2-135M-Instruct through the `openai` client against `modernlm serve`: 20 requests for a nested
pydantic model (an enum, a Literal, bounded numbers, an optional field, an array), greedy. With
`client.chat.completions.parse(..., response_format=Person)` every reply validates; the same
prompts without it mostly do not (the issue measured 0 of 20 for a flat one)."""

from __future__ import annotations

import concurrent.futures
import enum
from typing import Literal, Optional

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
from pydantic import BaseModel, Field, ValidationError  # noqa: E402

from modernlm import load  # noqa: E402
from modernlm.commands.eval_table import default_baseline  # noqa: E402
from tests.serve_util import serving  # noqa: E402

pytestmark = pytest.mark.slow


class Pet(enum.StrEnum):
    cat = "cat"
    dog = "dog"
    fish = "fish"
    bird = "bird"


class Address(BaseModel):
    city: str = Field(max_length=40)
    country: Optional[str] = Field(default=None, max_length=40)  # noqa: UP045


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)
    address: Address
    pets: list[Pet] = Field(max_length=3)
    status: Literal["student", "worker", "retired"]


PEOPLE = [("Ana", 34, "Lisbon", "cat"), ("Ben", 71, "Leeds", "dog"), ("Chen", 19, "Taipei", "fish"),
          ("Dara", 45, "Dublin", "bird"), ("Eli", 28, "Haifa", "cat"), ("Fay", 66, "Perth", "dog"),
          ("Gus", 22, "Oslo", "fish"), ("Hana", 38, "Osaka", "cat"), ("Ivo", 81, "Split", "bird"),
          ("Jo", 16, "Quebec", "dog"), ("Kai", 52, "Kiel", "cat"), ("Lea", 30, "Lyon", "fish"),
          ("Mo", 44, "Cairo", "dog"), ("Nia", 25, "Accra", "bird"), ("Otto", 60, "Graz", "cat"),
          ("Pia", 21, "Turin", "dog"), ("Raj", 35, "Pune", "fish"), ("Sol", 70, "Cadiz", "cat"),
          ("Tom", 18, "Cork", "bird"), ("Uma", 48, "Goa", "dog")]  # fmt: skip
JOBS = ["a student", "a worker", "retired"]


def prompt(i: int) -> list[dict[str, str]]:
    name, age, city, pet = PEOPLE[i]
    text = (f"Return a JSON object with keys name, age, address (city, country), pets and status for: "
            f"{name}, {age}, lives in {city}, has a {pet} and is {JOBS[i % 3]}.")  # fmt: skip
    return [{"role": "user", "content": text}]


def test_parse_gives_valid_objects_where_free_text_does_not():
    lm = load(default_baseline(), backend="modernlm", quantize="auto", progress=False)
    with serving(lm, max_batch=16) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)

        def constrained(i: int) -> Person | None:
            r = client.chat.completions.parse(model=lm.name, messages=prompt(i), response_format=Person,
                                              max_tokens=160, temperature=0)  # fmt: skip
            return r.choices[0].message.parsed

        def free(i: int) -> bool:
            r = client.chat.completions.create(model=lm.name, messages=prompt(i), max_tokens=160, temperature=0)
            try:
                Person.model_validate_json(r.choices[0].message.content)
                return True
            except ValidationError:
                return False

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            parsed = list(pool.map(constrained, range(20)))
            valid_free = sum(pool.map(free, range(20)))
    assert all(isinstance(p, Person) for p in parsed), parsed
    assert sum(p.name == PEOPLE[i][0] for i, p in enumerate(parsed)) >= 15  # and they say what was asked
    print(f"\nvalid: constrained 20/20, free {valid_free}/20")
    assert valid_free < 20


def test_a_named_tool_choice_calls_that_tool_with_valid_arguments():
    """Two functions; tool_choice names one: SmolLM2 calls it, its arguments validate."""
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}  # fmt: skip

    class Weather(BaseModel):
        city: str
        unit: Literal["celsius", "fahrenheit"]

    clock = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": weather}},
             {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": clock}}]
    lm = load(default_baseline(), backend="modernlm", quantize="auto", progress=False)
    with serving(lm, max_batch=4) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
        named = {"type": "function", "function": {"name": "get_weather"}}
        r = client.chat.completions.create(model=lm.name, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=tools, tool_choice=named, max_tokens=80, temperature=0)  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert Weather.model_validate_json(call.function.arguments).city == "Paris"

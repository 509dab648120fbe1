"""What constrained decoding costs in `modernlm serve`: tokens/s with and without a JSON Schema.

`modernlm serve` on SmolLM2-135M-Instruct's .gguf with its defaults (quantize=auto, compiled decode
steps), max_batch 16. At 1 and 16 clients: the clients' chat requests at once, streamed, greedy,
each with `response_format` json_schema (a nested object: strings, bounded integers, an enum, an
array), then the same messages free with `ignore_eos` and max_tokens equal to what that request
produced constrained, so both rounds decode the same number of tokens per request. tok/s = the
round's completion tokens / its wall time; the best of `--rounds` rounds each, alternating. The
ratio is the constraint's speed: 1.0 costs nothing.

The schema's compile time is measured in this process on the same tokenizer: the first constraint
(which also builds llguidance's view of the 49k-token vocabulary, once per tokenizer), a new schema,
and the same schema again (the cache).

    python benchmarks/bench_structured.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve: a sibling of this file

from bench_serve import chat, client_for, one_request, serving  # noqa: E402

from modernlm.commands.eval_table import default_baseline  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                     "country": {"type": "string", "maxLength": 40}},
                    "required": ["city", "country"], "additionalProperties": False},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish", "bird"]}, "maxItems": 3},
        "status": {"enum": ["student", "worker", "retired"]},
    },
    "required": ["name", "age", "address", "pets", "status"],
    "additionalProperties": False,
}  # fmt: skip
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea", "Mo", "Nia", "Otto",
         "Pia"]  # fmt: skip
CITIES = ["Lisbon", "Leeds", "Taipei", "Dublin", "Haifa", "Perth", "Oslo", "Osaka", "Split", "Quebec", "Kiel", "Lyon",
          "Cairo", "Accra", "Graz", "Turin"]  # fmt: skip


def messages(i: int) -> list[dict]:
    text = (f"Return a JSON object with keys name, age, address (city, country), pets and status for: "
            f"{NAMES[i]}, {20 + 3 * i}, lives in {CITIES[i]}, has a {['cat', 'dog', 'fish'][i % 3]}.")  # fmt: skip
    return [{"role": "user", "content": text}]


async def round_of(url: str, model_id: str, n: int, counts: list[int] | None) -> dict:
    """n requests at once: constrained (counts None) or free with counts[i] tokens each."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    bodies = [chat(model_id, messages(i), temperature=0, max_tokens=200, response_format=fmt) if counts is None
              else chat(model_id, messages(i), temperature=0, max_tokens=counts[i], ignore_eos=True)
              for i in range(n)]  # fmt: skip
    async with client_for(n) as client:
        t0 = time.perf_counter()
        reqs = await asyncio.gather(*(one_request(client, url, b) for b in bodies))
    wall = max(r["t_end"] for r in reqs) - t0
    tokens = [r["completion_tokens"] for r in reqs]
    valid = 0
    if counts is None:
        for r in reqs:
            try:
                valid += isinstance(json.loads(r["text"]), dict)
            except json.JSONDecodeError:
                pass
    return {"tokens": tokens, "tok_s": sum(tokens) / wall, "valid": valid}


def compile_times() -> dict:
    from modernlm import load
    from modernlm.constrain import Constraint, matcher

    lm = load(default_baseline(), backend="modernlm", progress=False)
    tok, vocab, eos = lm.tokenizer, lm.model.config.vocab_size, [lm.tokenizer.eos_id]
    out = {}
    other = dict(SCHEMA, properties=dict(SCHEMA["properties"], email={"type": "string", "maxLength": 60}))
    for label, schema in (("first schema (and the vocabulary)", SCHEMA), ("a new schema", other),
                          ("the same schema again (cached)", other)):  # fmt: skip
        t0 = time.perf_counter()
        constraint = Constraint.json_schema(schema)
        constraint.check()
        matcher(constraint, tok, vocab, eos)
        out[label] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--levels", default="1,16")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    rows = []
    with serving(default_baseline(), 16, []) as (_, url, model_id):
        asyncio.run(round_of(url, model_id, 2, None))  # untimed: the first schema's compile, warm paths
        for n in levels:
            best_c, best_f = None, None
            for _ in range(args.rounds):
                c = asyncio.run(round_of(url, model_id, n, None))
                f = asyncio.run(round_of(url, model_id, n, c["tokens"]))
                best_c = c if best_c is None or c["tok_s"] > best_c["tok_s"] else best_c
                best_f = f if best_f is None or f["tok_s"] > best_f["tok_s"] else best_f
            rows.append((n, best_c, best_f))
    print(f"\nmodernlm serve, {Path(default_baseline()).name}, greedy chats, best of {args.rounds} rounds\n")
    print("| clients | tokens per round | free tok/s | JSON Schema tok/s | ratio | replies that parse |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, c, f in rows:
        print(f"| {n} | {sum(c['tokens'])} | {f['tok_s']:.1f} | {c['tok_s']:.1f} | {c['tok_s'] / f['tok_s']:.2f}x | "
              f"{c['valid']}/{n} |")
    print("\n| schema compile (in-process, SmolLM2's tokenizer) | seconds |\n|---|---:|")
    for label, seconds in compile_times().items():
        print(f"| {label} | {seconds:.4f} |")


if __name__ == "__main__":
    main()

"""Constrained decoding: the tokens a grammar allows next, per row, where every decoder picks tokens.

    c = Constraint.json_schema({"type": "object", "properties": {...}})   # or a pydantic model
    c = Constraint.json_object()              # any JSON object
    c = Constraint.regex(r"\\d{3}-\\d{4}")      # the whole output matches
    c = Constraint.choice(["yes", "no"])      # exactly one of these strings
    c = Constraint.grammar(lark_text)         # or syntax="gbnf" (llama.cpp's grammars)
    lm.generate(prompt, constraint=c)         # Sampling(constraint=c): generate, chat, serve alike

A `Constraint` is a value (its llguidance grammar text): hashable, checked by `check()` before any
decoding (a bad schema or regex is a UserError naming the problem). `Guide(constraints, tokenizer,
vocab, eos)` holds one matcher per row of a batch (None: a free row), so constrained and free rows
share one batch: `allowed()` gives the (B, V) mask that `generation.pick_tokens` applies, `advance`
feeds each row's picked token. When a row's grammar is complete the mask allows only its eos, so it
stops there; a row that runs out of max_new_tokens first ends unfinished (finish "length").

The grammar library is llguidance (Microsoft's; vLLM, SGLang and llama.cpp use it too), chosen over
xgrammar for a 3 MB wheel with no dependencies (xgrammar's pull in triton, tvm-ffi and
transformers), masks in about a millisecond on the CPU for SmolLM2's 49k tokens, the wider JSON
Schema coverage of the two (JSONSchemaBench), and Lark, GBNF and regex grammars. Compiled grammars
are cached per tokenizer and grammar (LRU, CACHE_SIZE); each row starts from a copy.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modernlm.errors import UserError

CACHE_SIZE = 64  # compiled grammars kept per process (a server sees the same few schemas again)
MAX_GRAMMAR_CHARS = 200_000  # a schema / grammar larger than this is refused before compiling
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What the output must be: `kind` (KINDS) and `source` (the schema as canonical JSON, the
    regex, the choices as a JSON list, the grammar text); `syntax` is "lark" or "gbnf" for grammars."""

    kind: str
    source: str
    syntax: str = "lark"

    @classmethod
    def json_schema(cls, schema: Any) -> Constraint:
        """A JSON Schema (a dict, its JSON text, or a pydantic model class: its objects then take no
        keys beyond their fields, as OpenAI's client makes a model's schema strict)."""
        if hasattr(schema, "model_json_schema"):  # a pydantic model class
            schema = closed(schema.model_json_schema())
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise UserError(f"json_schema: not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise UserError(f"json_schema: a JSON Schema is an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))  # key order kept: it is the output's

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", str(pattern))

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        if isinstance(options, str):  # its characters would be the choices
            raise UserError(f"choice: give a list of strings, got the string {options!r}")
        options = [str(o) for o in options]
        if not options or any(not o for o in options):
            raise UserError("choice: give one or more non-empty strings")
        return cls("choice", json.dumps(options))

    @classmethod
    def grammar(cls, text: str, syntax: str = "lark") -> Constraint:
        if syntax not in ("lark", "gbnf"):
            raise UserError(f"grammar syntax must be 'lark' or 'gbnf', got {syntax!r}")
        return cls("grammar", str(text), syntax)

    @classmethod
    def of(cls, **spec: Any) -> Constraint | None:
        """At most one of json_schema=, json_object=True, regex=, choice=, grammar= (the keywords of
        `LM.generate` and `Sampling.make`); None when none is given."""
        given = {k: v for k, v in spec.items() if v is not None and v is not False}  # {} is a schema: any JSON
        if len(given) > 1:
            raise UserError(f"give one constraint, got {', '.join(sorted(given))}")
        if not given:
            return None
        (kind, value), = given.items()
        if isinstance(value, Constraint):  # e.g. grammar=Constraint.grammar(text, syntax="gbnf")
            return value
        if kind == "json_object":
            return cls.json_object()
        return getattr(cls, kind)(value)

    def to_llguidance(self) -> str:
        """The grammar as llguidance reads it (JSON text of its grammar format)."""
        import llguidance as llg

        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise UserError(f"{self.kind}: {len(self.source):,} characters; at most {MAX_GRAMMAR_CHARS:,}")
        options = {"whitespace_flexible": False}  # compact JSON: no runs of spaces to wander into
        if self.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(self.source, defaults=options)
        if self.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            options = json.loads(self.source)
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
        text = self.source
        if self.syntax == "gbnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                text = gbnf_to_lark(text)
            except Exception as e:  # the converter's own errors: a bad grammar, said in one line
                raise UserError(f"grammar: not a GBNF grammar llguidance reads: {e}") from None
        return llg.LLMatcher.grammar_from_lark(text)

    def check(self) -> None:
        """UserError naming what is wrong with the schema, regex or grammar (before any decoding)."""
        import llguidance as llg

        error = llg.LLMatcher.validate_grammar(self.to_llguidance())
        if error:
            raise UserError(f"{self.kind}: {_one_line(error)}")

    @classmethod
    def schema_file(cls, path: str, field: str = "schema") -> Constraint:
        """The JSON Schema in file `path`, checked (`modernlm generate/chat ... schema=FILE`)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"{field}: cannot read {path}: {e.strerror}") from None
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{field}: {path} line {e.lineno}: not valid JSON ({e.msg})") from None
        constraint = cls.json_schema(schema)
        constraint.check()
        return constraint

    def describe(self) -> str:
        return self.kind if self.kind == "json_object" else f"{self.kind} {self.source[:60]!r}"


def closed(schema: Any, close: bool = True) -> Any:
    """`schema` with "additionalProperties": false on every object that has properties and does not
    say (JSON Schema's default lets a small model wander into extra keys it never closes). Where
    schemas combine, closed branches would refuse each other's keys and nothing would match: the
    branches of an allOf stay open and the object takes their keys; an object beside a $ref, anyOf
    or oneOf stays open."""
    if isinstance(schema, list):
        return [closed(x, close) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in LITERALS else closed(v, close=k != "allOf") for k, v in schema.items()}
    parts = out.get("allOf", [])
    if not close or "additionalProperties" in out or not isinstance(parts, list):
        return out
    if out.keys() & {"$ref", "anyOf", "oneOf"} or any(not isinstance(p, dict) or p.keys() & COMBINERS for p in parts):
        return out  # some of its keys are named elsewhere: left open
    names = {n: {} for p in parts for n in p.get("properties") or {}}  # an allOf's keys are the object's
    if names or "properties" in out:
        out["properties"] = names | out.get("properties", {})
        out["additionalProperties"] = False
    return out


LITERALS = ("const", "enum", "default", "examples")  # a schema's values, not schemas
COMBINERS = {"$ref", "allOf", "anyOf", "oneOf"}


def rebased(schema: Any, base: str) -> Any:
    """`schema` placed at `base` (a JSON pointer "#/...") inside another document: its local $refs
    ("#", "#/$defs/X") are relative to its own root, so they become base, base + "/$defs/X"."""
    if isinstance(schema, list):
        return [rebased(x, base) for x in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
            else v if k in LITERALS else rebased(v, base) for k, v in schema.items()}  # fmt: skip


def _one_line(error: str, limit: int = 300) -> str:
    """llguidance's message (several lines, a caret under the place) as one line."""
    text = " ".join(error.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- compiled grammars -------------------------------------------------------------------------

_lock = threading.Lock()  # the server's engine and request threads compile; one at a time
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # our Tokenizer -> {(V, eos): LLTokenizer}
# (LLTokenizer, grammar) -> a pristine LLMatcher. The key holds the tokenizer itself (it hashes by
# identity): keyed by its id, a tokenizer made after an earlier one was freed could take that id,
# and with it the earlier one's matchers, over another vocabulary
_MATCHERS: OrderedDict = OrderedDict()


def _ll_tokenizer(tokenizer: Any, vocab: int, eos: tuple[int, ...]) -> Any:
    import llguidance as llg

    per = _TOKENIZERS.setdefault(tokenizer, {})
    if (vocab, eos) not in per:  # ~0.3 s for a 49k vocabulary: once per tokenizer and eos set
        per[(vocab, eos)] = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=list(eos))
    return per[(vocab, eos)]


def matcher(constraint: Constraint, tokenizer: Any, vocab: int, eos: Sequence[int]) -> Any:
    """A fresh llguidance matcher for one row: `constraint` over `tokenizer`'s ids below `vocab`,
    ending with one of `eos`. A bad grammar is a UserError."""
    import llguidance as llg

    if not eos:
        raise UserError("a constrained generation needs an eos token to end on (the tokenizer has none)")
    with _lock:
        ll_tok = _ll_tokenizer(tokenizer, vocab, tuple(sorted(set(eos))))
        key = (ll_tok, constraint)
        pristine = _MATCHERS.get(key)
        if pristine is None:
            pristine = llg.LLMatcher(ll_tok, constraint.to_llguidance(), log_level=0)
            if pristine.is_error():
                raise UserError(f"{constraint.kind}: {_one_line(pristine.get_error())}")
            _MATCHERS[key] = pristine
            while len(_MATCHERS) > CACHE_SIZE:
                _MATCHERS.popitem(last=False)
        _MATCHERS.move_to_end(key)
        return pristine.deep_copy()


class Guide:
    """The constraints of a batch's rows: one matcher per row, or None for a free row."""

    def __init__(self, matchers: Sequence[Any | None], vocab: int):
        self.matchers = list(matchers)
        self.vocab = vocab
        self._bits = torch.arange(32, dtype=torch.int32)

    @classmethod
    def for_rows(cls, constraints: Sequence[Constraint | None], tokenizer: Any, vocab: int,
                 eos: Sequence[int]) -> Guide | None:  # fmt: skip
        """A Guide for rows with these constraints; None when no row has one."""
        if all(c is None for c in constraints):
            return None
        return cls([None if c is None else matcher(c, tokenizer, vocab, eos) for c in constraints], vocab)

    def allowed(self) -> Tensor | None:
        """(B, V) bool: the tokens each row may take next (every token for a free row)."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        bitmask = allocate_token_bitmask(len(self.matchers), self.vocab)  # all ones: free rows
        for i, m in enumerate(self.matchers):
            if m is not None:
                fill_next_token_bitmask(m, bitmask, i)
        bits = (bitmask[:, :, None] >> self._bits) & 1  # (B, W, 32): bit j of word w is token 32 w + j
        return bits.view(bitmask.size(0), -1)[:, : self.vocab].bool()

    def advance(self, tokens: Sequence[int] | Tensor) -> None:
        """Feed each constrained row its picked token; a row that already ended (its matcher
        stopped, or the token is negative) is left alone."""
        for m, t in zip(self.matchers, tokens.tolist() if isinstance(tokens, Tensor) else tokens, strict=True):
            if m is not None and t >= 0 and not m.is_stopped():
                m.consume_token(int(t))

    def complete(self, row: int) -> bool:
        """Whether row's output so far is a whole match (a free row always is)."""
        m = self.matchers[row]
        return m is None or m.is_accepting()

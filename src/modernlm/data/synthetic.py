"""A self-generated dataset for the offline demo pipeline: stories, word problems, preference pairs.

The demo must run with no network and no third-party text, and a tiny model must visibly learn at
every stage, so this module writes its own small world (the word lists below, written for this
project) into every file the pipeline needs:

    corpus/train.txt, corpus/val.txt   pretraining text, one story per blank-line paragraph
    gsm/{train,val,test}.jsonl         word problems in GSM8K's format: {"question", "answer": "... #### N"},
                                       plus "record" (template, kind, numbers, steps, result)
    sft/train.json, sft/val.json       Alpaca records {"instruction", "input", "output"}
    prefs/{train,val,test}.jsonl       {"prompt", "chosen", "rejected"}: right and wrong solutions (+ answers, kind)
    meta.json                          counts, each split's kinds and distinct computations, seed, the config

Train files teach, val files choose checkpoints, test files are what gets reported. Every text of a
problem renders one `Problem` record, so its answer is right by construction. Held out means
unseen: no training text states a held-out problem's computation (`split_of`). One seed gives
byte-identical files.

Design notes (Problems, Splits, Difficulty, the demonstrations' flaw, Preference pairs): docs/design.md#datasyntheticpy
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from modernlm.errors import UserError
from modernlm.files import atomic_write

# ---------------------------------------------------------------------------------------------
# The world: every word the generator uses, written for this module.


@dataclass(frozen=True)
class Person:
    name: str
    subj: str  # he / she
    obj: str  # him / her
    poss: str  # his / her
    kid: str  # boy / girl


def _people(names: str, subj: str, obj: str, poss: str, kid: str) -> list[Person]:
    return [Person(n, subj, obj, poss, kid) for n in names.split()]


PEOPLE = _people("Mia Lily Emma Zoe Anna Sara Nora Ella Ruby Ivy", "she", "her", "her", "girl") + _people(
    "Tom Ben Sam Max Leo Jack Noah Finn Owen Luke", "he", "him", "his", "boy"
)


@dataclass(frozen=True)
class Thing:
    one: str  # singular
    many: str  # plural
    food: bool  # can be eaten (the "eats" event needs it)

    def noun(self, n: int) -> str:
        return self.one if n == 1 else self.many

    def count(self, n: int) -> str:
        return f"{n} {self.noun(n)}"


THINGS = [
    Thing("apple", "apples", True),
    Thing("pear", "pears", True),
    Thing("cookie", "cookies", True),
    Thing("cherry", "cherries", True),
    Thing("plum", "plums", True),
    Thing("carrot", "carrots", True),
    Thing("candy", "candies", True),
    Thing("ball", "balls", False),
    Thing("marble", "marbles", False),
    Thing("sticker", "stickers", False),
    Thing("pencil", "pencils", False),
    Thing("shell", "shells", False),
    Thing("flower", "flowers", False),
    Thing("card", "cards", False),
    Thing("book", "books", False),
    Thing("stone", "stones", False),
]
TOYS = ["ball", "kite", "teddy bear", "toy car", "doll", "drum", "boat", "hat", "puzzle", "balloon"]
COLORS = "red blue green yellow pink brown purple white".split()  # no vowel first: "a red ..."
PLACES = ["the park", "the beach", "the garden", "the forest", "the farm", "the lake", "school", "the hill"]
SHOPS = ["market", "shop", "store", "fair"]
ANIMALS = "dog cat bird rabbit duck frog horse puppy kitten goat".split()  # "a ..." too
WEATHER = "sunny warm windy cold bright rainy".split()
HAPPY = "happy glad proud excited".split()
SPOTS = ["a big tree", "the bed", "a bench", "a bush", "the table", "a rock"]
SNACKS = ["bread", "seeds", "milk", "a carrot", "some grass", "an apple"]

# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class SyntheticConfig:
    seed: int = 0  # one seed for every file; same seed and sizes -> byte-identical output
    train_stories: int = 40000  # paragraphs of corpus/train.txt
    val_stories: int = 600  # paragraphs of corpus/val.txt
    arithmetic_fraction: float = 0.7  # share of stories that narrate a problem in prose (the rest: plain stories)
    equation_fraction: float = 0.4  # share of narrated steps that also write the sum out ("She counted: 4 + 3 = 7.")
    present_fraction: float = 0.25  # share of stories told in the present tense (the questions' tense)
    train_problems: int = 4000  # gsm/train.jsonl; also the word problems of sft/train.json
    val_problems: int = 200  # gsm/val.jsonl, the problems of sft/val.json and prefs/val.jsonl (val keys only)
    test_problems: int = 500  # gsm/test.jsonl, the problems of prefs/test.jsonl (test keys only)
    pref_train: int = 2000  # prefs/train.jsonl pairs (prompts: train problems)
    pref_val: int = 200  # prefs/val.jsonl pairs (prompts: the first val problems; choose DPO's checkpoint)
    pref_test: int | None = None  # prefs/test.jsonl pairs (prompts: first test problems); None: min(200, test_problems)
    test_key_fraction: float = 0.2  # share of arithmetic keys (computations) held out for test (design.md: Splits)
    val_key_fraction: float = 0.1  # share of arithmetic keys held out for val, disjoint from test's
    sft_story_fraction: float = 0.1  # story-writing instructions added to sft, as a share of its word problems
    compare_fraction: float = 0.4  # share of problems that compare two people (the rest: a chain of events)
    sft_flaw: float = 0.5  # share of "more/fewer than" demonstrations in sft/ that skip the computation (design.md)
    max_number: int = 40  # every count in a problem (start, amounts, each step's result) is in 1..max_number
    min_range: int = 10  # each problem's counts lie in 1..R, R drawn in min_range..max_number
    min_steps: int = 1  # fewest arithmetic steps in a problem
    max_steps: int = 2  # most arithmetic steps in a problem (1..3)

    def __post_init__(self) -> None:
        if self.pref_test is None and isinstance(self.test_problems, int):
            self.pref_test = min(200, self.test_problems)
        sizes = ("train_stories", "val_stories", "train_problems", "val_problems", "test_problems")
        for name in (*sizes, "pref_train", "pref_val", "pref_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"{name}: must be an int >= 0, got {value!r}")
        for name in sizes:
            if getattr(self, name) == 0:
                raise UserError(f"{name}: must be at least 1 (every file of the demo needs records)")
        fractions = ("arithmetic_fraction", "equation_fraction", "present_fraction", "sft_story_fraction", "sft_flaw")
        for name in (*fractions, "compare_fraction"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise UserError(f"{name}: must be a fraction in [0, 1], got {value!r}")
        if not isinstance(self.max_number, int) or self.max_number < 5:
            raise UserError(f"max_number: must be an int >= 5, got {self.max_number!r}")
        if not isinstance(self.min_range, int) or not 5 <= self.min_range <= self.max_number:
            raise UserError(f"min_range: must be an int in 5..max_number ({self.max_number}), got {self.min_range!r}")
        if not 1 <= self.min_steps <= self.max_steps <= 3:
            raise UserError(
                f"min_steps / max_steps: need 1 <= min_steps <= max_steps <= 3, got {self.min_steps} / {self.max_steps}"
            )
        if self.pref_train > self.train_problems:
            raise UserError(f"pref_train: at most train_problems ({self.train_problems}), got {self.pref_train}")
        if self.pref_val > self.val_problems:
            raise UserError(f"pref_val: at most val_problems ({self.val_problems}), got {self.pref_val}")
        if self.pref_test > self.test_problems:
            raise UserError(f"pref_test: at most test_problems ({self.test_problems}), got {self.pref_test}")
        for name in ("test_key_fraction", "val_key_fraction"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1:
                raise UserError(f"{name}: must be a fraction in (0, 1) (a held-out split needs keys), got {value!r}")
        if self.test_key_fraction + self.val_key_fraction > 0.9:
            raise UserError(
                f"test_key_fraction + val_key_fraction: at most 0.9 (train keeps the rest), "
                f"got {self.test_key_fraction} + {self.val_key_fraction}"
            )


# ---------------------------------------------------------------------------------------------
# Problems: templates, steps, rendering


@dataclass(frozen=True)
class CalcStep:
    op: str  # "+" or "-"
    left: int
    right: int
    result: int

    def text(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.result}"


@dataclass(frozen=True)
class Event:
    """One thing that changes the hero's count, in the question's, the solution's and the story's words."""

    op: str  # "+" or "-"
    food: bool  # only for things that can be eaten
    present: str  # question / present-tense story sentence
    past: str  # past-tense story sentence
    because: str  # the solution's clause before ", so ..."


# Fields: {H} hero, {F} friend, {o} hero's object pronoun, {n} the amount, {N} the amount with its
# noun ("3 apples"), {M} the same with "more" ("3 more apples"), {shop}. The present sentences are
# the questions' wording.
EVENTS: dict[str, Event] = {
    "given": Event("+", False, "{F} gives {H} {M}.", "{F} gave {H} {M}.", "{F} gives {o} {n} more"),
    "finds": Event("+", False, "{H} finds {M}.", "{H} found {M}.", "{H} finds {n} more"),
    "buys": Event("+", False, "{H} buys {M} at the {shop}.", "{H} bought {M} at the {shop}.", "{H} buys {n} more"),
    "gives_away": Event("-", False, "{H} gives {N} to {F}.", "{H} gave {N} to {F}.", "{H} gives {n} to {F}"),
    "loses": Event("-", False, "{H} loses {N}.", "{H} lost {N}.", "{H} loses {n}"),
    "eats": Event("-", True, "{H} eats {N}.", "{H} ate {N}.", "{H} eats {n}"),
}

# A template's steps as (op, left, right) over refs: ("n", i) is the i-th free number, ("s", j) the
# result of step j. Chains are built from their events; the comparison templates are fixed.
Ref = tuple[str, int]
COMPARE_TEMPLATES: dict[str, list[tuple[str, Ref, Ref]]] = {
    "together": [("+", ("n", 0), ("n", 1))],
    "more_than": [("+", ("n", 0), ("n", 1))],
    "fewer_than": [("-", ("n", 0), ("n", 1))],
    "more_than_together": [("+", ("n", 0), ("n", 1)), ("+", ("n", 0), ("s", 0))],
    "fewer_than_together": [("-", ("n", 0), ("n", 1)), ("+", ("n", 0), ("s", 0))],
}


def _chain_events(template: str) -> list[str]:
    return template.removeprefix("chain:").split("+")


def template_specs(template: str) -> list[tuple[str, Ref, Ref]]:
    """The (op, left, right) steps of a template."""
    if template in COMPARE_TEMPLATES:
        return COMPARE_TEMPLATES[template]
    events = _chain_events(template)
    return [(EVENTS[e].op, ("n", 0) if i == 0 else ("s", i - 1), ("n", i + 1)) for i, e in enumerate(events)]


def run_steps(
    specs: Sequence[tuple[str, Ref, Ref]], numbers: Sequence[int], error: tuple | None = None
) -> list[CalcStep]:
    """Compute the steps; error=(i, "off", delta) shifts step i's result, (i, "op") flips its operation.

    Later steps always compute correctly from what came before, as a student who slipped once would.
    """
    out: list[CalcStep] = []
    for i, (op, left, right) in enumerate(specs):
        a, b = (numbers[k] if kind == "n" else out[k].result for kind, k in (left, right))
        if error and error[0] == i and error[1] == "op":
            op = "-" if op == "+" else "+"
        result = a + b if op == "+" else a - b
        if error and error[0] == i and error[1] == "off":
            result += error[2]
        out.append(CalcStep(op, a, b, result))
    return out


# The kinds of problem, in display order: a chain of events with 1, 2 or 3 steps ("Mia has 4. Tom
# gives her 3 more. ..."), two counts added ("together"), and every "N more / fewer than" comparison
# (1 or 2 steps): the demonstrations' flawed kind. Held-out splits keep train's mix of these.
KINDS = ("chain1", "chain2", "chain3", "together", "compare")

ArithmeticKey = tuple[tuple[str, int, int], ...]


def template_kind(template: str) -> str:
    """The kind (one of `KINDS`) of a template: what per-kind reports group by."""
    if template == "together":
        return "together"
    if template in COMPARE_TEMPLATES:
        return "compare"
    return f"chain{len(_chain_events(template))}"


@dataclass(frozen=True)
class Problem:
    template: str  # "chain:given+eats", "together", "more_than", ... (see template_specs)
    numbers: tuple[int, ...]  # the free numbers: the start count, then each amount
    steps: tuple[CalcStep, ...]  # the computation, in order
    hero: Person
    friend: Person
    thing: Thing
    shop: str

    @property
    def key(self) -> ArithmeticKey:
        """What the splits keep apart: the arithmetic, (op, left, right) of each step, whatever the words.

        "Max finds 1 more cherry" and "Mia buys 1 more carrot" from 6, "6 and 1 together" and "1 more
        than 6" all have the key (("+", 6, 1),): one computation, so one split.
        """
        return tuple((s.op, s.left, s.right) for s in self.steps)

    @property
    def kind(self) -> str:
        """One of `KINDS`: "chain1".."chain3", "together" or "compare" (see `template_kind`)."""
        return template_kind(self.template)

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    def record(self) -> dict[str, Any]:
        """The structured record, JSON-ready (what tests recompute the answer from)."""
        return {
            "template": self.template,
            "kind": self.kind,
            "numbers": list(self.numbers),
            "steps": [asdict(s) for s in self.steps],
            "result": self.answer,
        }


def problem_kind(p: Problem) -> str:
    """The problem's kind, one of `KINDS` (the same as `p.kind`)."""
    return p.kind


def _slots(p: Problem, n: int = 0) -> dict[str, str]:
    h, t = p.hero, p.thing
    return {
        "H": h.name,
        "F": p.friend.name,
        "o": h.obj,
        "n": str(n),
        "N": t.count(n),
        "M": f"{n} more {t.noun(n)}",
        "shop": p.shop,
    }


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def question_text(p: Problem) -> str:
    """The word problem, in the present tense, ending in its "How many ...?" question."""
    h, f, t = p.hero.name, p.friend.name, p.thing
    a, b = p.numbers[0], p.numbers[1]
    if p.template == "together":
        return f"{h} has {t.count(a)}. {f} has {t.count(b)}. How many {t.many} do they have together?"
    if p.template in COMPARE_TEMPLATES:
        more = "more" if p.template.startswith("more") else "fewer"
        ask = "do they have together" if p.template.endswith("together") else f"does {f} have"
        fb = t.count(b).replace(" ", f" {more} ")  # "3 more apples", "1 fewer apple"
        return f"{h} has {t.count(a)}. {f} has {fb} than {h}. How many {t.many} {ask}?"
    parts = [f"{h} has {t.count(a)}."]
    for i, name in enumerate(_chain_events(p.template)):
        sentence = EVENTS[name].present.format(**_slots(p, p.numbers[i + 1]))
        parts.append(sentence if i == 0 else "Then " + sentence)
    parts.append(f"How many {t.many} does {h} have now?")
    return " ".join(parts)


def solution_text(p: Problem, steps: Sequence[CalcStep] | None = None) -> str:
    """The step-by-step solution ending in "#### N"; `steps` overrides the computation (a wrong one)."""
    steps = list(p.steps if steps is None else steps)
    f, t, s = p.friend.name, p.thing, p.hero.subj
    lines = []
    if p.template == "together":
        lines.append(f"Together they have {steps[0].text()} {t.noun(steps[0].result)}.")
    elif p.template in COMPARE_TEMPLATES:
        lines.append(f"{f} has {steps[0].text()} {t.noun(steps[0].result)}.")
        if len(steps) > 1:
            lines.append(f"Together they have {steps[1].text()} {t.noun(steps[1].result)}.")
    else:
        for i, name in enumerate(_chain_events(p.template)):
            because = EVENTS[name].because.format(**_slots(p, p.numbers[i + 1]))
            lines.append(f"{'Then ' if i else ''}{because}, so {s} has {steps[i].text()} {t.noun(steps[i].result)}.")
    return "\n".join(lines) + f"\n#### {steps[-1].result}"


def story_text(p: Problem, rng: random.Random, cfg: SyntheticConfig) -> str:
    """The problem told as a story: each event, then the new count; never a question, never "####"."""
    h, f, t, s = p.hero.name, p.friend.name, p.thing, p.hero.subj
    present = rng.random() < cfg.present_fraction
    had, has_ = ("has", "have") if present else ("had", "had")

    def equation(step: CalcStep, who: str) -> list[str]:
        counted = ("count" if who == "they" else "counts") if present else "counted"
        return [f"{_cap(who)} {counted}: {step.text()}."] if rng.random() < cfg.equation_fraction else []

    out: list[str] = []
    if rng.random() < 0.5:
        out.append(f"One {rng.choice(WEATHER)} day, {h} {'goes' if present else 'went'} to {rng.choice(PLACES)}.")
    a, b = p.numbers[0], p.numbers[1]
    first = p.steps[0]
    if p.template == "together":
        out.append(f"{h} {had} {t.count(a)} and {f} {had} {t.count(b)}.")
        out += equation(first, "they")
        out.append(f"Together they {has_} {t.count(first.result)}.")
    elif p.template in COMPARE_TEMPLATES:
        more = "more" if first.op == "+" else "fewer"
        out.append(f"{h} {had} {t.count(a)}. {f} {had} {t.count(b).replace(' ', f' {more} ')} than {h}.")
        out += equation(first, f)
        out.append(f"So {f} {had} {t.count(first.result)}.")
        if len(p.steps) > 1:
            out += equation(p.steps[1], "they")
            out.append(f"Together they {has_} {t.count(p.steps[1].result)}.")
    else:
        out.append(f"{h} {had} {t.count(a)}.")
        for i, name in enumerate(_chain_events(p.template)):
            event = EVENTS[name]
            sentence = (event.present if present else event.past).format(**_slots(p, p.numbers[i + 1]))
            out.append(("Then " if i == 0 or rng.random() < 0.5 else "After that, ") + sentence)
            out += equation(p.steps[i], s)
            now = rng.choice([f"Now {h} {had}", f"So {h} {had}", f"Now {s} {had}"])
            out.append(f"{now} {t.count(p.steps[i].result)}.")
    if rng.random() < 0.4:
        was, smiled = ("is", "smiles") if present else ("was", "smiled")
        out.append(rng.choice([f"{h} {was} {rng.choice(HAPPY)}.", f"{h} {smiled}."]))
    return " ".join(out)


@functools.cache
def _templates(steps: int) -> tuple[str, ...]:
    """Every template with this many steps; chains over every sequence of events."""
    chains = [[name] for name in EVENTS]
    for _ in range(steps - 1):
        chains = [c + [name] for c in chains for name in EVENTS]
    compare = [t for t, specs in COMPARE_TEMPLATES.items() if len(specs) == steps]
    return tuple(["chain:" + "+".join(c) for c in chains] + compare)


def _draw_numbers(specs: Sequence[tuple[str, Ref, Ref]], rng: random.Random, top: int) -> tuple[int, ...] | None:
    """Free numbers that keep every count in 1..top, drawn step by step; None when a step cannot fit.

    A step's right operand is either a new free number (drawn to fit) or an earlier value (checked).
    """
    numbers = [rng.randint(1 if specs[0][0] == "+" else 2, top - 1 if specs[0][0] == "+" else top)]
    results: list[int] = []
    value = lambda ref: numbers[ref[1]] if ref[0] == "n" else results[ref[1]]  # noqa: E731
    for op, left, right in specs:
        a = value(left)
        if right == ("n", len(numbers)):
            hi = top - a if op == "+" else a - 1  # the amount must leave the result in 1..top
            if hi < 1:
                return None
            numbers.append(rng.randint(1, hi))
        result = a + value(right) if op == "+" else a - value(right)
        if not 1 <= result <= top:
            return None
        results.append(result)
    return tuple(numbers)


def draw_problem(rng: random.Random, cfg: SyntheticConfig) -> Problem:
    """One random problem of the world: steps in min_steps..max_steps, every count in 1..max_number."""
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    top = rng.randint(cfg.min_range, cfg.max_number)  # this problem's largest allowed count
    thing = rng.choice(THINGS)
    templates = _templates(n_steps)
    chains = [t for t in templates if t.startswith("chain:") and (thing.food or "eats" not in t)]
    compare = [t for t in templates if not t.startswith("chain:")]
    while True:
        # A comparison compare_fraction of the time where one has this many steps, else a chain of events.
        template = rng.choice(compare) if compare and rng.random() < cfg.compare_fraction else rng.choice(chains)
        specs = template_specs(template)
        numbers = _draw_numbers(specs, rng, top)
        if numbers is not None:
            break
    hero, friend = rng.sample(PEOPLE, 2)
    return Problem(template, numbers, tuple(run_steps(specs, numbers)), hero, friend, thing, rng.choice(SHOPS))


def wrong_steps(
    p: Problem, rng: random.Random, max_number: int, allowed: Callable[[Sequence[CalcStep]], bool] | None = None
) -> list[CalcStep]:
    """The steps with one plausible slip (a result off by 1 or 2, or the wrong operation) and a wrong answer.

    Every count stays >= 0 and the final answer always differs from the right one; with `allowed`, the
    steps also pass it (`states_only`: a wrong solution must not state a held-out computation).
    """
    options = [(i, "off", d) for i in range(len(p.steps)) for d in (-2, -1, 1, 2)]
    options += [(i, "op") for i in range(len(p.steps))]
    rng.shuffle(options)
    for error in options:
        steps = run_steps(template_specs(p.template), p.numbers, error)
        if all(0 <= s.result <= 2 * max_number + 2 for s in steps) and steps[-1].result != p.answer:
            if allowed is None or allowed(steps):
                return steps
    # unreachable: the last step "off +1" always works, and states only the problem's own earlier steps
    raise AssertionError(f"no wrong solution for {p.key}")


def right_steps(steps: Sequence[CalcStep]) -> list[CalcStep]:
    """The steps whose equation is true (a wrong solution's slip is not; the steps after it are)."""
    return [s for s in steps if s.result == (s.left + s.right if s.op == "+" else s.left - s.right)]


def states_only(steps: Sequence[CalcStep], split: Splitter, splits: Collection[str]) -> bool:
    """Whether a text with these steps states only computations of `splits`: each true equation is a fact
    of one of them, and so is each run of true equations in order (a multi-step computation)."""
    right = [(s.op, s.left, s.right) for s in right_steps(steps)]
    runs = (run for n in range(1, len(right) + 1) for run in itertools.combinations(right, n))
    return all(split(run) in splits or (len(run) > 1 and split(run) is None) for run in runs)


_EQUATION_RE = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)")


def equations(text: str) -> list[tuple[int, str, int, int]]:
    """Every "a + b = c" / "a - b = c" in a text, as (a, op, b, c)."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in _EQUATION_RE.findall(text)]


# ---------------------------------------------------------------------------------------------
# Plain stories: little plots over the world, each using the hero, a friend, a toy and a place.


@dataclass(frozen=True)
class StoryCast:
    hero: Person
    friend: Person
    toy: str
    color: str
    place: str
    animal: str


def _plot_lost(c: StoryCast, rng: random.Random) -> list[str]:
    h, f, s, p = c.hero.name, c.friend.name, c.hero.subj, c.hero.poss
    return [
        f"{h} had a {c.color} {c.toy}.",
        f"One day {s} took it to {c.place} and lost it.",
        rng.choice([f"{_cap(s)} looked everywhere.", f"{_cap(s)} looked and looked, but it was gone."]),
        f"Then {f} found the {c.toy} under {rng.choice(SPOTS)}.",
        f"{h} was so {rng.choice(HAPPY)} to have {p} {c.toy} back.",
        rng.choice([f"{_cap(s)} said thank you to {f}.", f"{_cap(s)} gave {f} a big hug."]),
    ]


def _plot_animal(c: StoryCast, rng: random.Random) -> list[str]:
    h, f, s, animal = c.hero.name, c.friend.name, c.hero.subj, c.animal
    return [
        f"One {rng.choice(WEATHER)} day, {h} and {f} went to {c.place} with a {c.color} {c.toy}.",
        f"There they saw a little {animal}.",
        rng.choice([f"The {animal} was hungry.", f"The {animal} looked sad and alone."]),
        f"{h} gave it {rng.choice(SNACKS)}, and {f} gave it some water.",
        f"The {animal} played with the {c.toy}.",
        rng.choice(
            [f"From that day on, the {animal} was their friend.", f"{_cap(s)} hoped to see the {animal} again."]
        ),
    ]


def _plot_share(c: StoryCast, rng: random.Random) -> list[str]:
    h, f, s, p = c.hero.name, c.friend.name, c.hero.subj, c.hero.poss
    return [
        f"{h} had a new {c.color} {c.toy}.",
        f"{_cap(s)} took it to {c.place}, and {f} wanted to play with it too.",
        f"At first {h} did not want to share.",
        f"Then {s} saw that {f} was sad.",
        f"{h} gave {p} {c.toy} to {f}, and they played together.",
        rng.choice(["Sharing made them both happy.", "They had a lot of fun.", "It was a good day."]),
    ]


def _plot_rain(c: StoryCast, rng: random.Random) -> list[str]:
    h, f = c.hero.name, c.friend.name
    return [
        f"{h} and {f} played with a {c.color} {c.toy} at {c.place}.",
        rng.choice(["Then dark clouds came.", "Then the wind began to blow."]),
        "Soon it started to rain.",
        f"{h} took the {c.toy}, and they ran home.",
        rng.choice(["At home they drank warm milk.", "At home they sat by the window and watched the rain."]),
        f"The next day the sun came out, and they went back to {c.place}.",
    ]


def _plot_gift(c: StoryCast, rng: random.Random) -> list[str]:
    h, f, p = c.hero.name, c.friend.name, c.hero.poss
    return [
        f"It was {f}'s birthday.",
        f"{h} wanted to give {c.friend.obj} a gift.",
        f"{_cap(c.hero.subj)} made a {c.color} {c.toy} with {p} own hands.",
        f"{h} gave the {c.toy} to {f} at {c.place}.",
        f"{f} was very {rng.choice(HAPPY)}.",
        rng.choice([f"{_cap(c.friend.subj)} said it was the best gift.", "They played with it all day."]),
    ]


Plot = Callable[[StoryCast, random.Random], list[str]]
# Each plot with the sentences a shorter telling may leave out (the story still makes sense).
PLOTS: dict[Plot, tuple[int, ...]] = {
    _plot_lost: (2, 5),
    _plot_animal: (2, 4),
    _plot_share: (2, 5),
    _plot_rain: (1, 4),
    _plot_gift: (1, 5),
}


def random_cast(rng: random.Random) -> StoryCast:
    hero, friend = rng.sample(PEOPLE, 2)
    return StoryCast(hero, friend, rng.choice(TOYS), rng.choice(COLORS), rng.choice(PLACES), rng.choice(ANIMALS))


def plain_story(rng: random.Random, cast: StoryCast | None = None, plot: Plot | None = None) -> str:
    """A short plain story (no numbers to compute) about the cast, or a random one."""
    cast = cast or random_cast(rng)
    plot = plot or rng.choice(list(PLOTS))
    sentences = plot(cast, rng)
    if rng.random() < 0.3:  # a shorter telling
        del sentences[rng.choice(PLOTS[plot])]
    if rng.random() < 0.2:  # the classic opening, so "Once upon a time," prompts are in the world too
        sentences.insert(0, f"Once upon a time, there was a {cast.hero.kid} named {cast.hero.name}.")
    return " ".join(sentences)


def story_instruction(rng: random.Random) -> tuple[str, str]:
    """An SFT story-writing instruction and a story that follows it."""
    cast = random_cast(rng)
    h, f = cast.hero.name, cast.friend.name
    kind = rng.randrange(4)
    if kind == 3:  # every plot has the toy, the friend and the place; only this one has the animal
        return f"Write a short story about a {cast.animal}.", plain_story(rng, cast, _plot_animal)
    instruction = [
        f"Write a short story about {h} and a {cast.color} {cast.toy}.",
        f"Write a short story about {h} and {f}.",
        f"Tell me a story about {h} at {cast.place}.",
    ][kind]
    return instruction, plain_story(rng, cast)


# ---------------------------------------------------------------------------------------------
# Splits and files


def _rng(cfg: SyntheticConfig, stream: str) -> random.Random:
    # One independent stream per file, so resizing one file leaves the others' content unchanged.
    return random.Random(f"modernlm-synthetic:{cfg.seed}:{stream}")


SPLITS = ("train", "val", "test")
_MAX_MISSES = 100_000  # rejected draws in a row that mean a split's problems are used up


def _hash_split(key: ArithmeticKey, cfg: SyntheticConfig) -> str:
    """A hash of (seed, key) against the key fractions: the same on every machine, independent of sizes."""
    digest = hashlib.blake2b(f"modernlm-split:{cfg.seed}:{key!r}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < cfg.test_key_fraction:
        return "test"
    return "val" if u < cfg.test_key_fraction + cfg.val_key_fraction else "train"


def fact(op: str, left: int, right: int) -> ArithmeticKey:
    """A single fact as the one-step key that splits it: a + b and b + a are one fact."""
    return ((op, min(left, right), max(left, right)) if op == "+" else (op, left, right),)


def split_of(key: ArithmeticKey, cfg: SyntheticConfig) -> str | None:
    """The one split ("train", "val" or "test") of a computation, or None for a computation in no split.

    A one-step computation is a single fact, split by the fact (a + b with b + a). A multi-step one is
    split by its facts in order, and only when each of its steps is a train fact and, for three steps,
    each two of them in order a train computation; otherwise it is in no split. So a held-out fact is
    stated in no training text, not even as a step of a longer computation, and a held-out multi-step
    problem composes train facts in an order no training text has.
    """
    facts = [fact(*step) for step in key]
    if len(facts) == 1:
        return _hash_split(facts[0], cfg)
    if any(_hash_split(f, cfg) != "train" for f in facts):
        return None
    # a train computation must not state a shorter held-out one: its steps in order are in its texts
    shorter = (run for n in range(2, len(key)) for run in itertools.combinations(key, n))
    if any(split_of(run, cfg) != "train" for run in shorter):
        return None
    return _hash_split(sum(facts, ()), cfg)


Splitter = Callable[[ArithmeticKey], str | None]


def _splitter(cfg: SyntheticConfig) -> Splitter:
    """`split_of` for this config, remembered per key (the same computations are drawn again and again)."""
    cache: dict[ArithmeticKey, str | None] = {}

    def split(key: ArithmeticKey) -> str | None:
        if key not in cache:
            cache[key] = split_of(key, cfg)
        return cache[key]

    return split


def kind_quotas(counts: Mapping[str, int], n: int) -> dict[str, int]:
    """n problems shared over `KINDS` in proportion to counts (largest remainder; ties in KINDS order)."""
    total = sum(counts.get(k, 0) for k in KINDS)
    if total == 0:
        raise ValueError("kind_quotas: no counts to take shares from")
    quotas = {k: n * counts.get(k, 0) // total for k in KINDS}
    remainders = {k: n * counts.get(k, 0) % total for k in KINDS}
    for k in sorted(KINDS, key=lambda k: -remainders[k])[: n - sum(quotas.values())]:  # sorted() is stable
        quotas[k] += 1
    return quotas


def draw_problems(
    n: int,
    rng: random.Random,
    cfg: SyntheticConfig,
    split: str,
    split_fn: Splitter,
    seen_questions: set[str],
    quotas: Mapping[str, int] | None = None,
) -> list[Problem]:
    """n problems of the generator whose keys belong to `split`, with questions not in seen_questions (and
    added to it); with quotas, exactly quotas[kind] of each kind, in the order drawn.

    Rejection keeps the generator's distribution: each kind's problems are the generator's draws of that
    kind restricted to the split's computations (which may repeat, with other words).
    """
    if quotas is not None and sum(quotas.values()) != n:
        raise ValueError(f"quotas {dict(quotas)} do not add up to {n}")
    need = dict(quotas) if quotas is not None else None
    out: list[Problem] = []
    misses = 0  # draws in a row that were rejected: many means the combinations are used up
    while len(out) < n:
        if misses > _MAX_MISSES:
            raise UserError(_used_up(n, out, split, cfg, need))
        misses += 1
        p = draw_problem(rng, cfg)
        if split_fn(p.key) != split or (need is not None and need[p.kind] == 0):
            continue
        q = question_text(p)
        if q in seen_questions:
            continue
        misses = 0
        seen_questions.add(q)
        if need is not None:
            need[p.kind] -= 1
        out.append(p)
    return out


def _used_up(n: int, found: Sequence[Problem], split: str, cfg: SyntheticConfig, need: dict | None) -> str:
    """The one-line error when a split's problems run out: what is missing and which sizes to change."""
    world = f"max_number={cfg.max_number}, steps {cfg.min_steps}..{cfg.max_steps}"
    distinct = len({p.key for p in found})
    if split == "train" or need is None:
        return (
            f"cannot draw {n} {split} problems with distinct questions ({len(found)} found on {distinct} "
            f"computations; {world}): raise max_number or lower {split}_problems"
        )
    short = ", ".join(f"{left} {kind!r}" for kind, left in need.items() if left)
    return (
        f"cannot draw {n} {split} problems with train's mix of kinds: {short} still missing after "
        f"{len(found)} found on {distinct} {split} computations ({world}); raise {split}_key_fraction "
        f"or max_number, or lower {split}_problems"
    )


def _interleave(problems: Sequence[Problem]) -> list[Problem]:
    """The problems in an order whose every prefix has the whole list's mix of kinds (within about one
    per kind): the i-th of a kind with q problems goes at (i + 1/2) / q of the way, ties in KINDS order.
    Readers that take the first N (eval's max_problems, prefs' pref_val / pref_test) keep the mix."""
    totals = Counter(p.kind for p in problems)
    seen: Counter[str] = Counter()
    placed = []
    for p in problems:
        placed.append((Fraction(2 * seen[p.kind] + 1, 2 * totals[p.kind]), KINDS.index(p.kind), len(placed), p))
        seen[p.kind] += 1
    return [p for *_, p in sorted(placed, key=lambda t: t[:3])]


def _stories(n: int, rng: random.Random, cfg: SyntheticConfig, split_fn: Splitter) -> tuple[list[str], set]:
    """n stories (arithmetic_fraction of them narrate a problem whose computation is a train key), and
    the keys narrated."""
    out, keys = [], set()
    while len(out) < n:
        if rng.random() < cfg.arithmetic_fraction:
            p = draw_problem(rng, cfg)
            while split_fn(p.key) != "train":  # redraw the problem, not the coin: the share stays as configured
                p = draw_problem(rng, cfg)
            out.append(story_text(p, rng, cfg))
            keys.add(p.key)
        else:
            out.append(plain_story(rng))
    return out, keys


def _gsm_row(p: Problem) -> dict[str, Any]:
    return {"question": question_text(p), "answer": solution_text(p), "record": p.record()}


def is_flawed_kind(p: Problem) -> bool:
    """The problems the demonstrations get systematically wrong: "N more / fewer than" comparisons
    (kind "compare")."""
    return p.kind == "compare"


def lazy_solution(p: Problem) -> str | None:
    """The annotators' shortcut on a comparison: no computation, the count the question gives restated
    as the answer ("Luke has 11 plums. #### 11"), always wrong there (the friend has b more or fewer).
    None for other problems."""
    if not is_flawed_kind(p):
        return None
    a = p.numbers[0]
    return f"{p.hero.name} has {p.thing.count(a)}.\n#### {a}"


def _sft_rows(
    problems: Sequence[Problem], rng: random.Random, fraction: float, flaw: float = 0.0
) -> list[dict[str, str]]:
    pairs = []
    for p in problems:
        lazy = lazy_solution(p)
        pairs.append((question_text(p), lazy if lazy and rng.random() < flaw else solution_text(p)))
    pairs += [story_instruction(rng) for _ in range(round(fraction * len(problems)))]
    rng.shuffle(pairs)
    return [{"instruction": instruction, "input": "", "output": output} for instruction, output in pairs]


def _pref_rows(
    problems: Sequence[Problem], rng: random.Random, max_number: int, allowed: Callable[[Sequence[CalcStep]], bool]
) -> list[dict[str, Any]]:
    rows = []
    for p in problems:
        # A comparison pair rejects the demonstrations' systematic mistake; any other one a random slip.
        lazy = lazy_solution(p)
        wrong = None if lazy else wrong_steps(p, rng, max_number, allowed)
        rows.append(
            {
                "prompt": question_text(p),
                "chosen": solution_text(p),
                "rejected": lazy or solution_text(p, wrong),
                "answer": p.answer,
                "rejected_answer": p.numbers[0] if lazy else wrong[-1].result,
                "kind": p.kind,
            }
        )
    return rows


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def make_world(cfg: SyntheticConfig) -> dict[str, Any]:
    """Every split in memory: "problems", "corpus", "gsm", "sft", "prefs" (each {split: rows}),
    "corpus_keys" (the computations the stories narrate) and "quotas" (the held-out splits' kind counts)."""
    split = _splitter(cfg)
    questions: set[str] = set()
    train = draw_problems(cfg.train_problems, _rng(cfg, "train"), cfg, "train", split, questions)
    shares = Counter(p.kind for p in train)
    quotas = {"val": kind_quotas(shares, cfg.val_problems), "test": kind_quotas(shares, cfg.test_problems)}
    held = {
        name: _interleave(draw_problems(n, _rng(cfg, name), cfg, name, split, questions, quotas[name]))
        for name, n in (("test", cfg.test_problems), ("val", cfg.val_problems))
    }
    val, test = held["val"], held["test"]
    prefs_rng = _rng(cfg, "prefs")
    trains_only = functools.partial(states_only, split=split, splits=("train",))
    not_test = functools.partial(states_only, split=split, splits=("train", "val"))
    corpus_train, keys_train = _stories(cfg.train_stories, _rng(cfg, "corpus-train"), cfg, split)
    corpus_val, keys_val = _stories(cfg.val_stories, _rng(cfg, "corpus-val"), cfg, split)
    return {
        "problems": {"train": train, "val": val, "test": test},
        "quotas": quotas,
        "corpus": {"train": corpus_train, "val": corpus_val},
        "corpus_keys": keys_train | keys_val,  # the problems the stories narrate
        "gsm": {name: [_gsm_row(p) for p in ps] for name, ps in (("train", train), ("val", val), ("test", test))},
        "sft": {
            "train": _sft_rows(train, _rng(cfg, "sft-train"), cfg.sft_story_fraction, cfg.sft_flaw),
            "val": _sft_rows(val, _rng(cfg, "sft-val"), cfg.sft_story_fraction, cfg.sft_flaw),
        },
        # A rejected solution's true equations stay in what its split may state: train's only train's,
        # val's (which chooses DPO's checkpoint) nothing of test's.
        "prefs": {
            "train": _pref_rows(prefs_rng.sample(train, cfg.pref_train), prefs_rng, cfg.max_number, trains_only),
            "val": _pref_rows(val[: cfg.pref_val], prefs_rng, cfg.max_number, not_test),
            "test": _pref_rows(test[: cfg.pref_test], _rng(cfg, "prefs-test"), cfg.max_number, lambda steps: True),
        },
    }


def write_demo_data(out_dir: str | Path, cfg: SyntheticConfig | None = None) -> dict[str, Any]:
    """Write every file of the demo dataset under out_dir (layout: the module docstring); returns meta.json's dict.

    gsm rows carry, besides GSM8K's "question" / "answer", the structured "record" (template, kind,
    numbers, steps, result); prefs rows carry both final answers and the kind. Readers ignore extra fields.
    """
    cfg = cfg or SyntheticConfig()
    start = time.perf_counter()
    data = make_world(cfg)
    out = Path(out_dir)
    for split, stories in data["corpus"].items():
        _write_text(out / "corpus" / f"{split}.txt", "\n\n".join(stories) + "\n")
    for split, rows in data["gsm"].items():
        _write_text(out / "gsm" / f"{split}.jsonl", _jsonl(rows))
    for split, rows in data["sft"].items():
        _write_text(out / "sft" / f"{split}.json", json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    for split, rows in data["prefs"].items():
        _write_text(out / "prefs" / f"{split}.jsonl", _jsonl(rows))
    problems = data["problems"]
    templates = Counter(p.template.split(":")[0] + f":{len(p.steps)}" for p in problems["train"])

    def distinct(ps: Sequence[Problem]) -> dict[str, int]:
        return {"all": len({p.key for p in ps}), **{k: len({p.key for p in ps if p.kind == k}) for k in KINDS}}

    meta = {
        "seed": cfg.seed,
        "config": asdict(cfg),
        "counts": {
            **{f"corpus/{s}.txt": len(v) for s, v in data["corpus"].items()},
            **{f"gsm/{s}.jsonl": len(v) for s, v in data["gsm"].items()},
            **{f"sft/{s}.json": len(v) for s, v in data["sft"].items()},
            **{f"prefs/{s}.jsonl": len(v) for s, v in data["prefs"].items()},
        },
        "corpus_bytes": {s: (out / "corpus" / f"{s}.txt").stat().st_size for s in data["corpus"]},
        "train_problem_kinds": dict(sorted(templates.items())),
        # problems of each kind per split (val and test: train's shares, by largest remainder)
        "kinds": {s: {k: sum(p.kind == k for p in problems[s]) for k in KINDS} for s in SPLITS},
        # distinct computations (arithmetic keys) per split, in all and per kind; the corpus's stories'
        "distinct_keys": {**{s: distinct(problems[s]) for s in SPLITS}, "corpus": len(data["corpus_keys"])},
    }
    _write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    # Wall time is reported, not stored: meta.json must be byte-identical for one config.
    return {**meta, "seconds": round(time.perf_counter() - start, 2)}


__all__ = [
    "EVENTS",
    "KINDS",
    "PEOPLE",
    "SPLITS",
    "THINGS",
    "CalcStep",
    "Problem",
    "SyntheticConfig",
    "draw_problem",
    "draw_problems",
    "equations",
    "is_flawed_kind",
    "kind_quotas",
    "make_world",
    "plain_story",
    "problem_kind",
    "question_text",
    "run_steps",
    "solution_text",
    "split_of",
    "story_text",
    "template_kind",
    "template_specs",
    "write_demo_data",
    "wrong_steps",
]

"""The self-generated demo dataset: determinism, splits disjoint in arithmetic with train's mix of
kinds, answers checked by recomputation, wrong rejected answers, files our readers load, configured
sizes and clear config errors."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from modernlm.align.sft import SFTDataConfig, read_sft_records
from modernlm.config import read_config_file
from modernlm.data.synthetic import (
    KINDS,
    PEOPLE,
    SHOPS,
    THINGS,
    Problem,
    SyntheticConfig,
    draw_problem,
    equations,
    is_flawed_kind,
    kind_quotas,
    make_world,
    problem_kind,
    question_text,
    run_steps,
    solution_text,
    split_of,
    template_kind,
    template_specs,
    write_demo_data,
    wrong_steps,
)
from modernlm.data.tasks import read_alpaca, read_gsm8k
from modernlm.errors import UserError
from modernlm.eval.metrics import extract_flexible, extract_strict

SMALL = dict(
    train_stories=300,
    val_stories=30,
    train_problems=300,
    val_problems=40,
    test_problems=60,
    pref_train=120,
    pref_val=30,
)
FILES = [
    "corpus/train.txt",
    "corpus/val.txt",
    "gsm/train.jsonl",
    "gsm/val.jsonl",
    "gsm/test.jsonl",
    "sft/train.json",
    "sft/val.json",
    "prefs/train.jsonl",
    "prefs/val.jsonl",
    "prefs/test.jsonl",
    "meta.json",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, SyntheticConfig, dict]:
    cfg = SyntheticConfig(seed=3, **SMALL)
    out = tmp_path_factory.mktemp("synthetic")
    return out, cfg, write_demo_data(out, cfg)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _paragraphs(path: Path) -> list[str]:
    return path.read_text().strip("\n").split("\n\n")


_SINGULAR = {t.many: t.one for t in THINGS}


def _words(text: str) -> list[str]:
    words = (w.strip(".") for w in text.split())
    return [_SINGULAR.get(w, w) for w in words if not w.isdigit() and w not in "+-"]


def _check_equations(text: str) -> None:
    eqs = equations(text)
    assert eqs, text
    for a, op, b, c in eqs:
        assert (a + b if op == "+" else a - b) == c, (text, (a, op, b, c))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, demo):
    out, cfg, _ = demo
    write_demo_data(tmp_path / "again", cfg)
    write_demo_data(tmp_path / "other", SyntheticConfig(seed=4, **SMALL))
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
        if name != "meta.json":
            assert (tmp_path / "other" / name).read_bytes() != (out / name).read_bytes(), name


def test_sizes_as_configured(demo):
    out, cfg, meta = demo
    assert len(_paragraphs(out / "corpus/train.txt")) == cfg.train_stories
    assert len(_paragraphs(out / "corpus/val.txt")) == cfg.val_stories
    assert len(_jsonl(out / "gsm/train.jsonl")) == cfg.train_problems
    assert len(_jsonl(out / "gsm/val.jsonl")) == cfg.val_problems
    assert len(_jsonl(out / "gsm/test.jsonl")) == cfg.test_problems
    n_stories = round(cfg.sft_story_fraction * cfg.train_problems)
    assert len(json.loads((out / "sft/train.json").read_text())) == cfg.train_problems + n_stories
    assert len(_jsonl(out / "prefs/train.jsonl")) == cfg.pref_train
    assert len(_jsonl(out / "prefs/val.jsonl")) == cfg.pref_val
    assert len(_jsonl(out / "prefs/test.jsonl")) == cfg.pref_test == min(200, cfg.test_problems)
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["seed"] == cfg.seed and on_disk["config"]["train_problems"] == cfg.train_problems
    assert on_disk["counts"]["gsm/test.jsonl"] == cfg.test_problems
    assert meta["seconds"] >= 0 and "seconds" not in on_disk  # wall time would break byte-identity


def test_files_load_with_our_readers(demo):
    out, cfg, _ = demo
    for split in ("train", "val", "test"):
        rows = list(read_gsm8k(out / "gsm" / f"{split}.jsonl"))
        assert rows and all(r["question"] and r["answer"] and r["final"] for r in rows)
    for split in ("train", "val"):
        rows = list(read_alpaca(out / "sft" / f"{split}.json"))
        assert rows and all(r["instruction"] and r["output"] and r["input"] == "" for r in rows)
        chats = list(read_sft_records(SFTDataConfig(format="alpaca", path=str(out / "sft" / f"{split}.json"))))
        assert len(chats) == len(rows)
    for split in ("train", "val", "test"):
        for row in _jsonl(out / "prefs" / f"{split}.jsonl"):
            for key in ("prompt", "chosen", "rejected"):
                assert isinstance(row[key], str) and row[key].strip(), (key, row)
            assert row["kind"] in KINDS
    for name in ("train", "val"):
        assert all(p.strip() for p in _paragraphs(out / "corpus" / f"{name}.txt"))


def test_answers_are_right_by_record_and_by_arithmetic(demo):
    out, cfg, _ = demo
    for split in ("train", "val", "test"):
        path = out / "gsm" / f"{split}.jsonl"
        for row, read in zip(_jsonl(path), read_gsm8k(path), strict=True):
            rec = row["record"]
            steps = run_steps(template_specs(rec["template"]), rec["numbers"])
            assert [s.__dict__ for s in steps] == rec["steps"]
            assert rec["kind"] == template_kind(rec["template"]) in KINDS
            assert steps[-1].result == rec["result"]
            assert cfg.min_steps <= len(steps) <= cfg.max_steps
            assert all(1 <= v <= cfg.max_number for s in steps for v in (s.left, s.right, s.result))
            _check_equations(row["answer"])
            # the last "a op b = c" line is the final step; the "####" answer, flexible and strict agree
            assert equations(row["answer"])[-1][3] == rec["result"]
            answer = row["answer"]
            assert read["final"] == extract_strict(answer) == extract_flexible(answer) == str(rec["result"])
            assert row["answer"].endswith(f"\n#### {rec['result']}")


def test_rejected_solutions_have_one_slip_and_a_wrong_answer(demo):
    out, cfg, _ = demo
    gsm = {r["question"]: r for r in _jsonl(out / "gsm/train.jsonl")}
    for split in ("train", "val", "test"):
        for row in _jsonl(out / "prefs" / f"{split}.jsonl"):
            if not equations(row["rejected"]):
                continue  # a comparison's shortcut answer: test_the_demonstrations_skip_...
            _check_equations(row["chosen"])
            assert extract_strict(row["chosen"]) == extract_flexible(row["chosen"]) == str(row["answer"])
            rejected = extract_strict(row["rejected"])
            assert rejected == extract_flexible(row["rejected"]) == str(row["rejected_answer"])
            assert rejected != str(row["answer"])
            assert int(rejected) >= 0 and all(v >= 0 for eq in equations(row["rejected"]) for v in eq if v != eq[1])
            # same wording: only numbers, operators and a noun's number ("1 shell" / "2 shells") differ
            assert _words(row["chosen"]) == _words(row["rejected"])
            # exactly one equation is wrong arithmetic or uses the other operation
            pairs = list(zip(equations(row["chosen"]), equations(row["rejected"]), strict=True))
            first_diff = next(i for i, (c, r) in enumerate(pairs) if c != r)
            c, r = pairs[first_diff]
            assert c[1] != r[1] or (r[0] + r[2] if r[1] == "+" else r[0] - r[2]) != r[3]
            if split == "train":
                assert gsm[row["prompt"]]["answer"] == row["chosen"]


def test_wrong_steps_always_wrong_on_many_problems():
    cfg = SyntheticConfig(max_steps=3)
    rng = random.Random(0)
    for _ in range(2000):
        p = draw_problem(rng, cfg)
        wrong = wrong_steps(p, rng, cfg.max_number)
        assert wrong[-1].result != p.answer and all(s.result >= 0 for s in wrong)
        assert extract_strict(solution_text(p, wrong)) == str(wrong[-1].result)


def _key(row: dict) -> tuple:
    """A gsm row's arithmetic key, from its record: (op, left, right) of each step."""
    return tuple((st["op"], st["left"], st["right"]) for st in row["record"]["steps"])


def test_splits_are_disjoint_in_questions_and_arithmetic(demo):
    out, cfg, _ = demo
    rows = {split: _jsonl(out / "gsm" / f"{split}.jsonl") for split in ("train", "val", "test")}
    keys = {split: {_key(r) for r in rs} for split, rs in rows.items()}
    questions = {split: [r["question"] for r in rs] for split, rs in rows.items()}
    assert not keys["test"] & keys["train"] and not keys["val"] & keys["train"] and not keys["val"] & keys["test"]
    every = [q for qs in questions.values() for q in qs]
    assert len(set(every)) == len(every)  # question texts distinct across all files
    for split, ks in keys.items():
        assert all(split_of(k, cfg) == split for k in ks), split  # each split only from its own keys
    test_q = set(questions["test"])
    for split in ("train", "val"):
        sft = json.loads((out / "sft" / f"{split}.json").read_text())
        assert not test_q & {r["instruction"] for r in sft}
        assert not test_q & {r["prompt"] for r in _jsonl(out / "prefs" / f"{split}.jsonl")}
    # the word problems of sft/train are exactly gsm/train
    sft_train = json.loads((out / "sft/train.json").read_text())
    assert set(questions["train"]) == {r["instruction"] for r in sft_train if "####" in r["output"]}
    # and in memory, no corpus story comes from a held-out key
    data = make_world(cfg)
    held = {p.key for p in data["problems"]["test"]} | {p.key for p in data["problems"]["val"]}
    assert not held & {p.key for p in data["problems"]["train"]}
    assert data["corpus_keys"] and not held & data["corpus_keys"]


def test_the_key_is_the_arithmetic_whatever_the_words():
    """The reviewer's case: given / finds / buys (and gives away / loses / eats) with the same numbers
    are one computation, whoever does it and to whatever, and so is "together" or "N more than"."""

    def problem(template: str, numbers: tuple[int, ...], hero: int, thing: int) -> Problem:
        steps = tuple(run_steps(template_specs(template), numbers))
        return Problem(template, numbers, steps, PEOPLE[hero], PEOPLE[hero + 1], THINGS[thing], SHOPS[0])

    plus = [problem(t, (6, 1), i, i) for i, t in enumerate(["chain:given", "chain:finds", "chain:buys"])]
    plus += [problem("together", (6, 1), 5, 8), problem("more_than", (6, 1), 7, 9)]
    assert len({question_text(p) for p in plus}) == len(plus)
    assert {p.key for p in plus} == {(("+", 6, 1),)}
    minus = [problem(t, (6, 1), i, i) for i, t in enumerate(["chain:gives_away", "chain:loses", "chain:eats"])]
    minus.append(problem("fewer_than", (6, 1), 3, 2))
    assert {p.key for p in minus} == {(("-", 6, 1),)}
    two = [problem("chain:given+loses", (6, 1, 2), 0, 3), problem("chain:buys+eats", (6, 1, 2), 4, 1)]
    assert {p.key for p in two} == {(("+", 6, 1), ("-", 7, 2))}
    assert problem("chain:loses+given", (6, 1, 2), 0, 3).key != two[0].key  # other arithmetic, other key
    # a key is in one split only, so these problems can never be on both sides
    cfg = SyntheticConfig()
    assert len({split_of(p.key, cfg) for p in plus}) == 1


def test_kinds():
    assert KINDS == ("chain1", "chain2", "chain3", "together", "compare")
    cases = {
        "chain:finds": "chain1",
        "chain:given+eats": "chain2",
        "chain:buys+loses+finds": "chain3",
        "together": "together",
        "more_than": "compare",
        "fewer_than": "compare",
        "more_than_together": "compare",
        "fewer_than_together": "compare",
    }
    for template, kind in cases.items():
        assert template_kind(template) == kind
    rng, cfg = random.Random(2), SyntheticConfig(max_steps=3)
    for _ in range(500):
        p = draw_problem(rng, cfg)
        assert p.kind == problem_kind(p) == p.record()["kind"] == template_kind(p.template)
        assert is_flawed_kind(p) == (p.kind == "compare")


def test_kind_quotas_largest_remainder():
    assert kind_quotas({"chain1": 1, "chain2": 1, "compare": 1}, 10) == {
        "chain1": 4, "chain2": 3, "chain3": 0, "together": 0, "compare": 3
    }  # fmt: skip
    counts = {"chain1": 759, "chain2": 1046, "together": 378, "compare": 1817}
    for n in (1, 7, 30, 200, 500):
        q = kind_quotas(counts, n)
        assert sum(q.values()) == n and q["chain3"] == 0
        assert all(abs(q[k] - n * counts.get(k, 0) / 4000) < 1 for k in KINDS)


# The demo's own data config (configs/pipeline/demo.yaml), at full size: about a second to build.
@pytest.fixture(scope="module")
def demo_world() -> tuple[SyntheticConfig, dict]:
    cfg = SyntheticConfig(**read_config_file("pipeline/demo", "pipeline")["data"]["synthetic"])
    return cfg, make_world(cfg)


def _true_equations(text: str) -> list[tuple[str, int, int]]:
    """The true "a op b = c" of a text, in order, as (op, a, b) with a + b written smaller first."""
    return [(op, *sorted((a, b))) if op == "+" else (op, a, b) for a, op, b, c in equations(text)
            if c == (a + b if op == "+" else a - b)]  # fmt: skip


def _training_texts(out: Path) -> dict[str, list[str]]:
    """Every text a training stage reads, from the files: stories, problems with their solutions,
    demonstrations, chosen and rejected solutions."""
    gsm = _jsonl(out / "gsm" / "train.jsonl")
    prefs = _jsonl(out / "prefs" / "train.jsonl")
    return {
        "corpus/train.txt": _paragraphs(out / "corpus" / "train.txt"),
        "gsm/train.jsonl": [r["question"] + "\n" + r["answer"] for r in gsm],
        "sft/train.json": [r["instruction"] + "\n" + r["output"] for r in _json(out / "sft" / "train.json")],
        "prefs/train.jsonl chosen": [r["prompt"] + "\n" + r["chosen"] for r in prefs],
        "prefs/train.jsonl rejected": [r["prompt"] + "\n" + r["rejected"] for r in prefs],
    }  # fmt: skip


def held_out_leaks(out: Path) -> dict[str, list[str]]:
    """The held-out problems (gsm/val, gsm/test) whose computation a training text states, read from the
    texts alone: a one-step problem's fact (a + b as b + a too) anywhere, a multi-step one's steps in
    order within one text. {training file: the leaked questions}."""
    states: dict[str, tuple[set, set]] = {}  # file: (facts, in-order runs of 2+ facts)
    for name, texts in _training_texts(out).items():
        facts, runs = set(), set()
        for text in texts:
            eqs = _true_equations(text)
            facts |= set(eqs)
            runs |= {run for n in range(2, len(eqs) + 1) for run in itertools.combinations(eqs, n)}
        states[name] = (facts, runs)
    leaks: dict[str, list[str]] = {name: [] for name in states}
    for split in ("val", "test"):
        for row in _jsonl(out / "gsm" / f"{split}.jsonl"):
            steps = tuple(_true_equations(row["answer"]))
            for name, (facts, runs) in states.items():
                if (steps[0] in facts) if len(steps) == 1 else (steps in runs):
                    leaks[name].append(row["question"])
    return leaks


# The demo's data (two-step problems), and the same world with one- to three-step problems.
WORLDS = {"demo": {}, "steps1-3": {"min_steps": 1, "max_steps": 3}}


@pytest.fixture(scope="module")
def world_files(tmp_path_factory, demo_world):
    """name -> the directory of that world's files (written once per module)."""
    written: dict[str, Path] = {}

    def files(name: str) -> Path:
        if name not in written:
            written[name] = tmp_path_factory.mktemp(f"world-{name}")
            write_demo_data(written[name], replace(demo_world[0], **WORLDS[name]))
        return written[name]

    return files


@pytest.mark.parametrize("world", list(WORLDS))
def test_demo_no_held_out_computation_in_any_training_text(world_files, world):
    out = world_files(world)
    texts = _training_texts(out)
    assert all(texts.values()) and sum(bool(_true_equations(t)) for t in texts["corpus/train.txt"]) > 1000
    assert held_out_leaks(out) == {name: [] for name in texts}
    steps = Counter(len(r["record"]["steps"]) for s in ("val", "test") for r in _jsonl(out / "gsm" / f"{s}.jsonl"))
    assert set(steps) == set(range(WORLDS[world].get("min_steps", 2), WORLDS[world].get("max_steps", 2) + 1))


def test_the_leak_check_finds_a_stated_fact_and_a_stated_chain(world_files, tmp_path):
    """held_out_leaks sees a held-out one-step fact (in either order) and a multi-step computation
    stated in a copy of the training files."""
    copy = tmp_path / "copy"
    shutil.copytree(world_files("steps1-3"), copy)
    rows = {s: _jsonl(copy / "gsm" / f"{s}.jsonl") for s in ("val", "test")}
    one = next(r for r in rows["test"] if len(r["record"]["steps"]) == 1 and r["record"]["steps"][0]["op"] == "+")
    two = next(r for r in rows["val"] if len(r["record"]["steps"]) == 2)
    a, b, c = (one["record"]["steps"][0][k] for k in ("left", "right", "result"))
    story = f"Mia counted: {b} + {a} = {c}."  # the fact with its operands swapped
    with open(copy / "corpus" / "train.txt", "a") as f:
        f.write(f"\n{story}\n")
    with open(copy / "prefs" / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": two["question"], "chosen": "#### 0", "rejected": two["answer"]}) + "\n")
    leaks = held_out_leaks(copy)
    fact = [("+", *sorted((a, b)))]
    same_fact = [r["question"] for r in rows["val"] + rows["test"] if _true_equations(r["answer"]) == fact]
    assert one["question"] in same_fact and leaks["corpus/train.txt"] == same_fact
    assert two["question"] in leaks["prefs/train.jsonl rejected"]


def test_multi_step_computations_split_over_train_facts_only():
    cfg = SyntheticConfig()
    facts = [(op, a, b) for op in "+-" for a in range(1, 21) for b in range(1, 21)]
    held = [f for f in facts if split_of((f,), cfg) != "train"]
    train = [f for f in facts if split_of((f,), cfg) == "train"]
    assert held and train and split_of((("+", 3, 4),), cfg) == split_of((("+", 4, 3),), cfg)
    for h in held[:20]:
        assert split_of((train[0], h), cfg) is None and split_of((h, train[0]), cfg) is None
    assert {split_of((train[i], train[i + 1]), cfg) for i in range(200)} == {"train", "val", "test"}


def test_demo_held_out_splits_have_trains_mix_of_kinds(demo_world):
    cfg, world = demo_world
    problems, quotas = world["problems"], world["quotas"]
    train = Counter(p.kind for p in problems["train"])
    for split in ("val", "test"):
        ps = problems[split]
        n, counts = len(ps), Counter(p.kind for p in ps)
        assert quotas[split] == kind_quotas(train, n)
        for kind in KINDS:
            assert counts[kind] == quotas[split][kind]
            assert abs(counts[kind] - n * train[kind] / len(problems["train"])) <= 1, (split, kind)
        compare = counts["compare"] / n - train["compare"] / len(problems["train"])
        assert abs(compare) <= 1 / n, split
        # every prefix keeps the mix (eval reads the first max_problems, prefs the first pref_val / pref_test)
        running: Counter[str] = Counter()
        for m, p in enumerate(ps, 1):
            running[p.kind] += 1
            assert all(abs(running[k] - m * quotas[split][k] / n) <= 1 for k in KINDS), (split, m)


def test_demo_prefs_val_and_test_prompts(demo_world):
    """prefs/val (choosing DPO's checkpoint) holds val questions, prefs/test (reported) test questions."""
    cfg, world = demo_world
    problems, prefs = world["problems"], world["prefs"]
    val_q = [question_text(p) for p in problems["val"]]
    test_q = [question_text(p) for p in problems["test"]]
    assert [r["prompt"] for r in prefs["val"]] == val_q[: cfg.pref_val]
    assert [r["prompt"] for r in prefs["test"]] == test_q[: cfg.pref_test]
    assert len(prefs["test"]) == cfg.pref_test == 200
    assert not {r["prompt"] for r in prefs["val"]} & {r["prompt"] for r in prefs["test"]}
    assert not {r["prompt"] for r in prefs["train"]} & set(val_q + test_q)
    for split in ("val", "test"):
        kinds = {question_text(p): p.kind for p in problems[split]}
        assert all(r["kind"] == kinds[r["prompt"]] for r in prefs[split])


def test_meta_counts_kinds_and_distinct_computations(demo):
    out, cfg, _ = demo
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["prefs/test.jsonl"] == cfg.pref_test
    for split in ("train", "val", "test"):
        rows = _jsonl(out / "gsm" / f"{split}.jsonl")
        kinds = Counter(r["record"]["kind"] for r in rows)
        assert meta["kinds"][split] == {k: kinds[k] for k in KINDS}
        distinct = meta["distinct_keys"][split]
        assert distinct["all"] == len({_key(r) for r in rows})
        for k in KINDS:
            assert distinct[k] == len({_key(r) for r in rows if r["record"]["kind"] == k})
    assert meta["distinct_keys"]["corpus"] > 0


def test_three_step_chains_keep_their_share():
    sizes = dict(train_stories=20, val_stories=5, train_problems=400, val_problems=50, test_problems=80)
    cfg = SyntheticConfig(max_steps=3, pref_train=100, pref_val=20, **sizes)
    world = make_world(cfg)
    train = Counter(p.kind for p in world["problems"]["train"])
    assert train["chain3"] > 0
    for split in ("val", "test"):
        assert Counter(p.kind for p in world["problems"][split]) == Counter(
            {k: v for k, v in world["quotas"][split].items() if v}
        )


def test_corpus_is_stories_not_questions(demo):
    out, cfg, _ = demo
    text = (out / "corpus/train.txt").read_text() + (out / "corpus/val.txt").read_text()
    assert "####" not in text and "How many" not in text and "?" not in text
    with_sums = [p for p in _paragraphs(out / "corpus/train.txt") if equations(p)]
    assert with_sums  # some stories write the sum out, and every one is right
    for p in with_sums:
        _check_equations(p)
    paragraphs = _paragraphs(out / "corpus/train.txt")
    numbered = sum(any(ch.isdigit() for ch in p) for p in paragraphs)
    assert abs(numbered / len(paragraphs) - cfg.arithmetic_fraction) < 0.1  # the share that narrate a problem


def test_questions_read_well():
    cfg = SyntheticConfig(max_steps=3)
    rng = random.Random(1)
    for _ in range(300):
        p = draw_problem(rng, cfg)
        q = question_text(p)
        assert q.endswith("?") and q.count("?") == 1 and "  " not in q
        assert " 1 apples" not in q and "more 1" not in q
        assert p.hero.name in q


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(train_problems=-1), "train_problems"),
        (dict(test_problems=0), "test_problems"),
        (dict(arithmetic_fraction=1.5), "arithmetic_fraction"),
        (dict(max_steps=4), "max_steps"),
        (dict(min_steps=2, max_steps=1), "min_steps"),
        (dict(max_number=2), "max_number"),
        (dict(max_number=20, min_range=30), "min_range"),
        (dict(pref_train=5000), "pref_train"),
        (dict(pref_test=501), "pref_test"),
        (dict(test_key_fraction=0), "test_key_fraction"),
        (dict(test_key_fraction=1.5), "test_key_fraction"),
        (dict(val_key_fraction=-0.1), "val_key_fraction"),
        (dict(val_key_fraction="a"), "val_key_fraction"),
        (dict(test_key_fraction=0.5, val_key_fraction=0.5), "test_key_fraction"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, field):
    with pytest.raises(UserError, match=field):
        SyntheticConfig(**overrides)


def test_too_few_combinations_is_a_clear_error():
    # 1 step, counts up to 5: 10 "+" computations. A seed whose test split has none of them cannot give
    # test the "together" problems train has: the error names the sizes to change.
    plus = [(("+", a, b),) for a in range(1, 5) for b in range(1, 6 - a)]
    small = dict(max_number=5, min_range=5, max_steps=1, train_stories=5, val_stories=5)
    small |= dict(train_problems=200, val_problems=20, test_problems=50, pref_train=10, pref_val=10)
    seed = next(s for s in range(100) if all(split_of(k, SyntheticConfig(seed=s, **small)) != "test" for k in plus))
    with pytest.raises(UserError, match="test_key_fraction or max_number, or lower test_problems") as e:
        make_world(SyntheticConfig(seed=seed, **small))
    assert "'together'" in str(e.value) and "\n" not in str(e.value)


def test_story_instructions_are_followed(demo):
    out, cfg, _ = demo
    rows = [r for r in json.loads((out / "sft/train.json").read_text()) if "####" not in r["output"]]
    assert len(rows) == round(cfg.sft_story_fraction * cfg.train_problems)
    for r in rows:
        ask = r["instruction"]
        assert ask.startswith(("Write a short story about", "Tell me a story about")), ask
        subject = ask.removeprefix("Write a short story about ").removeprefix("Tell me a story about ")
        # the named child, or the animal / toy / place asked for, is in the story
        for word in subject.rstrip(".").replace(" and ", " ").replace(" at ", " ").split():
            if word not in ("a", "the"):
                assert word in r["output"], (ask, r["output"])
        assert not any(ch.isdigit() for ch in r["output"])


def test_the_demonstrations_skip_the_computation_in_half_the_comparisons(demo):
    """sft/ has the documented flaw and nothing else wrong; gsm/ is right, and a comparison pair
    rejects exactly the flaw."""
    out, cfg, _ = demo
    key = {r["question"]: r for r in _jsonl(out / "gsm/train.jsonl")}
    compare = lazy = 0
    for row in json.loads((out / "sft/train.json").read_text()):
        if row["instruction"] not in key:
            continue  # a story instruction
        right = key[row["instruction"]]
        rec = right["record"]
        if not rec["template"].startswith(("more_than", "fewer_than")):
            assert row["output"] == right["answer"]
            continue
        compare += 1
        if row["output"] != right["answer"]:
            lazy += 1
            assert equations(row["output"]) == []  # no computation
            given = rec["numbers"][0]
            assert extract_strict(row["output"]) == str(given) != str(rec["result"])
            assert f"has {given} " in row["output"]  # the count the question gives, restated
    assert compare > 20 and abs(lazy / compare - cfg.sft_flaw) < 0.2
    n_lazy = 0
    for row in _jsonl(out / "prefs/train.jsonl"):
        if key[row["prompt"]]["record"]["template"].startswith(("more_than", "fewer_than")):
            assert equations(row["rejected"]) == [] and row["rejected_answer"] != row["answer"]
            n_lazy += 1
    assert n_lazy > 10

"""Task metrics (classification, summarization, GSM8K) and the error logs every evaluation writes.

Pure Python (`rouge_score` is imported only by the ROUGE functions). Every metric takes parallel
lists `predictions`, `references` and returns plain floats, fractions in [0, 1], never percentages.
Each agrees with a reference: `macro_f1` with sklearn's `f1_score(average="macro", zero_division=0)`,
`rouge` with HF `evaluate`'s rouge (Porter stemmer; a plain mean, not the bootstrap "mid"),
`gsm8k_exact_match` with lm-evaluation-harness's strict ("#### N") and flexible (last number)
extractors, compared exactly (no floats). `write_predictions` writes the prediction logs atomically.

Design notes (absent classes, sentences for ROUGE-Lsum, what counts as a number):
docs/design.md#evalmetricspy
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from modernlm.errors import UserError
from modernlm.files import atomic_write

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TASKS = ("classification", "summarization", "gsm8k")


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share correct / n (95% for z = 1.96): unlike p +- z * se it stays
    inside [0, 1] and is not empty at 0 or n, which small per-kind counts reach."""
    if n <= 0:
        raise ValueError("wilson_interval: n must be positive")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> int:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no examples: predictions and references are empty")
    return len(predictions)


# ----------------------------------------------------------------------------- classification


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference."""
    n = _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / n


def _labels(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> list[Hashable]:
    labels = set(predictions) | set(references)
    try:
        return sorted(labels)  # type: ignore[type-var]
    except TypeError:  # mixed label types (1, "1", None): still a stable order
        return sorted(labels, key=repr)


def confusion_matrix(
    predictions: Sequence[Hashable], references: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> tuple[list[Hashable], list[list[int]]]:
    """(labels, counts): counts[i][j] = examples of true class labels[i] predicted as labels[j].

    Rows are references and columns predictions (sklearn's convention). Pairs with a label outside
    `labels` are not counted.
    """
    _check_lengths(predictions, references)
    labels = list(labels) if labels is not None else _labels(predictions, references)
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for p, r in zip(predictions, references, strict=True):
        if p in index and r in index:
            counts[index[r]][index[p]] += 1
    return labels, counts


def per_class_f1(
    predictions: Sequence[Hashable], references: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> dict[Hashable, float]:
    """F1 of each class, 2TP / (2TP + FP + FN); 0 for a class with no TP (and for an absent one)."""
    _check_lengths(predictions, references)
    labels = list(labels) if labels is not None else _labels(predictions, references)
    tp = dict.fromkeys(labels, 0)
    fp = dict.fromkeys(labels, 0)
    fn = dict.fromkeys(labels, 0)
    for p, r in zip(predictions, references, strict=True):
        if p == r:
            if p in tp:
                tp[p] += 1
            continue
        if p in fp:
            fp[p] += 1
        if r in fn:
            fn[r] += 1
    out = {}
    for c in labels:
        denom = 2 * tp[c] + fp[c] + fn[c]
        out[c] = 2 * tp[c] / denom if denom else 0.0
    return out


def macro_f1(
    predictions: Sequence[Hashable], references: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> float:
    """Unweighted mean of the per-class F1 (absent classes: docs/design.md#evalmetricspy)."""
    f1 = per_class_f1(predictions, references, labels)
    if not f1:
        raise ValueError("macro_f1 needs at least one label")
    return sum(f1.values()) / len(f1)


# ----------------------------------------------------------------------------- summarization

# A sentence ends at ".", "!" or "?", optionally followed by a closing quote or bracket, then whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def split_sentences(text: str) -> str:
    """`text` with one sentence per line: what ROUGE-Lsum needs (docs/design.md#evalmetricspy)."""
    sentences = []
    for line in text.splitlines():
        sentences.extend(s.strip() for s in _SENTENCE_END.split(line))
    return "\n".join(s for s in sentences if s)


def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise UserError("ROUGE needs the rouge-score package: pip install 'modernlm[eval]'") from e
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L/Lsum F-measure (fraction) of each (prediction, reference) pair."""
    _check_lengths(predictions, references)
    scorer = _rouge_scorer()
    out = []
    for p, r in zip(predictions, references, strict=True):
        # rouge_score's signature is score(target, prediction): the reference comes first.
        s = scorer.score(split_sentences(r), split_sentences(p))
        out.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    return out


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures over examples, as fractions: {"rouge1", "rouge2", "rougeL", "rougeLsum"}."""
    scores = rouge_per_example(predictions, references)
    return {k: sum(s[k] for s in scores) / len(scores) for k in ROUGE_TYPES}


# ----------------------------------------------------------------------------- GSM8K

# What counts as a number: docs/design.md#evalmetricspy. The lookbehinds keep a number from starting
# inside a word/id ("Q3") or another number ("1.2.3"), and a sign from following a letter, digit or
# ")" (there it is an operator: "16-3"). The lookahead stops "1,2345" from reading as "1,234" + "5"
# (it reads as "1" and, after the comma, "2345").
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?:\.\d+)?|\.\d+"
_SIGN = r"(?<![\w.)])[-+\u2212](?=\$?\.?\d)"
_NUMBER = rf"(?:{_SIGN}|(?<![\w.]))\$?(?:{_NUM})(?:/\d+)?%?"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(rf"####\s*({_NUMBER})")
_DECIMAL_RE = re.compile(r"-?(\d*)(?:\.(\d*))?")


def normalize_number(s: str) -> str:
    """Canonical text of a number: "$1,234.50" -> "1234.5", "+5.0" -> "5", "-0" -> "0", "50%" -> "50".

    Drops whitespace, ",", "$", "%", a leading "+", a trailing "." and trailing decimal zeros,
    and leading integer zeros ("007" -> "7", ".5" -> "0.5"); the unicode minus becomes "-". Fractions
    keep their form ("1/2"). Text that is not a number comes back with only those characters removed.
    """
    t = re.sub(r"[\s,$%]", "", s).replace("\u2212", "-").rstrip(".")
    if t.startswith("+"):
        t = t[1:]
    if "/" in t:
        return "/".join(normalize_number(part) if part else part for part in t.split("/"))
    m = _DECIMAL_RE.fullmatch(t)
    if not m or not (m.group(1) or m.group(2)):
        return t
    whole = m.group(1).lstrip("0") or "0"
    frac = (m.group(2) or "").rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    negative = t.startswith("-") and number != "0"
    return f"-{number}" if negative else number


def extract_strict(text: str) -> str | None:
    """Normalized number of the last "#### N" in `text`; None when there is none."""
    matches = _STRICT_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_flexible(text: str) -> str | None:
    """Normalized last number anywhere in `text`; None when there is none."""
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def gsm8k_target(reference: str | int | float) -> str:
    """The gold number of a reference: a full GSM8K answer ("... #### 72") or a bare number."""
    text = str(reference)
    target = extract_strict(text) if "####" in text else normalize_number(text)
    if not target or not _NUMBER_RE.fullmatch(target):
        raise ValueError(f"GSM8K reference has no final number: {text[-80:]!r}")
    return target


def gsm8k_exact_match(predictions: Sequence[str], references: Sequence[str | int | float]) -> dict[str, float]:
    """{"exact_match_strict", "exact_match_flexible"}: fractions of predictions whose strict /
    flexible extraction equals the reference's number (a prediction without one counts wrong)."""
    n = _check_lengths(predictions, references)
    targets = [gsm8k_target(r) for r in references]
    strict = sum(extract_strict(p) == t for p, t in zip(predictions, targets, strict=True))
    flexible = sum(extract_flexible(p) == t for p, t in zip(predictions, targets, strict=True))
    return {"exact_match_strict": strict / n, "exact_match_flexible": flexible / n}


# ----------------------------------------------------------------------------- error logs


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars / 0-d tensors as labels
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_predictions(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `rows` as JSONL, atomically; each row needs "input", "prediction" and "reference".

    Keys come out in that order, then the row's other keys. Parent folders are created. Returns the path.
    """
    path = Path(path)
    lines = []
    for i, row in enumerate(rows):
        missing = [k for k in ("input", "prediction", "reference") if k not in row]
        if missing:
            raise ValueError(f"prediction row {i} lacks {missing}")
        ordered = {"input": row["input"], "prediction": row["prediction"], "reference": row["reference"]}
        ordered.update({k: v for k, v in row.items() if k not in ordered})
        lines.append(json.dumps(ordered, ensure_ascii=False, default=_json_default) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(lines))
    return path


def evaluate_predictions(
    task: str,
    inputs: Sequence[Any] | None,
    predictions: Sequence[Any],
    references: Sequence[Any],
    errors_path: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of one task plus counts; writes the logged examples to `errors_path` when given.

    - "classification": accuracy, macro_f1; logs the wrongly labelled examples.
    - "gsm8k": exact_match_strict, exact_match_flexible; logs the examples the flexible extractor
      got wrong (so strict-only misses, a format problem, not a wrong answer, are not logged), with
      "target", "extracted_strict" and "extracted_flexible".
    - "summarization": rouge1, rouge2, rougeL, rougeLsum; ROUGE has no "wrong", so every example is
      logged with its four scores, worst ROUGE-L first: the head of the file is what to read.
    The result also holds "n" (examples) and "n_logged" (rows of the error file, also when no file
    is written). Each row carries "index", the example's position in the inputs. `inputs` may be
    None (rows then have "input": null). An empty error file means nothing was wrong.
    """
    n = _check_lengths(predictions, references)
    if inputs is None:
        inputs = [None] * n
    elif len(inputs) != n:
        raise ValueError(f"{len(inputs)} inputs but {n} predictions")
    examples = list(zip(range(n), inputs, predictions, references, strict=True))

    def row(i: int, x: Any, p: Any, r: Any, **extra: Any) -> dict[str, Any]:
        return {"input": x, "prediction": p, "reference": r, "index": i, **extra}

    rows: list[dict[str, Any]]
    if task == "classification":
        result: dict[str, Any] = {
            "accuracy": accuracy(predictions, references),
            "macro_f1": macro_f1(predictions, references),
        }
        rows = [row(i, x, p, r) for i, x, p, r in examples if p != r]
    elif task == "gsm8k":
        result = dict(gsm8k_exact_match(predictions, references))
        rows = []
        for i, x, p, r in examples:
            target, flexible = gsm8k_target(r), extract_flexible(p)
            if flexible != target:
                rows.append(
                    row(i, x, p, r, target=target, extracted_strict=extract_strict(p), extracted_flexible=flexible)
                )
    elif task == "summarization":
        scores = rouge_per_example(predictions, references)
        result = {k: sum(s[k] for s in scores) / n for k in ROUGE_TYPES}
        order = sorted(range(n), key=lambda i: (scores[i]["rougeL"], i))
        rows = [row(*examples[i], **scores[i]) for i in order]
    else:
        raise UserError(f"task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    result["n"] = n
    result["n_logged"] = len(rows)
    if errors_path is not None:
        write_predictions(errors_path, rows)
    return result

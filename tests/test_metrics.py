"""Task metrics against hand-computed values and rouge_score; GSM8K extraction edge cases; error logs."""

from __future__ import annotations

import json
import random

import pytest

from modernlm.errors import UserError
from modernlm.eval.metrics import (
    accuracy,
    confusion_matrix,
    evaluate_predictions,
    extract_flexible,
    extract_strict,
    gsm8k_exact_match,
    gsm8k_target,
    macro_f1,
    normalize_number,
    per_class_f1,
    rouge,
    rouge_per_example,
    split_sentences,
    wilson_interval,
    write_predictions,
)

# ----------------------------------------------------------------------------- classification

# 3 classes, 6 examples:
#   idx      0  1  2  3  4  5
#   ref      0  0  0  1  1  2
#   pred     0  0  1  1  2  2
# class 0: TP=2 (0,1) FP=0     FN=1 (2)  -> P=1,   R=2/3 -> F1 = 2*1*(2/3)/(1+2/3) = 4/5
# class 1: TP=1 (3)   FP=1 (2) FN=1 (4)  -> P=1/2, R=1/2 -> F1 = 1/2
# class 2: TP=1 (5)   FP=1 (4) FN=0      -> P=1/2, R=1   -> F1 = 2*(1/2)/(3/2) = 2/3
# macro F1 = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 30 / 3 = 59/90; accuracy = 4/6
REF3 = [0, 0, 0, 1, 1, 2]
PRED3 = [0, 0, 1, 1, 2, 2]


def test_accuracy_hand_computed():
    assert accuracy(PRED3, REF3) == pytest.approx(4 / 6)
    assert accuracy(["pos", "neg", "neg"], ["pos", "pos", "neg"]) == pytest.approx(2 / 3)


def test_macro_f1_hand_computed_3x3():
    assert per_class_f1(PRED3, REF3) == pytest.approx({0: 4 / 5, 1: 1 / 2, 2: 2 / 3})
    assert macro_f1(PRED3, REF3) == pytest.approx(59 / 90)


def test_macro_f1_absent_class_counts_as_zero():
    # labels adds class 3, in neither list: F1 = 0 (sklearn zero_division=0), mean over 4 classes.
    assert macro_f1(PRED3, REF3, labels=[0, 1, 2, 3]) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3 + 0) / 4)
    # A prediction outside `labels` is a miss of its true class and no class's false positive:
    # class "a": TP=1 -> F1 = 1; class "b": TP=0, FN=1 -> F1 = 0; "c" is ignored. Mean 1/2.
    assert macro_f1(["a", "c"], ["a", "b"], labels=["a", "b"]) == pytest.approx(0.5)
    # A class only ever predicted (never true) has F1 0 and counts with labels=None:
    # class 0: TP=1 FN=1 -> 2/3; class 1: FP=1 -> 0. Mean 1/3.
    assert macro_f1([0, 1], [0, 0]) == pytest.approx(1 / 3)


def test_macro_f1_equals_harmonic_mean_of_precision_and_recall():
    # Independent definition: F1 = 2PR/(P+R), 0 when P or R is undefined or both are 0.
    rng = random.Random(0)
    for _ in range(20):
        ref = [rng.randrange(4) for _ in range(30)]
        pred = [rng.randrange(5) for _ in range(30)]
        f1s = []
        for c in sorted(set(ref) | set(pred)):
            tp = sum(p == r == c for p, r in zip(pred, ref, strict=True))
            n_pred, n_true = pred.count(c), ref.count(c)
            prec = tp / n_pred if n_pred else 0.0
            rec = tp / n_true if n_true else 0.0
            f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        assert macro_f1(pred, ref) == pytest.approx(sum(f1s) / len(f1s))


def test_confusion_matrix_hand_computed():
    labels, counts = confusion_matrix(PRED3, REF3)
    assert labels == [0, 1, 2]
    # rows = reference, columns = prediction
    assert counts == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert confusion_matrix([10, 2, 2], [2, 10, 2]) == ([2, 10], [[1, 1], [1, 0]])  # numeric label order


@pytest.mark.parametrize("fn", [accuracy, macro_f1, confusion_matrix, rouge, gsm8k_exact_match])
def test_mismatched_lengths_raise(fn):
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        fn(["1", "2"], ["1", "2", "3"])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_hand_computed():
    # rouge_score lower-cases and keeps [a-z0-9] tokens; the stemmer leaves these words unchanged.
    # pred: the cat sat on the mat            (6 unigrams, 5 bigrams)
    # ref:  a cat was on the mat today         (7 unigrams, 6 bigrams)
    # ROUGE-1 clipped overlap: cat, on, the (min(2,1)=1), mat = 4 -> P=4/6, R=4/7, F=2PR/(P+R) = 8/13
    # ROUGE-2 overlap: "on the", "the mat" = 2 -> P=2/5, R=2/6, F = (4/15)/(11/15) = 4/11
    # ROUGE-L: LCS = cat on the mat = 4 -> same P, R as ROUGE-1 -> 8/13; one sentence -> Lsum = L
    got = rouge(["The cat sat on the mat."], ["A cat was on the mat today."])
    assert got == pytest.approx({"rouge1": 8 / 13, "rouge2": 4 / 11, "rougeL": 8 / 13, "rougeLsum": 8 / 13})


def test_rouge_lsum_needs_sentence_split():
    # Same two sentences in the other order. LCS over the whole text = one sentence (3 of 6 tokens):
    # ROUGE-L = 1/2. Lsum unions the LCS per reference sentence over prediction sentences: 6/6 = 1.
    got = rouge(["red apples fall. blue birds sing."], ["blue birds sing. red apples fall."])
    assert got["rougeL"] == pytest.approx(0.5)
    assert got["rougeLsum"] == pytest.approx(1.0)


def test_split_sentences():
    text = 'Anna will come. Will she bring cake? Yes! She said "fine." ok\nNew line\n\n'
    assert split_sentences(text) == 'Anna will come.\nWill she bring cake?\nYes!\nShe said "fine."\nok\nNew line'
    assert split_sentences("3.5 kg of rice") == "3.5 kg of rice"  # no whitespace after the "."


def test_rouge_matches_rouge_score_directly():
    from rouge_score import rouge_scorer

    preds = [
        "Tom is late. He will call Mia at five.",
        "The meeting moved to Friday!",
        "",
        "Jack buys the tickets. Lou pays him back? Maybe.",
    ]
    refs = [
        "Tom will be late and will call Mia at 5.",
        "The team meeting is on Friday. Bring the reports.",
        "Kate is sick.",
        "Lou pays Jack back for the tickets.",
    ]
    # The same texts with one sentence per line, written out by hand (what HF's scripts get from nltk).
    preds_nl = [
        "Tom is late.\nHe will call Mia at five.",
        "The meeting moved to Friday!",
        "",
        "Jack buys the tickets.\nLou pays him back?\nMaybe.",
    ]
    refs_nl = [
        "Tom will be late and will call Mia at 5.",
        "The team meeting is on Friday.\nBring the reports.",
        "Kate is sick.",
        "Lou pays Jack back for the tickets.",
    ]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(preds_nl, refs_nl, strict=True)]
    per = rouge_per_example(preds, refs)
    for mine, theirs in zip(per, direct, strict=True):
        assert mine == pytest.approx({k: v.fmeasure for k, v in theirs.items()})
    mean = rouge(preds, refs)
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert mean[k] == pytest.approx(sum(d[k].fmeasure for d in direct) / len(direct))
    assert per[2] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}  # empty prediction


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    "raw, want",
    [
        ("1,234", "1234"),
        ("$5.00", "5"),
        ("3.50", "3.5"),
        ("5.0", "5"),
        ("12.", "12"),
        ("+7", "7"),
        ("-42", "-42"),
        ("-0.0", "0"),
        ("\u22123", "-3"),  # unicode minus
        ("007", "7"),
        (".5", "0.5"),
        ("50%", "50"),
        ("1/2", "1/2"),
        ("$1,234.50", "1234.5"),
        (" 72 ", "72"),
        ("abc", "abc"),  # not a number: returned as is
    ],
)
def test_normalize_number(raw, want):
    assert normalize_number(raw) == want


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("So the total is 1,234.\n#### 1,234", "1234", "1234"),
        ("#### $5.00", "5", "5"),
        ("It costs $5.00 in all.", None, "5"),
        ("The temperature drops to -5 degrees.\n#### -5", "-5", "-5"),
        ("The answer is 12.", None, "12"),
        ("#### 3\nOops, let me redo it.\n#### 4", "4", "4"),  # the LAST "####" wins
        ("#### 5\nand more text ####", "5", "5"),  # a "####" with no number is skipped
        ("####12", "12", "12"),  # no space needed
        ("She scored 3 points in Q3.", None, "3"),  # "Q3" is an id, not a number
        ("Model abc123 and x2 are ids", None, None),
        ("Half of it is 1/2", None, "1/2"),  # fractions kept as written
        ("It grew by 50%.", None, "50"),
        ("I do not know.", None, None),
        ("", None, None),
        ("16-3-4=9 eggs", None, "9"),
        ("It is 20-25 = -5", None, "-5"),  # "-" after a digit is an operator, after "= " a sign
        ("(5)-4", None, "4"),
        ("He was 3rd", None, "3"),
        ("He ran 1,2345 miles", None, "2345"),  # not a thousands group: "1" and "2345"
        ("We have 1,234, then", None, "1234"),
        ("version 1.2.3", None, "1.2"),
        ("#### 1,000,000 dollars", "1000000", "1000000"),
    ],
)
def test_gsm8k_extraction_edge_cases(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_gsm8k_target_and_exact_match():
    gold = "She has 8 + 64 = <<8+64=72>>72 clips.\n#### 72"
    assert gsm8k_target(gold) == "72"
    assert gsm8k_target(" 1,234 ") == "1234"
    assert gsm8k_target(72) == "72"
    with pytest.raises(ValueError, match="no final number"):
        gsm8k_target("no answer here ####")
    preds = ["8 + 64 = 72\n#### 72", "The answer is 72.", "#### 71", "no idea", "#### 72.00"]
    refs = [gold, gold, "72", gold, 72]
    # strict right: 0, 4 -> 2/5; flexible right: 0, 1, 4 -> 3/5
    assert gsm8k_exact_match(preds, refs) == pytest.approx({"exact_match_strict": 2 / 5, "exact_match_flexible": 3 / 5})


def test_gsm8k_real_answers_extract_their_final_number(shared_data):
    # Every real GSM8K answer ends in "#### N": strict and flexible both give N (commas removed).
    n = 0
    for split in ("train", "test"):
        path = shared_data / "gsm8k" / f"{split}.jsonl"
        if not path.is_file():
            pytest.skip(f"{path} missing")
        for line in path.read_text().splitlines():
            answer = json.loads(line)["answer"]
            want = str(int(answer.split("####")[-1].strip().replace(",", "")))
            assert extract_strict(answer) == want, answer
            assert extract_flexible(answer) == want, answer
            n += 1
    assert n == 7473 + 1319


# ----------------------------------------------------------------------------- error logs


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_predictions_atomic_and_ordered(tmp_path):
    path = tmp_path / "sub" / "errors.jsonl"
    write_predictions(path, [{"score": 0.5, "reference": "b", "prediction": "a", "input": "é x"}])
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"input": "é x", "prediction": "a", "reference": "b", "score": 0.5}'
    ]
    # A bad row fails before anything is replaced: the old file stays whole, no temp file is left.
    with pytest.raises(ValueError, match="lacks"):
        write_predictions(path, [{"input": 1, "prediction": 2, "reference": 3}, {"input": 1}])
    assert read_jsonl(path) == [{"input": "é x", "prediction": "a", "reference": "b", "score": 0.5}]
    write_predictions(path, [])
    assert path.read_text() == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["errors.jsonl"]


def test_evaluate_classification_logs_exactly_the_wrong(tmp_path):
    inputs = [f"text {i}" for i in range(6)]
    path = tmp_path / "cls.jsonl"
    got = evaluate_predictions("classification", inputs, PRED3, REF3, errors_path=path)
    assert got == pytest.approx({"accuracy": 4 / 6, "macro_f1": 59 / 90, "n": 6, "n_logged": 2})
    assert read_jsonl(path) == [
        {"input": "text 2", "prediction": 1, "reference": 0, "index": 2},
        {"input": "text 4", "prediction": 2, "reference": 1, "index": 4},
    ]


def test_evaluate_gsm8k_logs_flexible_misses(tmp_path):
    gold = "3 + 4 = 7\n#### 7"
    preds = ["#### 7", "so it is 7.", "#### 8", "#### 7\nwait, it is 6"]
    path = tmp_path / "gsm.jsonl"
    got = evaluate_predictions("gsm8k", ["q0", "q1", "q2", "q3"], preds, [gold] * 4, errors_path=path)
    # strict right: 0, 3 -> 1/2; flexible right: 0, 1 -> 1/2; flexible wrong (logged): 2, 3
    assert got == pytest.approx({"exact_match_strict": 0.5, "exact_match_flexible": 0.5, "n": 4, "n_logged": 2})
    rows = read_jsonl(path)
    assert [r["index"] for r in rows] == [2, 3]
    assert rows[1] == {
        "input": "q3",
        "prediction": preds[3],
        "reference": gold,
        "index": 3,
        "target": "7",
        "extracted_strict": "7",
        "extracted_flexible": "6",
    }


def test_evaluate_summarization_logs_all_worst_first(tmp_path):
    preds = ["The cat sat on the mat.", "a b c", "red apples fall."]
    refs = ["A cat was on the mat today.", "a b c", "blue birds sing."]
    path = tmp_path / "sum.jsonl"
    got = evaluate_predictions("summarization", None, preds, refs, errors_path=path)
    # per example ROUGE-L: 8/13 (see test_rouge_hand_computed), 1, 0
    assert got["rougeL"] == pytest.approx((8 / 13 + 1 + 0) / 3)
    assert got["n"] == got["n_logged"] == 3
    rows = read_jsonl(path)
    assert [r["index"] for r in rows] == [2, 0, 1]
    assert rows[0]["input"] is None
    assert rows[1]["rouge1"] == pytest.approx(8 / 13) and rows[1]["rouge2"] == pytest.approx(4 / 11)


def test_evaluate_without_file_and_bad_task(tmp_path):
    got = evaluate_predictions("classification", None, ["a", "b"], ["a", "a"])
    # class a: TP=1 FN=1 -> 2/3; class b: FP=1 -> 0; macro 1/3
    assert got == pytest.approx({"accuracy": 0.5, "macro_f1": 1 / 3, "n": 2, "n_logged": 1})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="task: unknown task 'qa'"):
        evaluate_predictions("qa", None, ["a"], ["a"])
    with pytest.raises(ValueError, match="3 inputs but 2 predictions"):
        evaluate_predictions("classification", [1, 2, 3], ["a", "b"], ["a", "a"])


@pytest.mark.parametrize("correct, n", [(0, 10), (5, 10), (10, 10), (61, 68), (17, 42), (1, 200)])
def test_wilson_interval_equals_scipys(correct, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    want = scipy_stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(want.low, abs=1e-4) and hi == pytest.approx(want.high, abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook example
    with pytest.raises(ValueError):
        wilson_interval(0, 0)

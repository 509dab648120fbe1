"""The GSM8K verifier (modernlm.align.verifier, `modernlm verifier`) on tiny models built from config.

The loss against hand-computed BCE with its masks; a verifier trained briefly on a learnable set
(correctness visible in one token) ranks held-out correct solutions above wrong ones; majority
vote / best-of-N / weighted vote / pass@N against hand-built cases, ties included; sampling that
resumes exactly and is reused; bad records and a bad init_from as one-line errors; save/load that
reproduces the scores exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from modernlm.align.verifier import (
    HEAD_FILE,
    SampleSets,
    SampleSettings,
    VerifierBatches,
    VerifierModel,
    best_of_n,
    collate_verifier,
    draw_samples,
    examples_from_rows,
    label_solution,
    load_verifier,
    load_verifier_weights,
    majority_vote,
    read_problems,
    rerank,
    rerank_metrics,
    rerank_problem,
    save_verifier,
    score_examples,
    split_examples,
    verifier_example,
    verifier_loss_fn,
    weighted_vote,
    write_rerank_report,
)
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.runtime import Runtime
from modernlm.train.losses import verifier_loss
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import Trainer, TrainingConfig
from tests.conftest import tiny_config

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32)


def chat_checkpoint(path, seed: int = 0):
    """A tiny chat-ready checkpoint: byte tokenizer with the ChatML tokens, <|im_end|> as eos."""
    from modernlm.align.sft import prepare_chat_model
    from modernlm.checkpoint import save_model
    from modernlm.tokenizer import byte_tokenizer

    torch.manual_seed(seed)
    model, tok = ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=128)), byte_tokenizer()
    prepare_chat_model(model, tok)
    save_model(model, path, tok)
    return path


def write_problems(path, problems: list[tuple[str, str]]):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in problems))
    return path


# ---- the loss ------------------------------------------------------------------------------


def test_verifier_loss_is_masked_token_bce():
    values = torch.tensor([[0.5, -1.0, 2.0, float("inf")], [0.3, float("nan"), -0.7, 1.5]])
    mask = torch.tensor([[False, True, True, False], [True, False, True, True]])
    correct = torch.tensor([1.0, 0.0])
    loss, n = verifier_loss(values, correct, mask)

    def bce(x: float, y: float) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = bce(-1.0, 1) + bce(2.0, 1) + bce(0.3, 0) + bce(-0.7, 0) + bce(1.5, 0)
    assert n.item() == 5 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # inf / nan off the mask: nothing


def test_loss_fn_covers_solution_tokens_only():
    torch.manual_seed(0)
    model = VerifierModel(ModernDecoderLM(tiny_config()))
    rows = [verifier_example([1, 7, 8, 2], [9, 10, 3], True, 32), verifier_example([1, 2], [11, 3], False, 32)]
    batch = collate_verifier(rows, pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 9, 10, 3], [-100, -100, 11, 3, -100, -100, -100]]
    loss, n, metrics = verifier_loss_fn(0.0)(model, batch)
    assert n.item() == 5 and loss.item() == pytest.approx(5 * math.log(2))  # zero head: p = 0.5 everywhere
    # The joint loss adds lm_coef x the summed next-token loss of the same solution tokens.
    loss_lm, n_lm, m_lm = verifier_loss_fn(0.5)(model, batch)
    from modernlm.train.losses import next_token_loss

    lm_sum, lm_n = next_token_loss(model(batch["input_ids"]).logits[:, :-1], batch["labels"][:, 1:])
    assert n_lm.item() == lm_n.item() == 5
    assert loss_lm.item() == pytest.approx(loss.item() + 0.5 * lm_sum.item(), rel=1e-5)
    assert set(m_lm) == {"value_loss", "lm_loss"}


def test_long_examples_keep_the_end_of_the_solution():
    ex = verifier_example(list(range(10, 20)), [30, 31, 32], False, 5)
    assert ex["input_ids"] == [18, 19, 30, 31, 32] and ex["labels"] == [-100, -100, 30, 31, 32]


# ---- learning ------------------------------------------------------------------------------


def learnable_pairs(rng: np.random.Generator, n: int) -> list[tuple[dict, dict]]:
    """(correct, wrong) solutions to the same prompt, identical but for one token: 5 = right, 6 = wrong,
    at a random place, so the score at the last token has to find it by attention."""
    pairs = []
    for _ in range(n):
        prompt = [1, *rng.integers(10, 60, 4).tolist(), 2]
        body, pos = rng.integers(10, 60, 6).tolist(), int(rng.integers(0, 7))
        pairs.append(tuple(
            verifier_example(prompt, [*body[:pos], marker, *body[pos:], 3], marker == 5, 32) for marker in (5, 6)
        ))  # fmt: skip
    return pairs


def test_verifier_learns_to_rank_correct_above_wrong(tmp_path):
    rng = np.random.default_rng(0)
    train, held_out = learnable_pairs(rng, 128), learnable_pairs(rng, 32)
    torch.manual_seed(0)
    model = VerifierModel(ModernDecoderLM(tiny_config()))
    flat = [e for pair in held_out for e in pair]
    before = score_examples(model, flat)
    assert len(set(before)) == 1  # zero-initialised head: no preference yet
    trainer = Trainer(
        model, verifier_loss_fn(), VerifierBatches([e for p in train for e in p], 16, 0, seed=0),
        TrainingConfig(num_steps=60, batch_size=16, log_every=60, eval_every=0, save_every=0, progress=False),
        OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0), CPU, tmp_path,
        save_model_fn=save_verifier, load_model_fn=load_verifier_weights,
    )  # fmt: skip
    summary = trainer.train()
    assert summary["final_loss"] < 0.5  # from log 2 = 0.69 (tokens before the marker stay at 0.69)
    scores = score_examples(model, flat)
    right = [scores[2 * i] > scores[2 * i + 1] for i in range(len(held_out))]
    assert sum(right) == len(held_out), scores
    assert (tmp_path / "checkpoints" / "step_0000060" / HEAD_FILE).is_file()


# ---- reranking -----------------------------------------------------------------------------


def test_majority_vote_ties_go_to_the_first_seen():
    assert majority_vote(["3", "5", "5", "3", None, None, None]) == "3"  # 2 vs 2: "3" came first
    assert majority_vote([None, "5", "3", "3"]) == "3"
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def test_best_of_n_and_weighted_vote():
    assert best_of_n([0.1, 0.9, 0.9, 0.2]) == 1  # tie: the earliest
    with pytest.raises(ValueError):
        best_of_n([])
    # "7" wins by count (3 vs 1), "4" by summed score (0.9 vs 0.6)
    answers, scores = ["7", "4", "7", None, "7"], [0.2, 0.9, 0.2, 1.0, 0.2]
    assert majority_vote(answers) == "7" and weighted_vote(answers, scores) == "4"
    assert weighted_vote(["1", "2"], [0.5, 0.5]) == "1"
    pick = rerank_problem("4", answers, scores)
    assert pick["best_index"] == 3 and pick["best_answer"] is None and not pick["best_correct"]  # no number
    assert not pick["majority_correct"] and pick["weighted_correct"] and pick["pass_at_n"]


def test_rerank_metrics_over_problems():
    picks = [
        rerank_problem("1", ["1", "2", "2"], [0.9, 0.1, 0.1]),  # best right, majority wrong
        rerank_problem("2", ["2", "2", "3"], [0.3, 0.3, 0.5]),  # best wrong, majority + weighted right
        rerank_problem("9", ["1", None, "3"], [0.5, 0.5, 0.5]),  # nobody: pass@3 fails too
    ]
    m = rerank_metrics(picks, greedy_correct=[True, False, False])
    assert m == pytest.approx({
        "greedy_accuracy": 1 / 3, "majority_accuracy": 1 / 3, "best_of_n_accuracy": 1 / 3,
        "weighted_vote_accuracy": 2 / 3, "pass_at_n": 2 / 3,
    })  # fmt: skip


def test_rerank_report_picks_per_problem_and_writes_the_errors(tmp_path):
    problems = [{"question": f"q{p}", "answer": f"#### {t}", "target": t, "source": f"f line {p + 1}"}
                for p, t in enumerate(["1", "2"])]  # fmt: skip
    row = lambda p, k, a, t: {"problem": p, "sample": k, "solution": f"so {a}", "answer": a, "correct": a == t}  # noqa: E731
    rows = [row(0, 0, "1", "1"), row(0, 1, "3", "1"), row(1, 0, "2", "2"), row(1, 1, "4", "2")]
    greedy = [row(0, 0, "1", "1"), row(1, 0, "5", "2")]
    scores = [0.9, 0.1, 0.2, 0.8]  # problem 1: the verifier prefers the wrong sample
    metrics, predictions = rerank(problems, greedy, rows, scores)
    assert metrics["greedy_accuracy"] == 0.5 and metrics["best_of_n_accuracy"] == 0.5 and metrics["pass_at_n"] == 1
    assert [p["prediction"] for p in predictions] == ["so 1", "so 4"] and predictions[1]["scores"] == [0.2, 0.8]
    samples = SampleSets("gen", rows, {"share_correct": 0.5}, greedy, rows, {"share_correct": 0.5})
    text = write_rerank_report(
        tmp_path, problems, samples, scores, sample=SampleSettings(n_eval=2), eval_source="test.jsonl", lm_coef=0.5,
        step=7, val_loss=None,
    )  # fmt: skip
    assert text.startswith("greedy 0.500, majority@2 ") and text.endswith("on 2 problems")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n"] == 2 and report["step"] == 7 and report["settings"]["eval_path"] == "test.jsonl"
    errors = (tmp_path / "eval" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["index"] for e in errors] == [1]


def test_split_examples_holds_out_whole_problems(chat_model):
    _, enc = chat_model
    rows = [{"problem": p, "question": f"{p}?", "solution": "#### 1", "correct": k == 0} for p in range(10)
            for k in range(3)]  # fmt: skip
    train, val = split_examples(rows, 10, enc, 64, val_fraction=0.2, seed=0)
    assert len(train) == 24 and len(val) == 6  # 2 of 10 problems, with their 3 samples each
    assert split_examples(rows, 10, enc, 64, val_fraction=0.2, seed=0, max_val=4)[1] == val[:4]
    assert len(split_examples(rows[:3], 1, enc, 64, val_fraction=0.5, seed=0)[0]) == 3  # one problem stays


def test_label_solution_reads_the_last_number():
    assert label_solution("3 + 4 = 7 apples, so 7,000 in all", "7000") == ("7000", True)
    assert label_solution("so $5.50.", "5.5") == ("5.5", True)
    assert label_solution("no idea", "3") == (None, False)


# ---- data and errors -----------------------------------------------------------------------


def test_read_problems_and_bad_records(tmp_path):
    good = write_problems(tmp_path / "ok.jsonl", [("How many?", "2 + 2 = 4\n#### 4"), ("And?", "#### 1,000")])
    problems = read_problems(good)
    assert [p["target"] for p in problems] == ["4", "1000"] and problems[1]["source"].endswith("line 2")
    assert len(read_problems(good, max_problems=1)) == 1
    cases = {
        "missing field 'answer'": {"question": "q"},
        "no final '#### <number>'": {"question": "q", "answer": "it is 4"},
        "'#### four' is not a number": {"question": "q", "answer": "#### four"},
    }
    for message, bad in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=f"{path} line 2: .*{message}"):
            read_problems(path)
    with pytest.raises(UserError, match="no such file"):
        read_problems(tmp_path / "nope.jsonl")


def test_bad_init_from_is_one_line_naming_the_path(tmp_path, capsys):
    from modernlm.cli import run_command

    problems = write_problems(tmp_path / "p.jsonl", [("q", "#### 1")])
    code = run_command("verifier", [str(tmp_path / "no-sft"), f"data.train_path={problems}", "data.eval_path="])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "no-sft") in err and "Traceback" not in err and err.count("\n") == 1
    code = run_command("verifier", ["init_from=x", f"data.train_path={tmp_path / 'bad.jsonl'}"])
    assert code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("override, named", [
    ("data.max_train_problems=-1", "data: max_train_problems"),
    ("data.max_eval_problems=-2", "data: max_eval_problems"),
    ("data.max_length=-1", "data: max_length"), ("sample.top_k=-1", "sample: top_k"),
    ("sample.temperature=-0.5", "sample: temperature"), ("sample.n_eval=0", "sample: n_eval"),
])  # fmt: skip
def test_a_bad_count_or_sampling_setting_is_refused_before_loading(tmp_path, capsys, monkeypatch, override, named):
    """Refused as the config loads, in one line naming the field: not after the model loads and samples."""
    from modernlm.cli import run_command

    monkeypatch.setattr("modernlm.api.load", lambda *a, **k: pytest.fail("the model was loaded"))
    problems = write_problems(tmp_path / "p.jsonl", [("q", "#### 1")])
    code = run_command("verifier", ["sft", f"data.train_path={problems}", f"run.out_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "verifier").exists()


# ---- sampling: reused, and resumed exactly -------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from modernlm.align.sft import chat_ready
    from modernlm.api import load
    from modernlm.chat import ChatEncoder

    model, tok, _ = chat_ready(load(chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "sft"), backend="modernlm"))
    return model.eval(), ChatEncoder(tok)


PROBLEMS = [
    {"question": "1+1?", "answer": "#### 2", "target": "2"},
    {"question": "2+3?", "answer": "#### 5", "target": "5"},
    {"question": "9-4?", "answer": "#### 5", "target": "5"},
]
DRAW = dict(max_new_tokens=6, temperature=1.0, seed=3, batch_size=4)


def test_draw_samples_resumes_exactly_and_is_reused(chat_model, tmp_path):
    model, enc = chat_model
    full, stats = draw_samples(tmp_path / "a" / "s.jsonl", model, enc, PROBLEMS, 3, **DRAW)
    assert [(r["problem"], r["sample"]) for r in full] == [(p, k) for p in range(3) for k in range(3)]
    assert stats["samples"] == 9 and 0 <= stats["share_correct"] <= 1
    assert len({r["solution"] for r in full}) > 1  # samples differ
    meta = json.loads((tmp_path / "a" / "s.json").read_text())
    assert meta["settings"]["n"] == 3 and meta["stats"]["samples"] == 9

    # Killed after the first batch (4 rows) and midway through writing a line of the second.
    path = tmp_path / "b" / "s.jsonl"
    draw_samples(path, model, enc, PROBLEMS, 3, **DRAW)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]) + lines[6][:10])
    resumed, _ = draw_samples(path, model, enc, PROBLEMS, 3, **DRAW)
    assert resumed == full and path.read_text() == (tmp_path / "a" / "s.jsonl").read_text()

    # A complete file is reused without generating at all.
    again, _ = draw_samples(path, None, enc, PROBLEMS, 3, **DRAW)
    assert again == full
    with pytest.raises(UserError, match=r"other settings \(n: 3 -> 4"):
        draw_samples(path, model, enc, PROBLEMS, 4, **DRAW)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + json.dumps({"problem": 0, "sample": 2}) + "\n")
    with pytest.raises(UserError, match=f"{path} line 3: missing field 'solution'"):
        draw_samples(path, model, enc, PROBLEMS, 3, **DRAW)


# ---- save / load ---------------------------------------------------------------------------


def test_save_load_reproduces_scores_exactly(chat_model, tmp_path):
    from modernlm.chat import ChatEncoder
    from modernlm.checkpoint import save_model
    from modernlm.tokenizer import load_tokenizer

    model, enc = chat_model
    verifier = VerifierModel(ModernDecoderLM(model.config))
    torch.nn.init.normal_(verifier.head.weight, std=1.0)
    torch.nn.init.normal_(verifier.head.bias, std=1.0)
    rows = [{"question": p["question"], "solution": s, "correct": False} for p in PROBLEMS for s in ("4", "so 5")]
    examples = examples_from_rows(rows, enc, 64)
    scores = score_examples(verifier, examples, batch_size=4)
    assert len(set(scores)) == len(scores)
    save_verifier(verifier, tmp_path / "v", enc.tokenizer)
    loaded = load_verifier(tmp_path / "v")
    assert score_examples(loaded, examples, batch_size=4) == scores
    assert ChatEncoder(load_tokenizer(tmp_path / "v")).end_id == enc.end_id  # the chat tokenizer comes along
    fresh = VerifierModel(ModernDecoderLM(model.config))
    load_verifier_weights(fresh, tmp_path / "v")
    assert score_examples(fresh, examples, batch_size=4) == scores

    save_model(model, tmp_path / "plain")
    with pytest.raises(UserError, match="missing value_head.safetensors"):
        load_verifier(tmp_path / "plain")
    other = VerifierModel(ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=128, n_layer=1)))
    with pytest.raises(UserError, match="n_layer: 2 -> 1"):
        load_verifier_weights(other, tmp_path / "v")

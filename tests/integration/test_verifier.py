"""`modernlm verifier` end to end on a tiny chat checkpoint built here: every stage's files, a rerun
that resumes training without resampling, and the saved verifier reproducing the eval scores."""

from __future__ import annotations

import json

import pytest

from modernlm.cli import run_command
from modernlm.train.tracking import read_metrics
from tests.test_verifier import chat_checkpoint, write_problems

pytestmark = pytest.mark.slow


def test_verifier_command_end_to_end(tmp_path, capsys):
    from modernlm.align.verifier import examples_from_rows, load_verifier, score_examples
    from modernlm.chat import ChatEncoder
    from modernlm.tokenizer import load_tokenizer

    sft = chat_checkpoint(tmp_path / "sft")
    train = write_problems(
        tmp_path / "train.jsonl", [(f"{a}+{b}?", f"#### {a + b}") for a in range(3) for b in range(3)]
    )
    test = write_problems(tmp_path / "test.jsonl", [(f"{a}*{b}?", f"#### {a * b}") for a in range(2) for b in range(2)])
    args = [
        str(sft), f"data.train_path={train}", f"data.eval_path={test}", "data.val_fraction=0.2",
        "sample.n_train=4", "sample.n_eval=3", "sample.max_new_tokens=8", "sample.batch_size=8",
        "train.batch_size=4", "train.save_every=3", "train.eval_every=3", "train.progress=false",
        "optim.lr=1e-3", "optim.warmup_steps=2", "lm_coef=0.5", f"run.out_dir={tmp_path / 'runs'}", "run.device=cpu",
    ]  # fmt: skip
    assert run_command("verifier", [*args, "train.num_steps=6"]) == 0
    out = capsys.readouterr().out
    assert "done: greedy" in out and "best-of-3" in out and "pass@3" in out
    run = tmp_path / "runs" / "verifier"
    files = [
        "config.yaml", "metrics.jsonl", "summary.json", "eval.json", "eval/predictions.jsonl", "eval/errors.jsonl",
        "verifier/value_head.safetensors", "checkpoints/step_0000006/train_state.pt", "samples/train.jsonl",
        "samples/train.json", "samples/eval.jsonl", "samples/eval_greedy.jsonl",
    ]  # fmt: skip
    for name in files:
        assert (run / name).is_file(), name
    report = json.loads((run / "eval.json").read_text())
    assert report["n"] == 3 and report["n_problems"] == 4 and report["step"] == 6
    assert 0 <= report["greedy_accuracy"] <= 1 and report["pass_at_n"] <= 1
    for key in ("majority_accuracy", "best_of_n_accuracy", "weighted_vote_accuracy"):
        assert 0 <= report[key] <= report["pass_at_n"]  # the oracle bounds every pick from the N
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(len(p["scores"]) == 3 for p in predictions)
    assert any("lm_loss" in r for r in read_metrics(run))
    samples = {p.name: p.read_text() for p in (run / "samples").glob("*.jsonl")}

    # A rerun with more steps resumes training from step 6 and reuses every sample.
    assert run_command("verifier", [*args, "train.num_steps=9"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in (run / "samples").glob("*.jsonl")} == samples
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 9

    # The saved verifier scores the held-out samples exactly as eval.json's run did.
    verifier = load_verifier(run / "verifier")
    encoder = ChatEncoder(load_tokenizer(run / "verifier"))
    rows = [json.loads(line) for line in samples["eval.jsonl"].splitlines()]
    scores = score_examples(verifier, examples_from_rows(rows, encoder, 128), 8, encoder.tokenizer.pad_id)
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [s for p in predictions for s in p["scores"]] == scores

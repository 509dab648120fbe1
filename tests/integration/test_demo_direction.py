"""The direction of every effect the demo claims, on the demo's recipe at about a third of its time
budgets, so a regression shows up in CI and not in a report. On held-out problems (gsm/test) and
pairs (prefs/test) that chose no checkpoint:
- SFT raises greedy answer accuracy over the pretrained model;
- DPO raises held-out pair accuracy over SFT;
- the verifier's best-of-N is not below the SFT model's greedy accuracy on the same problems;
- RL (GRPO) raises greedy answer accuracy over the SFT model it starts from (selected on gsm/val).
Margins are directions, not the demo's figures: those are in the README, measured on the full run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modernlm.cli import run_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SHORTER = [
    "pretrain.train.max_seconds=80", "sft.train.max_seconds=50", "dpo.train.max_seconds=25",
    "rl.train.max_seconds=40", "verifier.train.max_seconds=30", "verifier.data.max_train_problems=300",
    "verifier.data.max_eval_problems=100", "eval.max_problems=100", "eval.max_pairs=100", "samples.questions=1",
]  # fmt: skip


def test_every_claimed_effect_points_the_right_way(tmp_path):
    out = tmp_path / "demo"
    recipe = ROOT / "configs" / "pipeline" / "demo.yaml"
    assert run_command("pipeline", ["-c", str(recipe), f"out_dir={out}", *SHORTER]) == 0
    rows = {r["model"]: r for r in json.loads((out / "eval" / "results.json").read_text())["rows"]}
    pretrain, sft, dpo, rl = rows["pretrain"], rows["sft"], rows["dpo"], rows["rl"]
    assert sft["answer_accuracy"] > pretrain["answer_accuracy"] + 0.1, (sft, pretrain)
    assert dpo["pair_accuracy"] > sft["pair_accuracy"], (dpo, sft)
    verifier = json.loads((out / "verifier" / "eval.json").read_text())
    assert verifier["best_of_n_accuracy"] >= verifier["greedy_accuracy"], verifier
    assert rl["answer_accuracy"] > sft["answer_accuracy"], (rl, sft)  # RL starts from SFT in the demo
    for row in (sft, dpo, rl):  # every kind is reported
        assert {k for k in row if k.startswith("answer_accuracy/")} >= {
            "answer_accuracy/chain1", "answer_accuracy/chain2", "answer_accuracy/together", "answer_accuracy/compare",
        }  # fmt: skip

"""Every effect the README claims for the demo, on the demo itself: `configs/pipeline/demo.yaml` as a
user runs it (its stages stop by step budgets, so the outcome does not depend on the machine's speed
or load), and a regression shows up in CI, not in a report. About 13 minutes on 2 idle cores. On
held-out problems (gsm/test) and pairs (prefs/test) that chose no checkpoint, each claim strict:
- SFT raises greedy answer accuracy over the pretrained model;
- DPO raises held-out pair accuracy over SFT;
- RL (GRPO, from SFT) raises greedy answer accuracy over SFT, by fixing `compare` (chain2 unchanged);
- the verifier's best-of-N and its weighted vote beat the SFT model's greedy answers.
The table itself is the README's (benchmarks/demo/results.json, kept from the documented run). On the
kept run's kind of CPU (its pipeline.json: the CPU, its vector instructions, torch's kernels, the
threads) it is equal to the last digit: measured on three runs, one of them CI's. Another kind of CPU
rounds differently and 2,770 training steps amplify that (an AMD EPYC gave pretrain val_ppl 5.08
where this Intel Xeon gives 5.35, and 0.80 against 0.88 SFT accuracy), so there only the directions
are checked. The pipeline runs in a subprocess, as a user runs it (this process's torch has one
thread: tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEPT = ROOT / "benchmarks" / "demo" / "results.json"
pytestmark = pytest.mark.slow


# What decides a float's rounding: equal on two machines, equal tables (modernlm.pipeline.runner.cpu_kind).
SAME_KIND = ("cpu", "cpu_simd", "cpu_capability", "threads", "torch")
# Instructions of 16-bit and tile (AMX) arithmetic only, which the demo's float32 kernels do not use:
# a Xeon that has them beside the kept one's instructions made the kept table to the last digit
# (2026-12-07, two runs: this test's and scripts/demo.sh's, with avx512_bf16, avx512_fp16, amx_tile)
NOT_FLOAT32 = {"avx512_bf16", "avx512_fp16", "amx_tile"}


def kind(env: dict) -> dict:
    """The SAME_KIND fields of a pipeline.json's environment, its instructions less NOT_FLOAT32."""
    simd = [f for f in env.get("cpu_simd") or [] if f not in NOT_FLOAT32]
    return {k: simd if k == "cpu_simd" else env.get(k) for k in SAME_KIND}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    recipe = ROOT / "configs" / "pipeline" / "demo.yaml"
    done = subprocess.run([sys.executable, "-m", "modernlm", "pipeline", "-c", str(recipe), f"out_dir={out}"],
                          capture_output=True, text=True, timeout=3000)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_every_claimed_effect_points_the_right_way(demo):
    results = json.loads((demo / "eval" / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    pretrain, sft, dpo, rl = rows["pretrain"], rows["sft"], rows["dpo"], rows["rl"]
    acc, compare = "answer_accuracy", "answer_accuracy/compare"
    assert sft[acc] > pretrain[acc], (sft, pretrain)
    assert dpo["pair_accuracy"] > sft["pair_accuracy"], (dpo, sft)
    assert rl[acc] > sft[acc] and rl[compare] > sft[compare], (rl, sft)  # RL starts from SFT in the demo
    assert rl[f"{acc}/chain2"] == sft[f"{acc}/chain2"], (rl, sft)  # all of RL's gain is on compare
    verifier = json.loads((demo / "verifier" / "eval.json").read_text())
    assert verifier["greedy_accuracy"] == sft[acc]  # the same model, the same problems
    assert verifier["best_of_n_accuracy"] > verifier["greedy_accuracy"], verifier
    assert verifier["weighted_vote_accuracy"] > verifier["greedy_accuracy"], verifier
    for row in (sft, dpo, rl):  # every kind is reported, with its count
        kinds = {"chain2", "compare"}  # the demo's problems are two-step
        assert {k.split("/")[1] for k in row if k.startswith("answer_count/")} >= kinds, row


def test_the_table_is_the_kept_one_on_its_kind_of_cpu(demo):
    here = kind(json.loads((demo / "pipeline.json").read_text())["environment"])
    kept_env = kind(json.loads((KEPT.parent / "pipeline.json").read_text())["environment"])
    differs = {k: (kept_env[k], here[k]) for k in SAME_KIND if kept_env[k] != here[k]}
    if differs:
        pytest.skip(f"the kept table comes from another kind of CPU (kept, here): {differs}")
    rows = json.loads((demo / "eval" / "results.json").read_text())["rows"]
    assert rows == json.loads(KEPT.read_text())["rows"]  # the README's table, to the last digit
    verifier = json.loads((demo / "verifier" / "eval.json").read_text())
    kept = json.loads((KEPT.parent / "verifier-eval.json").read_text())
    scores = [k for k in kept if k.endswith("accuracy") or k in ("pass_at_n", "val_loss")]  # not times, paths
    assert {k: verifier[k] for k in scores} == {k: kept[k] for k in scores}

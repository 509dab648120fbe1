"""The pipeline's evaluation lists lm-evaluation-harness tasks: each model's row gets a column per
task and metric, equal to what `modernlm eval tasks` measures; a wrong task name fails before any
stage runs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from modernlm.cli import run_command  # noqa: E402
from modernlm.pipeline.table import PipelineEvalSettings, evaluate_model  # noqa: E402
from tests.serve_util import chat_checkpoint  # noqa: E402


def test_eval_rows_carry_harness_columns_equal_to_eval_tasks(tmp_path, shared_data, capsys):
    ckpt = chat_checkpoint(tmp_path / "ckpt", chat=False)
    cfg = PipelineEvalSettings(device="cpu", harness_tasks=["sst2_local"], harness_limit=6,
                               harness_data_dir=str(shared_data))
    row = evaluate_model("pretrain", ckpt, chat=False, cfg=cfg)
    out = tmp_path / "r.json"
    args = [str(ckpt), "tasks=sst2_local", "limit=6", f"data_dir={shared_data}", "--out", str(out)]
    assert run_command("eval tasks", args) == 0
    capsys.readouterr()
    assert row["sst2_local acc"] == json.loads(out.read_text())["results"]["sst2_local"]["acc,none"]


def test_a_wrong_harness_task_fails_before_the_pipeline_runs(tmp_path, shared_data, capsys):
    args = ["-c", "demo", "eval.harness_tasks=[sst2_locl]", f"out_dir={tmp_path / 'run'}",
            f"eval.harness_data_dir={shared_data}"]
    assert run_command("pipeline", args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sst2_locl" in err and "sst2_local" in err
    assert not (tmp_path / "run").exists()

"""The pipeline end to end at a small size: every stage's artefacts, the headline table, skipping on
a rerun, --only, and the report's overwrite protection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modernlm.cli import main

RECIPE = Path(__file__).with_name("pipeline-smoke.yaml")
pytestmark = pytest.mark.slow


def _run(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def test_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _run("pipeline", "-c", str(RECIPE), f"out_dir={out}") == 0
    summary = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done"] * 12
    for stage in ("pretrain", "sft", "dpo", "verifier"):
        for name in ("config.yaml", "metrics.jsonl", "summary.json"):
            assert (out / stage / name).is_file(), (stage, name)
    assert (out / "sft" / "eval.json").is_file() and (out / "dpo" / "eval.json").is_file()
    results = json.loads((out / "eval" / "results.json").read_text())
    models = [r["model"] for r in results["rows"]]
    assert models[:4] == ["pretrain", "sft", "dpo", "rl"] and any("best of" in m for m in models)
    assert all(r["params"] > 0 and r["val_ppl"] > 1 for r in results["rows"][:4])
    assert (out / "rl" / "eval.json").is_file()
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert vals[-1] < vals[0] - 1.0  # pretraining learned
    report = (out / "report.md").read_text()
    assert "pretrain" in report and "sft + verifier, best of" in report
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 1
    assert "| pretrain |" in (out / "samples" / "samples.md").read_text()

    # A rerun skips every stage; the report is left alone.
    before = (out / "report.md").stat().st_mtime_ns
    capsys.readouterr()
    assert _run("pipeline", "-c", str(RECIPE), f"out_dir={out}") == 0
    assert capsys.readouterr().out.count("skipped") == 12
    assert (out / "report.md").stat().st_mtime_ns == before

    # So does a copy of the pipeline directory, run with out_dir pointing at it.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert _run("pipeline", "-c", str(RECIPE), f"out_dir={copy}") == 0
    assert capsys.readouterr().out.count("skipped") == 12

    # --only re-runs one stage.
    assert _run("pipeline", "-c", str(RECIPE), f"out_dir={out}", "--only", "samples") == 0
    assert "samples (selected)" in capsys.readouterr().out

    # `modernlm report` never overwrites a report without --force.
    assert _run("report", str(out)) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.md").stat().st_mtime_ns == before
    assert _run("report", str(out), "--force") == 0
    assert (out / "report.md").stat().st_mtime_ns != before

"""`modernlm report`: the headline table and every section come from the run directories (a pipeline,
one run, a directory of runs), the HTML page is self-contained and escaped, missing files are
sections left out, and an existing report is never replaced without --force."""

from __future__ import annotations

import json
import math
import re

import pytest

from modernlm.cli import run_command
from modernlm.pipeline.report import collect, flatten, fmt, headline, stage_timings, write_report

pytest.importorskip("matplotlib")

EVIL = "<script>alert('x')</script>"


def write_training_run(d, losses: dict[int, float], vals: dict[int, float], params: int, extra: dict | None = None):
    """A run dir as the trainer writes it: config.yaml, metrics.jsonl, summary.json."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"model:\n  n_layer: 2\nrun:\n  name: {d.name}\n")
    lines = []
    for step in sorted(set(losses) | set(vals)):
        if step in losses:
            lines.append({"step": step, "loss": losses[step], "lr": 1e-3, "tokens": 512 * step, **(extra or {})})
        if step in vals:
            lines.append({"step": step, "val_loss": vals[step], "val_ppl": math.exp(vals[step])})
    killed = '{"step": 9, "lo'  # a half-written last line
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + killed)
    summary = {
        "params": params,
        "steps": max(losses),
        "tokens_seen": 512 * max(losses),
        "wall_time_s": 12.5,
        "final_loss": losses[max(losses)],
        "final_val_loss": vals[max(vals)],
        "best_val_loss": min(vals.values()),
    }
    (d / "summary.json").write_text(json.dumps(summary))


RESULTS = {
    "columns": ["model", "params", "val_ppl", "answer_accuracy"],
    "rows": [
        {"model": "pretrain", "params": 1234567, "val_ppl": 12.3456, "answer_accuracy": 0.05},
        {"model": "dpo", "params": 1234567, "val_ppl": 14.5, "answer_accuracy": 0.625},
    ],
    "notes": "accuracy on 40 held-out questions",
}


@pytest.fixture
def pipeline(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    stages = [
        {"name": "tokenizer", "run_dir": "tok", "status": "done", "wall_s": 2.0},
        {"name": "pretrain", "run_dir": "pretrain", "status": "done", "wall_s": 30.0},
        {"name": "dpo", "run_dir": "dpo", "status": "done", "wall_s": 6.0},
        {"name": "eval", "run_dir": "eval", "status": "done", "wall_s": 2.0},
        {"name": "samples", "run_dir": "samples", "status": "pending"},  # never ran: no directory
    ]
    env = {"python": "3.11.9", "torch": "2.13.0", "device": "cpu", "cpu_count": 2, "git_commit": "abc123"}
    pipe = {"recipe": "demo", "started": "2025-01-01T10:00:00", "finished": "2025-01-01T10:00:40", "environment": env}
    (root / "pipeline.json").write_text(json.dumps({**pipe, "stages": stages}))
    (root / "pipeline.yaml").write_text("recipe: demo\nstages: [tokenizer, pretrain, dpo, eval, samples]\n")
    (root / "tok").mkdir()
    (root / "tok" / "stage.json").write_text(json.dumps({"vocab_size": 4096, "files": {"corpus": "wiki.txt"}}))
    write_training_run(root / "pretrain", {1: 4.0, 2: 3.5, 4: 3.0}, {0: 4.2, 4: 3.1}, params=1234567)
    entries = [f"**Once upon**{EVIL} a time", "**Once upon** a ``` fence", "third", "fourth"]
    (root / "pretrain" / "samples.md").write_text(
        "".join(f"## step {2 * i}\n\n{e}\n\n" for i, e in enumerate(entries, 1))
    )
    dpo_metrics = {"rewards/chosen": 0.5, "rewards/rejected": -0.25, "rewards/margins": 0.75}
    write_training_run(root / "dpo", {1: 0.69, 3: 0.41}, {3: 0.5}, params=1234567, extra=dpo_metrics)
    (root / "dpo" / "config.yaml").unlink()  # an optional file missing
    (root / "dpo" / "eval.json").write_text(json.dumps({"before": {"accuracy": 0.1}, "after": {"accuracy": 0.6}}))
    (root / "eval").mkdir()
    (root / "eval" / "results.json").write_text(json.dumps(RESULTS))
    (root / "eval" / "eval.json").write_text(json.dumps({"greedy_accuracy": 0.5, "best_of_n_accuracy": 0.75}))
    (root / "eval" / "eval").mkdir()
    (root / "eval" / "eval" / "predictions.jsonl").write_text(json.dumps({"prompt": "2+2?", "prediction": "4"}) + "\n")
    return root


def read(root):
    return (root / "report.md").read_text(), (root / "report.html").read_text()


def test_pipeline_report_has_every_section(pipeline, capsys):
    assert run_command("report", [str(pipeline)]) == 0
    md, page = read(pipeline)
    # the headline table is results.json, formatted, in both outputs
    assert "| model | params | val_ppl | answer_accuracy |" in md
    assert "| pretrain | 1.23M | 12.35 | 0.05 |" in md
    assert "| dpo | 1.23M | 14.50 | 0.625 |" in md
    assert "<tr><td>pretrain</td><td>1.23M</td><td>12.35</td><td>0.05</td></tr>" in page
    assert "accuracy on 40 held-out questions" in md and "accuracy on 40 held-out questions" in page
    # environment recorded by the pipeline, the recipe, stages in pipeline.json order
    assert "| git_commit | abc123 |" in md and "Not recorded" not in md
    assert "stages: [tokenizer, pretrain, dpo, eval, samples]" in md
    headings = re.findall(r"^## (\d+\. .*)$", md, flags=re.M)
    assert headings == [f"{i}. {s} (done)" for i, s in enumerate(["tokenizer", "pretrain", "dpo", "eval"], 1)] + [
        "5. samples (pending)"
    ]
    # task metrics flattened with "/", stage.json, last logged DPO metrics
    assert "| before/accuracy | 0.1 |" in md and "| after/accuracy | 0.6 |" in md
    assert "| best_of_n_accuracy | 0.75 |" in md and "| files/corpus | wiki.txt |" in md
    assert "| rewards/margins | 0.75 |" in md
    # summaries formatted: params 1.23M, losses 4 decimals, times in s
    assert "| final_val_loss | 3.1000 |" in md and "| wall_time_s | 12.5 s |" in md
    # samples: the first 3 of 4 entries of samples.md; eval's predictions.jsonl
    assert "From samples.md (first 3 of 4)." in md and "third" in md and "fourth" not in md
    assert "prediction: 4" in md
    assert "````\n## step 4\n\n**Once upon** a ``` fence\n````" in md  # a fence longer than any backtick run inside
    assert "Directory: samples (missing)." in md
    # one loss curve per training stage, linked relatively and written as files
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["report_assets/02-pretrain-loss.png", "report_assets/03-dpo-loss.png"]
    for link in links:
        assert (pipeline / link).read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out.split() == [str(pipeline / "report.md"), str(pipeline / "report.html")]


def test_html_is_self_contained_and_escaped(pipeline):
    write_report(pipeline)
    _, page = read(pipeline)
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "report_assets" not in page and 'src="http' not in page and "<link" not in page
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<style>" in page
    assert page.count("<details>") == 2  # pipeline.yaml and pretrain's config.yaml (dpo has none)
    assert "<summary>config.yaml</summary>\n<pre><code>model:\n  n_layer: 2" in page


def test_timings_shares_add_up(pipeline):
    data = collect(pipeline)
    timings = stage_timings(data.runs)
    assert [(n, st, w) for n, st, w, _ in timings] == [
        ("tokenizer", "done", 2.0),
        ("pretrain", "done", 30.0),
        ("dpo", "done", 6.0),
        ("eval", "done", 2.0),
        ("samples", "pending", None),
    ]
    shares = [sh for *_, sh in timings]
    assert shares[-1] is None and sum(shares[:-1]) == pytest.approx(1.0)
    assert shares[1] == pytest.approx(0.75)
    md = write_report(pipeline)[0].read_text()
    assert "| pretrain | done | 30.0 s | 75.0% |" in md and "| total |  | 40.0 s | 100.0% |" in md


def test_without_results_json_one_row_per_training_stage(pipeline):
    (pipeline / "eval" / "results.json").unlink()
    stages = json.loads((pipeline / "pipeline.json").read_text())["stages"]
    (pipeline / "pipeline.json").write_text(json.dumps({"stages": stages}))  # no environment either
    header, rows = headline(collect(pipeline))
    assert header[:3] == ["model", "params", "steps"]
    assert [r[0] for r in rows] == ["pretrain", "dpo"]  # stages with a summary.json only
    assert rows[0] == ["pretrain", "1.23M", "4", "2.05k", "3.0000", "3.1000", f"{math.exp(3.1):.2f}", "12.5 s"]
    md, page = [p.read_text() for p in write_report(pipeline)[:2]]
    assert "Not recorded by the runs" in md and "Not recorded by the runs" in page  # current environment


def test_single_run_and_dir_of_runs(tmp_path):
    runs = tmp_path / "runs"
    write_training_run(runs / "b-small", {1: 5.0, 2: 4.0}, {2: 4.5}, params=950)
    write_training_run(runs / "a-big", {1: 4.0, 2: 3.0}, {2: 3.5}, params=25_300_000)
    (runs / "a-big" / "summary.json").write_text("{not json")  # unreadable: skipped, said so
    (runs / "notes").mkdir()  # not a run
    (runs / "notes" / "todo.txt").write_text("x")

    md = write_report(runs / "b-small")[0].read_text()
    assert md.startswith("# Run report: b-small\n")
    assert "| b-small | 950 | 2 | 1.02k | 4.0000 | 4.5000 | 90.02 | 12.5 s |" in md
    assert "## Timings" not in md

    data = collect(runs)
    assert data.kind == "runs" and [r.name for r in data.runs] == ["a-big", "b-small"]
    md, page = [p.read_text() for p in write_report(runs, out=tmp_path / "reports")[:2]]
    assert (tmp_path / "reports" / "report_assets" / "01-a-big-loss.png").is_file()
    assert "| a-big | n/a | n/a | n/a | n/a | n/a | 33.12 | n/a |" in md  # val ppl still from metrics.jsonl
    assert "Skipped summary.json: unreadable" in md and "notes" not in md
    assert "<td>b-small</td><td>950</td>" in page
    assert not (runs / "report.md").exists()


def test_overwrite_needs_force(pipeline, capsys):
    assert run_command("report", [str(pipeline)]) == 0
    (pipeline / "report.md").write_text("my edits")
    assert run_command("report", [str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert f"{pipeline / 'report.md'} already exists; pass --force" in err and "Traceback" not in err
    assert (pipeline / "report.md").read_text() == "my edits"
    (pipeline / "report.md").unlink()  # report.html alone also blocks
    assert run_command("report", [str(pipeline)]) == 2
    assert "report.html already exists" in capsys.readouterr().err
    assert not (pipeline / "report.md").exists()
    (pipeline / "report_assets" / "99-old-loss.png").write_bytes(b"old")
    assert run_command("report", [str(pipeline), "--force"]) == 0
    assert read(pipeline)[0].startswith("# Pipeline report: demo")
    assert not (pipeline / "report_assets" / "99-old-loss.png").exists()  # stale images go too
    assert run_command("report", ["force=true", str(pipeline)]) == 0
    assert not list(pipeline.glob(".*.tmp"))


def test_missing_or_empty_directory_is_a_user_error(tmp_path, capsys):
    assert run_command("report", [str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert run_command("report", [str(tmp_path)]) == 2
    assert "no run here" in capsys.readouterr().err
    (tmp_path / "pipeline.json").write_text(json.dumps({"recipe": "x"}))
    assert run_command("report", [str(tmp_path)]) == 2
    assert "no 'stages' list" in capsys.readouterr().err


def test_formatting_and_flatten():
    assert [fmt("params", 1234567), fmt("tokens_seen", 2_500_000_000), fmt("params", 950)] == ["1.23M", "2.5B", "950"]
    assert [fmt("val_loss", 3.14159), fmt("val_ppl", 23.1), fmt("wall_s", 3)] == ["3.1416", "23.10", "3.0 s"]
    assert [fmt("tok_per_s", 41200.0), fmt("lr", 3e-4), fmt("x", 1 / 3)] == ["41.2k/s", "3.00e-04", "0.3333"]
    assert [fmt("x", None), fmt("x", True), fmt("x", "nan"), fmt("x", [1])] == ["n/a", "true", "nan", "[1]"]
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": 2}) == [("a/b/c", 1), ("a/d", [1, 2]), ("e", 2)]
    assert flatten(0.5) == [("value", 0.5)]

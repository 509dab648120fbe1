"""`modernlm report`: the headline table and every section come from the run directories (a pipeline,
one run, a directory of runs), the HTML page is self-contained and escaped, missing files are
sections left out, and an existing report is never replaced without --force."""

from __future__ import annotations

import json
import math
import re

import pytest

from modernlm.cli import run_command
from modernlm.pipeline.report import collect, flatten, fmt, headline, kind_table, stage_timings, write_report

pytest.importorskip("matplotlib")

from modernlm.pipeline.plotting import accuracy_figure, accuracy_kinds, metric_figure  # noqa: E402

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
    # the accuracy figure, then one loss curve per training stage, linked relatively and written as files
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == [
        "report_assets/00-accuracy.png",
        "report_assets/02-pretrain-loss.png",
        "report_assets/03-dpo-loss.png",
    ]
    for link in links:
        assert (pipeline / link).read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out.split() == [str(pipeline / "report.md"), str(pipeline / "report.html")]


def test_html_is_self_contained_and_escaped(pipeline):
    write_report(pipeline)
    _, page = read(pipeline)
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)  # accuracy + 2 losses
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
    # DPO logs no val_ppl (its loss is no token NLL): no perplexity made up from its val loss
    metrics = pipeline / "dpo" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()[:-1]]  # (the last: half a line)
    metrics.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "val_ppl"}) + "\n" for r in records))
    assert headline(collect(pipeline))[1][1][6] == "n/a"
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


def test_results_json_without_rows_leaves_the_table_to_the_runs(tmp_path):
    # `modernlm experiment sinks`' directory: its two runs and a results.json of its own numbers, no "rows"
    root = tmp_path / "sinks"
    write_training_run(root / "sink", {1: 5.0, 2: 4.0}, {2: 4.5}, params=950)
    write_training_run(root / "nosink", {1: 5.0, 2: 4.2}, {2: 4.6}, params=900)
    (root / "results.json").write_text(json.dumps({"context": 16, "arms": {"sink": {"ppl": [9.0]}}}))
    header, rows = headline(collect(root))
    assert header[0] == "model" and [r[0] for r in rows] == ["nosink", "sink"]
    md = write_report(root)[0].read_text()
    assert "| sink | 950 | 2 | 1.02k | 4.0000 | 4.5000 | 90.02 | 12.5 s |" in md and "n/a: no" not in md
    assert "val ppl is the last validation perplexity" in md  # the note of the runs' table


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


# ---- the accuracy figure, per-kind accuracies, an RL stage ----------------------------------------

KIND_ROWS = [
    {"model": "pretrain", "params": 1234567, "val_ppl": 12.3, "answer_accuracy": 0.1,
     "answer_accuracy/chain1": 0.2, "answer_accuracy/compare": 0.0},
    {"model": "sft", "params": 1234567, "answer_accuracy": 0.5, "answer_accuracy/compare": 0.25,
     "answer_accuracy/together": 0.6, "answer_accuracy/chain1": 0.75},
    {"model": "rl", "params": 1234567, "answer_accuracy": 0.7, "answer_accuracy/compare": 0.65,
     "answer_accuracy/together": 0.7, "answer_accuracy/chain1": 0.8},
    {"model": "sft, majority vote of 8", "answer_accuracy": 0.55},
    {"model": "sft, pass@8 (oracle)", "answer_accuracy": 0.9, "answer_accuracy/compare": 0.5},
]  # fmt: skip


@pytest.fixture
def rl_pipeline(pipeline):
    """The pipeline with per-kind accuracies in results.json and an rl stage after dpo."""
    results = {"columns": ["model", "params", "val_ppl", "answer_accuracy", "answer_accuracy/chain1"],
               "rows": KIND_ROWS, "notes": "per kind too"}  # fmt: skip
    (pipeline / "eval" / "results.json").write_text(json.dumps(results))
    pipe = json.loads((pipeline / "pipeline.json").read_text())
    pipe["stages"].insert(3, {"name": "rl", "run_dir": "rl", "status": "done", "wall_s": 9.0})
    (pipeline / "pipeline.json").write_text(json.dumps(pipe))
    rl = pipeline / "rl"
    rl.mkdir()
    (rl / "config.yaml").write_text("rl:\n  group_size: 8\n")
    lines = [
        {"step": 0, "val_loss": 0.9, "val_accuracy": 0.5},
        {"step": 1, "loss": 0.01, "lr": 1e-5, "reward": 0.4, "reward_std": 0.3, "frac_reward_zero_std": 0.5,
         "kl": 0.0, "clip_ratio/region_mean": 0.0, "completions/mean_length": 41.0, "entropy": 1.2},
        {"step": 2, "loss": -0.02, "lr": 1e-5, "reward": 0.55, "reward_std": 0.25, "frac_reward_zero_std": 0.375,
         "kl": 0.01, "clip_ratio/region_mean": 0.02, "completions/mean_length": 38.5, "entropy": 1.1},
        {"step": 2, "val_loss": 0.8, "val_accuracy": 0.625},
    ]  # fmt: skip
    (rl / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (rl / "summary.json").write_text(json.dumps({"params": 1234567, "steps": 2, "final_loss": -0.02}))
    (rl / "eval.json").write_text(json.dumps({"before": {"accuracy": 0.5}, "after": {"accuracy": 0.625}}))
    return pipeline


def test_accuracy_figure_opens_the_results(rl_pipeline):
    md, page = [p.read_text() for p in write_report(rl_pipeline)[:2]]
    image = md.index("![held-out answer accuracy")
    assert "(report_assets/00-accuracy.png)" in md
    assert (rl_pipeline / "report_assets" / "00-accuracy.png").read_bytes().startswith(b"\x89PNG")
    caption = md.index("Share of held-out word problems")
    main = md.index("| model | params | val_ppl | answer_accuracy |\n")  # per-kind columns left out of it
    kinds = md.index("| model | all | chain1 | together | compare |")
    assert (
        md.index("## Results") < image < caption < main < kinds < md.index("per kind too") < md.index("## Environment")
    )
    assert "the kind the SFT demonstrations get wrong" in md
    assert (
        "| pretrain | 0.10 | 0.20 | n/a | 0.00 |" in md and "| sft, pass@8 (oracle) | 0.90 | n/a | n/a | 0.50 |" in md
    )
    assert "majority vote of 8 | 0.55" not in md.split("| model | all |")[1].split("\n\n")[0]  # no kind: no row
    # with the problem counts the rows carry, each accuracy gets its 95% Wilson interval; counts are no column
    results = json.loads((rl_pipeline / "eval" / "results.json").read_text())
    results["rows"][1].update({"answer_count": 200, "answer_count/chain1": 68, "answer_count/compare": 4})
    (rl_pipeline / "eval" / "results.json").write_text(json.dumps(results))
    md = write_report(rl_pipeline, force=True)[0].read_text()
    assert "| sft | 0.50 [0.43, 0.57] | 0.75 [0.64, 0.84] | 0.60 | 0.25 [0.05, 0.70] |" in md
    assert "answer_count" not in md and "95% interval" in md
    # the HTML inlines it, before any table
    assert page.index('<img alt="held-out answer accuracy') < page.index("<table>")
    # with the per-kind keys gone the figure has only "all"; without answer_accuracy there is none
    header, rows = kind_table(collect(rl_pipeline))
    assert (
        header == ["model", "all", "chain1", "together", "compare"]
        and [r[0] for r in rows][-1] == "sft, pass@8 (oracle)"
    )
    (rl_pipeline / "eval" / "results.json").write_text(json.dumps({"rows": [{"model": "pretrain", "val_ppl": 3.0}]}))
    md, page = [p.read_text() for p in write_report(rl_pipeline, force=True)[:2]]
    assert "00-accuracy.png" not in md and "| model | all |" not in md
    assert not (rl_pipeline / "report_assets" / "00-accuracy.png").exists()
    assert page.index("<table>") < page.index("<img")


def test_accuracy_figure_bars_are_the_numbers():
    assert accuracy_figure([]) is None and accuracy_figure([{"model": "pretrain", "val_ppl": 3.0}]) is None
    assert accuracy_figure([{"model": "x", "answer_accuracy": "nan"}]) is None
    keys = ["zeta", "compare", "alpha", "chain1", ""]
    row = {"answer_accuracy/" + k if k else "answer_accuracy": 0.5 for k in keys}
    assert accuracy_kinds([row]) == ["chain1", "compare", "alpha", "zeta"]
    fig = accuracy_figure(KIND_ROWS)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "chain1", "together", "compare"]
    bars = {c.get_label(): c for c in ax.containers}
    assert list(bars) == [r["model"] for r in KIND_ROWS]
    groups = ["answer_accuracy", "answer_accuracy/chain1", "answer_accuracy/together", "answer_accuracy/compare"]
    for row in KIND_ROWS:
        patches = bars[row["model"]].patches
        want = [(g, row[k]) for g, k in enumerate(groups) if k in row]  # a kind not measured: no bar
        assert [round(p.get_x() + p.get_width() / 2) for p in patches] == [g for g, _ in want]
        assert [p.get_height() for p in patches] == pytest.approx([v for _, v in want])
    oracle = bars["sft, pass@8 (oracle)"].patches[0]
    assert oracle.get_hatch() and not bars["sft"].patches[0].get_hatch()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(legend) == sorted(bars) and "sft, pass@8 (oracle)" in legend
    # a pass@N row named without the word still reads "oracle" in the legend
    fig = accuracy_figure([{"model": "sft, pass@4", "answer_accuracy": 0.5}])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sft, pass@4 (oracle)"]


def test_rl_stage_is_reported_with_reward_and_accuracy_curves(rl_pipeline):
    md = write_report(rl_pipeline)[0].read_text()
    section = md.split("## 4. rl (done)")[1].split("\n## ")[0]
    assert "Directory: rl; wall time 9.0 s." in section
    assert "| after/accuracy | 0.625 |" in section and "| final_loss | -0.0200 |" in section
    assert "| frac_reward_zero_std | 0.375 |" in section and "| val_accuracy | 0.625 |" in section
    assert "### Loss curves" in section and "### reward and val_accuracy curves" in section
    assert "(report_assets/04-rl-loss.png)" in section and "(report_assets/04-rl-curves.png)" in section
    assert "group_size: 8" in section
    assert (rl_pipeline / "report_assets" / "04-rl-curves.png").read_bytes().startswith(b"\x89PNG")
    assert "-curves.png" not in md.replace("04-rl-curves.png", "")  # the other stages log no reward/accuracy
    # the curves are the metrics
    records = [json.loads(line) for line in (rl_pipeline / "rl" / "metrics.jsonl").read_text().splitlines()]
    fig = metric_figure(records, {"reward": "mean reward", "val_accuracy": "accuracy", "absent": "x"})
    assert len(fig.axes) == 2
    reward, accuracy = (ax.get_lines()[0] for ax in fig.axes)
    assert list(reward.get_xdata()) == [1, 2] and list(reward.get_ydata()) == [0.4, 0.55]
    assert list(accuracy.get_xdata()) == [0, 2] and list(accuracy.get_ydata()) == [0.5, 0.625]
    assert metric_figure(records, {"absent": "x"}) is None

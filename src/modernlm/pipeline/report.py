"""The report of a pipeline or of run directories: one Markdown file and the same as one HTML page.

    from modernlm.pipeline.report import write_report
    write_report("runs/demo")            # -> runs/demo/report.md, report_assets/*.png, report.html

The report only reads run directories; no training stage imports it. Three layers:
- `collect(root)`: what is on disk, as a `ReportData` (a pipeline dir, one run dir, or a dir of runs);
- `render(data)`: the document as a list of blocks (`Heading`, `Text`, `Table`, `Image`, `Code`),
  every number already formatted, every string still raw;
- `to_markdown(blocks)` / `to_html(blocks)`: the two outputs, each escaping for its own syntax, so
  they can never disagree. The HTML page is self-contained (inline CSS, images as data URIs).

Every file but pipeline.json's stage list is optional: a missing or unreadable file is a missing
section or an "n/a", never a crash. matplotlib is imported only to draw, through plotting.py.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from modernlm.errors import UserError
from modernlm.eval.compare import markdown_table, md_escape, md_fence
from modernlm.eval.metrics import wilson_interval
from modernlm.files import atomic_write
from modernlm.pipeline.runner import PIPELINE_FILE

RESULTS_FILE = "results.json"
MD_FILE, HTML_FILE, ASSETS_DIR = "report.md", "report.html", "report_assets"
# Any of these makes a directory a run (training stages write the first three).
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "eval.json", "stage.json")
# Metrics besides the loss drawn vs step when a run logs them (RL: reward per completion, and the
# accuracy on held-out problems at its evaluations); metric -> axis label.
CURVE_METRICS = {"reward": "mean reward", "val_accuracy": "held-out answer accuracy"}
ACCURACY_IMAGE = "00-accuracy.png"


# ---- what is on disk ------------------------------------------------------------------------


@dataclass
class RunData:
    name: str
    path: Path
    exists: bool = True
    status: str | None = None  # pipeline stages only
    wall_s: float | None = None
    error: str | None = None  # a failed stage's message, when pipeline.json has one
    summary: dict[str, Any] = field(default_factory=dict)
    stage: dict[str, Any] = field(default_factory=dict)  # stage.json of stages without a training loop
    eval: Any = None  # eval.json: task metrics
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: str | None = None  # config.yaml, verbatim
    samples: list[str] = field(default_factory=list)  # samples.md entries, or eval/predictions.jsonl lines
    samples_total: int = 0
    samples_source: str = ""
    results: dict[str, Any] | None = None  # results.json, if this stage wrote the headline table
    problems: list[str] = field(default_factory=list)  # files that were there but unreadable


@dataclass
class ReportData:
    root: Path
    kind: str  # "pipeline", "run" or "runs"
    title: str
    environment: dict[str, Any]
    environment_recorded: bool  # False: the environment of whoever made the report
    runs: list[RunData]
    pipeline: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None  # pipeline.yaml, verbatim
    results: dict[str, Any] | None = None


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name}: unreadable ({e})")
        return None


def _read_text(path: Path, problems: list[str]) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path.name}: unreadable ({e})")
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    # tolerant where tracking.read_metrics is strict: a killed run may leave half a last line
    out = []
    text = _read_text(path, [])
    for line in (text or "").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def samples_entries(text: str) -> list[str]:
    """samples.md split into entries: one per `## ` heading (the trainer's `## step N`)."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("## ") or not entries:
            entries.append([])
        entries[-1].append(line)
    return [e for e in ("\n".join(lines).strip() for lines in entries) if e]


def read_run(path: Path, name: str, max_samples: int = 3) -> RunData:
    run = RunData(name=name, path=path, exists=path.is_dir())
    if not run.exists:
        return run
    p = run.problems
    run.summary = d if isinstance(d := _read_json(path / "summary.json", p), dict) else {}
    run.stage = d if isinstance(d := _read_json(path / "stage.json", p), dict) else {}
    run.eval = _read_json(path / "eval.json", p)
    run.results = d if isinstance(d := _read_json(path / RESULTS_FILE, p), dict) else None
    run.metrics = _read_jsonl(path / "metrics.jsonl")
    run.config = _read_text(path / "config.yaml", p)
    if (text := _read_text(path / "samples.md", p)) is not None:
        entries, run.samples_source = samples_entries(text), "samples.md"
    else:
        lines = _read_jsonl(path / "eval" / "predictions.jsonl")
        entries, run.samples_source = [_key_values(r) for r in lines], "eval/predictions.jsonl"
    run.samples, run.samples_total = entries[:max_samples], len(entries)
    return run


def _key_values(record: dict[str, Any], limit: int = 600) -> str:
    def short(v: Any) -> str:
        s = v if isinstance(v, str) else json.dumps(v)
        return s if len(s) <= limit else s[:limit] + " ..."

    return "\n".join(f"{k}: {short(v)}" for k, v in record.items())


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def current_environment() -> dict[str, Any]:
    """The environment of this process, for runs that recorded none (no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "modernlm"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    env["cpu_count"] = os.cpu_count()
    return env


def collect(root: str | Path, max_samples: int = 3) -> ReportData:
    """Read a pipeline directory, one run directory, or a directory of runs."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"run_dir: no such directory: {root}")
    problems: list[str] = []
    pipeline = _read_json(root / PIPELINE_FILE, problems)
    if problems:
        raise UserError(f"{root / PIPELINE_FILE}: {problems[0]}")
    if pipeline is not None:
        if not isinstance(pipeline, dict) or not isinstance(pipeline.get("stages"), list):
            raise UserError(f"{root / PIPELINE_FILE}: no 'stages' list")
        runs = []
        for i, s in enumerate(pipeline["stages"]):
            s = s if isinstance(s, dict) else {}
            name = str(s.get("name") or f"stage {i + 1}")
            if (root / str(s.get("run_dir") or name)).resolve() == root.resolve():
                continue  # the stage that writes into the pipeline directory itself: this report
            run = read_run(root / str(s.get("run_dir") or name), name, max_samples)
            run.status, run.error = s.get("status"), s.get("error")
            run.wall_s = finite(s.get("wall_s"))
            runs.append(run)
        env = pipeline.get("environment")
        results = _read_json(root / RESULTS_FILE, [])
        if not isinstance(results, dict):  # else the last stage that wrote one (the final eval)
            results = next((r.results for r in reversed(runs) if r.results is not None), None)
        return ReportData(
            root=root,
            kind="pipeline",
            title=f"Pipeline report: {pipeline.get('recipe') or root.resolve().name}",
            environment=env if isinstance(env, dict) else current_environment(),
            environment_recorded=isinstance(env, dict),
            runs=runs,
            pipeline=pipeline,
            recipe=_read_text(root / "pipeline.yaml", []),
            results=results,
        )
    if is_run(root):
        kind, dirs = "run", [root]
    else:
        kind, dirs = "runs", sorted((d for d in root.iterdir() if is_run(d)), key=lambda d: d.name)
    if not dirs:
        raise UserError(f"{root}: no run here (no {PIPELINE_FILE}, no {'/'.join(RUN_FILES)} in it or a subdirectory)")
    runs = [read_run(d, d.resolve().name, max_samples) for d in dirs]
    for run in runs:
        run.wall_s = finite(run.summary.get("wall_time_s"))
    results = runs[0].results if kind == "run" else _read_json(root / RESULTS_FILE, [])
    return ReportData(
        root=root,
        kind=kind,
        title=f"{'Run' if kind == 'run' else 'Runs'} report: {root.resolve().name}",
        environment=current_environment(),
        environment_recorded=False,
        runs=runs,
        results=results if isinstance(results, dict) else None,
    )


# ---- numbers and tables -----------------------------------------------------------------------


def finite(v: Any) -> float | None:
    """`v` as a float when it is a finite number, else None (metrics.jsonl writes nan as the string "nan")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def human(n: float) -> str:
    """1234567 -> 1.23M, 12345 -> 12.3k, 950 -> 950."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def fmt(key: str, v: Any) -> str:
    """A value formatted by what its key says it is: params 1.23M, losses 4 decimals, times in s."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            return str(v)
        k = key.lower().rsplit("/", 1)[-1]
        if "per_s" in k:
            return f"{human(v)}/s"
        if "param" in k or "tokens" in k:
            return human(v)
        if k.endswith("_s") or "time" in k or k in ("wall", "seconds"):
            return f"{v:.1f} s"
        if "loss" in k:
            return f"{v:.4f}"
        if "ppl" in k or "perplexity" in k:
            return f"{v:.2f}"
        if k == "lr":
            return f"{v:.2e}"
        return str(v) if isinstance(v, int) else f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (key, value) rows, keys joined with "/" ({"a": {"b": 1}} -> [("a/b", 1)])."""
    if isinstance(value, dict):
        rows = []
        for k, v in value.items():
            rows += flatten(v, f"{prefix}/{k}" if prefix else str(k))
        return rows
    return [(prefix or "value", value)]


def _result_rows(data: ReportData) -> list[dict[str, Any]]:
    rows = (data.results or {}).get("rows")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _per_kind(column: str) -> bool:
    """Columns left to `kind_table`: per-kind accuracies and the problem counts behind the intervals."""
    return column.startswith(("answer_accuracy/", "answer_count"))


def headline(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """The headline table: results.json's rows where it has any, else one row per run that has a summary.json.

    The per-kind accuracies (answer_accuracy/<kind>) are left to `kind_table`, so the table stays narrow.
    """
    rows = _result_rows(data)
    if rows:  # a results.json without rows (an experiment's own numbers) leaves the table to the runs
        cols = (data.results or {}).get("columns") or list(dict.fromkeys(k for r in rows for k in r))
        cols = [str(c) for c in cols if not _per_kind(str(c))]
        return cols, [[fmt(c, r.get(c)) for c in cols] for r in rows]
    header = ["model", "params", "steps", "tokens", "final loss", "best val loss", "val ppl", "wall time"]
    rows = []
    for run in data.runs:
        s = run.summary
        if not s and data.kind == "pipeline":
            continue  # a stage without a training loop has no row
        # a perplexity only where the trainer logged one (a token NLL): exp of DPO's or GRPO's val
        # loss is no perplexity
        ppl = next((r["val_ppl"] for r in reversed(run.metrics) if finite(r.get("val_ppl")) is not None), None)
        rows.append(
            [
                run.name,
                fmt("params", s.get("params")),
                fmt("steps", s.get("steps")),
                fmt("tokens", s.get("tokens_seen")),
                fmt("loss", s.get("final_loss")),
                fmt("loss", s.get("best_val_loss")),
                fmt("ppl", ppl),
                fmt("wall_time_s", s.get("wall_time_s")),
            ]
        )
    return header, rows


def kind_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """Answer accuracy per kind of problem: model x ("all", then each kind), 2 decimals, the rows that have any kind."""
    from modernlm.pipeline.plotting import accuracy_kinds

    rows = _result_rows(data)
    kinds = accuracy_kinds(rows)
    cols = ["answer_accuracy", *(f"answer_accuracy/{k}" for k in kinds)]
    table = [[str(r.get("model", "n/a")), *(_with_interval(r, c) for c in cols)]
             for r in rows if any(c in r for c in cols[1:])]  # fmt: skip
    return (["model", "all", *kinds], table) if table else ([], [])


def _with_interval(row: dict[str, Any], column: str) -> str:
    """An accuracy with its 95% Wilson interval ("0.75 [0.64, 0.84]") where the row counts its problems."""
    v, n = finite(row.get(column)), row.get(column.replace("answer_accuracy", "answer_count", 1))
    if v is None:
        return "n/a"
    if not isinstance(n, int) or n <= 0:
        return f"{v:.2f}"
    lo, hi = wilson_interval(round(v * n), n)
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def stage_timings(runs: list[RunData]) -> list[tuple[str, str, float | None, float | None]]:
    """(name, status, wall seconds, share of the total) per stage; shares of the known times sum to 1."""
    total = sum(r.wall_s for r in runs if r.wall_s is not None)
    rows = []
    for r in runs:
        share = r.wall_s / total if total and r.wall_s is not None else None
        rows.append((r.name, r.status or ("done" if r.summary else "n/a"), r.wall_s, share))
    return rows


def last_values(records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The last logged value of every numeric metric (e.g. DPO's rewards/margins), in first-seen order."""
    last: dict[str, Any] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and finite(v) is not None:
                last[k] = v
    return list(last.items())


# ---- the document ---------------------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file name under report_assets/
    png: bytes
    alt: str


@dataclass
class Code:
    text: str
    fold: str = ""  # non-empty: in HTML, folded in a <details> with this summary


Block = Heading | Text | Table | Image | Code


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def loss_figure(run: RunData, dpi: int = 100) -> bytes | None:
    """Train loss (solid) and val loss (dashed) vs step as PNG bytes; None when nothing to draw."""
    import importlib.util

    from modernlm.pipeline.plotting import curve_figures, run_series

    series = run_series(run.metrics, run.name)
    if not (series.train_step or series.val_step) or importlib.util.find_spec("matplotlib") is None:
        return None
    return _png(curve_figures([series])["loss_vs_step"], dpi)


def _png(fig: Any, dpi: int) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def accuracy_png(rows: list[dict[str, Any]], dpi: int = 100) -> bytes | None:
    """plotting.accuracy_figure as PNG bytes; None when no row has an answer_accuracy (or no matplotlib)."""
    import importlib.util

    from modernlm.pipeline.plotting import accuracy_bars, accuracy_figure

    if not accuracy_bars(rows)[1] or importlib.util.find_spec("matplotlib") is None:
        return None
    return _png(accuracy_figure(rows), dpi)


def curve_metrics(run: RunData) -> list[str]:
    """The CURVE_METRICS that the run logged."""
    from modernlm.pipeline.plotting import metric_points

    return [k for k in CURVE_METRICS if metric_points(run.metrics, k)[0]]


def curves_figure(run: RunData, dpi: int = 100) -> bytes | None:
    """The CURVE_METRICS the run logged (RL's reward, val_accuracy) vs step as PNG bytes; None when none."""
    import importlib.util

    from modernlm.pipeline.plotting import metric_figure

    if not curve_metrics(run) or importlib.util.find_spec("matplotlib") is None:
        return None
    return _png(metric_figure(run.metrics, CURVE_METRICS, run.name), dpi)


def accuracy_caption(rows: list[dict[str, Any]]) -> str:
    from modernlm.pipeline.plotting import accuracy_kinds

    kinds = accuracy_kinds(rows)
    text = (
        "Share of held-out word problems answered right by each model, greedy unless its name says otherwise "
        "(majority vote, verifier best of N or weighted vote: N samples of the SFT model; pass@N, hatched: "
        "the oracle that counts a problem right when any of the N samples is)"
    )
    if kinds:
        text += ", over all problems and per kind of problem"
        if "compare" in kinds:
            text += ' ("compare": the "more/fewer than" problems, the kind the SFT demonstrations get wrong)'
    return text + "."


def _kv_table(pairs: list[tuple[str, Any]]) -> Table:
    return Table(["key", "value"], [[k, fmt(k, v)] for k, v in pairs])


def render(data: ReportData, now: datetime | None = None) -> list[Block]:
    now = now or datetime.now().astimezone()
    blocks: list[Block] = [Heading(data.title, 1)]
    intro = [f"Generated {now.isoformat(timespec='seconds')} by modernlm report from {data.root}."]
    if data.kind == "pipeline":
        p = data.pipeline
        intro.append(f"Started {p.get('started') or 'n/a'}, finished {p.get('finished') or 'n/a'}.")
    blocks.append(Text(" ".join(intro)))

    # the results first: the accuracy figure, the table, the per-kind table, results.json's notes
    header, rows = headline(data)
    blocks.append(Heading("Results"))
    if png := accuracy_png(_result_rows(data)):
        alt = "held-out answer accuracy per model, overall and per kind of problem"
        blocks += [Image(ACCURACY_IMAGE, png, alt), Text(accuracy_caption(_result_rows(data)))]
    if rows:
        blocks.append(Table(header, rows))
        if not _result_rows(data):  # the rows are the runs'
            blocks.append(Text("val ppl is the last validation perplexity each run logged (exp of a token NLL; "
                               "none for DPO, GRPO or the verifier, whose losses are no token NLL)."))
    else:
        blocks.append(Text("n/a: no rows in results.json and no summary.json."))
    kind_header, kind_rows = kind_table(data)
    if kind_rows:
        blocks += [
            Text("answer_accuracy per kind of problem (the same held-out problems), with its 95% interval "
                 "(Wilson) over the problems of that kind:"),
            Table(kind_header, kind_rows),
        ]
    if data.results is not None and isinstance(data.results.get("notes"), str):
        blocks.append(Text(data.results["notes"]))

    blocks.append(Heading("Environment"))
    if not data.environment_recorded:
        blocks.append(Text("Not recorded by the runs: this is the environment the report was made in."))
    blocks.append(_kv_table(list(data.environment.items())))

    if data.kind != "run":
        blocks.append(Heading("Timings"))
        timings = stage_timings(data.runs)
        table = [[n, st, fmt("wall_s", w), "n/a" if sh is None else f"{100 * sh:.1f}%"] for n, st, w, sh in timings]
        known = [w for _, _, w, _ in timings if w is not None]
        table.append(["total", "", fmt("wall_s", sum(known) if known else None), "100.0%" if known else "n/a"])
        blocks.append(Table(["stage" if data.kind == "pipeline" else "run", "status", "wall time", "share"], table))

    for i, run in enumerate(data.runs, 1):
        blocks += _run_blocks(i, run, data)
    if data.recipe is not None:
        blocks += [Heading("Recipe"), Code(data.recipe, fold="pipeline.yaml (the resolved recipe)")]
    return blocks


def _run_blocks(i: int, run: RunData, data: ReportData) -> list[Block]:
    title = f"{i}. {run.name}" if data.kind != "run" else run.name
    blocks: list[Block] = [Heading(title + (f" ({run.status})" if run.status else ""))]
    inside = run.path != data.root and run.path.is_relative_to(data.root)
    where = run.path.relative_to(data.root) if inside else run.path
    line = f"Directory: {where}" + ("" if run.exists else " (missing)")
    if run.wall_s is not None:
        line += f"; wall time {fmt('wall_s', run.wall_s)}"
    blocks.append(Text(line + "."))
    if run.error:
        blocks.append(Code(str(run.error)))
    for problem in run.problems:
        blocks.append(Text(f"Skipped {problem}."))
    if run.summary:
        blocks += [Heading("Summary", 3), _kv_table(list(run.summary.items()))]
    if run.stage:
        blocks += [Heading("Stage", 3), _kv_table(flatten(run.stage))]
    if run.eval is not None:
        blocks += [Heading("Task metrics", 3), _kv_table(flatten(run.eval))]
    if values := last_values(run.metrics):
        blocks += [Heading("Last logged metrics", 3), _kv_table(values)]
    if png := loss_figure(run):
        image = Image(f"{i:02d}-{_slug(run.name)}-loss.png", png, f"{run.name} loss vs step")
        blocks += [Heading("Loss curves", 3), image]
    if png := curves_figure(run):
        names = " and ".join(curve_metrics(run))
        image = Image(f"{i:02d}-{_slug(run.name)}-curves.png", png, f"{run.name} {names} vs step")
        blocks += [Heading(f"{names} curves", 3), image]
    if run.samples:
        more = f" (first {len(run.samples)} of {run.samples_total})" if run.samples_total > len(run.samples) else ""
        blocks.append(Heading("Samples", 3))
        blocks.append(Text(f"From {run.samples_source}{more}."))
        blocks += [Code(s) for s in run.samples]
    if run.config is not None:
        blocks += [Heading("Config", 3), Code(run.config, fold="config.yaml")]
    return blocks


# ---- the two outputs --------------------------------------------------------------------------


def _md_text(s: str) -> str:
    return html.escape(s, quote=False)  # Markdown passes raw HTML through; entities are shown as text


def to_markdown(blocks: list[Block], assets: str = ASSETS_DIR) -> str:
    """Markdown; images are linked as assets/NAME (the caller writes the files)."""
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {_md_text(b.text)}")
        elif isinstance(b, Text):
            out.append(_md_text(b.text))
        elif isinstance(b, Table):
            out.append(markdown_table(b.header, b.rows).rstrip("\n"))
        elif isinstance(b, Image):
            out.append(f"![{md_escape(b.alt)}]({assets}/{b.name})")
        elif isinstance(b, Code):
            fence = md_fence(b.text)
            code = f"{fence}\n{b.text.rstrip()}\n{fence}"
            out.append(f"{_md_text(b.fold)}:\n\n{code}" if b.fold else code)
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.6rem; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; }
h2 { border-bottom: 1px solid #ddd; margin-top: 2rem; }
"""


def to_html(blocks: list[Block]) -> str:
    """One self-contained page: inline CSS, images as base64 data URIs, every string escaped."""
    e = html.escape
    title = next((b.text for b in blocks if isinstance(b, Heading)), "report")
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>\n" for row in b.rows)
            body.append(f"<table>\n<tr>{head}</tr>\n{rows}</table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<p><img alt="{e(b.alt)}" src="data:image/png;base64,{data}"></p>')
        elif isinstance(b, Code):
            pre = f"<pre><code>{e(b.text.rstrip())}</code></pre>"
            body.append(f"<details><summary>{e(b.fold)}</summary>\n{pre}\n</details>" if b.fold else pre)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path = "", force: bool = False, max_samples: int = 3) -> list[Path]:
    """Write OUT/report.md (+ OUT/report_assets/*.png) and OUT/report.html; OUT defaults to run_dir.

    Refuses to replace an existing report unless `force`. Returns the paths written.
    """
    data = collect(run_dir, max_samples)
    out_dir = Path(out or run_dir)
    md_path, html_path = out_dir / MD_FILE, out_dir / HTML_FILE
    for path in (md_path, html_path):
        if path.exists() and not force:
            raise UserError(f"{path} already exists; pass --force to replace it")
    blocks = render(data)
    images = [b for b in blocks if isinstance(b, Image)]
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = out_dir / ASSETS_DIR
    if assets.is_dir():  # drop images of an earlier report that this one does not have
        for old in assets.glob("*.png"):
            if old.name not in {b.name for b in images}:
                old.unlink()
    written = []
    if images:
        assets.mkdir(exist_ok=True)
        for b in images:
            atomic_write(assets / b.name, b.png)
            written.append(assets / b.name)
    atomic_write(md_path, to_markdown(blocks).encode())
    atomic_write(html_path, to_html(blocks).encode())
    return [md_path, html_path, *written]


__all__ = [
    "accuracy_png",
    "collect",
    "finite",
    "flatten",
    "fmt",
    "headline",
    "kind_table",
    "render",
    "stage_timings",
    "to_html",
    "to_markdown",
    "write_report",
]

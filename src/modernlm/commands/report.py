"""A Markdown report and the same as one self-contained HTML page, of a pipeline or of runs.

    modernlm report runs/demo                  # a pipeline dir -> runs/demo/report.md, report.html
    modernlm report runs/pretrain-tiny         # one run directory
    modernlm report runs --out reports/all     # every run directory under runs/, by name
    modernlm report runs/demo --force          # replace an existing report

Environment, configs, the headline table (results.json, else one row per run's summary.json),
stage timings, and per stage its summary, task metrics (eval.json), loss curves, samples and
config. Only reads the run directories; images go to report_assets/ for the Markdown file and are
embedded in the HTML page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

POSITIONALS = ["run_dir"]
FLAGS = {"--out": "out", "--force": "force"}
OUTPUTS = {"out": "dir"}


@dataclass
class Config:
    run_dir: str = ""  # a pipeline directory (pipeline.json), one run directory, or a directory of runs
    out: str = ""  # directory for report.md, report.html and report_assets/; "" = run_dir
    force: bool = False  # replace an existing report.md / report.html
    samples: int = 3  # entries of samples.md (or eval/predictions.jsonl) shown per run


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """report.md and report.html in OUT, else in RUN_DIR (a missing RUN_DIR is main's error)."""
    from modernlm.pipeline.report import HTML_FILE, MD_FILE

    if cfg.out:
        setting, out = "out", Path(cfg.out)
    elif cfg.run_dir and Path(cfg.run_dir).is_dir():
        setting, out = "run_dir", Path(cfg.run_dir)
    else:
        return []
    return [(setting, out, "dir"), (setting, out / MD_FILE, "file"), (setting, out / HTML_FILE, "file")]


def main(cfg: Config) -> None:
    from modernlm.errors import UserError
    from modernlm.pipeline.report import write_report

    if not cfg.run_dir:
        raise UserError("run_dir: give a pipeline or run directory (modernlm report RUN_DIR)")
    if cfg.samples < 0:
        raise UserError(f"samples must be >= 0, got {cfg.samples}")
    for path in write_report(cfg.run_dir, cfg.out, force=cfg.force, max_samples=cfg.samples)[:2]:
        print(path)

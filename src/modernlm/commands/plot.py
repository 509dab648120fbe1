"""Loss and perplexity curves of one or more runs (train solid, validation dashed), as PNG files.

    modernlm plot runs/tiny                          # -> runs/tiny/{loss,ppl}_vs_{step,tokens}.png
    modernlm plot runs/a runs/b --out plots/compare  # runs overlaid, labelled by directory name

Reads each run's metrics.jsonl; validation points are placed on the tokens axis by interpolating
the train lines' token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modernlm.errors import UserError

POSITIONALS = ["run_dirs..."]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "dir"}


@dataclass
class Config:
    run_dirs: list[str] = field(default_factory=list)  # run directories holding metrics.jsonl
    out: str = ""  # output directory; "" = the run directory for one run, ./plots for several
    dpi: int = 120  # resolution of the PNG files

    def __post_init__(self) -> None:
        if self.dpi < 1:
            raise UserError(f"dpi must be >= 1, got {self.dpi}")


def derived_outputs(cfg: Config) -> list[tuple[str, str, str]]:
    """The default output directory: the run directory for one run, ./plots for several."""
    if cfg.out or not cfg.run_dirs:
        return []
    if len(cfg.run_dirs) > 1:
        return [("out", "plots", "dir")]
    return [("run_dirs", cfg.run_dirs[0], "dir")] if Path(cfg.run_dirs[0]).is_dir() else []


def main(cfg: Config) -> None:
    from modernlm.pipeline.plotting import plot_runs

    if not cfg.run_dirs:
        raise UserError("run_dirs: give one or more run directories (modernlm plot RUN_DIR ...)")
    for d in cfg.run_dirs:
        if not Path(d).is_dir():
            raise UserError(f"run_dirs: no such directory: {d}")
    out = cfg.out or (cfg.run_dirs[0] if len(cfg.run_dirs) == 1 else "plots")
    for path in plot_runs(cfg.run_dirs, out, dpi=cfg.dpi):
        print(path)

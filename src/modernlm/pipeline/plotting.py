"""Loss and perplexity curves of training runs, drawn from their metrics.jsonl as PNG files.

Three layers, so the data can be tested apart from the drawing:
- `run_series(records)`: the numbers that get plotted (pure: metrics records in, lists out);
- `curve_figures(series)`: matplotlib Figures, several runs overlaid, train solid, validation dashed;
- `plot_runs(run_dirs, out_dir)`: reads the runs and writes the PNGs.

Validation lines carry no token count; their tokens are interpolated from the train lines'
(step, tokens) pairs, which is exact when every step trains on the same number of tokens (pretraining).
matplotlib is imported inside the functions that draw, and only through the object API with the
Agg canvas (no pyplot, no global backend), so plotting never needs a display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modernlm.files import atomic_open

# file stem -> (y quantity, x axis)
FIGURES: dict[str, tuple[str, str]] = {
    "loss_vs_step": ("loss", "step"),
    "loss_vs_tokens": ("loss", "tokens"),
    "ppl_vs_step": ("ppl", "step"),
    "ppl_vs_tokens": ("ppl", "tokens"),
}


@dataclass
class RunSeries:
    label: str
    train_step: list[int] = field(default_factory=list)
    train_tokens: list[float] = field(default_factory=list)  # empty when the run logged no tokens
    train_loss: list[float] = field(default_factory=list)
    train_ppl: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_tokens: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_ppl: list[float] = field(default_factory=list)

    def xy(self, part: str, y: str, x: str) -> tuple[list[float], list[float]]:
        """(x, y) of one line: part "train" or "val", y "loss" or "ppl", x "step" or "tokens"."""
        xs = getattr(self, f"{part}_{x}")
        return (list(xs), list(getattr(self, f"{part}_{y}"))) if xs else ([], [])


def _number(v: Any) -> float | None:
    # non-finite values are logged as strings ("nan"); a skipped step has no point to draw
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def run_series(records: list[dict[str, Any]], label: str = "") -> RunSeries:
    """The curves of one run's metrics records (tracking.read_metrics)."""
    s = RunSeries(label)
    steps_tokens: list[tuple[int, float]] = []
    for r in records:
        step = r.get("step")
        if not isinstance(step, int):
            continue
        tokens = _number(r.get("tokens"))
        if tokens is not None:
            steps_tokens.append((step, tokens))
        loss = _number(r.get("loss"))
        if loss is not None:
            s.train_step.append(step)
            s.train_loss.append(loss)
            s.train_ppl.append(math.exp(min(loss, 700.0)))
            if tokens is not None:
                s.train_tokens.append(tokens)
        val = _number(r.get("val_loss"))
        if val is not None:
            s.val_step.append(step)
            s.val_loss.append(val)
            ppl = _number(r.get("val_ppl"))
            s.val_ppl.append(ppl if ppl is not None else math.exp(min(val, 700.0)))
    if len(s.train_tokens) != len(s.train_step):  # tokens on some lines only: not a usable axis
        s.train_tokens = []
    if s.train_tokens and s.val_step:
        import numpy as np

        known = sorted({(0, 0.0), *steps_tokens})  # step 0 = no tokens yet
        s.val_tokens = [float(t) for t in np.interp(s.val_step, [k for k, _ in known], [t for _, t in known])]
    return s


def curve_figures(series: list[RunSeries]) -> dict[str, Any]:
    """One matplotlib Figure per entry of FIGURES, every run overlaid in its own colour."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        from modernlm.errors import UserError

        raise UserError("plotting needs matplotlib: pip install 'modernlm[eval]'") from None

    figures = {}
    for stem, (y, x) in FIGURES.items():
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, s in enumerate(series):
            color = f"C{i % 10}"
            tx, ty = s.xy("train", y, x)
            if tx:
                ax.plot(tx, ty, color=color, linewidth=1.2, label=f"{s.label} train")
            vx, vy = s.xy("val", y, x)
            if vx:
                ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=3, label=f"{s.label} val")
        ax.set_xlabel("training tokens" if x == "tokens" else "step")
        ax.set_ylabel("perplexity" if y == "ppl" else "loss (nats/token)")
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
        if y == "ppl":
            ax.set_yscale("log")
        ax.set_title(f"{'Perplexity' if y == 'ppl' else 'Loss'} vs {'tokens' if x == 'tokens' else 'step'}")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        figures[stem] = fig
    return figures


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name; parent/name where two runs share a name."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names, strict=True)]


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, dpi: int = 120) -> list[Path]:
    """Write out_dir/{loss,ppl}_vs_{step,tokens}.png for the runs; returns the paths written."""
    from modernlm.errors import UserError
    from modernlm.train.tracking import METRICS_FILE, read_metrics

    dirs = [Path(d) for d in run_dirs]
    series = []
    for d, label in zip(dirs, run_labels(dirs), strict=True):
        if not (d / METRICS_FILE).is_file():
            raise UserError(f"{d}: no {METRICS_FILE} (not a training run directory)")
        series.append(run_series(read_metrics(d), label))
    if not any(s.train_step or s.val_step for s in series):
        raise UserError("no loss values in the runs' metrics.jsonl: nothing to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in curve_figures(series).items():
        path = out / f"{stem}.png"
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        paths.append(path)
    return paths

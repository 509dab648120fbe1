"""Loss and perplexity curves of training runs, drawn from their metrics.jsonl as PNG files.

Three layers, so the data can be tested apart from the drawing:
- `run_series(records)`: the numbers that get plotted (pure: metrics records in, lists out);
- `curve_figures(series)`: matplotlib Figures, several runs overlaid, train solid, validation dashed;
- `plot_runs(run_dirs, out_dir)`: reads the runs and writes the PNGs.

Perplexity is drawn only for runs whose loss is a token NLL, which the trainer marks by logging
`ppl` / `val_ppl` beside it: exp of a DPO, GRPO or verifier loss is no perplexity.
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
    perplexity: bool = False  # the loss is a token NLL (the run logged ppl or val_ppl)

    def xy(self, part: str, y: str, x: str) -> tuple[list[float], list[float]]:
        """(x, y) of one line: part "train" or "val", y "loss" or "ppl", x "step" or "tokens"."""
        xs = getattr(self, f"{part}_{x}")
        if not xs or (y == "ppl" and not self.perplexity):
            return [], []
        return list(xs), list(getattr(self, f"{part}_{y}"))


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
        s.perplexity = s.perplexity or "ppl" in r or "val_ppl" in r
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
    """One matplotlib Figure per entry of FIGURES, every run overlaid in its own colour; the
    perplexity figures only when some run's loss is a token NLL."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        from modernlm.errors import UserError

        raise UserError("plotting needs matplotlib: pip install 'modernlm[eval]'") from None

    figures = {}
    for stem, (y, x) in FIGURES.items():
        if y == "ppl" and not any(s.perplexity for s in series):
            continue
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
    """Write out_dir/{loss,ppl}_vs_{step,tokens}.png for the runs (ppl only where a run's loss is a
    token NLL); returns the paths written."""
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


# ---- the headline picture: answer accuracy per model and kind of problem ---------------------------

ACCURACY = "answer_accuracy"
KIND_ORDER = ("chain1", "chain2", "chain3", "together", "compare")  # the synthetic word problems' kinds


def accuracy_kinds(rows: list[dict[str, Any]]) -> list[str]:
    """The kinds of the rows' `answer_accuracy/<kind>` keys: KIND_ORDER first, then any other alphabetically."""
    found = {k.split("/", 1)[1] for r in rows for k in r if k.startswith(ACCURACY + "/") and k != ACCURACY + "/"}
    return [k for k in KIND_ORDER if k in found] + sorted(found - set(KIND_ORDER))


def is_oracle(model: str) -> bool:
    """pass@N: right when any of N samples is; an upper bound no reranker reaches, not a model."""
    return "oracle" in model or "pass@" in model


def accuracy_bars(rows: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """What the accuracy figure draws (pure): the groups ("all", then each kind) and per row with an
    `answer_accuracy`, in the rows' order, its label and one value per group (None: not measured)."""
    rows = [r for r in rows if isinstance(r, dict) and _number(r.get(ACCURACY)) is not None]
    kinds = accuracy_kinds(rows)
    bars = []
    for r in rows:
        label = str(r.get("model") or "?")
        if is_oracle(label) and "oracle" not in label:
            label += " (oracle)"
        bars.append((label, [_number(r.get(ACCURACY))] + [_number(r.get(f"{ACCURACY}/{k}")) for k in kinds]))
    return ["all", *kinds], bars


def accuracy_figure(rows: list[dict[str, Any]]) -> Any:
    """Grouped bars of held-out answer accuracy: one group per kind of problem (first "all"), one bar per
    results row with an answer_accuracy (the pass@N oracle hatched); None when no row has one."""
    groups, bars = accuracy_bars(rows)
    if not bars:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = min(0.84 / len(bars), 0.16)  # a few bars in one group stay bars, not slabs
    label_size = 7 if len(bars) * len(groups) <= 24 else 6.5
    rotation = 0 if width >= 0.12 else 90  # a label wider than its bar stands up
    for i, (label, values) in enumerate(bars):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        if is_oracle(label):
            style = {"facecolor": "white", "edgecolor": "0.35", "hatch": "////", "linewidth": 0.8}
        else:
            style = {"color": f"C{i % 10}"}
        container = ax.bar(xs, ys, width * 0.92, label=label, **style)
        ax.bar_label(container, fmt="%.2f", fontsize=label_size, rotation=rotation, padding=2)
    ax.set_xticks(range(len(groups)), groups, fontsize=10)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylim(0, 1.12)  # room above a bar at 1.0 for its label
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("answer accuracy")
    if len(groups) > 1:
        ax.set_xlabel("kind of problem")
    ax.set_title("Held-out answer accuracy (greedy unless named)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    # matplotlib fills a legend column by column; reordered so that it reads row by row, in the rows' order
    handles, labels = ax.get_legend_handles_labels()
    ncols = min(4, len(bars))
    nrows = -(-len(bars) // ncols)
    order = [i * ncols + c for c in range(ncols) for i in range(nrows) if i * ncols + c < len(bars)]
    fig.legend([handles[j] for j in order], [labels[j] for j in order], loc="outside lower center",
               ncols=ncols, fontsize=8, frameon=False)  # fmt: skip
    return fig


# ---- curves of other metrics than the loss (RL's reward, held-out accuracy at evals) ---------------


def metric_points(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, lines without a finite value left out."""
    steps, values = [], []
    for r in records:
        step, v = r.get("step"), _number(r.get(key))
        if isinstance(step, int) and v is not None:
            steps.append(step)
            values.append(v)
    return steps, values


def metric_figure(records: list[dict[str, Any]], metrics: dict[str, str], label: str = "") -> Any:
    """One panel per metric (key -> axis label) the records have, vs step; None when they have none."""
    panels = [(key, name, *metric_points(records, key)) for key, name in metrics.items()]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (key, name, xs, ys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        few = len(xs) <= 30  # evaluation points: marked
        ax.plot(xs, ys, color=f"C{i + 1}", linewidth=1.2, marker="o" if few else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{label} {key}".strip(), fontsize=10)
        ax.grid(True, alpha=0.3)
        if "accuracy" in key:
            ax.set_ylim(0, 1)
    return fig


# ---- `modernlm experiment sinks`: perplexity by position past the trained context -----------------


def plot_sinks(results: dict[str, Any], path: str | Path, points: int) -> None:
    """sinks.png from the experiment's results.json: perplexity by position, one line per arm, in
    spans of C / points tokens (log scale), a dashed line at every multiple of the context C."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    C, M = results["context"], results["multiples"]
    size = max(C // points, 1)
    fig = Figure(figsize=(7, 4.8), dpi=120)
    ax = fig.add_subplot()
    for arm in results["arms"].values():
        nll = np.asarray(arm["nll_by_position"], dtype=float)  # column j: the target at position j + 1
        positions = np.arange(1, len(nll) + 1)
        spans = positions // size
        x = [(k + 0.5) * size / C for k in range(spans.max() + 1)]
        y = [float(np.exp(nll[spans == k].mean())) for k in range(spans.max() + 1)]
        ax.plot(x, y, marker=".", label=f"{arm['name']}: {arm['about']}")
    for k in range(1, M):
        ax.axvline(k, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")  # a collapsing arm can be orders of magnitude off
    low, high = ax.get_ylim()
    if high / low < 10:  # within one decade: plain numbers, on the minor ticks too (else 10^k labels)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("position / trained context C")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity past the trained context (C = {C}, window {results['window']})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix[1:] or "png")

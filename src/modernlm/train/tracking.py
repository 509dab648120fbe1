"""MetricsWriter: the single producer of `metrics.jsonl` and `summary.json` in a run directory.

One JSON object per line (`{"step": 120, "loss": 3.21, "lr": 3e-4, ...}`), flushed at once so a
killed run keeps everything it logged. TensorBoard events are written too when `tensorboard` is
installed, behind a null object so call sites never branch. Only rank 0 writes; other ranks get a
writer whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from modernlm.errors import UserError
from modernlm.files import atomic_write, atomic_write_json

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class _NullBoard:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl is the record
        return _NullBoard()
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):  # tensors and numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf; keep the line parseable
    return v


class MetricsWriter:
    """Append metrics to run_dir/metrics.jsonl (rank 0 only), optionally mirrored to TensorBoard.

    `truncate_after=step` drops lines logged after `step` by an earlier, killed attempt, so that a
    resumed run's metrics.jsonl reads as one uninterrupted run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        truncate_after: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.board: Any = _NullBoard()
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if truncate_after is not None and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= truncate_after
            ]
            atomic_write(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a")
        if tensorboard:
            self.board = _tensorboard(self.run_dir)

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        """Write one line {"step": step, **metrics}; returns the plain-typed record."""
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.board.add_scalar(k, v, step)
        return record

    def summary(self, **values: Any) -> None:
        """Write run_dir/summary.json (replaced atomically)."""
        if not self.enabled:
            return
        atomic_write_json(self.run_dir / SUMMARY_FILE, {k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.board.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def format_line(step: int, num_steps: int, record: dict[str, Any]) -> str:
    """The one human log line, fixed format so it greps well:
    `step 120/1000 | loss 3.2140 | lr 3.00e-04 | gnorm 0.91 | 41200 tok/s | mfu 38.1% | peak 9120 MiB`
    (tok/s: input tokens; SFT, DPO, GRPO, the verifier and finetuning add examples per second, `8.0 ex/s`;
    peak: peak_mem_mib, see TrainLog)."""

    def num(key: str, fmt: str) -> str:
        v = record[key]
        return format(v, fmt) if isinstance(v, (int, float)) else str(v)  # "nan" stays readable

    parts = [f"step {step}/{num_steps}"]
    if "loss" in record:
        parts.append(f"loss {num('loss', '.4f')}")
    if "val_loss" in record:
        parts.append(f"val_loss {num('val_loss', '.4f')}")
    if "val_ppl" in record:
        parts.append(f"val_ppl {num('val_ppl', '.2f')}")
    for prefix in ("", "val_"):  # DPO's reward metrics, GRPO's reward and held-out accuracy, short
        for key, short in (("rewards/accuracies", "reward_acc"), ("rewards/margins", "margin"), ("reward", "reward"),
                           ("accuracy", "accuracy")):  # fmt: skip
            if prefix + key in record:
                parts.append(f"{prefix}{short} {num(prefix + key, '.3f')}")
    if "lr" in record:
        parts.append(f"lr {num('lr', '.2e')}")
    if "grad_norm" in record:
        parts.append(f"gnorm {num('grad_norm', '.2f')}")
    if "tok_per_s" in record:
        parts.append(f"{num('tok_per_s', '.0f')} tok/s")
    if "examples_per_s" in record:
        parts.append(f"{num('examples_per_s', '.1f')} ex/s")
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if "peak_mem_mib" in record:
        parts.append(f"peak {num('peak_mem_mib', '.0f')} MiB")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)


def add_section(path: Path, step: int, section: str) -> None:
    """Append `section` ("## step N..." and its text) to a samples file, rewritten atomically (a
    kill never leaves half a section), without what an earlier attempt wrote for a later step or
    under the same heading: after a resume or a rerun the file reads as one run's."""
    heading = section.split("\n", 1)[0]

    def stale(part: str) -> bool:
        m = re.match(r"## step (\d+)", part)
        return m is not None and (int(m[1]) > step or (int(m[1]) == step and part.split("\n", 1)[0] == heading))

    parts: list[str] = []  # the old text, cut before each "## " line
    for line in (path.read_text(encoding="utf-8") if path.is_file() else "").splitlines(keepends=True):
        if line.startswith("## ") or not parts:
            parts.append("")
        parts[-1] += line
    atomic_write(path, "".join(p for p in parts if not stale(p)) + section)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of run_dir/metrics.jsonl, in order. A last line cut short (a run killed while
    writing it; resuming drops it) is skipped; a bad line before it is a UserError naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                break
            raise UserError(f"{path}:{i}: not a JSON record") from None
    return records


__all__ = ["METRICS_FILE", "SUMMARY_FILE", "MetricsWriter", "add_section", "format_line", "read_metrics"]

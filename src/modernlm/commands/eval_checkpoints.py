"""Validation loss and perplexity of every saved checkpoint of a pretraining run, into a CSV.

    modernlm eval checkpoints runs/tiny                      # -> runs/tiny/checkpoint_eval.csv
    modernlm eval checkpoints runs/tiny max_tokens=50000 device=cuda

Reads RUN/config.yaml (data.path, data.seq_len) and scores RUN/checkpoints/step_* (and best/) on
the shards' val split. The default windows are the trainer's validation windows: context =
data.seq_len + 1 tokens (seq_len inputs and their targets), stride = context - 1, so consecutive
windows share one token and every token after the first is scored exactly once; with the whole
split, val_loss equals the trainer's (eval_batches=0) when the split's length minus one is a
multiple of seq_len (the trainer scores whole windows only; this also scores the last, shorter
one). Rows are appended; a checkpoint of the same run already in the CSV with the same data, dtype
and method is skipped, so rerunning after more training scores only the new checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modernlm.commands import check_scoring
from modernlm.errors import UserError

POSITIONALS = ["run_dir"]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "file"}

CSV_FILE = "checkpoint_eval.csv"


@dataclass
class Config:
    run_dir: str = ""  # a pretraining run directory (config.yaml + checkpoints/)
    data: str = ""  # token shard directory; "" = data.path of RUN/config.yaml
    split: str = "val"  # shard split to score
    context: int = 0  # tokens per window; 0 = data.seq_len + 1 (the trainer's validation windows)
    stride: int = 0  # tokens between window starts; 0 = context - 1 (every token scored once)
    max_tokens: int = 0  # score only the first N tokens of the split (0 = all)
    best: bool = True  # also score checkpoints/best (labelled "best", with its step)
    batch_size: int = 8  # windows per forward pass
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "float32"  # float32, bfloat16 or float16 weights
    progress: bool = False  # a progress bar per checkpoint on stderr
    out: str = ""  # CSV to append to; "" = RUN/checkpoint_eval.csv

    def __post_init__(self) -> None:
        check_scoring(self.batch_size, self.max_tokens)


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The default CSV in the run directory (a missing run directory is main's error)."""
    if cfg.out or not cfg.run_dir or not Path(cfg.run_dir).is_dir():
        return []
    return [("run_dir", Path(cfg.run_dir) / CSV_FILE, "file")]


def windows(cfg: Config, seq_len: int) -> tuple[int, int]:
    """(context, stride); by default the trainer's validation windows for data.seq_len."""
    context = cfg.context or seq_len + 1
    stride = cfg.stride or context - 1
    if context < 2 or not 1 <= stride <= context:
        raise UserError(f"need context >= 2 and 1 <= stride <= context; got context={context}, stride={stride}")
    return context, stride


def main(cfg: Config) -> None:
    from modernlm.checkpoint import BEST_INFO_FILE, run_checkpoints, saved_step
    from modernlm.eval.checkpoint_scores import (
        KEY,
        append_row,
        read_rows,
        run_data,
        score_checkpoint,
        split_ids,
        tokens_seen,
    )  # fmt: skip
    from modernlm.train.tracking import read_metrics

    if not cfg.run_dir:
        raise UserError("run_dir: give a run directory (modernlm eval checkpoints RUN_DIR)")
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir: no such directory: {run_dir}")
    data_path, seq_len = run_data(run_dir, cfg.data)
    context, stride = windows(cfg, seq_len)
    checkpoints = run_checkpoints(run_dir, cfg.best)
    if not checkpoints:
        raise UserError(f"{run_dir / 'checkpoints'}: no saved checkpoints")
    steps = {path: saved_step(path) for path in checkpoints}
    for path, step in steps.items():
        if step is None:  # (best/ whose best.json is missing or names no step)
            raise UserError(f"{path / BEST_INFO_FILE}: no step in it (best=false skips {path})")
    ids = split_ids(data_path, cfg.split, cfg.max_tokens)

    csv_path = Path(cfg.out) if cfg.out else run_dir / CSV_FILE
    done = {tuple(row[k] for k in KEY) for row in read_rows(csv_path)}
    records = read_metrics(run_dir)
    scored = 0
    for path, step in steps.items():
        name = path.name
        row: dict[str, Any] = dict(
            run=run_dir.resolve(), checkpoint=name, step=step, data=data_path.resolve(), split=cfg.split,
            context=context, stride=stride, max_tokens=cfg.max_tokens, dtype=cfg.dtype,
        )  # fmt: skip
        if tuple(str(row[k]) for k in KEY) in done:
            print(f"{name} (step {step}): already in {csv_path}, skipped")
            continue
        result = score_checkpoint(
            path, ids, context, stride, split=cfg.split, batch_size=cfg.batch_size, device=cfg.device,
            dtype=cfg.dtype, progress=cfg.progress,
        )  # fmt: skip
        row |= dict(
            tokens_seen=tokens_seen(run_dir, step, path, records) or "",
            val_loss=round(result.loss, 8),
            val_ppl=round(result.perplexity, 6),
            tokens_scored=result.tokens,
        )
        append_row(csv_path, row)  # one row at a time: a killed run keeps its rows
        scored += 1
        print(
            f"{name} (step {step}): val_loss {result.loss:.4f} | val_ppl {result.perplexity:.2f} | "
            f"{result.tokens:,} tokens, context {context}, stride {stride}",
            flush=True,
        )
    print(f"{scored} scored, {len(checkpoints) - scored} already there -> {csv_path}")

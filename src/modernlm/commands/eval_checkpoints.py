"""Validation loss and perplexity of every saved checkpoint of a pretraining run, into a CSV.

    modernlm eval checkpoints runs/tiny                      # -> runs/tiny/checkpoint_eval.csv
    modernlm eval checkpoints runs/tiny max_tokens=50000 device=cuda

Reads RUN/config.yaml (data.path, data.seq_len) and scores RUN/checkpoints/step_* (and best/) on
the shards' val split. The default windows are the trainer's validation windows: context =
data.seq_len + 1 tokens (seq_len inputs and their targets), stride = context - 1, so consecutive
windows share one token and every token after the first is scored exactly once; with the whole
split, val_loss equals the trainer's (eval_batches=0). Rows are appended; a checkpoint already in
the CSV with the same step and method is skipped, so rerunning after more training scores only the
new checkpoints.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POSITIONALS = ["run_dir"]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "file"}

CSV_FILE = "checkpoint_eval.csv"
COLUMNS = [
    "checkpoint", "step", "tokens_seen", "val_loss", "val_ppl", "tokens_scored", "context", "stride",
    "max_tokens", "split",
]  # fmt: skip
KEY = ("checkpoint", "step", "context", "stride", "max_tokens", "split")  # same key = already scored


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


def run_data(run_dir: Path, data: str) -> tuple[Path, int]:
    """(shard directory, seq_len) from RUN/config.yaml; `data` overrides the directory."""
    from modernlm.config import read_config_file
    from modernlm.errors import UserError

    file = run_dir / "config.yaml"
    if not file.is_file():
        raise UserError(f"{run_dir}: no config.yaml (not a run directory written by `modernlm pretrain`)")
    section = read_config_file(file).get("data")
    if not isinstance(section, dict) or "seq_len" not in section or not (data or section.get("path")):
        raise UserError(f"{file}: expected a data section with path and seq_len (a pretraining run)")
    path = Path(data or section["path"])
    if not path.is_dir():
        raise UserError(
            f"data: shard directory {path} not found"
            + ("" if data else f" (data.path of {file}, relative to the cwd); pass data=PATH")
        )
    return path, int(section["seq_len"])


def list_checkpoints(run_dir: Path, best: bool) -> list[tuple[str, int, Path]]:
    """(name, step, directory) of the complete step_* checkpoints in step order, then best."""
    import json

    from modernlm.checkpoint import BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE, WEIGHTS_FILE

    root = run_dir / CHECKPOINTS_DIR
    found = []
    for p in sorted(root.glob("step_*")):
        if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file() and p.name[5:].isdigit():
            found.append((p.name, int(p.name[5:]), p))
    info = root / BEST_DIR / "best.json"
    if best and info.is_file() and (root / BEST_DIR / WEIGHTS_FILE).is_file():
        found.append((BEST_DIR, int(json.loads(info.read_text())["step"]), root / BEST_DIR))
    return found


def tokens_seen(run_dir: Path, step: int, path: Path, records: list[dict[str, Any]]) -> int | None:
    """Training tokens at `step`: the metrics line of that step, else the checkpoint's train_state."""
    for r in records:
        if r.get("step") == step and isinstance(r.get("tokens"), int):
            return r["tokens"]
    from modernlm.checkpoint import load_training_state, step_dir

    for candidate in (path, step_dir(run_dir, step)):
        if (candidate / "train_state.pt").is_file():
            return int(load_training_state(candidate).get("counters", {}).get("tokens_seen", 0)) or None
    return None


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    from modernlm.errors import UserError

    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise UserError(f"{csv_path}: columns {reader.fieldnames} are not {COLUMNS}; move it aside")
        return list(reader)


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The default CSV in the run directory (a missing run directory is main's error)."""
    if cfg.out or not cfg.run_dir or not Path(cfg.run_dir).is_dir():
        return []
    return [("run_dir", Path(cfg.run_dir) / CSV_FILE, "file")]


def main(cfg: Config) -> None:
    import math

    import torch

    from modernlm.api import load
    from modernlm.data.shards import TokenStream
    from modernlm.errors import UserError
    from modernlm.perplexity import sliding_window_nll
    from modernlm.train.tracking import read_metrics

    if not cfg.run_dir:
        raise UserError("run_dir: give a run directory (modernlm eval checkpoints RUN_DIR)")
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir: no such directory: {run_dir}")
    data_path, seq_len = run_data(run_dir, cfg.data)
    context = cfg.context or seq_len + 1
    stride = cfg.stride or context - 1
    if context < 2 or not 1 <= stride <= context:
        raise UserError(f"need context >= 2 and 1 <= stride <= context; got context={context}, stride={stride}")
    checkpoints = list_checkpoints(run_dir, cfg.best)
    if not checkpoints:
        raise UserError(f"{run_dir / 'checkpoints'}: no saved checkpoints")

    stream = TokenStream(data_path, cfg.split)
    n = min(len(stream), cfg.max_tokens) if cfg.max_tokens else len(stream)
    if n < 2:
        raise UserError(f"data: the {cfg.split} split of {data_path} has fewer than 2 tokens")
    ids = torch.from_numpy(stream.read(0, n))

    csv_path = Path(cfg.out) if cfg.out else run_dir / CSV_FILE
    done = {tuple(row[k] for k in KEY) for row in read_rows(csv_path)}
    records = read_metrics(run_dir)
    scored = skipped = 0
    for name, step, path in checkpoints:
        row: dict[str, Any] = dict(
            checkpoint=name, step=step, context=context, stride=stride, max_tokens=cfg.max_tokens, split=cfg.split
        )
        if tuple(str(row[k]) for k in KEY) in done:
            print(f"{name} (step {step}): already in {csv_path}, skipped")
            skipped += 1
            continue
        model = load(path, device=cfg.device, dtype=cfg.dtype, progress=cfg.progress)
        if int(ids.max()) >= model.vocab_size:
            raise UserError(
                f"{path}: the {cfg.split} tokens go up to id {int(ids.max())}, the model has {model.vocab_size}"
            )
        if context - 1 > model.max_context:  # a window feeds context - 1 inputs to the model
            raise UserError(f"context {context}: {path} takes at most {model.max_context} input tokens")
        result = sliding_window_nll(
            model.logits_fn, ids, context, stride, batch_size=cfg.batch_size, device=model.device,
            progress=cfg.progress,
        )  # fmt: skip
        del model
        row |= dict(
            tokens_seen=tokens_seen(run_dir, step, path, records) or "",
            val_loss=round(result.loss, 8),
            val_ppl=round(result.perplexity, 6),
            tokens_scored=result.tokens,
        )
        new_file = not csv_path.is_file()
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "a", newline="") as f:  # one row at a time: a killed run keeps its rows
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        scored += 1
        print(
            f"{name} (step {step}): val_loss {result.loss:.4f} | val_ppl {math.exp(min(result.loss, 700)):.2f} | "
            f"{result.tokens:,} tokens, context {context}, stride {stride}",
            flush=True,
        )
    print(f"{scored} scored, {skipped} already there -> {csv_path}")

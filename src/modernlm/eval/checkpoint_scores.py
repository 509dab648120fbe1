"""Validation loss of a pretraining run's checkpoints, one CSV row each (`modernlm eval checkpoints`).

A row's KEY (run, checkpoint, step, data, split, context, stride, max_tokens, dtype) says which
scoring it holds: a checkpoint already in the CSV under the same key is not scored again, and
another run, other data or another dtype is a new row (run and data are absolute paths). Rows are
appended one at a time, so a killed evaluation keeps the rows it wrote (a row it was cut off in is
dropped before the next is appended).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modernlm.api import load
from modernlm.checkpoint import TRAIN_STATE_FILE, load_training_state, step_dir
from modernlm.config import read_config_file
from modernlm.data.shards import TokenStream
from modernlm.errors import UserError
from modernlm.perplexity import NLLResult, sliding_window_nll

COLUMNS = [
    "run", "checkpoint", "step", "tokens_seen", "val_loss", "val_ppl", "tokens_scored", "data", "split",
    "context", "stride", "max_tokens", "dtype",
]  # fmt: skip
KEY = ("run", "checkpoint", "step", "data", "split", "context", "stride", "max_tokens", "dtype")  # same = scored


def run_data(run_dir: Path, data: str) -> tuple[Path, int]:
    """(shard directory, seq_len) from RUN/config.yaml; `data` overrides the directory."""
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


def split_ids(data_path: Path, split: str, max_tokens: int = 0) -> Tensor:
    """The tokens of a shard split, or its first `max_tokens` (0 = all)."""
    stream = TokenStream(data_path, split)
    n = min(len(stream), max_tokens) if max_tokens else len(stream)
    if n < 2:
        raise UserError(f"data: the {split} split of {data_path} has fewer than 2 tokens")
    return torch.from_numpy(stream.read(0, n))


def tokens_seen(run_dir: Path, step: int, path: Path, records: list[dict[str, Any]]) -> int | None:
    """Training tokens at `step`: the metrics line of that step, else the checkpoint's train_state."""
    for r in records:
        if r.get("step") == step and isinstance(r.get("tokens"), int):
            return r["tokens"]
    for candidate in (path, step_dir(run_dir, step)):
        if (candidate / TRAIN_STATE_FILE).is_file():
            return int(load_training_state(candidate).get("counters", {}).get("tokens_seen", 0)) or None
    return None


def score_checkpoint(
    path: Path, ids: Tensor, context: int, stride: int, *, split: str, batch_size: int, device: str, dtype: str,
    progress: bool = False,
) -> NLLResult:  # fmt: skip
    """The checkpoint's NLL of `ids` (tokens of `split`) in windows of `context` tokens, one every
    `stride` tokens (`perplexity.sliding_window_nll`)."""
    model = load(path, device=device, dtype=dtype, progress=progress)
    if int(ids.max()) >= model.vocab_size:
        raise UserError(f"{path}: the {split} tokens go up to id {int(ids.max())}, the model has {model.vocab_size}")
    if context - 1 > model.max_context:  # a window feeds context - 1 inputs to the model
        raise UserError(f"context {context}: {path} takes at most {model.max_context} input tokens")
    return sliding_window_nll(
        model.logits_fn, ids, context, stride, batch_size=batch_size, device=model.device, progress=progress
    )


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of the CSV so far (none when it does not exist yet). A last row cut off by a kill (no
    newline at its end) is dropped from the file first: appending to it would glue two rows into one."""
    if not csv_path.is_file():
        return []
    data = csv_path.read_bytes()
    if not data.endswith(b"\n"):
        with open(csv_path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        if b"\n" not in data:  # killed inside the header: an empty file, the header comes with the next row
            return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise UserError(f"{csv_path}: columns {reader.fieldnames} are not {COLUMNS}; move it aside")
        return list(reader)


def append_row(csv_path: Path, row: dict[str, Any]) -> None:
    """One row more (the header first, into a new or emptied file)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.is_file() or csv_path.stat().st_size == 0
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow(row)


__all__ = ["COLUMNS", "KEY", "append_row", "read_rows", "run_data", "score_checkpoint", "split_ids", "tokens_seen"]

"""Pretraining batches read from token shards on disk (the format `modernlm prepare` writes).

A shard directory holds `meta.json`, `<split>_NNNNN.bin` arrays of token ids (memmapped, never
loaded whole) and the tokenizer; see `read_meta` for the checks. A split's files are read as one
long token stream in which documents are separated by eos.

Training windows (`TrainWindows`): the stream is cut into non-overlapping windows of seq_len+1
tokens (input = first seq_len, target = the same shifted by one); every epoch visits all windows
once in a fresh random order, with a random start offset so window borders move between epochs.
Each step takes the next `batch_size * world_size` windows of that order and rank r keeps the
r-th slice, so ranks never share a window, and 1 process with batch 2B sees exactly the windows
2 processes with batch B see. The position is two integers (epoch, cursor): `state_dict()` makes
resume exact. Validation windows (`val_batches`) are the first windows of the val split in order,
the same every time, split round-robin across ranks.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modernlm.data.corpus import read_meta  # the shard format is defined where it is written
from modernlm.errors import UserError


@dataclass
class TokenDataConfig:
    path: str = ""  # shard directory written by `modernlm prepare` (meta.json + *.bin + tokenizer)
    seq_len: int = 256  # tokens per training window (targets are the next token of each)

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")


class TokenStream:
    """One split of a shard directory as a single read-only token array (memmapped files)."""

    def __init__(self, path: str | Path, split: str, meta: dict[str, Any] | None = None):
        path = Path(path)
        meta = meta or read_meta(path)
        info = meta["splits"].get(split)
        if not isinstance(info, dict) or not info.get("files"):
            raise UserError(f"{path / 'meta.json'}: no '{split}' split with files")
        self.arrays: list[np.ndarray] = []
        for name in info["files"]:
            file = path / name  # read_meta checked it exists with the right size
            if file.stat().st_size == 0:
                continue  # an empty shard holds no tokens (np.memmap refuses empty files)
            self.arrays.append(
                np.memmap(file, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
            )
        self.offsets = [0]
        for a in self.arrays:
            self.offsets.append(self.offsets[-1] + len(a))
        self.split = split

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int64, crossing file borders when needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        i = bisect.bisect_right(self.offsets, start) - 1
        while filled < length:
            a, lo = self.arrays[i], start + filled - self.offsets[i]
            n = min(length - filled, len(a) - lo)
            out[filled : filled + n] = a[lo : lo + n]
            filled += n
            i += 1
        return out


def _windows(
    stream: TokenStream, starts: list[int] | np.ndarray, seq_len: int
) -> tuple[Tensor, Tensor]:
    rows = np.stack([stream.read(int(s), seq_len + 1) for s in starts])  # (B, T+1)
    rows_t = torch.from_numpy(rows)
    return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()  # inputs, targets (B, T)


class TrainWindows:
    """Endless random training batches (inputs, targets), each (batch_size, seq_len) int64."""

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        n = len(stream)
        if n < seq_len + 1:
            raise UserError(
                f"data: the {stream.split} split has {n} tokens, fewer than one sequence "
                f"(data.seq_len + 1 = {seq_len + 1}); use more text or a smaller data.seq_len"
            )
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_windows = (n - 1) // seq_len
        # slack: how far the window grid can shift and still fit num_windows windows
        self.slack = (n - 1) - self.num_windows * seq_len
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order, self._offset = -1, np.empty(0, dtype=np.int64), 0

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(0, self.slack + 1))
            self._order = rng.permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order, self._offset

    def next_starts(self) -> list[int]:
        """Token offsets of this rank's windows for the next micro-batch; advances the position."""
        starts: list[int] = []
        need = self.batch_size * self.world_size
        while len(starts) < need:
            order, offset = self._epoch_order(self.epoch)
            take = order[self.cursor : self.cursor + need - len(starts)]
            starts.extend(int(offset + w * self.seq_len) for w in take)
            self.cursor += len(take)
            if self.cursor >= self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return _windows(self.stream, self.next_starts(), self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (
            state.get("num_windows", self.num_windows) != self.num_windows
            or state.get("seed", self.seed) != self.seed
        ):
            raise UserError(
                "data: the checkpoint's data position was saved for a different dataset, seq_len or seed; "
                "resume with the same data.path, data.seq_len and run.seed"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class ValBatches:
    """Re-iterable validation batches (inputs, targets) for this rank, identical on every pass.

    The first windows of the split, in order: at most `max_batches * batch_size * world_size` of
    them in total (0 = all), rank r taking every world_size-th. When the split is shorter than one
    window, one shorter window is used, so validation still works on tiny data.
    """

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        max_batches: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.stream = stream
        self.seq_len = min(seq_len, len(stream) - 1)
        total = (len(stream) - 1) // self.seq_len if self.seq_len >= 1 else 0
        if max_batches > 0:
            total = min(total, max_batches * batch_size * world_size)
        mine = list(range(rank, total, world_size))
        # start offsets of this rank's batches
        self.batches = [[w * self.seq_len for w in mine[i : i + batch_size]] for i in range(0, len(mine), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for starts in self.batches:
            yield _windows(self.stream, starts, self.seq_len)


__all__ = [
    "TokenDataConfig",
    "TokenStream",
    "TrainWindows",
    "ValBatches",
    "read_meta",
]

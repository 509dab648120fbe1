"""The engine's compiled decode steps, over a few static shapes: what a GPU replays as CUDA graphs.

A decode step's shapes change as the engine runs: its row count (1 .. max_batch) with every admission
and retirement, the widest block table whenever a sequence enters a new block, and the cache's
Python ints (`end`, `room`) at every step. A CUDA graph replays one fixed shape, and torch.compile's
CUDA graphs (mode "reduce-overhead") record one graph for each distinct set of input shapes *and
int inputs*: fed the plain step, they would record a graph per step. So `StaticSteps` feeds the
compiled model tensors only, of few shapes:

  rows     padded up to a power of two (at most max_batch); a padding row writes its key and value
           to slot 0 of one scratch block and reads nothing else;
  width    each block table padded with its own first block up to a power of two (>= 2); the
           padded slots lie past the row's length, masked as a short table's are already;
  ints     constant: the rows' room is the engine's to check (`_make_room`) and the RoPE tables
           are built for every position the pool can hold, before the first step.

Over a whole run the step then sees at most (log2(max_batch) + 1) x log2(widest table) shapes: one
compile (dynamic shapes: one graph for one row, one for more) and, on a GPU, one CUDA graph recorded
per shape the first times it comes (a step's time each). `warm_up` pays the compile and each row
count's graph before requests come. A padding row changes no real row's numbers: rows do not mix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modernlm.model import PagedCache
from modernlm.runtime import compile_model


def bucket(n: int, cap: int | None = None) -> int:
    """n rounded up to a power of two, at most `cap` (when n <= cap)."""
    up = 1 << max(0, n - 1).bit_length()
    return min(up, cap) if cap is not None and n <= cap else up


class _StepView(PagedCache):
    """The pool of `cache` as one static-shaped decode step sees it: the rows and tables `StaticSteps`
    sets, constant ints, attention through PyTorch's ops (what compiles), no buffer kept across steps
    (a graph's buffers are its own), and nothing written back when the step ends."""

    fused = False
    keeps_scratch = False

    def __init__(self, cache: PagedCache, end: int):
        self.k, self.v = cache.k, cache.v
        self.num_blocks, self.block_size = cache.num_blocks, cache.block_size
        self.room, self.end, self.seen = 1, end, 1  # one token each, positions below end + 1, no sink to add
        self._scratch = None

    def attends_in_place(self, q: Tensor) -> bool:
        return False

    def advance(self, t: int) -> None:
        pass  # the engine selects the next step's rows afresh; ints that changed would recompile


class StaticSteps:
    """Decode steps of `model` over `cache` through torch.compile at a few shapes (see the module
    docstring), with CUDA graphs on a GPU. `scratch` is a block of the pool that no sequence owns:
    padding rows write there. `steps(tokens, tables, lengths)` -> the logits (rows, V) of one decode
    step: row r feeds tokens[r] at position lengths[r], its table holding a slot for it."""

    graph_devices = ("cuda",)  # where steps replay as CUDA graphs (a test adds "cpu": the same calls, no graph)

    def __init__(self, model, cache: PagedCache, scratch: int, max_rows: int):
        self.model, self.cache, self.scratch, self.max_rows = model, cache, scratch, max_rows
        self.device = cache.k[0].device
        positions = cache.num_blocks * cache.block_size  # no row can go past the pool
        model.rope.reserve(positions)
        self.view = _StepView(cache, end=positions - 1)
        self.graphs = self.device.type in self.graph_devices
        # (imports torch._dynamo, which the marks below need)
        self.decode = compile_model(model, dynamic=True, mode="reduce-overhead" if self.graphs else None)
        for buf in (*cache.k, *cache.v):
            # the pool's sizes are fixed: were they symbolic, a size equal to a table's width at
            # warm-up (2 kv heads, 2 blocks) would be taken for the same size, and recompiled later
            torch._dynamo.mark_static(buf)
            if self.graphs:
                # written in place: CUDA graphs take an input that a step changes only at an
                # address that never moves (cudagraph trees would skip the graph otherwise)
                torch._dynamo.mark_static_address(buf)
        cache.clear([scratch])
        self.shapes: set[tuple[int, int]] = set()  # (rows, width) stepped at: one CUDA graph each

    def __call__(self, tokens: list[int], tables: list[list[int]], lengths: list[int]) -> Tensor:
        rows, pad = len(tokens), bucket(len(tokens), self.max_rows) - len(tokens)
        width = bucket(max(2, *(len(t) for t in tables)))
        tables = [t + t[:1] * (width - len(t)) for t in tables] + [[self.scratch] * width] * pad
        view, device = self.view, self.device
        view.table = torch.tensor(tables, device=device)
        view.lengths = torch.tensor(lengths + [0] * pad, device=device)
        view.gather, view.rows = view.gather_index(view.table), rows + pad
        idx = torch.tensor(tokens + [0] * pad, device=device)[:, None]
        self.shapes.add((rows + pad, width))
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read: reuse them
        # a copy: a CUDA graph's output is overwritten by its next replay
        return self.decode(idx, cache=view, last_only=True).logits[:rows, -1].clone()

    def warm_up(self) -> None:
        """A step at each row count (three on a GPU: cudagraph trees record at the third), so that
        the compile and each row count's graph at the narrowest tables come before any request."""
        counts = sorted({bucket(n, self.max_rows) for n in range(1, self.max_rows + 1)})
        for rows in counts:
            for _ in range(3 if self.graphs else 1):
                self([0] * rows, [[self.scratch]] * rows, [0] * rows)

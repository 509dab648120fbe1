"""Compiled decode steps over a few static shapes: what a GPU replays as CUDA graphs.

A decode step's shapes change as decoding runs. In the serve engine its row count (1 .. max_batch)
changes with every admission and retirement, the widest block table whenever a sequence enters a
new block, and the cache's Python ints (`end`, `room`) at every step; in `generate` the cache's
length grows by one every step. A CUDA graph replays one fixed shape, and torch.compile's CUDA
graphs (mode "reduce-overhead") record one graph for each distinct set of input shapes *and int
inputs*: fed the plain step, they would record a graph per step. So the steps here feed the
compiled model tensors only, of few shapes, through `_StepView`, a paged cache whose ints are
constant:

  rows     the engine's (`StaticSteps`) padded up to a power of two (at most max_batch); a padding
           row writes its key and value to slot 0 of one scratch block and reads nothing else.
           generate's (`CacheSteps`) are its batch, the same at every step;
  width    each block table of the engine padded with its own first block up to a power of two
           (>= 2); the padded slots lie past the row's length, masked as a short table's are
           already. generate's plain cache is a pool of one block per row, as long as its capacity;
  ints     constant: a row's room is the caller's to check, and the RoPE tables are built for every
           position the cache can hold, before the first step.

Over a whole engine run the step then sees at most (log2(max_batch) + 1) x log2(widest table)
shapes: one compile (dynamic shapes: one graph for one row, one for more) and, on a GPU, one CUDA
graph recorded per shape the first times it comes (a step's time each). `warm_up` pays the compile
and each row count's graph before requests come. A padding row changes no real row's numbers: rows
do not mix. generate's steps take the same two graphs (and two more for left-padded batches), and
one CUDA graph per batch and capacity: a graph replays at the addresses it recorded, so on a GPU
generate decodes into a cache kept from one call to the next (`CacheSteps.cache_for`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import cached_property

import torch
from torch import Tensor

from modernlm.model import KVCache, PagedCache
from modernlm.runtime import compile_model

graph_devices = ("cuda",)  # where steps replay as CUDA graphs (tests add "cpu": the same calls, no graph)


def graphs_on(device: torch.device) -> bool:
    """Whether compiled steps on `device` replay as CUDA graphs."""
    return device.type in graph_devices


def bucket(n: int, cap: int | None = None) -> int:
    """n rounded up to a power of two, at most `cap` (when n <= cap)."""
    up = 1 << max(0, n - 1).bit_length()
    return min(up, cap) if cap is not None and n <= cap else up


def compiled(model, graphs: bool):
    """`torch.compile(model)` for static-shaped steps: dynamic sizes (one graph serves every row
    count above one, every table width and capacity), replayed as CUDA graphs where `graphs`."""
    return compile_model(model, dynamic=True, mode="reduce-overhead" if graphs else None)


class _StepView(PagedCache):
    """The pool k, v (blocks, K, block_size, D) as one static-shaped decode step sees it: the rows and
    tables the caller sets, constant ints, attention through PyTorch's ops (what compiles), no buffer
    kept across steps (a graph's buffers are its own), and nothing written back when the step ends.
    The sizes are read from the pool, so that they are the graph's sizes, not ints it would be built
    for. `rope`'s tables must already hold every position of the pool (`RotaryEmbedding.reserve`)."""

    fused = False
    keeps_scratch = False

    def __init__(self, k: list[Tensor], v: list[Tensor], rope):
        self.k, self.v = k, v
        # one token each, positions below the tables' length (a constant), no sink to add
        self.room, self.end, self.seen = 1, rope.cos.size(0) - 1, 1
        self._scratch = None

    @property
    def num_blocks(self) -> int:
        return self.k[0].size(0)

    @property
    def block_size(self) -> int:
        return self.k[0].size(2)

    def attends_in_place(self, q: Tensor) -> bool:
        return False

    def advance(self, t: int) -> None:
        pass  # the caller sets the next step's rows afresh; ints that changed would recompile


class StaticSteps:
    """The serve engine's decode steps of `model` over `cache` through torch.compile at a few shapes
    (see the module docstring), with CUDA graphs on a GPU. `scratch` is a block of the pool that no
    sequence owns: padding rows write there. `steps(tokens, tables, lengths)` -> the logits (rows, V)
    of one decode step: row r feeds tokens[r] at position lengths[r], its table holding a slot for it."""

    def __init__(self, model, cache: PagedCache, scratch: int, max_rows: int):
        self.scratch, self.max_rows = scratch, max_rows
        self.device = cache.k[0].device
        model.rope.reserve(cache.num_blocks * cache.block_size)  # no row can go past the pool
        self.view = _StepView(cache.k, cache.v, model.rope)
        self.graphs = graphs_on(self.device)
        self.decode = compiled(model, self.graphs)  # (imports torch._dynamo, which the marks below need)
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


class _RowsView(_StepView):
    """A plain KVCache (B, K, capacity, D) as a pool of one block per row: row b's keys are block b
    as it is, read without a gather; `valid` masks a left-padded row's padding."""

    def __init__(self, cache: KVCache, rope):
        super().__init__(cache.k, cache.v, rope)
        self.rows = cache.k[0].size(0)
        self.table = torch.arange(self.rows, device=cache.k[0].device)[:, None]  # (B, 1): row b's block is b

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.write(layer, k, v)
        return self.k[layer].to(k.dtype), self.v[layer].to(v.dtype)


class CacheSteps:
    """`generate`'s decode steps of `model` through torch.compile, over its plain (not rolling)
    KVCache read as `_RowsView`: a step's inputs are tensors whose sizes are the batch's and the
    capacity's, so one graph serves a single row and another every larger batch, at every length
    and capacity (one more each for left-padded batches). With CUDA graphs (on a GPU) generate takes
    its cache from `cache_for`, kept from one call to the next."""

    def __init__(self, model):
        self.model = model
        self.graphs = graphs_on(model.norm.weight.device)
        self.decode = compiled(model, self.graphs)
        self.kept: KVCache | None = None
        self._holder: weakref.ref | None = None  # the step over the kept cache, while a generation holds it

    def __reduce__(self):
        # kept on the model (generation.compiled_steps): a deep copy or a pickle of the model gets
        # None in their place, and compiles its own steps when it needs them, never these graphs
        return type(None), ()

    @cached_property
    def dynamic(self):
        """The model compiled with dynamic shapes alone, for the steps of a rolling cache (its slots
        move every step: no static shapes). One graph serves every length; no CUDA graphs."""
        return compile_model(self.model, dynamic=True)

    def cache_for(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for `batch` rows of `capacity` tokens: the kept one while it has the batch,
        the model's dtype and the room, else a new one (kept from now on) whose capacity is rounded
        up to a power of two, so a chat's growing turns need a new one (and a new graph) rarely.
        While a generation holds the kept one (a stream not read to its end), a new one of its own."""
        c, p = self.kept, next(self.model.parameters())  # the dtype and device new_cache takes
        held = self._holder is not None and self._holder() is not None
        # (the model's new_cache adds the sink token's slot: compare with a cache it would make)
        if held or c is None or c.k[0].size(0) != batch or c.k[0].dtype != p.dtype or c.k[0].device != p.device \
                or c.capacity < capacity + int(self.model.sink is not None):  # fmt: skip
            if not held:
                self.kept = None  # free the last one's memory first
            c = self.model.new_cache(batch, bucket(capacity))
            for buf in (*c.k, *c.v):
                # written in place by every step: an address that never moves (as the engine's pool)
                torch._dynamo.mark_static_address(buf)
            if not held:
                self.kept = c
        c.length = c.seen = 0
        c.valid = None
        return c

    def over(self, cache: KVCache) -> Callable[[Tensor], Tensor]:
        """`step(tokens)`: row b feeds tokens[b] (B,) at the cache's length -> the logits (B, V)."""
        self.model.rope.reserve(cache.capacity)
        view = _RowsView(cache, self.model.rope)
        for buf in (*cache.k, *cache.v):
            # kv heads and head size never change: were they symbolic, one equal to the batch at the
            # first call would be taken for the same size, and recompiled at another batch
            torch._dynamo.mark_static(buf, 1)
            torch._dynamo.mark_static(buf, 3)

        def step(tokens: Tensor) -> Tensor:
            cache.check_room(1)
            view.lengths = torch.full_like(tokens, cache.length)
            view.valid = cache.valid  # (B, capacity) after a left-padded prefill, else None
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.decode(tokens[:, None], cache=view, last_only=True).logits[:, -1].clone()
            cache.advance(1)
            return logits

        if cache is self.kept:  # held until the generation drops its step (at its end)
            self._holder = weakref.ref(step)
        return step

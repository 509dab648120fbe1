"""Who holds which KV block: the free list, reference counts and the prefix cache of the engine's
`PagedCache` (the tensors live there; this is bookkeeping only, no torch).

A sequence's slots fill blocks of `block_size` in order. A full block is named by the hash of every
token up to its end (the hash of its parent block's name and its own tokens), so two sequences
that start with the same tokens name their first blocks alike. With `prefix_cache`, a full block
stays findable by that name after its last holder is gone, until its memory is needed: a new
sequence then starts from the cached blocks of the longest prefix it shares with any earlier one
(vLLM's automatic prefix caching; llama.cpp's server keeps one slot's prompt). Cached blocks that no
sequence holds are evicted least recently used, only when no free block is left, so the cache
lives under the same budget as everything else.

The names are SHA-256 digests: Python's `hash` of a tuple is cheap to collide on purpose, and a
collision would hand one user's keys and values to another's prompt.

Design notes: docs/design.md#serveblockspy
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence

SINK = -1  # the slot of a model's learned sink token, in a sequence's slot tokens


def block_names(tokens: Sequence[int], block_size: int, parent: bytes = b"", start: int = 0) -> list[bytes]:
    """The names of the full blocks of `tokens` from block `start` on (`parent`: the name of block
    start - 1, b"" for the first)."""
    names = []
    for b in range(start, len(tokens) // block_size):
        part = array("q", tokens[b * block_size : (b + 1) * block_size]).tobytes()
        parent = hashlib.sha256(parent + part).digest()
        names.append(parent)
    return names


class BlockPool:
    """`num_blocks` blocks: free ones (lowest id first, so the memory in use stays packed at the
    pool's start), held ones (a reference count each), and, with `prefix_cache`, full blocks by
    name (`lru`: those no sequence holds, least recently used first)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self.free = list(range(num_blocks))  # a heap
        self.refs = [0] * num_blocks
        self.name: dict[int, bytes] = {}  # block -> its name, for full blocks the cache knows
        self.by_name: dict[bytes, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()

    def available(self) -> int:
        """Blocks that `allocate` can hand out now (free ones and cached ones no one holds)."""
        return len(self.free) + len(self.lru)

    def used(self) -> int:
        return self.num_blocks - self.available()

    def allocate(self, n: int) -> list[int] | None:
        """n blocks for one holder, or None (and nothing taken) when fewer are available."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                block = heapq.heappop(self.free)
            else:  # evict the least recently used cached block
                block, _ = self.lru.popitem(last=False)
                del self.by_name[self.name.pop(block)]
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one hold on each block; a block no one holds is free again, or cached if named."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.name:
                    self.lru[block] = None
                else:
                    heapq.heappush(self.free, block)

    def match(self, names: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of `names` from the first, each now held once more."""
        out = []
        for name in names if self.prefix_cache else ():
            block = self.by_name.get(name)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.lru[block]
            self.refs[block] += 1
            out.append(block)
        return out

    def register(self, block: int, name: bytes) -> None:
        """`block` (held, now full) is the block called `name`; the first block of a name keeps it."""
        if self.prefix_cache and name not in self.by_name and block not in self.name:
            self.by_name[name], self.name[block] = block, name

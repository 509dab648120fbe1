"""The serving engine: continuous batching of many requests on one ModernDecoderLM.

One thread owns the model and loops: admit (a waiting sequence gets the KV blocks its prompt
needs, reusing the cached blocks of the longest prefix it shares with earlier sequences) ->
prefill (at most `prefill_chunk` prompt tokens per loop, so a long prompt delays the running
streams by one chunk's time per token, never by its whole prefill) -> step (one decode forward for
every running sequence, each picking its next token with its own settings and seeded generator,
`generation.pick_tokens`) -> retire (a sequence that ended or was cancelled gives its blocks back at
once). The keys and values live in a `PagedCache` of `kv_cache_bytes`: memory follows what the
sequences hold. When a sequence needs a block and none is left, the newest sequence is preempted:
its blocks go back and it waits at the head of the queue, to be recomputed (mostly from the prefix
cache) when memory frees up; its stream goes on where it was. A sequence's tokens do not depend on
what else is in the batch: the same greedy tokens as alone.

A failure belongs to its request: a prefill that raises fails its request alone, a decode step
that raises is retried row by row so that only the failing rows' requests fail; each is logged
with its traceback (logger "modernlm.serve") and the client is told a generic message with its
request id. A request reports through `Request.emit(event)` on the engine thread.

Design notes (the loop, the events): docs/design.md#serveenginepy
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from modernlm.constrain import Guide
from modernlm.generation import Sampling, TextStream, pick_tokens, prompt_seen
from modernlm.model import PagedCache
from modernlm.serve.blocks import SINK, BlockPool, block_names
from modernlm.steps import StaticSteps

log = logging.getLogger("modernlm.serve")


@dataclass
class TokenInfo:
    """One generated token with its log-probability under the model (raw logits, before any
    sampling setting) and the `top` most likely tokens (id, logprob) when asked for."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    choice: int
    text: str  # new text, safe to show ('' while a stop string may still be forming)
    tokens: list[TokenInfo]  # tokens consumed since the last piece (with logprobs when asked)


@dataclass
class Done:
    choice: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    completion_tokens: int  # tokens generated, the eos included


@dataclass
class Failed:
    message: str


@dataclass(eq=False)
class Request:
    """One prompt, `n` choices. `sampling.seed` (when set) seeds choice i with seed + i."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Piece | Done | Failed], None]
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: each token's logprob and its top k
    id: str = ""  # the request id (x-request-id), in the server's log and in failure messages
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineFull(Exception):
    """The queue is full: the request is refused (the server answers 503)."""


def default_kv_bytes(model: Any, max_batch: int, kv_dtype: torch.dtype | None = None) -> int:
    """The KV budget when none is given: a quarter of the machine's memory (on a GPU, half of what
    is free after the weights), and no more than `max_batch` sequences of the full context need."""
    p = next(model.parameters())
    if p.device.type == "cuda":
        budget = torch.cuda.mem_get_info(p.device)[0] // 2
    else:
        budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    cfg = model.config
    per_token = PagedCache.block_bytes(cfg, 1, kv_dtype or p.dtype)
    return min(budget, max_batch * (cfg.max_seq_len + 1) * per_token)


@dataclass(eq=False)
class _Seq:
    """One choice of a request in flight: its slots in the cache, text stream, sampling state."""

    request: Request
    choice: int
    sampling: Sampling
    stream: TextStream
    generator: torch.Generator | None
    slots: list[int]  # what the cache holds or will hold: [SINK]? + prompt + the tokens fed back
    seen: Tensor | None = None  # (1, V) tokens seen, for the repetition penalty
    blocks: list[int] = field(default_factory=list)  # its block table
    names: list[bytes] = field(default_factory=list)  # the names of its full blocks (prefix cache)
    hashed: list[bytes] = field(default_factory=list)  # the names of its slots' full blocks, for admission
    filled: int = 0  # slots computed into the cache
    started: bool = False  # its first token is picked (a preempted sequence resumes, no new pick)
    counted: bool = False  # its prompt is in the engine's token counts
    last: int = -1  # the token to feed at the next step
    count: int = 0  # tokens generated
    pending: list[TokenInfo] = field(default_factory=list)
    guide: Guide | None = None  # its constraint's matcher (sampling.constraint), None when free


class Engine:
    """Continuous batching on `model` (a ModernDecoderLM) with `tokenizer`; see the module
    docstring. `max_batch` sequences run together (1: one at a time); `max_queue` more may wait.
    The KV cache holds `kv_cache_bytes` (0: `default_kv_bytes`) in blocks of `block_size` tokens, in
    `kv_dtype` (None: float16 under a float32 model, whatever its weights, as llama.cpp's default,
    half of a float32 cache; else the model's dtype);
    `prefix_cache` keeps full blocks for later prompts that start alike. `start()` runs the engine
    thread, `submit(request)` queues a request (EngineFull when the queue is full), `close()` stops."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 64,
                 kv_cache_bytes: int = 0, block_size: int = 16, prefill_chunk: int = 256, prefix_cache: bool = True,
                 compile: bool = False, kv_dtype: torch.dtype | None = None):
        if max_batch < 1 or max_queue < 0 or block_size < 1 or prefill_chunk < 2 or kv_cache_bytes < 0:
            raise ValueError("max_batch, block_size and kv_cache_bytes must be positive, max_queue >= 0, "
                             f"prefill_chunk >= 2; got {max_batch}, {block_size}, {kv_cache_bytes}, "
                             f"{max_queue}, {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        p = next(model.parameters())
        self.device, self.vocab = p.device, model.config.vocab_size
        self.sink = model.sink is not None
        # float16 under float32 numbers (llama.cpp's default cache: half the bytes to hold and to
        # read each step, the keys and values rounded to 16 bits), else the model's own dtype
        self.kv_dtype = kv_dtype or (torch.float16 if p.dtype == torch.float32 else p.dtype)
        per_block = PagedCache.block_bytes(model.config, block_size, self.kv_dtype)
        budget = kv_cache_bytes or default_kv_bytes(model, max_batch, self.kv_dtype)
        if budget < per_block:
            raise ValueError(f"kv_cache_bytes {budget} is less than one block of {block_size} tokens "
                             f"({per_block} bytes)")
        num_blocks = budget // per_block
        self.cache = PagedCache(model.config, num_blocks, block_size, device=self.device, dtype=self.kv_dtype)
        self.pool = BlockPool(num_blocks, block_size, prefix_cache)
        # Decode steps: on the CPU, fused (every layer in one call of modernlm/kernels, nothing to
        # compile); elsewhere through torch.compile where asked, at a few static shapes, as CUDA
        # graphs on a GPU (steps.py: padding rows write to a block kept for them; `warm_up`
        # pays the compile before requests come).
        self.fused = model.fuses_steps(self.cache)
        self.compiled = compile and not self.fused and num_blocks > 1
        self.static_steps = None
        if self.compiled:  # padding rows write to a block of their own
            self.static_steps = StaticSteps(model, self.cache, self.pool.allocate(1)[0], max_batch)
        self.block_size, self.kv_bytes = block_size, num_blocks * per_block
        self.running: list[_Seq] = []  # decoding, oldest first
        self.prefilling: list[_Seq] = []  # admitted, prompt not all in the cache yet
        self.waiting: deque[_Seq] = deque()
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # decode steps run (for tests and the log)
        self.prompt_tokens = 0  # prompt slots of admitted sequences
        self.hit_tokens = 0  # ... of which the prefix cache held
        self.preempted = 0

    # ---- the caller's side (any thread) ---------------------------------------------------------

    def start(self) -> Engine:
        """Run the engine in a thread of its own (see `run` for the faster way on a CPU)."""
        self.thread = threading.Thread(target=self.run, name="modernlm-engine", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def stats(self) -> dict[str, int]:
        """The engine's state for /health and /metrics (a snapshot; the last three only grow)."""
        running, waiting = self.load
        pool = self.pool
        return {
            "running": running, "waiting": waiting,
            "kv_cache_bytes": self.kv_bytes, "kv_block_size": self.block_size,
            "kv_blocks_total": pool.num_blocks, "kv_blocks_used": pool.used(),
            "kv_blocks_free": len(pool.free), "kv_blocks_cached": len(pool.lru),
            "prefix_hit_tokens": self.hit_tokens, "prompt_tokens": self.prompt_tokens, "preempted": self.preempted,
        }  # fmt: skip

    @property
    def seq_blocks(self) -> int:
        """The blocks sequences may hold: the pool's, but the one padding rows write to."""
        return self.pool.num_blocks - int(self.static_steps is not None)

    @property
    def kv_tokens(self) -> int:
        """The most tokens one sequence can hold: the whole KV budget."""
        return self.seq_blocks * self.block_size - int(self.sink)

    @property
    def load(self) -> tuple[int, int]:
        """(sequences admitted, sequences waiting)."""
        return len(self.running) + len(self.prefilling), len(self.waiting)

    def submit(self, request: Request) -> None:
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        seqs = [self._seq(request, i) for i in range(request.n)]
        with self.lock:
            busy = len(self.running) + len(self.prefilling)
            if len(self.waiting) + len(seqs) > self.max_queue + max(0, self.max_batch - busy):
                raise EngineFull(f"the server is busy ({busy} running, {len(self.waiting)} waiting)")
            self.waiting.extend(seqs)
            self.lock.notify_all()

    def _seq(self, request: Request, choice: int) -> _Seq:
        s = request.sampling
        if s.eos_token_id is None and self.tokenizer.eos_id is not None:
            s = Sampling.make(s, eos_token_id=self.tokenizer.eos_id)
        if s.seed is not None:
            s = Sampling.make(s, seed=s.seed + choice)
        generator = None
        if s.temperature > 0:  # as `iter_tokens`: a seeded private generator, else a random seed
            seed = s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()))
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stream = TextStream(self.tokenizer, s.stop, context=request.prompt, eos=s.eos_ids)
        slots = [SINK] * self.sink + list(request.prompt)
        guide = Guide.for_rows([s.constraint], self.tokenizer, self.model.config.vocab_size, s.eos_ids)
        return _Seq(request, choice, s, stream, generator, slots, guide=guide)

    # ---- the engine thread ----------------------------------------------------------------------

    def run(self, until_idle: bool = False) -> None:
        """The engine loop, on the calling thread, until `close()` (`until_idle`: or until no
        request is left, as a script's batch). On a CPU, call it on the thread that loaded the model
        (`modernlm serve` does): PyTorch's OpenMP threads serve the thread that used them first, and
        from another thread the same decode step ran ~1.4x slower here; on a GPU, the thread that
        ran `warm_up` replays the CUDA graphs it recorded."""
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not self.stopping and not self.running and not self.prefilling and not self.waiting:
                        if until_idle:
                            return
                        self.lock.wait()
                    if self.stopping:
                        break
                try:
                    self._retire()
                    self._admit()
                    self._prefill()
                    self._retire()  # a sequence may end on its first token
                    if self.running:
                        self._step()
                    self._retire()
                except Exception:  # a bug of the engine's own: fail what is in flight, keep serving
                    log.exception("engine error; failing the %d requests in flight", len(self._admitted()))
                    for seq in self._admitted():
                        self._fail(seq)
                    self._retire()
        for seq in [*self.running, *self.prefilling, *self.waiting]:
            seq.request.emit(Failed("the server is shutting down"))

    def warm_up(self) -> float:
        """Compile the decode steps (and on a GPU, record their graphs at each row count) before any
        request, not in the first user's time. Returns the seconds."""
        start = time.perf_counter()
        if self.static_steps is not None:
            with torch.inference_mode():
                self.static_steps.warm_up()
        return time.perf_counter() - start

    def _admitted(self) -> list[_Seq]:
        return [*self.running, *self.prefilling]

    def _fail(self, seq: _Seq) -> None:
        """Tell `seq`'s request it failed (the log has the error) and cancel its other choices."""
        if not seq.request.cancelled.is_set():
            seq.request.emit(Failed(f"generation failed (request {seq.request.id or 'without id'}): "
                                    "an internal error; the server's log has the details"))
            seq.request.cancel()

    def _admit(self) -> None:
        """Give waiting sequences, in arrival order, the blocks their prompts need."""
        while len(self.running) + len(self.prefilling) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    return
                seq = self.waiting[0]
            try:
                if not seq.request.cancelled.is_set() and not self._reserve(seq):
                    return  # not enough memory yet: it waits at the head of the queue
            except Exception:
                log.exception("admission of request %s failed", seq.request.id)
                self._fail(seq)
            with self.lock:
                self.waiting.popleft()
            if not seq.request.cancelled.is_set():
                self.prefilling.append(seq)

    def _reserve(self, seq: _Seq) -> bool:
        """Blocks for `seq`'s slots: the cached ones of its longest known prefix, fresh ones for the
        rest. False (nothing taken) when the pool cannot give them now."""
        bs, n = self.block_size, len(seq.slots)
        if math.ceil((n + 1) / bs) > self.seq_blocks:
            log.warning("request %s: %d tokens do not fit the KV cache (%d tokens)", seq.request.id, n, self.kv_tokens)
            seq.request.emit(Failed(f"the prompt needs {n + 1} tokens of KV cache and the server's cache holds "
                                    f"{self.kv_tokens} (kv_cache_bytes)"))
            seq.request.cancel()
            return True
        if len(seq.hashed) != n // bs:  # once per prompt, not at every step it waits for memory
            seq.hashed = block_names(seq.slots, bs)
        names = seq.hashed
        # A new sequence computes at least its last prompt token: its logits pick the first token.
        cached = self.pool.match(names if seq.started else names[: (n - 1) // bs])
        fresh = self.pool.allocate(math.ceil(n / bs) - len(cached))
        if fresh is None:
            self.pool.release(cached)
            return False
        seq.blocks, seq.names, seq.filled = cached + fresh, names[: len(cached)], len(cached) * bs
        if not seq.counted:
            seq.counted = True
            self.prompt_tokens += n
            self.hit_tokens += seq.filled
        return True

    def _prefill(self) -> None:
        """Compute up to `prefill_chunk` prompt tokens, oldest admitted sequence first."""
        budget = self.prefill_chunk
        for seq in list(self.prefilling):
            if budget <= 0:
                return
            if seq.request.cancelled.is_set():
                continue
            if seq.filled == len(seq.slots):  # a preempted sequence whose slots were all cached
                self.prefilling.remove(seq)
                self.running.append(seq)
                continue
            n = min(budget, len(seq.slots) - seq.filled)
            if seq.filled == 0 and self.sink:
                n = max(n, 2)  # the sink slot and at least one token: the model adds the sink itself
            tokens = [t for t in seq.slots[seq.filled : seq.filled + n] if t != SINK]
            try:
                logits = self._forward([seq], [tokens])
            except Exception:
                log.exception("prefill of request %s failed", seq.request.id)
                self._fail(seq)
                continue
            budget -= n
            self._filled(seq, n)
            if seq.filled == len(seq.slots):
                self.prefilling.remove(seq)
                self.running.append(seq)
                if not seq.started:
                    seq.started = True
                    if seq.sampling.repetition_penalty != 1.0:
                        seq.seen = prompt_seen(torch.tensor([seq.request.prompt], device=self.device), self.vocab)
                    self._take(seq, logits)

    def _forward(self, seqs: list[_Seq], rows: list[list[int]]) -> Tensor:
        """The next tokens `rows` of each of `seqs` through the model; the last position's logits (B, V).

        Each row is given the blocks up to its new end only (what attention reads), and a block
        this forward enters but leaves partly written is zeroed first: the unwritten slots are
        masked, yet still multiplied by 0 in attention, and 0 * a NaN left in memory is NaN. (A
        block is never cleared whole at allocation: zeroing a long prompt's blocks at once stalled
        every stream, and untouched memory is not resident.)"""
        bs, tables = self.block_size, []
        for s, row in zip(seqs, rows, strict=True):
            end = s.filled + len(row) + int(self.sink and s.filled == 0)  # the sink takes a slot
            last = (end - 1) // bs
            if end % bs and last * bs >= s.filled:
                self.cache.clear(s.blocks[last : last + 1])
            tables.append(s.blocks[: last + 1])
        if self.static_steps is not None and len(rows[0]) == 1 and all(s.filled for s in seqs):
            # one token a row after tokens already cached: a decode step (a row's first token
            # goes through the model as it is, which puts the sink before it)
            return self.static_steps([row[0] for row in rows], tables, [s.filled for s in seqs])
        self.cache.select(tables, [s.filled for s in seqs])
        idx = torch.tensor(rows, device=self.device)
        return self.model(idx, cache=self.cache, last_only=True).logits[:, -1]

    def _filled(self, seq: _Seq, n: int) -> None:
        """`seq`'s next n slots are computed: name the blocks they filled, for later prompts."""
        seq.filled += n
        full = seq.filled // self.block_size
        if full > len(seq.names):
            parent = seq.names[-1] if seq.names else b""
            names = block_names(seq.slots[: full * self.block_size], self.block_size, parent, len(seq.names))
            for i, name in enumerate(names, start=len(seq.names)):
                self.pool.register(seq.blocks[i], name)
            seq.names += names

    def _make_room(self) -> None:
        """A block for each running sequence whose blocks are full; when none is left, preempt the
        newest sequence (its blocks go back; it waits at the head of the queue)."""
        for seq in list(self.running):
            if seq not in self.running or seq.filled < len(seq.blocks) * self.block_size:
                continue
            while (block := self.pool.allocate(1)) is None:
                victim = (self.prefilling or self.running)[-1]
                if victim is seq and len(self._admitted()) == 1:  # alone, and the cache is full
                    seq.request.emit(Piece(seq.choice, seq.stream.flush(), seq.pending))
                    seq.request.emit(Done(seq.choice, "length", seq.count))
                    return
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seq.blocks += block

    def _preempt(self, seq: _Seq) -> None:
        (self.running if seq in self.running else self.prefilling).remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.names, seq.filled = [], [], 0
        self.preempted += 1
        with self.lock:
            self.waiting.appendleft(seq)

    def _step(self) -> None:
        self._make_room()
        rows = [seq for seq in self.running if not seq.stream.done]
        if not rows:
            return
        try:
            logits = self._forward(rows, [[seq.last] for seq in rows])  # (rows, V)
        except Exception:  # find the rows that fail: each alone
            log.exception("a decode step of %d sequences failed; retrying each alone", len(rows))
            for seq in rows:
                try:
                    one = self._forward([seq], [[seq.last]])
                except Exception:
                    log.exception("decode step of request %s failed", seq.request.id)
                    self._fail(seq)
                    continue
                self._stepped(seq, one)
            return
        self.steps += 1
        for i, seq in enumerate(rows):
            self._stepped(seq, logits[i : i + 1])

    def _stepped(self, seq: _Seq, logits: Tensor) -> None:
        seq.slots.append(seq.last)
        self._filled(seq, 1)
        self._take(seq, logits)

    def _take(self, seq: _Seq, logits: Tensor) -> None:
        """Pick `seq`'s next token from its logits (1, V) and report what it adds; a failure fails
        `seq` alone (its sampler's, its grammar's), not the others in the batch."""
        try:
            self._pick(seq, logits)
        except Exception:
            log.exception("picking the next token of request %s failed", seq.request.id)
            self._fail(seq)

    def _pick(self, seq: _Seq, logits: Tensor) -> None:
        s = seq.sampling
        allowed = seq.guide.allowed() if seq.guide is not None else None
        token = int(pick_tokens(logits, s, seq.seen, seq.generator, self.tokenizer.vocab_size, allowed)[0])
        if seq.guide is not None:
            seq.guide.advance([token])
        if seq.seen is not None:
            seq.seen[0, token] = True
        seq.last, seq.count = token, seq.count + 1
        k = seq.request.logprobs
        info = TokenInfo(token, 0.0, [])
        if k is not None:
            logp = logits[0].float().log_softmax(-1)
            info.logprob = float(logp[token])
            if k:
                top = logp.topk(k)
                info.top = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        seq.pending.append(info)
        text = seq.stream.push(token)
        if not seq.stream.done and seq.count >= s.max_new_tokens:
            text += seq.stream.flush()
        if text or seq.stream.done:
            seq.request.emit(Piece(seq.choice, text, seq.pending))
            seq.pending = []
        if seq.stream.done:
            finish = "length" if seq.stream.finish == "length" else "stop"
            seq.request.emit(Done(seq.choice, finish, seq.count))

    def _retire(self) -> None:
        """Give back the blocks of sequences that ended or were cancelled."""
        for admitted in (self.running, self.prefilling):
            keep = []
            for seq in admitted:
                if seq.stream.done or seq.request.cancelled.is_set():
                    self.pool.release(seq.blocks)
                    seq.blocks = []
                else:
                    keep.append(seq)
            admitted[:] = keep
        with self.lock:  # a cancelled request's queued choices go too
            if any(seq.request.cancelled.is_set() for seq in self.waiting):
                self.waiting = deque(seq for seq in self.waiting if not seq.request.cancelled.is_set())

"""The serving engine: continuous batching of many requests on one ModernDecoderLM.

One thread owns the model and loops: admit (prefill a waiting prompt alone and copy its keys and
values into a free row of the batch's `SlotCache`) -> step (one decode forward for every row in use,
each row picking its next token with its own settings and seeded generator, `generation.pick_tokens`)
-> retire (a row that ended or was cancelled leaves at once; rows stay packed). New requests join
between decode steps, and a sequence's tokens do not depend on what else is in the batch: the same
greedy tokens as alone. A request reports through `Request.emit(event)` on the engine thread.

Design notes (the loop, the events): docs/design.md#serveenginepy
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from modernlm.generation import Sampling, TextStream, pick_tokens, prompt_seen
from modernlm.model import SlotCache


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


@dataclass(eq=False)
class _Seq:
    """One choice of a request in flight: its text stream, sampling state and last token."""

    request: Request
    choice: int
    sampling: Sampling
    stream: TextStream
    generator: torch.Generator | None
    seen: Tensor | None  # (1, V) tokens seen, for the repetition penalty
    last: int = -1  # the token to feed at the next step
    count: int = 0  # tokens generated
    pending: list[TokenInfo] = field(default_factory=list)


class Engine:
    """Continuous batching on `model` (a ModernDecoderLM) with `tokenizer`; see the module
    docstring. `max_batch` sequences decode together (1: one at a time); `max_queue` more may wait
    for a row. `start()` runs the engine thread, `submit(request)` queues a request (EngineFull
    when the queue is full), `close()` stops the thread."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 64,
                 kv_cache_bytes: int = 0, block_size: int = 16, prefill_chunk: int = 256, prefix_cache: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.vocab = model.config.vocab_size
        dtype = next(model.parameters()).dtype
        self.cache = SlotCache(model.config, max_batch, 64, device=self.device, dtype=dtype)
        self.rows: list[_Seq] = []  # row i of the cache holds rows[i]
        self.waiting: deque[_Seq] = deque()
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # decode steps run (for tests and the log)

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
        """The engine's state for /health and /metrics (a snapshot; counters only grow)."""
        running, waiting = self.load
        return {
            "running": running, "waiting": waiting,
            "kv_cache_bytes": 0, "kv_block_size": 16, "kv_blocks_total": 0, "kv_blocks_used": 0,
            "kv_blocks_free": 0, "kv_blocks_cached": 0,
            "prefix_hit_tokens": 0, "prompt_tokens": 0,
        }

    @property
    def kv_tokens(self) -> int:
        """The most tokens one sequence can hold: the whole KV budget."""
        return 1 << 30

    @property
    def load(self) -> tuple[int, int]:
        """(sequences in the batch, sequences waiting)."""
        return len(self.rows), len(self.waiting)

    def submit(self, request: Request) -> None:
        seqs = [self._seq(request, i) for i in range(request.n)]
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_queue + max(0, self.max_batch - len(self.rows)):
                raise EngineFull(f"the server is busy ({len(self.rows)} running, {len(self.waiting)} waiting)")
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
        return _Seq(request, choice, s, stream, generator, None)

    # ---- the engine thread ----------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, on the calling thread, until `close()`. On a CPU, call it on the thread
        that loaded the model (`modernlm serve` does): PyTorch's OpenMP threads serve the thread
        that used them first, and from another thread the same decode step ran ~1.4x slower here."""
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not self.stopping and not self.rows and not self.waiting:
                        self.lock.wait()
                    if self.stopping:
                        break
                try:
                    self._retire()
                    self._admit()
                    self._retire()  # a sequence may end on its first token
                    if self.rows:
                        self._step()
                    self._retire()
                except Exception as e:  # a failing step fails the requests in flight, not the server
                    message = f"generation failed: {type(e).__name__}: {e}"
                    for seq in {s.request: s for s in self.rows}.values():
                        seq.request.emit(Failed(message))
                        seq.request.cancel()
                    self._retire()
        for seq in [*self.rows, *self.waiting]:
            seq.request.emit(Failed("the server is shutting down"))

    def _admit(self) -> None:
        """Prefill waiting sequences into free rows, one at a time, in arrival order."""
        while len(self.rows) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    return
                seq = self.waiting.popleft()
            if seq.request.cancelled.is_set():
                continue
            ids = torch.tensor([seq.request.prompt], device=self.device)
            alone = self.model.new_cache(1, ids.size(1))
            logits = self.model(ids, cache=alone, last_only=True).logits[:, -1]  # (1, V)
            if seq.sampling.repetition_penalty != 1.0:
                seq.seen = prompt_seen(ids, self.vocab)
            row = len(self.rows)
            self._grow(alone.length + seq.sampling.max_new_tokens)
            self.cache.put(row, alone)
            self.rows.append(seq)
            self.cache.rows = len(self.rows)
            self._take(seq, logits)

    def _grow(self, need: int) -> None:
        if need > self.cache.capacity:
            self.cache.grow(max(need, 2 * self.cache.capacity))

    def _step(self) -> None:
        idx = torch.tensor([[seq.last] for seq in self.rows], device=self.device)  # (rows, 1)
        logits = self.model(idx, cache=self.cache, last_only=True).logits[:, -1]  # (rows, V)
        self.steps += 1
        for i, seq in enumerate(self.rows):
            self._take(seq, logits[i : i + 1])

    def _take(self, seq: _Seq, logits: Tensor) -> None:
        """Pick `seq`'s next token from its logits (1, V) and report what it adds."""
        s = seq.sampling
        token = int(pick_tokens(logits, s, seq.seen, seq.generator, self.tokenizer.vocab_size)[0])
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
        """Free the rows of sequences that ended or were cancelled (the last row fills the gap)."""
        i = 0
        while i < len(self.rows):
            seq = self.rows[i]
            if seq.stream.done or seq.request.cancelled.is_set():
                last = len(self.rows) - 1
                if i != last:
                    self.cache.move(last, i)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
                self.cache.rows = len(self.rows)
            else:
                i += 1
        with self.lock:  # a cancelled request's queued choices go too
            if any(seq.request.cancelled.is_set() for seq in self.waiting):
                self.waiting = deque(seq for seq in self.waiting if not seq.request.cancelled.is_set())

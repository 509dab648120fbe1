"""The continuous-batching engine: a PagedCache step gives each row the logits it gets alone
(every model variant, rows at different positions), and the engine's sequences get the text
`TextGeneration` gives each alone, whatever joins or leaves the batch meanwhile: greedy, seeded
sampling, repetition penalty, stop strings; a request arriving mid-generation decodes in the same
forwards as the running one and finishes first; cancelling frees a row at once."""

from __future__ import annotations

import threading

import pytest
import torch

from modernlm.generation import Sampling, TextGeneration
from modernlm.model import ModernDecoderLM, PagedCache
from modernlm.serve.engine import Done, Engine, EngineFull, Failed, Piece, Request
from modernlm.tokenizer import train_bpe
from tests.serve_util import CORPUS


def test_paged_cache_rows_at_their_own_positions_equal_alone(variant_config):
    """Rows in scattered blocks, at different positions, prefilled in chunks, joining at different
    steps: each gets the logits it gets alone in a plain KVCache."""
    torch.manual_seed(0)
    model = ModernDecoderLM(variant_config).eval()
    prompts = [torch.randint(0, variant_config.vocab_size, (1, n)) for n in (3, 9, 5)]
    steps, bs = 4, 4
    feed = torch.randint(0, variant_config.vocab_size, (3, steps))
    alone = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            cache = model.new_cache(1, p.size(1) + steps)
            first = model(p, cache=cache).logits[:, -1:]
            alone.append(torch.cat([first] + [model(feed[i : i + 1, t : t + 1], cache=cache).logits
                                              for t in range(steps - 1)], 1))
        sink = int(variant_config.attn_sink)
        paged = PagedCache(variant_config, 32, bs, device="cpu", dtype=torch.float32)
        free = torch.randperm(32).tolist()  # blocks in no order: a row's table is scattered
        tables, filled, got = [[] for _ in prompts], [0] * 3, [[] for _ in prompts]

        def forward(rows, idx):
            for r in rows:  # room for what this forward adds
                while len(tables[r]) * bs < filled[r] + idx.size(1) + (sink if filled[r] == 0 else 0):
                    tables[r].append(free.pop())
                    paged.clear(tables[r][-1:])  # unwritten memory may hold NaNs
            paged.select([tables[r] for r in rows], [filled[r] for r in rows])
            out = model(idx, cache=paged).logits
            for r in rows:
                filled[r] += idx.size(1) + (sink if filled[r] == 0 else 0)
            return out

        for t in range(steps + 2):
            if t < len(prompts):  # one new row per step, its prompt in chunks of 2 tokens
                p = prompts[t]
                for c in range(0, p.size(1), 2):
                    logits = forward([t], p[:, c : c + 2])
                got[t].append(logits[:, -1:])
            rows = [r for r in range(min(t + 1, 3)) if 0 < len(got[r]) < steps]
            if rows:
                idx = torch.stack([feed[r, len(got[r]) - 1] for r in rows])[:, None]
                logits = forward(rows, idx)
                for j, r in enumerate(rows):
                    got[r].append(logits[j : j + 1])
    for i in range(3):
        torch.testing.assert_close(torch.cat(got[i], 1), alone[i], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def setup():
    from tests.conftest import tiny_config

    tok = train_bpe(CORPUS * 20, vocab_size=320, special_tokens=("<|endoftext|>", "<|pad|>"))
    torch.manual_seed(0)
    model = ModernDecoderLM(
        tiny_config(vocab_size=320, max_seq_len=256, n_expert=4, moe_layers=[1], attn_sink=True)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model, tok


class Collector:
    """Gathers each request's events; `wait()` until every choice is done."""

    def __init__(self, n_choices: int):
        self.texts: dict[int, str] = {}
        self.done: dict[int, Done] = {}
        self.failed: list[str] = []
        self.left = n_choices
        self.event = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, ev) -> None:
        with self.lock:
            if isinstance(ev, Piece):
                self.texts[ev.choice] = self.texts.get(ev.choice, "") + ev.text
            elif isinstance(ev, Done):
                self.done[ev.choice] = ev
                self.left -= 1
            elif isinstance(ev, Failed):
                self.failed.append(ev.message)
            if self.left == 0 or self.failed:
                self.event.set()

    def wait(self) -> None:
        assert self.event.wait(60), "the engine did not finish"
        assert not self.failed, self.failed


SETTINGS = [
    Sampling(max_new_tokens=9),
    Sampling(max_new_tokens=17, temperature=0.9, seed=5),
    Sampling(max_new_tokens=6, repetition_penalty=1.3),
    Sampling(max_new_tokens=12, temperature=1.2, top_k=20, top_p=0.9, seed=1),
]


def run_all(engine: Engine, jobs: list[tuple[list[int], Sampling]]) -> list[Collector]:
    """Submit every job at once to a started engine and wait for them all."""
    collectors = []
    for prompt, s in jobs:
        c = Collector(1)
        engine.submit(Request(prompt, s, c))
        collectors.append(c)
    for c in collectors:
        c.wait()
    return collectors


def assert_alone(model, tok, jobs, collectors) -> None:
    for (prompt, s), c in zip(jobs, collectors, strict=True):
        ref = TextGeneration(model, tok, [prompt], s).run()[0]
        assert c.texts.get(0, "") == ref.text
        assert c.done[0].completion_tokens == len(ref.ids) + (ref.finish == "eos")
        assert c.done[0].finish_reason == ("length" if ref.finish == "length" else "stop")


def test_engine_sequences_equal_alone_as_they_join_and_leave(setup):
    model, tok = setup
    texts = ["Once upon", "The quick brown fox jumps", "In 1999 the", "a", "the river should be", "cat"]
    jobs = [(tok.encode(t, add_bos=True), SETTINGS[i % len(SETTINGS)]) for i, t in enumerate(texts * 2)]
    engine = Engine(model, tok, max_batch=3, max_queue=32).start()  # fewer rows than requests
    try:
        collectors = run_all(engine, jobs)
    finally:
        engine.close()
    assert_alone(model, tok, jobs, collectors)
    assert engine.load == (0, 0)


def test_stop_strings_and_n_choices(setup):
    model, tok = setup
    prompt = tok.encode("Once upon", add_bos=True)
    full = TextGeneration(model, tok, [prompt], Sampling(max_new_tokens=20)).run()[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    engine = Engine(model, tok, max_batch=4).start()
    try:
        c = Collector(1)
        engine.submit(Request(prompt, Sampling(max_new_tokens=20, stop=[stop]), c))
        c.wait()
        assert c.texts[0] == full[: full.index(stop)] and c.done[0].finish_reason == "stop"
        c = Collector(3)
        engine.submit(Request(prompt, Sampling(max_new_tokens=10, temperature=1.0, seed=11), c, n=3))
        c.wait()
    finally:
        engine.close()
    for i in range(3):
        alone = TextGeneration(model, tok, [prompt], 10, temperature=1.0, seed=11 + i).run()[0]
        assert c.texts.get(i, "") == alone.text


def test_cancel_frees_the_row_and_a_full_queue_refuses(setup):
    model, tok = setup
    engine = Engine(model, tok, max_batch=1, max_queue=1).start()
    try:
        prompt = tok.encode("Once", add_bos=True)
        long = Request(prompt, Sampling(max_new_tokens=200, eos_token_id=()), Collector(1))
        engine.submit(long)
        waiting = Collector(1)
        engine.submit(Request(prompt, Sampling(max_new_tokens=3), waiting))  # the queue's one place
        with pytest.raises(EngineFull):
            engine.submit(Request(prompt, Sampling(max_new_tokens=3), Collector(1)))
        long.cancel()
        waiting.wait()  # admitted once the cancelled request left its row
        assert not long.emit.done  # the cancelled request never finished its 200 tokens
    finally:
        engine.close()
    assert engine.load == (0, 0)


def test_a_request_joins_the_running_batch_and_finishes_first(setup):
    """Batching, observed at the model: a forward pre-hook records the rows of every decode forward
    (one token per row: the prefills here feed more), and at the 4th submits a 3-token request while a 250-token
    one runs. The newcomer is prefilled alone between steps, decodes in the same forwards as the
    long one (2 rows in steps 5 and 6) and is done at step 6 of the long one's 249; a
    one-request-at-a-time engine would decode 1 row per step and finish it after the long one."""
    model, tok = setup
    engine = Engine(model, tok, max_batch=4)
    prompt_long, prompt_short = tok.encode("Once", add_bos=True), tok.encode("The quick brown", add_bos=True)
    s_long, s_short = Sampling(max_new_tokens=250, eos_token_id=()), Sampling(max_new_tokens=3, eos_token_id=())
    finished: list[tuple[str, int]] = []  # (request, decode steps run when it was done), on the engine thread

    def collect(name: str, c: Collector):
        def emit(ev) -> None:
            if isinstance(ev, Done):
                finished.append((name, engine.steps))
            c(ev)

        return emit

    long_c, short_c = Collector(1), Collector(1)
    short = Request(prompt_short, s_short, collect("short", short_c))
    rows: list[int] = []

    def decode_rows(module, args, kwargs) -> None:
        if args[0].size(1) == 1:  # a decode step (the prompts here are 2+ tokens, prefilled in one chunk)
            rows.append(args[0].size(0))
            if len(rows) == 4:
                engine.submit(short)  # arrives while the long request is mid-generation

    handle = model.register_forward_pre_hook(decode_rows, with_kwargs=True)
    try:
        engine.start()
        engine.submit(Request(prompt_long, s_long, collect("long", long_c)))
        long_c.wait()
        short_c.wait()
    finally:
        handle.remove()
        engine.close()
    assert finished == [("short", 6), ("long", 249)]
    assert rows == [1] * 4 + [2] * 2 + [1] * 243  # 249 decode steps; the prefills give the first tokens
    assert short_c.done[0].completion_tokens == 3 and long_c.done[0].completion_tokens == 250
    # The rows decoded together got the tokens each gets alone.
    for prompt, s, c in ((prompt_long, s_long, long_c), (prompt_short, s_short, short_c)):
        assert c.texts.get(0, "") == TextGeneration(model, tok, [prompt], s).run()[0].text


# ---- memory by need, the prefix cache, chunked prefill, failures ------------------------------------


def story_jobs(tok, n: int) -> list[tuple[list[int], Sampling]]:
    texts = ["Once upon a time there was", "The quick brown fox", "In 1999 the committee", "a big house"]
    return [(tok.encode(texts[i % 4] + " again" * (i // 4), add_bos=True), SETTINGS[i % len(SETTINGS)])
            for i in range(n)]  # fmt: skip


def test_memory_follows_what_sequences_hold_and_returns_to_the_pool(setup):
    """The blocks in use never exceed what the admitted sequences' tokens fill (rounded up to a
    block each), and once every request is done all blocks are back: free, or cached for later
    prompts (the prefix cache) and evictable."""
    model, tok = setup
    engine = Engine(model, tok, max_batch=4, block_size=4)
    bs = engine.block_size
    jobs = story_jobs(tok, 8)
    peak: list[tuple[int, int]] = []  # (blocks in use, blocks the admitted sequences' slots need)

    def watch(module, args, kwargs) -> None:
        held = sum(-(-(len(s.slots) + 1) // bs) for s in engine._admitted())  # their slots and the next one
        peak.append((engine.pool.num_blocks - engine.pool.available(), held))

    handle = model.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        engine.start()
        collectors = run_all(engine, jobs)
    finally:
        handle.remove()
        engine.close()
    assert all(used <= held for used, held in peak)
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == stats["kv_blocks_total"]
    # the float32 model's default cache is float16 (llama.cpp's): 2 bytes a number
    assert stats["kv_cache_bytes"] == stats["kv_blocks_total"] * PagedCache.block_bytes(model.config, bs, torch.float16)
    assert_alone(model, tok, jobs, collectors)


def test_a_full_cache_queues_and_preempts_and_every_sequence_still_gets_what_it_gets_alone(setup):
    """A budget of 12 blocks of 4 tokens for 8 requests of ~10-40 tokens each: admission waits for
    memory, running sequences are preempted when the pool runs dry and resumed later (from the
    prefix cache where it still holds their blocks), and each sequence's text is what it gets
    alone. A prompt larger than the whole cache fails at once, alone."""
    model, tok = setup
    per_block = PagedCache.block_bytes(model.config, 4, torch.float16)  # the default cache's (float16)
    for prefix_cache in (True, False):
        engine = Engine(model, tok, max_batch=4, block_size=4, kv_cache_bytes=12 * per_block,
                        prefix_cache=prefix_cache).start()  # fmt: skip
        jobs = story_jobs(tok, 8)
        try:
            collectors = run_all(engine, jobs)
            huge = Collector(1)
            engine.submit(Request(list(range(3, 100)), Sampling(max_new_tokens=2), huge))
            assert huge.event.wait(30) and "KV cache" in huge.failed[0]
        finally:
            engine.close()
        assert engine.preempted > 0  # the budget was tight enough to exercise preemption
        assert_alone(model, tok, jobs, collectors)
        assert engine.stats()["kv_blocks_used"] == 0


def test_prefix_cache_reuses_a_shared_prefix_and_changes_no_token(setup):
    """A second turn that starts with the first turn's prompt and reply finds all their full blocks
    cached: only the rest is computed. The replies equal those of an engine without the cache and
    those each prompt gets alone."""
    model, tok = setup
    first = tok.encode("Once upon a time there was a little cat who lived in a big house.", add_bos=True)
    s = Sampling(max_new_tokens=12)
    replies = {}
    for prefix_cache in (True, False):
        engine = Engine(model, tok, max_batch=2, block_size=4, prefix_cache=prefix_cache).start()
        try:
            (c1,) = run_all(engine, [(first, s)])
            second = first + tok.encode(c1.texts[0] + " The quick brown fox")
            hits_before = engine.stats()["prefix_hit_tokens"]
            (c2,) = run_all(engine, [(second, s)])
            hits = engine.stats()["prefix_hit_tokens"] - hits_before
        finally:
            engine.close()
        replies[prefix_cache] = (c1.texts[0], c2.texts[0])
        if prefix_cache:  # at least the sink slot and the first prompt, to their last full block
            assert hits >= (len(first) + 1) // 4 * 4 and hits % 4 == 0, hits
        else:
            assert hits == 0
    assert replies[True] == replies[False]
    assert replies[True][1] == TextGeneration(model, tok, [second], s).run()[0].text


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(setup):
    """Chunked prefill, observed at the model: while a stream decodes, a 200-token prompt arrives;
    between any two decode steps the engine computes at most prefill_chunk prompt tokens, so the
    running stream waits one chunk per token at most, and both get what they get alone."""
    model, tok = setup
    engine = Engine(model, tok, max_batch=4, prefill_chunk=32)
    long_prompt = (tok.encode("The quick brown fox jumps over the lazy dog, again and again.", add_bos=True) * 15)[:200]
    running = Collector(1)
    jobs = [(tok.encode("Once", add_bos=True), Sampling(max_new_tokens=60, eos_token_id=())),
            (long_prompt, Sampling(max_new_tokens=5, eos_token_id=()))]  # fmt: skip
    late = Collector(1)
    forwards: list[tuple[int, int]] = []  # (rows, tokens per row) of every forward

    def record(module, args, kwargs) -> None:
        forwards.append(tuple(args[0].shape))
        if len(forwards) == 5:
            engine.submit(Request(*jobs[1], late))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine.start()
        engine.submit(Request(*jobs[0], running))
        running.wait()
        late.wait()
    finally:
        handle.remove()
        engine.close()
    prefill_tokens, between = 0, []
    for rows, t in forwards[2:]:
        if t == 1 and rows >= 1 and prefill_tokens:
            between.append(prefill_tokens)
            prefill_tokens = 0
        elif t > 1:
            prefill_tokens += t
    assert sum(between) == len(long_prompt)  # the whole prompt, spread over decode steps ...
    assert len(between) == -(-len(long_prompt) // 32) and max(between) <= 32  # ... one chunk at a time
    assert_alone(model, tok, jobs, [running, late])


def poison(engine: Engine, model, bad: Request, *, during: str):
    """A forward pre-hook that raises when `bad`'s sequence is in a prefill ("prefill") or decode
    ("decode") forward: a fault of that request alone."""

    def hook(module, args, kwargs) -> None:
        table = kwargs["cache"].table
        mine = [s for s in engine._admitted() if s.request is bad and s.blocks]
        decode = args[0].size(1) == 1
        if mine and (decode == (during == "decode")) and mine[0].blocks[0] in table[:, 0].tolist():
            raise RuntimeError("injected fault")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("during", ["prefill", "decode"])
def test_a_failing_request_fails_alone_and_is_logged(setup, caplog, during):
    """Fault injection: the forwards of one request raise (in its prefill, or in decode steps it
    shares with others). That request fails at once with a generic message naming its id, the
    traceback is in the server's log, and the others get exactly what they get alone."""
    model, tok = setup
    engine = Engine(model, tok, max_batch=4)
    jobs = story_jobs(tok, 3)
    good = [Collector(1) for _ in jobs]
    bad_c = Collector(1)
    bad = Request(tok.encode("In 1999 the river", add_bos=True), Sampling(max_new_tokens=30), bad_c, id="req-bad")
    handle = poison(engine, model, bad, during=during)
    try:
        engine.start()
        for (prompt, s), c in zip(jobs, good, strict=True):
            engine.submit(Request(prompt, s, c))
        engine.submit(bad)
        assert bad_c.event.wait(30) and len(bad_c.failed) == 1
        for c in good:
            c.wait()
    finally:
        handle.remove()
        engine.close()
    assert "req-bad" in bad_c.failed[0] and "injected" not in bad_c.failed[0]  # no internals to the client
    assert "injected fault" in caplog.text and "req-bad" in caplog.text
    assert_alone(model, tok, jobs, good)
    assert engine.stats()["kv_blocks_used"] == 0


def test_an_engine_error_fails_what_is_in_flight_and_the_engine_keeps_serving(setup, caplog, monkeypatch):
    model, tok = setup
    engine = Engine(model, tok, max_batch=4)
    calls = {"n": 0}
    step = engine._step

    def broken_once() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("a bug")
        step()

    monkeypatch.setattr(engine, "_step", broken_once)
    try:
        engine.start()
        hit = Collector(1)
        engine.submit(Request(tok.encode("Once", add_bos=True), Sampling(max_new_tokens=20), hit, id="r1"))
        assert hit.event.wait(30) and "r1" in hit.failed[0]
        jobs = story_jobs(tok, 2)
        collectors = run_all(engine, jobs)  # still serving
    finally:
        engine.close()
    assert "engine error" in caplog.text and "KeyError" in caplog.text
    assert_alone(model, tok, jobs, collectors)

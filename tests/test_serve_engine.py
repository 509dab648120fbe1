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


def test_engine_sequences_equal_alone_as_they_join_and_leave(setup):
    model, tok = setup
    texts = ["Once upon", "The quick brown fox jumps", "In 1999 the", "a", "the river should be", "cat"]
    jobs = [(tok.encode(t, add_bos=True), SETTINGS[i % len(SETTINGS)]) for i, t in enumerate(texts * 2)]
    engine = Engine(model, tok, max_batch=3, max_queue=32).start()  # fewer rows than requests
    try:
        collectors = []
        for prompt, s in jobs:
            c = Collector(1)
            engine.submit(Request(prompt, s, c))
            collectors.append(c)
        for c in collectors:
            c.wait()
    finally:
        engine.close()
    for (prompt, s), c in zip(jobs, collectors, strict=True):
        ref = TextGeneration(model, tok, [prompt], s).run()[0]
        assert c.texts.get(0, "") == ref.text
        assert c.done[0].completion_tokens == len(ref.ids) + (ref.finish == "eos")
        assert c.done[0].finish_reason == ("length" if ref.finish == "length" else "stop")
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

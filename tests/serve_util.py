"""Models and a live server for the `modernlm serve` tests.

`script_checkpoint` saves a model whose greedy output is known in advance: one layer whose
attention and FFN weights are zero, so the logits depend on the current token alone, and an LM
head that maps each token to its successor in a chain (any other token to eos). With the chain
"\n" -> "<script>" -> "alert(1)" -> "</script>" -> eos, the reply to any ChatML prompt (which ends
with "\n") is "<script>alert(1)</script>": what the chat page must show as text.

`serving(lm, **settings)` runs the real app (uvicorn, 127.0.0.1, a free port) in a thread and
yields its base URL.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from modernlm.checkpoint import save_model
from modernlm.model import ModelConfig, ModernDecoderLM
from modernlm.tokenizer import byte_tokenizer, train_bpe
from tests.conftest import tiny_config

SCRIPT_WORDS = ("<script>", "alert(1)", "</script>")
CORPUS = [
    "Once upon a time there was a little cat who lived in a big house.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "In 1999 the committee decided that the river should be cleaned.",
]


def chat_checkpoint(path: Path, chat: bool = True, max_seq_len: int = 256, **config) -> Path:
    """A tiny random model (a BPE of 320 tokens; ChatML specials with `chat`) whose greedy replies
    depend on the prompt: its weights are scaled up for sharp logits, not one token repeated."""
    specials = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>") if chat else ("<|endoftext|>", "<|pad|>")
    tok = train_bpe(CORPUS * 20, vocab_size=320, special_tokens=specials, chat_template="chatml" if chat else None)
    if chat:
        tok.eos_token = "<|im_end|>"  # as SFT makes it: a reply ends at <|im_end|>
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=max_seq_len, **config))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    save_model(model, path, tok)
    return path


def script_checkpoint(
    path: Path, words: Sequence[str] = SCRIPT_WORDS, first: str = "\n", max_seq_len: int = 512
) -> Path:
    """A checkpoint whose greedy continuation of any prompt ending in `first` is "".join(words)."""
    tok = byte_tokenizer(eos_token="<|im_end|>")
    tok.backend.add_tokens(list(words))
    chain = [tok.encode(first)[-1], *(tok.token_to_id(w) for w in words), tok.eos_id]
    vocab = tok.vocab_size
    d = vocab + vocab % 2  # one-hot embeddings; an even width for RoPE
    model = ModernDecoderLM(ModelConfig(vocab_size=vocab, d_model=d, n_layer=1, n_head=1, max_seq_len=max_seq_len,
                                        tie_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.zero_()
        model.tok_emb.weight[:, :vocab].copy_(torch.eye(vocab))
        model.lm_head.weight[tok.eos_id, :vocab] = 5.0  # every token -> eos ...
        for a, b in zip(chain, chain[1:], strict=False):
            model.lm_head.weight[b, a] = 10.0  # ... but the chain's tokens -> their successor
    save_model(model, path, tok)
    return path


@contextlib.contextmanager
def serving(lm, **settings) -> Iterator[str]:
    """The app of `modernlm serve` for `lm` (settings: ServeConfig fields), live on 127.0.0.1."""
    import uvicorn

    from modernlm.serve.app import ServeConfig, make_app

    app = make_app(lm, ServeConfig(**settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

"""Train a byte-level BPE tokenizer (the `tokenizers` library) on a corpus; save it to OUT.

    modernlm tokenizer train ../shared/data/wikitext-2/wiki.train.tokens --out data/tok
    modernlm tokenizer train -c corpus.yaml --out data/tok vocab_size=16000  # corpus.sources: [...]

OUT gets tokenizer.json + tokenizer_config.json (modernlm and transformers.AutoTokenizer load it).
Special tokens take the first ids; `<|endoftext|>` is bos and eos, and ChatML tokens are included.
The text is split as GPT-2 splits it, which llama.cpp implements as its "gpt-2" pre-tokenizer, so a
model with this tokenizer runs in llama.cpp / Ollama (`modernlm convert --to gguf`) with the same ids.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from modernlm.data.corpus import CorpusConfig, CorpusPrefix, corpus_with_input
from modernlm.errors import UserError
from modernlm.tokenizer import DEFAULT_SPECIAL_TOKENS, TOKENIZER_FILE, train_bpe

POSITIONALS = ["input"]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "dir"}


@dataclass
class Config:
    input: str = ""  # a file, directory or glob; shorthand for corpus.sources=[{path: INPUT}]
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    out: str = ""  # output directory (required)
    vocab_size: int = 8192  # including the 256 byte symbols and the special tokens
    min_frequency: int = 2  # a pair must occur this often to be merged
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    bos_token: str = "<|endoftext|>"  # "" = none
    eos_token: str = "<|endoftext|>"  # "" = none; prepare puts it after every document
    pad_token: str = "<|pad|>"  # "" = none (then pad falls back to eos)
    chat_template: str = "chatml"  # "chatml", "" (none) or a Jinja template string
    max_bytes: int = 0  # train on the first this many bytes of the corpus (0 = all)
    overwrite: bool = False  # replace a tokenizer already in OUT

    def __post_init__(self) -> None:
        if self.min_frequency < 0:
            raise UserError(f"min_frequency must be >= 0, got {self.min_frequency}")


def main(cfg: Config) -> None:
    if not cfg.out:
        raise UserError("out: give an output directory, e.g. out=runs/tokenizer")
    if (Path(cfg.out) / TOKENIZER_FILE).exists() and not cfg.overwrite:
        raise UserError(f"out: {cfg.out} holds a tokenizer already (shards made with it would no longer match it); "
                        "overwrite=true replaces it")  # fmt: skip
    texts = CorpusPrefix(corpus_with_input(cfg.input, cfg.corpus), cfg.max_bytes)
    start = time.perf_counter()
    docs = iter(texts)
    first = list(itertools.islice(docs, 1))  # fail on an empty corpus before training starts
    if not first:
        raise UserError("the corpus has no documents")
    tok = train_bpe(
        itertools.chain(first, docs),
        cfg.vocab_size,
        special_tokens=cfg.special_tokens,
        bos_token=cfg.bos_token or None,
        eos_token=cfg.eos_token or None,
        pad_token=cfg.pad_token or None,
        min_frequency=cfg.min_frequency,
        chat_template=cfg.chat_template or None,
        show_progress=sys.stderr.isatty(),
    )
    tok.save(cfg.out)
    seconds = time.perf_counter() - start
    print(
        f"trained byte-level BPE: vocab {tok.vocab_size} on {texts.documents:,} documents, "
        f"{texts.bytes / 1e6:.1f} MB in {seconds:.1f}s -> {cfg.out}"
    )
    if tok.vocab_size < cfg.vocab_size:
        print(f"warning: the corpus gave only {tok.vocab_size} tokens (asked for {cfg.vocab_size})")

"""Tokenize a corpus once into token shards the trainer memory-maps (see modernlm.data.corpus).

    modernlm prepare ../shared/data/wikitext-2/wiki.train.tokens tokenizer=data/tok out=data/wt2
    modernlm prepare -c corpus.yaml --tokenizer ../shared/data/gpt2-tokenizer --out data/mix

OUT gets meta.json, train_NNNNN.bin / val_NNNNN.bin (uint16 ids when the vocab fits, else uint32;
each document followed by eos) and the tokenizer. val takes whole documents (val_fraction, at least
one), or with val_split=tail the last val_fraction of the tokens (nanoGPT's 90/10 split of one text).
`tokenizer=byte` is the byte tokenizer (no training; one token per byte). OUT is written to a temp
dir and renamed at the end; output is the same for any num_workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modernlm.data.corpus import CorpusConfig, corpus_with_input, default_workers, prepare_tokens
from modernlm.errors import UserError
from modernlm.tokenizer import load_tokenizer

POSITIONALS = ["input"]
FLAGS = {"--out": "out", "--tokenizer": "tokenizer"}
OUTPUTS = {"out": "dir"}


@dataclass
class Config:
    input: str = ""  # a file, directory or glob; shorthand for corpus.sources=[{path: INPUT}]
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: str = ""  # tokenizer dir, tokenizer.json, or a GPT-2 vocab.json+merges.txt dir
    out: str = ""  # output directory (required)
    val_fraction: float = 0.0005  # share held out for validation: of documents, or of tokens with val_split=tail
    val_split: Literal["documents", "tail"] = "documents"  # random whole documents, or the corpus's last tokens
    seed: int = 0  # seeds the train/val draw
    num_workers: int = 0  # tokenizer processes; 0 = one per CPU core
    shard_tokens: int = 100_000_000  # tokens per .bin file (the last one holds the rest)
    chunk_bytes: int = 1 << 20  # text per task sent to a worker
    overwrite: bool = False  # replace OUT if it exists
    progress: bool = True  # tqdm progress bar (on a terminal)


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """OUT is built in a temporary sibling directory and renamed: its parent must be writable too."""
    out = Path(cfg.out)
    return [("out", out.absolute().parent, "dir")] if cfg.out and out.exists() else []


def main(cfg: Config) -> None:
    if not cfg.tokenizer:
        raise UserError(
            "tokenizer: give a tokenizer dir (from `modernlm tokenizer train`) or a GPT-2 files dir"
        )
    if not cfg.out:
        raise UserError("out: give an output directory, e.g. out=data/wikitext2")
    corpus = corpus_with_input(cfg.input, cfg.corpus)
    tok = load_tokenizer(cfg.tokenizer)
    workers = cfg.num_workers or default_workers()
    start = time.perf_counter()
    meta = prepare_tokens(
        corpus,
        tok,
        cfg.out,
        val_fraction=cfg.val_fraction,
        val_split=cfg.val_split,
        seed=cfg.seed,
        num_workers=workers,
        shard_tokens=cfg.shard_tokens,
        chunk_bytes=cfg.chunk_bytes,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
    )
    seconds = time.perf_counter() - start
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"prepared {train['tokens'] + val['tokens']:,} tokens ({meta['dtype']}): "
        f"train {train['tokens']:,} ({len(train['files'])} file(s), {train['documents']:,} docs), "
        f"val {val['tokens']:,} ({val['documents']:,} docs)"
    )
    print(
        f"read {meta['bytes']:,} bytes, {meta['bytes_per_token']:.2f} bytes/token, "
        f"{meta['bytes'] / 1e6 / seconds:.2f} MB/s ({workers} workers, {seconds:.1f}s) -> {cfg.out}"
    )

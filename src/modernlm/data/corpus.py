"""Corpora and token shards: read documents, mix sources by weight, tokenize once to disk.

Sources (`SourceConfig`): local .txt (and WikiText's .tokens / .raw), .jsonl and .parquet files,
directories and globs, any of them gzipped, or Hugging Face hub datasets; `documents` says how text
becomes documents (WikiText articles, paragraphs, lines, whole files, or a `separator`).
Mixing (`CorpusConfig`): weights are shares of the mix, in UTF-8 bytes or documents; the next
document always comes from the source furthest below its share, and the mix stops when the first
source runs out, so no document repeats.
Token shards (`prepare_tokens`, modernlm-tokens-v1) are what the trainer memory-maps:
`DIR/meta.json`, `DIR/{train,val}_NNNNN.bin` (uint16 when the vocabulary fits, else uint32;
documents concatenated, each followed by eos) and the tokenizer files.

Design notes: docs/design.md#datacorpuspy
"""

from __future__ import annotations

import dataclasses
import glob
import io
import itertools
import json
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modernlm.data.readers import jsonl_rows, load_hub, parquet_column, text_lines
from modernlm.errors import UserError
from modernlm.files import atomic_write, clean_leftovers, replace_dir, tmp_path

FORMAT = "modernlm-tokens-v1"
META_FILE = "meta.json"
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".tokens", ".raw")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
WIKITEXT_EXTENSIONS = (".tokens", ".raw")


@dataclass
class SourceConfig:
    """One corpus source: a local `path` or a hub `hf_dataset` (exactly one)."""

    path: str = ""  # file, directory or glob: .txt/.tokens/.raw/.jsonl/.parquet, optionally .gz
    hf_dataset: str = ""  # or a Hugging Face hub dataset id, e.g. "roneneldan/TinyStories"
    hf_config: str = ""  # the hub dataset's config name, e.g. "wikitext-103-raw-v1"
    split: str = "train"  # the hub split to read
    hf_streaming: bool = False  # stream the hub dataset instead of downloading it first
    text_field: str = "text"  # jsonl key / parquet or hub column that holds the text
    documents: Literal["auto", "paragraph", "line", "file", "wikitext"] = "auto"  # see module doc
    separator: str = ""  # if set, text is split into documents on this string instead
    weight: float = 0.0  # share of the mix (see CorpusConfig); 0 everywhere = all documents
    max_documents: int = 0  # read at most this many documents from the source (0 = all)

    def __post_init__(self):
        if bool(self.path) == bool(self.hf_dataset):
            raise ValueError("give exactly one of path (a local file or glob) or hf_dataset")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {self.max_documents}")

    @property
    def name(self) -> str:
        if self.path:
            return self.path
        return ":".join(x for x in ("hf", self.hf_dataset, self.hf_config, self.split) if x)


@dataclass
class CorpusConfig:
    """Where the text comes from, and how several sources are mixed (see module docstring)."""

    sources: list[SourceConfig] = field(default_factory=list)
    mix_by: Literal["bytes", "documents"] = "bytes"  # what the source weights are shares of

    def __post_init__(self):
        weighted = [s.weight > 0 for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError(
                "give every source a weight > 0 (a weighted mix) or none (all documents)"
            )


# ---------------------------------------------------------------------------------------------
# Reading documents


def source_files(path: str) -> list[Path]:
    """The files a source path names: a file, a directory's known files, or a glob's matches."""
    if glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"no files match {path!r}")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f, strict=False))
        if not files:
            raise UserError(f"no .txt/.jsonl/.parquet files in directory {p}")
        return files
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    return [p]


def _kind(path: Path, strict: bool = True) -> str | None:
    """'text', 'jsonl' or 'parquet' from the extension (under an optional .gz)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    for kind, exts in (
        ("text", TEXT_EXTENSIONS),
        ("jsonl", JSONL_EXTENSIONS),
        ("parquet", PARQUET_EXTENSIONS),
    ):
        if ext in exts:
            return kind
    if strict:
        known = ", ".join(TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS)
        raise UserError(
            f"{path}: unknown file type {ext or '(no extension)'!r}; expected {known} (or .gz)"
        )
    return None


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    for where, row in jsonl_rows(path):
        if text_field not in row:
            raise UserError(f"{where}: no {text_field!r} field (set text_field=...)")
        text = row[text_field]
        if not isinstance(text, str):
            raise UserError(f"{where}: {text_field!r} is {type(text).__name__}, expected a string")
        yield text


def _hub_texts(src: SourceConfig) -> Iterator[str]:
    ds = load_hub(src.hf_dataset, src.hf_config, src.split, streaming=src.hf_streaming, column=src.text_field)
    for row in ds:
        text = row.get(src.text_field)
        if isinstance(text, str):
            yield text


# Top-level WikiText headings look like " = Title = "; sections are " = = Title = = ".
_WIKITEXT_TITLE = re.compile(r"^\s*= (?!=).*[^=\s].* =\s*$")


def _group_lines(lines: Iterable[str], rule: str) -> Iterator[str]:
    """Turn lines (with their newlines) into stripped, non-empty documents by `rule`."""
    if rule == "line":
        for line in lines:
            if line.strip():
                yield line.strip()
        return
    if rule == "file":
        text = "".join(lines).strip()
        if text:
            yield text
        return
    buf: list[str] = []
    for line in lines:
        if rule == "paragraph":
            if line.strip():
                buf.append(line)
                continue
        elif _WIKITEXT_TITLE.match(line) is None:  # wikitext: a title starts the next article
            buf.append(line)
            continue
        text = "".join(buf).strip()
        if text:
            yield text
        buf = [] if rule == "paragraph" else [line]
    text = "".join(buf).strip()
    if text:
        yield text


def _split_separator(lines: Iterable[str], separator: str) -> Iterator[str]:
    for part in "".join(lines).split(separator):
        if part.strip():
            yield part.strip()


def _as_lines(rows: Iterable[str]) -> Iterator[str]:
    for row in rows:
        yield row if row.endswith("\n") else row + "\n"


def _file_documents(path: Path, src: SourceConfig) -> Iterator[str]:
    kind = _kind(path)
    if kind == "text":
        lines: Iterable[str] = text_lines(path)
        rule = src.documents
        if rule == "auto":
            inner = path.with_suffix("") if path.suffix.lower() == ".gz" else path
            rule = "wikitext" if inner.suffix.lower() in WIKITEXT_EXTENSIONS else "paragraph"
        if src.separator:
            return _split_separator(lines, src.separator)
        return _group_lines(lines, rule)
    rows = _jsonl_texts(path, src.text_field) if kind == "jsonl" else parquet_column(path, src.text_field)
    return _rows_to_documents(rows, src)


def _rows_to_documents(rows: Iterable[str], src: SourceConfig) -> Iterator[str]:
    if src.separator:
        return _split_separator(_as_lines(rows), src.separator)
    if src.documents == "auto":
        return (r for r in rows if r.strip())
    return _group_lines(_as_lines(rows), src.documents)


def _nonempty(docs: Iterable[str], what: str) -> Iterator[str]:
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise UserError(f"{what}: no documents (empty file?)")


def read_source(src: SourceConfig) -> Iterator[str]:
    """All documents of one source, in order (at most `max_documents`)."""

    def docs() -> Iterator[str]:
        if src.hf_dataset:
            yield from _nonempty(_rows_to_documents(_hub_texts(src), src), f"source {src.name}")
            return
        for path in source_files(src.path):
            yield from _nonempty(_file_documents(path, src), str(path))

    it = docs()
    return itertools.islice(it, src.max_documents) if src.max_documents else it


def iter_documents(corpus: CorpusConfig) -> Iterator[tuple[int, str]]:
    """(source index, document) pairs for the whole corpus, mixed as the module docstring says."""
    if not corpus.sources:
        raise UserError("no corpus sources: give an input path or corpus.sources")
    for s in corpus.sources:  # fail on a missing file now, not after tokenizing the others
        if s.path:
            source_files(s.path)
    streams = [read_source(s) for s in corpus.sources]
    if all(s.weight == 0 for s in corpus.sources):
        for i, stream in enumerate(streams):
            for doc in stream:
                yield i, doc
        return
    total = sum(s.weight for s in corpus.sources)
    shares = [s.weight / total for s in corpus.sources]
    taken = [0] * len(streams)
    while True:
        # Deficit round-robin: the source furthest below its share goes next (ties: first listed).
        i = min(range(len(streams)), key=lambda k: taken[k] / shares[k])
        doc = next(streams[i], None)
        if doc is None:  # first source exhausted: stop, so the shares hold and nothing repeats
            return
        taken[i] += len(doc.encode("utf-8")) if corpus.mix_by == "bytes" else 1
        yield i, doc


def corpus_with_input(input: str, corpus: CorpusConfig) -> CorpusConfig:
    """A command's `input` shorthand (one path or glob) as a corpus; it excludes corpus.sources."""
    if input and corpus.sources:
        raise UserError("give either input (one path) or corpus.sources, not both")
    if input:
        return dataclasses.replace(corpus, sources=[SourceConfig(path=input)])
    if not corpus.sources:
        raise UserError(
            "no corpus: give an input path (e.g. data/wiki.train.tokens) or corpus.sources"
        )
    return corpus


# ---------------------------------------------------------------------------------------------
# Token shards


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab <= 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise UserError(f"tokenizer vocabulary of {vocab_size} does not fit in uint32 token files")


class _ShardWriter:
    """Appends token arrays to SPLIT_00000.bin, SPLIT_00001.bin, ... of `shard_tokens` each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = (
            directory,
            split,
            dtype,
            shard_tokens,
        )
        self.files: list[str] = []
        self.tokens = self.documents = 0
        self._file: io.BufferedWriter | None = None
        self._left = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        self.documents += documents
        while tokens.size:
            if self._left == 0:
                self.close()
                name = f"{self.split}_{len(self.files):05d}.bin"
                self._file = open(self.directory / name, "wb")  # noqa: SIM115 (closed in close())
                self.files.append(name)
                self._left = self.shard_tokens
            n = min(self._left, tokens.size)
            self._file.write(tokens[:n].tobytes())
            tokens, self._left, self.tokens = tokens[n:], self._left - n, self.tokens + n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def meta(self) -> dict[str, Any]:
        return {"files": self.files, "tokens": self.tokens, "documents": self.documents}


def _move_tail(train: _ShardWriter, val: _ShardWriter, fraction: float, eos: int | None) -> None:
    """Move the last `fraction` of train's tokens to val: read them off the end of train's shard
    files, truncate the files, write them to val. The first int(n * (1 - fraction)) tokens stay."""
    n = train.tokens
    move = n - int(n * (1 - fraction))
    if move == 0 or move == n:
        raise UserError(f"val_fraction {fraction} of {n} tokens leaves train or val empty")
    itemsize = train.dtype.itemsize
    pieces, left = [], move
    while left:
        file = train.directory / train.files[-1]
        size = file.stat().st_size // itemsize
        take = min(size, left)
        pieces.append(np.fromfile(file, dtype=train.dtype, offset=(size - take) * itemsize))
        if take == size:
            file.unlink()
            train.files.pop()
        else:
            os.truncate(file, (size - take) * itemsize)
        left -= take
    tail = np.concatenate(pieces[::-1])
    # Documents now count the eos tokens each split ends a document with (the cut one counts once
    # in each split, as both hold a part of it).
    moved_docs = int((tail == eos).sum()) if eos is not None else 0
    val.write(tail, max(moved_docs, 1))
    val.close()
    train.tokens -= move
    train.documents = max(train.documents - moved_docs, 1)


# Worker state: each process builds the tokenizer once, from its JSON, in `_init_worker`.
_BACKEND: Any = None
_EOS: int | None = None


def _init_worker(tokenizer_json: str, eos_id: int | None) -> None:
    global _BACKEND, _EOS
    from tokenizers import Tokenizer as Backend

    # One thread per process, so num_workers is the number of cores used (and never oversubscribed).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _BACKEND, _EOS = Backend.from_str(tokenizer_json), eos_id


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a chunk of documents, each followed by eos, flat; and each document's length."""
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for k, enc in enumerate(_BACKEND.encode_batch(texts, add_special_tokens=False)):
        flat.extend(enc.ids)
        if _EOS is not None:
            flat.append(_EOS)
        lengths[k] = len(enc.ids) + (_EOS is not None)
    return np.array(flat, dtype=np.uint32), lengths


def _map_ordered(
    func: Callable, items: Iterable[tuple[Any, Any]], num_workers: int, initargs: tuple
) -> Iterator:
    """(key, func(payload)) for each (key, payload) in `items`, in order, over `num_workers`
    processes with a bounded number in flight (only the payload travels to a worker)."""
    if num_workers <= 1:
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        _init_worker(*initargs)
        try:
            for key, payload in items:
                yield key, func(payload)
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        return
    import multiprocessing as mp

    # spawn, not fork: forking a process whose tokenizers threads have run can deadlock, and spawn
    # behaves the same on Linux and macOS.
    ctx = mp.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for key, payload in items:
            pending.append((key, pool.apply_async(func, (payload,))))
            if len(pending) >= 2 * num_workers:  # backpressure: never read far ahead of the workers
                key, result = pending.popleft()
                yield key, result.get()
        while pending:
            key, result = pending.popleft()
            yield key, result.get()


def _chunks(
    docs: Iterable[tuple[int, str]], chunk_bytes: int
) -> Iterator[tuple[tuple[list[int], list[int]], list[str]]]:
    """Group documents into chunks of about `chunk_bytes`: ((source ids, UTF-8 sizes), texts)."""
    sources: list[int] = []
    texts: list[str] = []
    sizes: list[int] = []
    total = 0
    for i, text in docs:
        sources.append(i)
        texts.append(text)
        sizes.append(len(text.encode("utf-8")))
        total += sizes[-1]
        if total >= chunk_bytes:
            yield (sources, sizes), texts
            sources, texts, sizes, total = [], [], [], 0
    if texts:
        yield (sources, sizes), texts


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def prepare_tokens(
    corpus: CorpusConfig,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.0005,
    val_split: Literal["documents", "tail"] = "documents",
    seed: int = 0,
    num_workers: int = 0,
    shard_tokens: int = 100_000_000,
    chunk_bytes: int = 1 << 20,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `corpus` with `tokenizer` (a `modernlm.tokenizer.Tokenizer`) into `out_dir`.

    Each document goes to val with probability `val_fraction` (a seeded draw per document, in corpus
    order; if none did, the last document does), otherwise to train; both splits hold whole
    documents, never shared. `val_split="tail"` instead holds out the last `val_fraction` of the
    corpus's tokens, cutting mid-document if need be (nanoGPT's split of one long text: the first
    90% trains, the last 10% validates). Documents are tokenized in chunks of about `chunk_bytes` by
    `num_workers` processes (0 = one per core); chunking and the draws do not depend on the worker
    count, so the output is byte-identical for any `num_workers`. Everything is written to a
    temporary sibling directory that is renamed to `out_dir` at the end, so an interrupted run never
    leaves a complete-looking dataset. Returns the meta.json dict.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_split not in ("documents", "tail"):
        raise UserError(f"val_split must be 'documents' or 'tail', got {val_split!r}")
    if shard_tokens < 1 or chunk_bytes < 1:
        raise UserError("shard_tokens and chunk_bytes must be >= 1")
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    if eos is None:
        print("warning: the tokenizer has no eos token; documents are joined without a separator")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists; pass overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = num_workers if num_workers > 0 else default_workers()

    from tqdm import tqdm

    n_sources = len(corpus.sources)
    per_source = {
        "documents": np.zeros(n_sources, np.int64),
        "bytes": np.zeros(n_sources, np.int64),
        "tokens": np.zeros(n_sources, np.int64),
    }
    tmp = tmp_path(out)  # .<out>.tmp-<pid>: files.clean_leftovers recognizes it after a kill
    clean_leftovers(Path(out).parent)  # a killed earlier run's (its pid is gone)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        rng = np.random.default_rng(seed)
        held: np.ndarray | None = (
            None  # the latest train document, kept back in case val ends empty
        )
        chunks = _chunks(iter_documents(corpus), chunk_bytes)
        bar = tqdm(
            total=None, unit="B", unit_scale=True, desc="prepare", disable=not progress or None
        )
        initargs = (tokenizer.backend.to_str(), eos)
        for (sources, sizes), (ids, lengths) in _map_ordered(
            _encode_chunk, chunks, workers, initargs
        ):
            src = np.asarray(sources)
            np.add.at(per_source["documents"], src, 1)
            np.add.at(per_source["bytes"], src, np.asarray(sizes))
            np.add.at(per_source["tokens"], src, lengths - (eos is not None))
            is_val = rng.random(len(lengths)) < val_fraction
            if val_split == "tail":
                is_val[:] = False  # the tail moves to val at the end
            token_is_val = np.repeat(is_val, lengths)
            if is_val.any():
                writers["val"].write(ids[token_is_val], int(is_val.sum()))
            train_lengths = lengths[~is_val]
            if train_lengths.size:
                train = ids[~token_is_val]
                if held is not None:
                    writers["train"].write(held, 1)
                last = int(train_lengths[-1])
                writers["train"].write(train[: train.size - last], train_lengths.size - 1)
                held = train[-last:]
            bar.update(sum(sizes))
        bar.close()
        if held is not None:
            to_val = writers["val"].documents == 0 and val_split == "documents"
            writers["val" if to_val else "train"].write(held, 1)
        for w in writers.values():
            w.close()
        if val_split == "tail":
            _move_tail(writers["train"], writers["val"], val_fraction, eos)
        if writers["train"].documents == 0:
            raise UserError(
                f"the corpus has {writers['val'].documents} document(s), all in val: need at least 2 documents "
                "(one always goes to val), or a smaller val_fraction; val_split=tail holds out the last "
                "val_fraction of the text instead"
            )
        total_bytes = int(per_source["bytes"].sum())
        text_tokens = int(per_source["tokens"].sum())
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": eos,
            "bos_id": tokenizer.bos_id,
            "splits": {s: w.meta() for s, w in writers.items()},
            "source": {
                "sources": [
                    {**_source_record(s), **{k: int(v[i]) for k, v in per_source.items()}}
                    for i, s in enumerate(corpus.sources)
                ],
                "mix_by": corpus.mix_by,
                "val_fraction": val_fraction,
                "val_split": val_split,
                "seed": seed,
                "shard_tokens": shard_tokens,
                "text_tokens": text_tokens,  # tokens without the eos separators
            },
            "bytes": total_bytes,
            # bytes per text token (eos separators are not text), the tokenizer's compression
            "bytes_per_token": total_bytes / max(text_tokens, 1),
        }
        tokenizer.save(tmp)
        atomic_write(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")  # last: marks it complete
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def write_shards(
    path: str | Path,
    splits: dict[str, np.ndarray | list[int]],
    vocab_size: int,
    *,
    eos_id: int | None = None,
    bos_id: int | None = None,
    tokenizer: Any = None,
    shard_tokens: int = 0,
) -> Path:
    """Write in-memory token arrays as a shard directory (one file per split, or `shard_tokens`
    per file). For small corpora and tests; `prepare_tokens` streams real corpora."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    meta_splits = {}
    for split, tokens in splits.items():
        arr = np.asarray(tokens)
        writer = _ShardWriter(path, split, dtype, shard_tokens or max(arr.size, 1))
        writer.write(arr, int((arr == eos_id).sum()) if eos_id is not None else 1)
        writer.close()
        meta_splits[split] = writer.meta()
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "bos_id": bos_id,
        "splits": meta_splits,
        "source": {"writer": "modernlm.data.corpus.write_shards"},
        "bytes": 0,
        "bytes_per_token": 0.0,
    }
    if tokenizer is not None:
        tokenizer.save(path)
    atomic_write(path / META_FILE, json.dumps(meta, indent=2))
    return path


def _source_record(src: SourceConfig) -> dict[str, Any]:
    """A source's settings (only those that differ from the defaults) and, for paths, its files."""
    defaults = {f.name: f.default for f in dataclasses.fields(SourceConfig)}
    record: dict[str, Any] = {k: v for k, v in dataclasses.asdict(src).items() if v != defaults[k]}
    out: dict[str, Any] = {"config": record}
    if src.path:
        out["files"] = [str(p) for p in source_files(src.path)]
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check DIR/meta.json; every problem is a UserError naming the file."""
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise UserError("data.path is not set: point it at a directory made by `modernlm prepare`")
    if not path.is_dir():
        raise UserError(f"data.path: directory not found: {path}")
    file = path / "meta.json"
    if not file.is_file():
        hint = " (the directory is empty)" if not any(path.iterdir()) else ""
        raise UserError(
            f"{path} is not a prepared dataset (no meta.json){hint}; make it with `modernlm prepare`"
        )
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f"{file}: not a {FORMAT} token directory "
            f"(format={meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise UserError(f"{file}: dtype must be uint16 or uint32, got {meta.get('dtype')!r}")
    if not isinstance(meta.get("vocab_size"), int) or not isinstance(meta.get("splits"), dict):
        raise UserError(f"{file}: needs an integer vocab_size and a splits mapping")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
        size = 0
        for name in info.get("files", []):
            shard = path / name
            if not shard.is_file():
                raise UserError(f"{file} lists {name}, which does not exist (split {split!r})")
            size += shard.stat().st_size
        if size != info.get("tokens", -1) * itemsize:  # a truncated or foreign shard
            raise UserError(f"{path}: split {split!r} has {size} bytes, meta says {info.get('tokens')} tokens")
    return meta



class CorpusPrefix:
    """A corpus' documents, the last one the first to reach `max_bytes` (0 = all of them);
    `documents` and `bytes` count what has been read."""

    def __init__(self, corpus: CorpusConfig, max_bytes: int = 0) -> None:
        self.corpus, self.max_bytes = corpus, max_bytes
        self.documents = self.bytes = 0

    def __iter__(self) -> Iterator[str]:
        for _, doc in iter_documents(self.corpus):
            self.bytes += len(doc.encode("utf-8"))
            self.documents += 1
            yield doc
            if self.max_bytes and self.bytes >= self.max_bytes:
                return


__all__ = [
    "CorpusPrefix",
    "CorpusConfig",
    "SourceConfig",
    "corpus_with_input",
    "iter_documents",
    "prepare_tokens",
    "read_meta",
    "read_source",
    "source_files",
    "token_dtype",
    "write_shards",
]

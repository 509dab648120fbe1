"""Throughput of `modernlm prepare` against naive tokenization, on WikiText-2 train + GPT-2 BPE.

    python benchmarks/bench_prepare.py [--data ../shared/data] [--repeats 3] [--workers 1,2]

Every method reads the same documents and produces the same token ids (checked); times include
reading the text and writing the ids. Baselines: one `tokenizers` encode call per document in
one process + np.concatenate (naive), the same with `encode_batch` (which uses every core through
tokenizers' own threads), and HF `datasets.map` when `datasets` is installed. Best of N runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from modernlm.data.corpus import CorpusConfig, SourceConfig, iter_documents, prepare_tokens
from modernlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def naive(corpus: CorpusConfig, tok, out: Path, batch: bool) -> int:
    docs = [d for _, d in iter_documents(corpus)]
    eos = [tok.eos_id]
    if batch:
        encoded = [e.ids + eos for e in tok.backend.encode_batch(docs, add_special_tokens=False)]
    else:
        encoded = [tok.backend.encode(d, add_special_tokens=False).ids + eos for d in docs]
    ids = np.concatenate([np.asarray(e, dtype=np.uint16) for e in encoded])
    ids.tofile(out / "all.bin")
    return ids.size


def hf_datasets_map(corpus: CorpusConfig, tok, out: Path, workers: int) -> int:
    import datasets

    ds = datasets.Dataset.from_dict({"text": [d for _, d in iter_documents(corpus)]})
    eos = tok.eos_id
    ds = ds.map(
        lambda b: {"ids": [e.ids + [eos] for e in tok.backend.encode_batch(b["text"])]},
        batched=True,
        remove_columns=["text"],
        num_proc=workers if workers > 1 else None,
    )
    ids = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ds["ids"]])
    ids.tofile(out / "all.bin")
    return ids.size


def _cpu_seconds() -> float:
    # this process and its finished children (the prepare workers are joined before returning)
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(repeats: int, fn) -> tuple[float, float, int]:
    """Best wall time of `repeats` runs, the CPU seconds of that run, and fn's token count."""
    runs, n = [], 0
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
        try:
            start, cpu = time.perf_counter(), _cpu_seconds()
            n = fn(out)
            runs.append((time.perf_counter() - start, _cpu_seconds() - cpu))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return *min(runs), n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()

    data = Path(args.data)
    corpus = CorpusConfig([SourceConfig(path=str(data / "wikitext-2" / "wiki.train.tokens"))])
    tok = load_tokenizer(data / "gpt2-tokenizer")
    mb = sum(len(d.encode()) for _, d in iter_documents(corpus)) / 1e6

    rows: list[tuple[str, str, float, float, int]] = []
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    rows.append(
        (
            "naive: encode() per document, 1 process",
            "1",
            *best_of(args.repeats, lambda o: naive(corpus, tok, o, False)),
        )
    )
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    cores = len(os.sched_getaffinity(0))
    rows.append(
        (
            "naive: encode_batch(), tokenizers threads",
            f"{cores} threads",
            *best_of(args.repeats, lambda o: naive(corpus, tok, o, True)),
        )
    )
    try:
        import datasets  # noqa: F401

        for w in (1, cores):
            rows.append(
                (
                    f"HF datasets.map(batched, num_proc={w})",
                    str(w),
                    *best_of(args.repeats, lambda o, w=w: hf_datasets_map(corpus, tok, o, w)),
                )
            )
    except ImportError:
        pass
    for w in [int(x) for x in args.workers.split(",")]:

        def run(out: Path, w: int = w) -> int:
            meta = prepare_tokens(corpus, tok, out / "ds", num_workers=w, progress=False)
            return sum(s["tokens"] for s in meta["splits"].values())

        rows.append((f"modernlm prepare num_workers={w}", str(w), *best_of(args.repeats, run)))

    counts = {n for *_, n in rows}
    assert len(counts) == 1, f"methods disagree on the token count: {counts}"
    base = rows[0][2]
    print(
        f"WikiText-2 train ({mb:.1f} MB of text, {counts.pop():,} GPT-2 tokens incl. eos), "
        f"{cores} cores, best of {args.repeats}\n"
    )
    print("| method | workers | wall s | MB/s | speedup vs naive | CPU s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, workers, seconds, cpu, _ in rows:
        print(
            f"| {name} | {workers} | {seconds:.2f} | {mb / seconds:.2f} | {base / seconds:.2f}x "
            f"| {cpu:.2f} |"
        )


if __name__ == "__main__":
    main()

"""Readers of local files and hub datasets, with one error format.

Every reader yields what it read and raises a `UserError` that says where, in one format:

    <file>: cannot read (...)                     the file as a whole (missing, a bad gzip stream)
    <file> line <n>: not valid JSON (...)         a line of a text, .tsv or JSON Lines file (1-based)
    <file> record <n>: expected a JSON object     an element of a .json list (1-based)
    <dataset>[<split>] row <n>: ...               a hub row (0-based, as `datasets` numbers them)

Row readers yield `(where, record)` pairs, so that the caller's own checks ("missing field 'answer'")
name the same place: f"{where}: ...". Files ending in .gz are read through gzip; text is UTF-8.
`datasets` (and pyarrow for .parquet) are imported only when a hub dataset (a parquet file) is read.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from modernlm.errors import UserError

Rows = Iterator[tuple[str, dict[str, Any]]]  # (where, record)


def is_gzip(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(".gz")


def _read_error(where: str, e: Exception) -> UserError:
    if isinstance(e, UnicodeDecodeError):
        return UserError(f"{where}: not UTF-8 text ({e.reason})")
    return UserError(f"{where}: cannot read ({e})")  # gzip.BadGzipFile is an OSError


@contextlib.contextmanager
def open_text(path: str | Path) -> Iterator[TextIO]:
    """The file as UTF-8 text (through gzip for .gz), a leading byte order mark dropped (Windows
    tools write one; HF datasets' readers drop it too); a read error is a UserError naming the file."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8-sig") if is_gzip(path) else open(path, encoding="utf-8-sig") as f:
            yield f
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise _read_error(str(path), e) from None


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) of a text file; a read error names the line."""
    with open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
        except UnicodeDecodeError as e:
            raise _read_error(f"{path} line {_first_bad_line(path) or lineno + 1}", e) from None
        except (OSError, EOFError) as e:
            raise _read_error(f"{path} line {lineno + 1}", e) from None


def _first_bad_line(path: str | Path) -> int | None:
    """The line (as text mode counts them: after \\r\\n, \\n or \\r) of a file's first bytes that are not
    UTF-8: text mode decodes some 8 KB ahead of the line it hands out, so the error comes lines early.
    A line break is never inside a UTF-8 character, so the lines can be split as bytes."""
    with gzip.open(path, "rb") if is_gzip(path) else open(path, "rb") as f:
        n = 0
        for raw in f:  # split at newlines; a lone carriage return inside ends a line too
            for part in raw.removesuffix(b"\n").removesuffix(b"\r").split(b"\r"):
                n += 1
                try:
                    part.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    return None


def text_lines(path: str | Path) -> Iterator[str]:
    """The lines of a text file, with their newlines."""
    for _, line in numbered_lines(path):
        yield line


def json_object(text: str, where: str) -> dict[str, Any]:
    """One JSON object parsed from `text` (a line of a JSON Lines file, found at `where`)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def jsonl_rows(path: str | Path, lines: Iterable[str] | None = None) -> Rows:
    """The objects of a JSON Lines file (or of its `lines`, already read); blank lines are skipped."""
    numbered = numbered_lines(path) if lines is None else enumerate(lines, start=1)
    for lineno, line in numbered:
        if line.strip():
            where = f"{path} line {lineno}"
            yield where, json_object(line, where)


def json_rows(path: str | Path) -> Rows:
    """The objects of a .json file holding a list of them (JSON Lines under a .json name also)."""
    with open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: it is JSON Lines under a .json name (SAMSum's zip)
            yield from jsonl_rows(path, text.splitlines(keepends=True))
            return
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path} record {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{path} record {i}", row


def tsv_rows(path: str | Path) -> Rows:
    """The rows of a tab-separated file with a header row, as dicts by column name.

    GLUE .tsv files are plain tab-split lines (no quoting); the header names the columns."""
    header: list[str] | None = None
    for lineno, line in numbered_lines(path):
        line = line.rstrip("\r\n")
        if header is None:
            header = line.split("\t")
            if header == [""]:
                break
            continue
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise UserError(
                f"{path} line {lineno}: expected {len(header)} tab-separated columns "
                f"({', '.join(header)}), got {len(cells)}"
            )
        yield f"{path} line {lineno}", dict(zip(header, cells, strict=True))
    if header is None or header == [""]:
        raise UserError(f"{path} line 1: empty file; expected a header row such as 'sentence<TAB>label'")


def file_rows(path: str | Path) -> Rows:
    """The records of a .tsv, .json, .jsonl, .ndjson file (optionally .gz), by its name."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".tsv"):
        return tsv_rows(path)
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return jsonl_rows(path)
    if name.endswith((".json", ".json.gz")):
        return json_rows(path)
    raise UserError(f"path: unsupported file type {path} (expected .tsv, .json, .jsonl or .jsonl.gz)")


def parquet_column(path: str | Path, column: str) -> Iterator[str]:
    """The non-null values of one column of a .parquet file (optionally .gz)."""
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        source: Any = io.BytesIO(gzip.decompress(path.read_bytes())) if is_gzip(path) else path
        pf = pq.ParquetFile(source)
    except Exception as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if column not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {column!r}; columns: {', '.join(pf.schema_arrow.names)}")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None and not isinstance(value, str):
                raise UserError(f"{path} row {row}: {column!r} is {type(value).__name__}, expected a string")
            if value is not None:
                yield value


def hub_name(dataset: str, config: str = "", split: str = "train") -> str:
    """'openai/gsm8k/main[test]': how messages and reports name a hub dataset's split."""
    return "/".join(x for x in (dataset, config) if x) + f"[{split}]"


def load_hub(
    dataset: str, config: str = "", split: str = "train", *, data_dir: str = "", streaming: bool = False,
    column: str = "",
) -> Any:
    """`datasets.load_dataset` of one split (a hub id, or a local directory of json/csv/parquet
    files); any failure is a UserError. With `column`, a dataset that lacks it is one too."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "hf_dataset: loading a hub dataset needs the `datasets` package (pip install datasets)"
        ) from None
    kwargs: dict[str, Any] = {"split": split}
    if data_dir:
        kwargs["data_dir"] = data_dir
    if streaming:
        kwargs["streaming"] = True
    try:
        ds = datasets.load_dataset(dataset, config or None, **kwargs)
    except Exception as e:  # no network, unknown id/config/split: all the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{hub_name(dataset, config, split)}: cannot load ({first})") from None
    columns = getattr(ds, "column_names", None)
    if column and columns is not None and column not in columns:
        raise UserError(f"{hub_name(dataset, config, split)}: no column {column!r}; columns: {', '.join(columns)}")
    return ds


def load_text(
    path: str = "", hf_dataset: str = "", hf_config: str = "", split: str = "test", text_field: str = "text"
) -> tuple[str, str]:
    """(text, its description): a UTF-8 text file, or a hub dataset's `text_field` column joined
    with "\\n\\n" as the HF perplexity guide joins WikiText."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"data: no such file: {path}")
        try:
            return file.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise UserError(f"data: {path} is not UTF-8 text ({e})") from None
    if not hf_dataset:
        raise UserError("data: give a text file (data=PATH) or a hub dataset (hf_dataset=NAME)")
    ds = load_hub(hf_dataset, hf_config, split, column=text_field)
    what = "/".join(x for x in (hf_dataset, hf_config) if x) + f" [{split}]"
    return "\n\n".join(ds[text_field]), f"hub:{what}"


def hub_rows(
    dataset: str, config: str = "", split: str = "train", *, data_dir: str = "", streaming: bool = False
) -> Rows:
    """The rows of a hub dataset's split, as dicts."""
    ds = load_hub(dataset, config, split, data_dir=data_dir, streaming=streaming)
    for i, row in enumerate(ds):
        yield f"{dataset}[{split}] row {i}", dict(row)


__all__ = [
    "Rows",
    "file_rows",
    "hub_name",
    "hub_rows",
    "is_gzip",
    "json_object",
    "json_rows",
    "jsonl_rows",
    "load_hub",
    "numbered_lines",
    "open_text",
    "parquet_column",
    "text_lines",
    "tsv_rows",
]

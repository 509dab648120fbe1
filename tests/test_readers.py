"""data.readers: one set of file and hub readers, one error format ("<file> line <n>: ...")."""

from __future__ import annotations

import gzip
import json

import pytest

from modernlm.data.readers import (
    file_rows,
    hub_rows,
    json_rows,
    jsonl_rows,
    load_hub,
    numbered_lines,
    open_text,
    text_lines,
    tsv_rows,
)
from modernlm.errors import UserError


def test_text_plain_and_gzipped_read_the_same(tmp_path):
    text = "one\ntwo\r\nthree"
    (tmp_path / "a.txt").write_bytes(text.encode())
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    lines = list(text_lines(tmp_path / "a.txt"))
    assert lines == ["one\n", "two\n", "three"]  # newlines kept (and \r\n read as \n)
    assert list(text_lines(tmp_path / "a.txt.gz")) == lines
    assert [n for n, _ in numbered_lines(tmp_path / "a.txt")] == [1, 2, 3]
    with open_text(tmp_path / "a.txt.gz") as f:
        assert f.read() == "one\ntwo\nthree"


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"missing\.txt: cannot read"):
        list(text_lines(tmp_path / "missing.txt"))
    (tmp_path / "fake.txt.gz").write_text("not gzip")
    with pytest.raises(UserError, match=r"fake\.txt\.gz line 1: cannot read"):
        list(text_lines(tmp_path / "fake.txt.gz"))
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt line 2: not UTF-8 text"):
        list(text_lines(tmp_path / "latin1.txt"))
    # the line itself, not the last one handed out: text mode decodes ~8 KB ahead (it said line 4497
    # for 5000), and counts a lone \r as a line's end, as here
    lines = [f"line {i}\r\n" if i % 2 else f"line {i}\r" for i in range(1, 5000)] + ["caf\xe9\n", "more\n" * 3000]
    for name, write in [("far.txt", lambda b: b), ("far.txt.gz", gzip.compress)]:
        (tmp_path / name).write_bytes(write("".join(lines).encode("latin-1")))
        with pytest.raises(UserError, match=rf"{name} line 5000: not UTF-8 text"):
            list(text_lines(tmp_path / name))


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Windows tools write UTF-8 with a BOM; HF datasets' readers drop it (it was a JSON error, and
    the first tokens of a .txt)."""
    bom = "\ufeff".encode()
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "hello"}\n')
    assert list(jsonl_rows(tmp_path / "a.jsonl")) == [(f"{tmp_path / 'a.jsonl'} line 1", {"text": "hello"})]
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(bom + b"one\ntwo\n"))
    assert list(text_lines(tmp_path / "a.txt.gz")) == ["one\n", "two\n"]


def test_rows_carry_where_they_come_from(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(jsonl_rows(path)) == [(f"{path} line 1", {"a": 1}), (f"{path} line 3", {"a": 2})]  # blank skipped
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"x": 1}, {"x": 2}]))
    assert list(json_rows(path)) == [(f"{path} record 1", {"x": 1}), (f"{path} record 2", {"x": 2})]
    path.write_text('{"x": 1}\n{"x": 2}\n')  # JSON Lines under a .json name (SAMSum's zip)
    assert list(json_rows(path)) == [(f"{path} line 1", {"x": 1}), (f"{path} line 2", {"x": 2})]


@pytest.mark.parametrize(
    "name, content, reader, message",
    [
        ("pairs.jsonl", '{"a": 1}\n{"a": \n', jsonl_rows, r"pairs\.jsonl line 2: not valid JSON \(.* at column \d+\)"),
        ("pairs.jsonl", '{"a": 1}\n[1, 2]\n', jsonl_rows, r"pairs\.jsonl line 2: expected a JSON object, got list"),
        ("pairs.jsonl.gz", '{"a": 1}\nnot json\n', jsonl_rows, r"pairs\.jsonl\.gz line 2: not valid JSON"),
        ("a.json", '[{"x": 1},\n {"x": }]', json_rows, r"a\.json line 2: not valid JSON"),
        ("a.json", '[{"x": 1}, 3]', json_rows, r"a\.json record 2: expected a JSON object"),
        ("a.json", '{"x": 1}', json_rows, r"a\.json: expected a JSON list"),
    ],
)
def test_a_bad_line_is_named(tmp_path, name, content, reader, message):
    path = tmp_path / name
    path.write_bytes(gzip.compress(content.encode()) if name.endswith(".gz") else content.encode())
    with pytest.raises(UserError, match=message):
        list(reader(path))


def test_tsv_rows_and_file_rows_by_name(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\ngood\t1\n\nbad\t0\n")
    rows = list(file_rows(path))
    assert rows == [(f"{path} line 2", {"sentence": "good", "label": "1"}),
                    (f"{path} line 4", {"sentence": "bad", "label": "0"})]  # fmt: skip
    path.write_text("sentence\tlabel\ngood\n")
    with pytest.raises(UserError, match=r"dev\.tsv line 2: expected 2 tab-separated columns"):
        list(tsv_rows(path))
    path.write_text("")
    with pytest.raises(UserError, match=r"dev\.tsv line 1: empty file"):
        list(tsv_rows(path))
    with pytest.raises(UserError, match="unsupported file type"):
        file_rows(tmp_path / "data.csv")


def test_hub_rows_from_a_local_builder(tmp_path):
    """The hub path, through `datasets`' own json and csv builders on local files (nothing is downloaded)."""
    pytest.importorskip("datasets")
    (tmp_path / "j").mkdir()
    records = [{"text": "a", "n": 0}, {"text": "b", "n": 1}]
    (tmp_path / "j" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = list(hub_rows(str(tmp_path / "j"), split="test"))
    assert rows == [(f"{tmp_path / 'j'}[test] row 0", {"text": "a", "n": 0}),
                    (f"{tmp_path / 'j'}[test] row 1", {"text": "b", "n": 1})]  # fmt: skip
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv").write_text("text,label\nhello,1\nbye,0\n")
    assert [r for _, r in hub_rows("csv", split="train", data_dir=str(tmp_path / "c"))] == [
        {"text": "hello", "label": 1},
        {"text": "bye", "label": 0},
    ]
    with pytest.raises(UserError, match=r"no column 'content'"):
        load_hub(str(tmp_path / "j"), split="test", column="content")
    with pytest.raises(UserError, match=r"\[nosuch\]: cannot load"):
        list(hub_rows(str(tmp_path / "j"), split="nosuch"))

"""files.py: atomic files and directories, and the cleanup of what a killed write leaves behind.

Real files in tmp_path throughout; only the OS calls a crash interrupts are replaced, to raise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modernlm import files
from modernlm.files import (
    atomic_files,
    atomic_open,
    atomic_write,
    atomic_write_json,
    clean_leftovers,
    replace_dir,
    tmp_path,
)

DEAD_PID = 2**31 - 2  # above any pid_max: no process has it


class Crash(Exception):
    pass


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def make_dir(path: Path, **contents: str) -> Path:
    path.mkdir(parents=True)
    for name, text in contents.items():
        (path / name).write_text(text)
    return path


def read_dir(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def as_dead(directory: Path) -> None:
    """Rename this process's temporaries in `directory` as if a killed process had left them."""
    suffix = f"-{os.getpid()}"
    for p in directory.iterdir():
        if p.name.startswith(".") and p.name.endswith(suffix):
            p.rename(p.with_name(p.name[: -len(suffix)] + f"-{DEAD_PID}"))


# ---- files ---------------------------------------------------------------------------------------


def test_atomic_write_replaces_the_content_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "out.json"
    atomic_write(path, "first\n")
    atomic_write(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    atomic_write_json(path, {"a": [1, 2], "é": 1.5}, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == '{\n  "a": [\n    1,\n    2\n  ],\n  "é": 1.5\n}\n'
    with atomic_open(path) as f:
        f.write("line\n")
    assert path.read_bytes() == b"line\n"
    assert listing(tmp_path) == ["out.json"]


def test_an_error_inside_atomic_open_keeps_the_old_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("old\n")
    with pytest.raises(Crash), atomic_open(path) as f:
        f.write("half of the new")
        raise Crash
    assert path.read_text() == "old\n" and listing(tmp_path) == ["answers.jsonl"]
    with pytest.raises(ValueError, match="whole files"), atomic_open(path, "a"):
        pass


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    path.write_text("old")

    def failing(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(path, "new")
    assert path.read_text() == "old" and listing(tmp_path) == ["eval.json"]


def test_atomic_files_moves_a_libraries_files_in_at_the_end(tmp_path):
    out = make_dir(tmp_path / "model", **{"config.json": "old", "keep.txt": "kept"})
    with atomic_files(out) as staging:
        assert staging.parent == out and staging.name == tmp_path_name(out / "staging")
        (staging / "config.json").write_text("new")
        make_dir(staging / "sub", **{"w.bin": "w"})
        assert (out / "config.json").read_text() == "old"  # nothing visible before the block ends
    assert (out / "config.json").read_text() == "new" and (out / "sub" / "w.bin").read_text() == "w"
    assert (out / "keep.txt").read_text() == "kept" and listing(out) == ["config.json", "keep.txt", "sub"]
    with pytest.raises(Crash), atomic_files(out) as staging:
        (staging / "config.json").write_text("newer")
        raise Crash
    assert (out / "config.json").read_text() == "new" and listing(out) == ["config.json", "keep.txt", "sub"]


def tmp_path_name(path: Path) -> str:
    return tmp_path(path).name


# ---- directories ---------------------------------------------------------------------------------


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_replace_dir_replaces(tmp_path, monkeypatch, exchange):
    used = []
    real = files._exchange

    def spy(a, b):
        ok = exchange and real(a, b)
        used.append(ok)
        return ok

    monkeypatch.setattr(files, "_exchange", spy)
    final = tmp_path / "best"
    replace_dir(make_dir(tmp_path / "new1", **{"w": "1"}), final)  # nothing there yet: a plain rename
    replace_dir(make_dir(tmp_path / "new2", **{"w": "2", "best.json": "{}"}), final)
    assert read_dir(final) == {"best.json": "{}", "w": "2"}
    assert listing(tmp_path) == ["best"]  # the old contents are gone, so are the new names
    if exchange and sys.platform.startswith("linux"):
        assert used == [True]  # ext4, tmpfs, xfs, btrfs all have RENAME_EXCHANGE


def test_a_crash_between_the_fallbacks_renames_is_undone_by_clean_leftovers(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "best", **{"w": "old", "best.json": '{"step": 4}'})
    new = make_dir(tmp_path / tmp_path_name(final), **{"w": "new", "best.json": '{"step": 8}'})
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise Crash  # killed after setting the old one aside, before the new one arrived
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash):
        replace_dir(new, final)
    monkeypatch.undo()
    assert not final.exists()
    assert clean_leftovers(tmp_path) == []  # the writer's own: left alone while it could still finish
    as_dead(tmp_path)
    removed = clean_leftovers(tmp_path)
    assert read_dir(final) == {"best.json": '{"step": 4}', "w": "old"}  # the old, complete directory
    assert [p.name for p in removed] == [f".best.tmp-{DEAD_PID}"] and listing(tmp_path) == ["best"]


def test_a_crash_after_the_fallbacks_renames_keeps_the_new_one(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "step_0000004", **{"w": "old"})
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    monkeypatch.setattr(files.shutil, "rmtree", lambda *a, **k: None)  # killed before the old one went
    replace_dir(make_dir(tmp_path / "new", **{"w": "new"}), final)
    monkeypatch.undo()
    as_dead(tmp_path)
    assert [p.name for p in clean_leftovers(tmp_path)] == [f".step_0000004.old-{DEAD_PID}"]
    assert read_dir(final) == {"w": "new"} and listing(tmp_path) == ["step_0000004"]


def test_clean_leftovers_removes_only_the_dead_writers_temporaries(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = f".metrics.jsonl.tmp-{os.getpid()}"
        theirs = f".report.html.tmp-{live.pid}"
        dead_file, dead_dir = f".eval.json.tmp-{DEAD_PID}", f".step_0000002.tmp-{DEAD_PID}"
        for name in (mine, theirs, dead_file, ".hidden", ".x.tmp-notapid", "results.json"):
            (tmp_path / name).write_text("x")
        make_dir(tmp_path / dead_dir, **{"model.safetensors": "half"})
        removed = clean_leftovers(tmp_path)
        assert sorted(p.name for p in removed) == [dead_file, dead_dir]
        assert listing(tmp_path) == sorted([mine, theirs, ".hidden", ".x.tmp-notapid", "results.json"])
    finally:
        live.kill()
        live.wait()
    assert clean_leftovers(tmp_path / "missing") == []


def test_files_json_helpers_match_json_dumps(tmp_path):
    data = {"step": 3, "val_loss": 1.25, "nested": {"a": None}}
    atomic_write_json(tmp_path / "a.json", data)
    assert (tmp_path / "a.json").read_text() == json.dumps(data, indent=2) + "\n"

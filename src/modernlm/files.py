"""Writing results so that nothing is lost: every file atomically, every output path checked first.

`atomic_write` / `atomic_write_json` / `atomic_open` are the one way a result file is written: the
data goes to a temporary file in the same directory, is fsynced and renamed over the path, so a
reader, or a run killed at any moment, sees the old file or the new one, never half of one.
`atomic_files` does the same for a library that saves several files itself, `replace_dir` puts a
finished directory in place of another, `clean_leftovers` removes what a killed write left behind,
and `check_output_file` / `check_output_dir` make a path that cannot be written a one-line
`UserError` before any long work starts.

Design notes: docs/design.md#filespy
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from modernlm.errors import UserError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def tmp_path(path: Path) -> Path:
    """The temporary name next to `path` that this process writes before renaming."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync(path: str | Path) -> None:
    """fsync a file or directory by path; a no-op where it cannot be opened (e.g. directories on
    some platforms)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable."""
    _fsync(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path`, for a writer that takes a file name: on a clean exit the file
    written there replaces `path` (synced first), on an error it goes.

        with atomic_path("model.gguf") as tmp:
            writer = GGUFWriter(tmp, "llama")
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on an error it goes.

        with atomic_open(run_dir / "answers.jsonl") as f:
            for row in rows:
                f.write(json.dumps(row) + "\\n")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        f = open(tmp, mode) if mode == "wb" else open(tmp, mode, encoding=encoding, newline="\n")  # noqa: SIM115
        with f:  # closed (flushed) before atomic_path syncs and renames it
            yield f


def atomic_write(path: str | Path, data: bytes | str, encoding: str = "utf-8") -> None:
    """Write `data` (bytes, or text in `encoding`) to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode(encoding) if isinstance(data, str) else data)


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> None:
    """`obj` as indented JSON with a final newline, atomically (kwargs go to json.dumps)."""
    kwargs.setdefault("indent", 2)
    atomic_write(path, json.dumps(obj, **kwargs) + "\n")


@contextlib.contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """A staging directory for a library that writes several files itself (`save_pretrained`):
    when the block ends, each file written there replaces its namesake in `directory` atomically
    (fsynced, renamed); on an error none does. The staging directory is `.staging.tmp-<pid>` inside
    `directory`, so `clean_leftovers(directory)` removes it after a kill.

        with atomic_files(out) as d:
            hf_model.save_pretrained(d)
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = tmp_path(directory / "staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        for root, _dirs, files in os.walk(staging):
            target = directory / Path(root).relative_to(staging)
            target.mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                os.replace(os.path.join(root, name), target / name)
            fsync_dir(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- directories -------------------------------------------------------------------------------

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # linux/fs.h
RENAME_SWAP = 2  # macOS sys/stdio.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the OS or file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    fa, fb = os.fsencode(a), os.fsencode(b)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        rc = libc.renameat2(AT_FDCWD, fa, AT_FDCWD, fb, RENAME_EXCHANGE)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(fa, fb, RENAME_SWAP)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # e.g. a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories (files written by other libraries,
    e.g. a tokenizer's or PEFT's save, were never fsynced; for the others this is near free)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        fsync_dir(root)


def replace_dir(new: str | Path, final: str | Path) -> None:
    """Move the finished directory `new` to `final`, replacing any directory already there.

    `final` is never missing while an old version existed: the two are exchanged atomically (and
    the old contents, now at `new`, deleted). Without an atomic exchange the old directory is
    renamed to `.<final>.old-<pid>` first, and `clean_leftovers` restores it after a crash.
    """
    new, final = Path(new), Path(final)
    _fsync_tree(new)
    if not final.exists():
        os.rename(new, final)
    elif _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = final.with_name(f".{final.name}{OLD_MARK}{os.getpid()}")
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def _pid_of(name: str, mark: str) -> int | None:
    try:
        return int(name.rsplit(mark, 1)[1])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether another process with this id runs now (then its temporaries are not leftovers)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def clean_leftovers(directory: str | Path) -> list[Path]:
    """Remove the temporaries of killed writes in `directory` (not this process's own, nor those of
    another process still running); put back a directory set aside by `replace_dir` whose
    replacement never arrived. Returns what it removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        for mark in (OLD_MARK, TMP_MARK):
            pid = _pid_of(name, mark)
            if mark not in name or pid is None:
                continue
            if pid == os.getpid() or _alive(pid):
                break
            original = directory / name[1:].rsplit(mark, 1)[0]
            if mark == OLD_MARK and not original.exists():
                os.rename(entry, original)  # killed between the two renames: the old one is the valid one
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            else:
                entry.unlink(missing_ok=True)
                removed.append(entry)
            break
    return removed


# ---- output paths, checked before the work -----------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(directory: Path, what: str, target: Path) -> None:
    """Write and delete a probe file in `directory`: the only check that root, read-only mounts and
    network file systems all answer truthfully."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".modernlm-probe-", dir=directory)
    except OSError as e:
        # /proc and the like answer ENOENT: say what it means rather than "No such file or directory"
        reason = "no new files can be created there" if e.errno == errno.ENOENT else e.strerror
        raise UserError(f"{what}: cannot write {target}: {directory} is not writable ({reason})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | Path, what: str) -> Path:
    """`path` must be a writable directory or creatable as one. `what` names the setting
    (e.g. "run.out_dir", "--out"). Creates nothing."""
    p = Path(path)
    if str(path) == "":
        raise UserError(f"{what}: no output directory given")
    if p.exists() and not p.is_dir():
        raise UserError(f"{what}: {p} is a file; expected a directory")
    anc = _nearest_existing(p)
    if not anc.is_dir():
        raise UserError(f"{what}: cannot create {p}: {anc} is a file, not a directory")
    _check_writable(anc, what, p)
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """`path` must be a file that can be (over)written: not a directory, its parent a writable
    directory or creatable as one. Creates nothing."""
    p = Path(path)
    if str(path) == "":
        raise UserError(f"{what}: no output file given")
    if p.is_dir():
        raise UserError(f"{what}: {p} is a directory; expected a file name (e.g. {p / 'out.json'})")
    anc = _nearest_existing(p.parent)
    if not anc.is_dir():
        raise UserError(f"{what}: cannot create {p}: {anc} is a file, not a directory")
    _check_writable(anc, what, p)
    return p


def _field(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_outputs(
    cfg: Any,
    outputs: dict[str, str],
    derived: Iterable[tuple[str, Any, str]] = (),
    names: dict[str, str] | None = None,
) -> None:
    """Check a command's declared output paths before its work starts (`modernlm.cli` calls this).

    `outputs` maps dotted config fields to "file" or "dir" (an empty value = not set = skipped);
    `derived` lists (setting, path, kind) for paths built from other fields (a run directory
    `run.out_dir/run.name`, a `.json` written beside the output). `names` says how the user wrote
    a setting (`--out` for a flag); a setting not in it is named as is. Creates nothing.
    """
    names = names or {}
    checks = {"file": check_output_file, "dir": check_output_dir}
    for setting, kind in outputs.items():
        value = _field(cfg, setting)
        if value not in ("", None):
            checks[kind](value, names.get(setting, setting))
    for setting, path, kind in derived:
        checks[kind](path, names.get(setting, setting))


__all__ = [
    "atomic_files",
    "atomic_open",
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "check_output_dir",
    "check_output_file",
    "check_outputs",
    "clean_leftovers",
    "fsync_dir",
    "replace_dir",
    "tmp_path",
]

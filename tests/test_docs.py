"""Every code block of the README and of docs/*.md runs as a user types it, or says why not.

A fenced block's info string is its language, then, for a block that is not run, a marker and a
reason: "```bash slow: minutes on a CPU". GitHub renders the first word as the language and
ignores the rest. `bash` and `python` blocks run unless marked `slow` (minutes), `gpu`, `hub` (the
internet) or `needs` (files the docs do not make in seconds, a server that stays up, a person at
the terminal); `text`, `yaml` and `json` blocks (output, file listings, config files) are never
run. Any other language, no language, an unknown marker or a marker without a reason fails
`test_every_block_runs_or_says_why_not`, so nothing is left out silently; `pytest -s` prints the
list of what is skipped and why. That test also checks the relative links (files and #anchors)
and that the README stays a front door that links every page.

The blocks that run do so as a user runs them from a fresh checkout with `../shared/data` beside
it: in a new directory whose parent holds a `shared` link to the checkout's `../shared`, with the
checkout's configs/, benchmarks/, scripts/ and src/ linked in, and the installed `modernlm` (this
interpreter's environment) first on PATH, offline. The README's blocks run, in order, in one such
directory; the docs pages' in another, training.md first (the other pages use its
`runs/pretrain-tiny`), then in DOC_ORDER. A block that starts `modernlm serve ... &` gets a free
port instead of 8000 (the same text otherwise), and every process a block leaves behind is killed
with it. The runs take a few minutes on 2 cores (the README's one-minute pretraining is among
them), so they are marked slow.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The order the docs' blocks run in: training.md makes runs/pretrain-tiny, which the others use.
DOC_ORDER = ["training", "model", "serving", "evaluation", "finetuning", "interop", "alignment", "pipeline",
             "benchmarks", "commands", "tests"]  # fmt: skip
LINKED_IN = ("configs", "benchmarks", "scripts", "src")  # the checkout's files a user's commands read
RUN_LANGS = {"bash", "python"}
DATA_LANGS = {"text", "yaml", "json"}
SKIP_MARKERS = {"slow", "gpu", "hub", "needs"}
README_MAX_LINES = 230  # a front door (nanochat's README is 230 lines); the manual is in docs/
BLOCK_TIMEOUT = 300


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str  # "" when the block runs
    reason: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGS and not self.marker


def pages() -> list[Path]:
    """README first, then the docs pages in the order their blocks run."""
    docs = sorted(DOCS.glob("*.md"), key=lambda p: (DOC_ORDER.index(p.stem) if p.stem in DOC_ORDER else 99, p.stem))
    return [README, *docs]


def blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        assert not m.group(1), f"{path.name}:{i + 1}: an indented fence (keep fences at the line start)"
        info, start = m.group(2).strip(), i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: a code block that never closes"
        lang, _, rest = info.partition(" ")
        marker, _, reason = rest.strip().partition(":")
        out.append(Block(path, start + 1, lang, marker.strip(), reason.strip(), "\n".join(lines[start + 1 : i]) + "\n"))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for p in pages() for b in blocks(p)]


# ---- the fast checks: every block runs or says why not; links; the README's shape -----------------


def test_every_block_runs_or_says_why_not():
    problems, skipped, data = [], [], []
    for b in all_blocks():
        if b.lang in DATA_LANGS:
            if b.marker:
                problems.append(f"{b.where}: a ```{b.lang} block is never run; it needs no marker")
            data.append(b)
        elif b.lang not in RUN_LANGS:
            problems.append(f"{b.where}: language {b.lang!r}: use one of {sorted(RUN_LANGS | DATA_LANGS)}")
        elif b.marker:
            if b.marker not in SKIP_MARKERS:
                problems.append(f"{b.where}: unknown marker {b.marker!r} (one of {sorted(SKIP_MARKERS)})")
            elif not b.reason:
                problems.append(f"{b.where}: ```{b.lang} {b.marker} without a reason (```{b.lang} {b.marker}: WHY)")
            skipped.append(b)
    assert not problems, "\n".join(problems)
    print(f"\n{len(skipped)} blocks not run, each with its reason:")
    for b in skipped:
        print(f"  {b.where} ({b.lang}) {b.marker}: {b.reason}")
    print(f"{len(data)} text / yaml / json blocks (not run)")
    assert sum(b.runs for b in all_blocks()) >= 5  # the parser found the blocks that run


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no headings inside code blocks
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def test_relative_links_resolve():
    problems = []
    for page in pages():
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.relative_to(ROOT)}: {target}: no heading #{anchor} in {dest.name}")
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door_that_links_every_page():
    text = README.read_text()
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move the details into docs/"
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"](docs/{p.name}" not in text]
    assert not missing, f"README.md links no docs page for {missing}"


# ---- the slow part: run every block that runs ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace(tmp: Path, name: str) -> Path:
    """A directory laid out like a fresh checkout with ../shared beside it (the data read, never copied)."""
    (tmp / "shared").symlink_to(SHARED)
    ws = tmp / name
    ws.mkdir()
    for entry in LINKED_IN:
        (ws / entry).symlink_to(ROOT / entry)
    return ws


def user_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the installed `modernlm`
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    env.pop("MODERNLM_API_KEY", None)
    return env


def run_block(b: Block, ws: Path, scripts: Path) -> float:
    code = b.code
    if "modernlm serve" in code:  # a free port, not 8000: another server may be up on this machine
        port = free_port()
        code = re.sub(r"\bmodernlm serve ", f"modernlm serve port={port} ", code).replace(":8000", f":{port}")
    script = scripts / f"{b.path.stem}-{b.line}.{'sh' if b.lang == 'bash' else 'py'}"
    script.write_text(code)
    cmd = ["bash", "-e", "-o", "pipefail", str(script)] if b.lang == "bash" else [sys.executable, str(script)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ws, env=user_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{b.where}: still running after {BLOCK_TIMEOUT} s (mark it slow?)\n{b.code}\n{out[-3000:]}")
    finally:
        try:  # whatever the block left running (a server whose `kill` never came)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.monotonic() - start
    assert proc.returncode == 0, f"{b.where}: exit {proc.returncode}\n--- block:\n{b.code}--- output:\n{out[-4000:]}"
    print(f"  {b.where} ({b.lang}): {took:.1f} s")
    return took


def run_pages(paths: list[Path], tmp_path: Path) -> None:
    """Run every block of `paths` that runs, in order, in one user-like working directory."""
    assert SHARED.is_dir(), f"the shared data is not at {SHARED}"
    ws, scripts = workspace(tmp_path, "modernlm"), tmp_path / "blocks"
    scripts.mkdir()
    print()
    total = 0.0
    for path in paths:
        for b in blocks(path):
            if b.runs:
                total += run_block(b, ws, scripts)
    print(f"  {total:.0f} s in all")


@pytest.mark.slow
def test_readme_blocks_run(tmp_path):
    run_pages([README], tmp_path)


@pytest.mark.slow
@pytest.mark.hf
def test_docs_blocks_run(tmp_path):
    run_pages(pages()[1:], tmp_path)

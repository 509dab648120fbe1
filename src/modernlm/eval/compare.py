"""Side-by-side samples: which checkpoints a path means, and Markdown tables of generations.

`modernlm generate` compares checkpoints by continuing the same prompts with the same sampling
settings and the same seed, so that what differs between two cells comes from the weights alone.
This module holds the pieces that are not specific to that command:

- `run_checkpoints(run_dir)`: a run's complete checkpoints, `checkpoints/step_*` in step order, then
  `checkpoints/best`; `checkpoint_dirs(path)`: those of a run directory, else `path` itself.
- `saved_step(path)` / `checkpoint_name(path)`: the training step and a short label of one.
- `markdown_table(header, rows)`: a GitHub-flavoured Markdown table; `md_escape` makes any text
  safe for one cell (`|` escaped, newlines as `<br>`, HTML characters as entities).
- `generations_markdown(...)`: the whole document, a header block with every sampling setting,
  then one table per prompt whose rows are checkpoints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from modernlm.checkpoint import (
    BEST_DIR,
    BEST_INFO_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    STEP_PREFIX,
    WEIGHTS_FILE,
    checkpoint_step,
)
from modernlm.errors import UserError


class CheckpointSamples(NamedTuple):
    name: str  # short label, e.g. "pretrain-tiny/step_0000200"
    step: int | None  # training step, None when unknown (e.g. a converted model)
    texts: list[str]  # one generation per prompt, in prompt order


def _is_step_name(name: str) -> bool:
    # a half-written checkpoint is a hidden .step_*.tmp-<pid> directory, never step_<digits>
    return name.startswith(STEP_PREFIX) and name.removeprefix(STEP_PREFIX).isdigit()


def _is_complete(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def run_checkpoints(run_dir: str | Path, best: bool = True) -> list[Path]:
    """A run directory's complete checkpoints (config.json and weights): its `step_*` in step order,
    then `best/` (with its best.json) when `best` and present."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    steps = [p for p in root.glob(f"{STEP_PREFIX}*") if _is_step_name(p.name) and _is_complete(p)]
    dirs = sorted(steps, key=checkpoint_step)
    if best and _is_complete(root / BEST_DIR) and (root / BEST_DIR / BEST_INFO_FILE).is_file():
        dirs.append(root / BEST_DIR)
    return dirs


def checkpoint_dirs(path: str | Path) -> list[Path]:
    """The checkpoint directories `path` stands for, in order: a run directory (it holds
    `checkpoints/`) its `run_checkpoints`; anything else itself (loading it will say what is wrong
    with it, e.g. no config.json)."""
    path = Path(path)
    if not (path / CHECKPOINTS_DIR).is_dir():
        return [path]
    dirs = run_checkpoints(path)
    if not dirs:
        raise UserError(f"run directory {path}: no checkpoints in {path / CHECKPOINTS_DIR}")
    return dirs


def saved_step(path: str | Path) -> int | None:
    """The training step of a checkpoint: from a `step_N` name, or from best/best.json; None when
    neither tells."""
    path = Path(path)
    if _is_step_name(path.name):
        return checkpoint_step(path)
    info = path / BEST_INFO_FILE  # written by the trainer next to the best model
    if info.is_file():
        try:
            step = json.loads(info.read_text()).get("step")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return step if isinstance(step, int) else None
    return None


def checkpoint_name(path: str | Path) -> str:
    """`run/step_0000200` for a checkpoint inside a run directory, else the path as given."""
    path = Path(path)
    if path.parent.name == CHECKPOINTS_DIR and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.name}"
    return str(path)


def md_escape(text: str) -> str:
    """Text for one Markdown table cell, shown as it is: backslashes and pipes escaped, `&`, `<`
    and `>` as HTML entities (WikiText's `<unk>` would otherwise vanish as an unknown tag), line
    breaks as `<br>`."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; every cell goes through `md_escape`."""
    lines = ["| " + " | ".join(md_escape(str(h)) for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(md_escape(str(c)) for c in row) + " |")
    return "\n".join(lines) + "\n"


def generations_markdown(
    settings: Mapping[str, object],
    prompts: Sequence[str],
    results: Sequence[CheckpointSamples],
    title: str = "Generations",
) -> str:
    """The side-by-side document: a settings table, then per prompt a checkpoint x generation table."""
    parts = [
        f"# {title}\n",
        f"{len(results)} checkpoint(s) x {len(prompts)} prompt(s). Every cell was sampled with the "
        "same settings and the same seed, so differences between rows come from the weights.\n",
        markdown_table(["setting", "value"], [(k, json.dumps(v)) for k, v in settings.items()]),
    ]
    for i, prompt in enumerate(prompts):
        shown = md_escape(prompt) if prompt else "*(empty: starts from the bos token)*"
        parts.append(f"## Prompt {i + 1}\n\n**Prompt:** {shown}\n")
        rows = [(r.name, "-" if r.step is None else r.step, r.texts[i]) for r in results]
        parts.append(markdown_table(["checkpoint", "step", "generation"], rows))
    return "\n".join(parts)


__all__ = [
    "CheckpointSamples",
    "checkpoint_dirs",
    "checkpoint_name",
    "generations_markdown",
    "markdown_table",
    "md_escape",
    "run_checkpoints",
    "saved_step",
]

"""Side-by-side samples: which checkpoints a path means, and Markdown tables of generations.

`modernlm generate` compares checkpoints by continuing the same prompts with the same sampling
settings and the same seed, so that what differs between two cells comes from the weights alone.
This module holds the pieces that are not specific to that command:

- `checkpoint_dirs(path)`: a checkpoint directory is itself; a run directory (one holding
  `checkpoints/`, as `modernlm pretrain` writes) is its `checkpoints/step_*` in step order, then
  `checkpoints/best` when present.
- `checkpoint_step(path)` / `checkpoint_name(path)`: the training step and a short label of one.
- `markdown_table(header, rows)`: a GitHub-flavoured Markdown table; `md_escape` makes any text
  safe for one cell (`|` escaped, newlines as `<br>`, HTML
  characters as entities).
- `generations_markdown(...)`: the whole document, a header block with every sampling setting,
  then one table per prompt whose rows are checkpoints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from modernlm.checkpoint import BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE
from modernlm.errors import UserError

_STEP_DIR = re.compile(r"step_(\d+)$")


class CheckpointSamples(NamedTuple):
    name: str  # short label, e.g. "pretrain-tiny/step_0000200"
    step: int | None  # training step, None when unknown (e.g. a converted model)
    texts: list[str]  # one generation per prompt, in prompt order


def checkpoint_dirs(path: str | Path) -> list[Path]:
    """The checkpoint directories `path` stands for, in order.

    A run directory (it holds `checkpoints/`) gives its complete `step_*` checkpoints in step
    order, then `best/` if present. Anything else is returned as is: loading it will say what is
    wrong with it (e.g. no config.json).
    """
    path = Path(path)
    root = path / CHECKPOINTS_DIR
    if not root.is_dir():
        return [path]
    steps = []
    for p in root.iterdir():
        match = _STEP_DIR.match(p.name)
        # a half-written checkpoint is a hidden .step_*.tmp-<pid> dir, never step_*; still require the config
        if match and (p / CONFIG_FILE).is_file():
            steps.append((int(match.group(1)), p))
    dirs = [p for _, p in sorted(steps)]
    if (root / BEST_DIR / CONFIG_FILE).is_file():
        dirs.append(root / BEST_DIR)
    if not dirs:
        raise UserError(f"run directory {path}: no checkpoints in {root}")
    return dirs


def checkpoint_step(path: str | Path) -> int | None:
    """The training step of a checkpoint: from a `step_N` name, or from best/best.json."""
    path = Path(path)
    match = _STEP_DIR.match(path.name)
    if match:
        return int(match.group(1))
    info = path / "best.json"  # written by the trainer next to the best model
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
    "checkpoint_step",
    "generations_markdown",
    "markdown_table",
    "md_escape",
]

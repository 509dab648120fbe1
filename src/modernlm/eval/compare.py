"""Side-by-side samples: Markdown tables of generations (and any Markdown table).

`modernlm generate` compares checkpoints by continuing the same prompts with the same sampling
settings and the same seed, so that what differs between two cells comes from the weights alone.
This module holds the pieces that are not specific to that command:

Which checkpoints a path means (`checkpoint.checkpoint_dirs`) is the checkpoint layout's.
- `markdown_table(header, rows)`: a GitHub-flavoured Markdown table; `md_escape` makes any text
  safe for one cell (`|` escaped, newlines as `<br>`, HTML characters as entities); `md_fence`
  gives the backticks that quote any text as code (a fenced block or an inline span).
- `generations_markdown(...)`: the whole document, a header block with every sampling setting,
  then one table per prompt whose rows are checkpoints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple


class CheckpointSamples(NamedTuple):
    name: str  # short label, e.g. "pretrain-tiny/step_0000200"
    step: int | None  # training step, None when unknown (e.g. a converted model)
    texts: list[str]  # one generation per prompt, in prompt order


def md_escape(text: str) -> str:
    """Text for one Markdown table cell, shown as it is: backslashes and pipes escaped, `&`, `<`
    and `>` as HTML entities (WikiText's `<unk>` would otherwise vanish as an unknown tag), line
    breaks as `<br>`."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def md_fence(text: str, shortest: int = 3) -> str:
    """Backticks that `text` cannot close: longer than its longest run of them (at least `shortest`;
    3 for a fenced block, 1 for an inline code span), so model text stays text, never live HTML."""
    ticks = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(shortest, ticks + 1)


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
    "generations_markdown",
    "markdown_table",
    "md_escape",
    "md_fence",
]

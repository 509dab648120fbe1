"""Standard benchmarks through lm-evaluation-harness, for any model modernlm loads (our checkpoints,
MoE and sink models included, HF directories, hub ids, .gguf).

    modernlm eval tasks runs/sft/checkpoints/best tasks=sst2_local,gsm8k_local limit=100
    modernlm eval tasks SmolLM2-135M-Instruct.Q4_1.gguf tasks=wikitext_local --out wikitext.json
    modernlm eval tasks MODEL tasks=hellaswag,arc_easy num_fewshot=0     # any harness task (downloads)

Offline tasks shipped with modernlm (src/modernlm/eval/tasks/tasks, the harness's prompts and metrics
on local files under data_dir): sst2_local (GLUE SST-2 validation, accuracy), gsm8k_local (GSM8K
test, 5-shot, strict and flexible exact match), wikitext_local (WikiText-2 test by article: word
and byte perplexity, bits per byte). Every other name is the harness's own task (it downloads its
data). Writes the harness's results JSON (--out, e.g. results.json; not a .md name) and a Markdown table
beside it (results.md); prints the table. max_length (the context the harness uses) is 1 to the
model's context; max_gen_toks must leave room for a prompt in it (checked before any task runs).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from modernlm.commands import check_scoring
from modernlm.errors import UserError
from modernlm.files import atomic_write

POSITIONALS = ["model"]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "file"}


@dataclass
class Config:
    model: str = ""  # a checkpoint or run directory, HF directory or hub id, or .gguf
    tasks: list[str] = field(default_factory=list)  # harness task names (ours: sst2_local, gsm8k_local, wikitext_local)
    limit: int | None = None  # the first N examples of each task (null = all)
    num_fewshot: int | None = None  # examples in each prompt (null = the task's own default)
    batch_size: int = 8  # requests per forward
    max_gen_toks: int = 256  # tokens a generation task may generate, unless the task says (the harness's default)
    max_length: int | None = None  # the context the harness uses (rolling windows, truncation); null = the model's
    apply_chat_template: bool = False  # prompts in the model's chat template (--apply_chat_template)
    compile: bool = False  # generation tasks: decode steps through torch.compile (CUDA graphs on a GPU)
    data_dir: str = "../shared/data"  # where the offline tasks find sst2/, gsm8k/, wikitext-2/
    include_path: str = ""  # more task YAMLs (a folder), as the harness's --include_path
    out: str = ""  # the results JSON, not .md (the .md table goes beside it); "" = print the table only
    seed: int = 0  # the harness's random, numpy, torch and few-shot seeds
    device: str = "cpu"  # cpu, cuda, cuda:1, mps, auto
    dtype: str | None = None  # float32, bfloat16, float16 (null: the checkpoint's own; float32 for HF)
    backend: str = "auto"  # auto, modernlm (HF Llamas converted), transformers
    quantize: str = "none"  # none, int8, int4, auto (a .gguf's own blocks); ours only (docs/model.md)

    def __post_init__(self) -> None:
        check_scoring(self.batch_size)


def main(cfg: Config) -> None:
    if not cfg.model:
        raise UserError("model: give a model source (modernlm eval tasks MODEL tasks=...)")
    names = [n.strip() for item in cfg.tasks for n in item.split(",") if n.strip()]  # tasks=a,b or [a, b]
    if not names:
        raise UserError("tasks: name at least one harness task (tasks=sst2_local,gsm8k_local)")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"limit must be >= 1, got {cfg.limit}")
    if cfg.max_length is not None and cfg.max_length < 1:
        raise UserError(f"max_length: must be >= 1 (null = the model's context), got {cfg.max_length}")
    if cfg.out and Path(cfg.out).suffix.lower() == ".md":  # the table goes to OUT as .md: it would replace the JSON
        raise UserError(f"out: give the results JSON's name (e.g. results.json), not {cfg.out}: the table goes beside")
    try:
        from modernlm.eval.tasks import run
    except ImportError as e:
        raise UserError(f"eval tasks needs lm-evaluation-harness: pip install 'modernlm[harness]' ({e})") from None
    from modernlm.api import load_fastest
    from modernlm.quant import check_quantize

    # Names and data files first, then the model (minutes may go into loading it).
    manager = run.prepare_tasks(names, cfg.data_dir, cfg.include_path or None)
    lm = load_fastest(cfg.model, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend, what="model",
                      quantize=check_quantize(cfg.quantize, "quantize", auto=True))
    if lm.tokenizer is None:
        raise UserError(f"model: {cfg.model} has no tokenizer, so the harness has no text to work with")
    results = run.evaluate(
        lm, names, manager, limit=cfg.limit, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size,
        max_gen_toks=cfg.max_gen_toks, max_length=cfg.max_length,
        apply_chat_template=cfg.apply_chat_template, compile=cfg.compile, seed=cfg.seed,
    )  # fmt: skip
    table = run.results_table(results)
    print(table)
    if cfg.out:
        out = Path(cfg.out)
        atomic_write(out, run.results_json(results))
        atomic_write(out.with_suffix(".md"), f"# {lm.name}: lm-evaluation-harness\n\n{table}")
        print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)

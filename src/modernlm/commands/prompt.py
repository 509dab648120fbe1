"""Zero- and few-shot prompting baselines: SST-2 by label scoring, SAMSum summaries, GSM8K chain of thought.

    modernlm prompt SmolLM2-135M-Instruct.Q4_1.gguf task=sst2 data.path=../shared/data/sst2/dev.tsv
    modernlm prompt MODEL task=gsm8k data.path=../shared/data/gsm8k/test.jsonl \\
        shots=8 shots_from=../shared/data/gsm8k/train.jsonl --out runs/prompt/gsm8k-8shot

MODEL: a modernlm checkpoint or run directory, an HF model directory, hub id or .gguf (HF models run
on transformers' own causal LM). Prompts are the task's causal templates in `modernlm.data.tasks`
(SST-2: "Review: {text}\\nSentiment:"; data.prompt_template overrides). SST-2 predicts the label word
with the higher log-probability (mode=score) or the first generated word (mode=generate); SAMSum and
GSM8K generate greedily. shots > 0 prepends that many demonstrations (prompt + reference) drawn, seeded,
from `shots_from` (for GSM8K, worked solutions ending in "#### N"). Writes OUT/: config.yaml,
metrics.json, predictions.jsonl, errors.jsonl (the wrong ones; for SAMSum all, worst ROUGE-L first),
summary.json, and demonstrations.txt when few-shot; prints one summary line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from modernlm.data.tasks import TaskDatasetConfig
from modernlm.errors import UserError
from modernlm.files import atomic_write

POSITIONALS = ["model"]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "dir"}

TASKS = ("sst2", "samsum", "gsm8k")
DEFAULT_OUT_PARENT = "runs/prompt"


@dataclass
class Config:
    model: str = ""  # modernlm checkpoint or run dir, HF model dir, hub id or .gguf file
    task: str = "sst2"  # sst2 | samsum | gsm8k
    data: TaskDatasetConfig = field(default_factory=TaskDatasetConfig)  # the eval file: data.path=...
    shots: int = 0  # demonstrations per prompt (0 = zero-shot)
    shots_from: str = ""  # file to draw demonstrations from, e.g. the train split (same format as data)
    seed: int = 0  # seed of the demonstration draw
    mode: str = "auto"  # auto | score | generate (auto: sst2 scores label words, the others generate)
    max_examples: int = 0  # evaluate the first N examples (0 = all)
    batch_size: int = 8  # sequences per forward / generate call
    max_new_tokens: int = 0  # generation budget (0 = per task: sst2 5, samsum 128, gsm8k 256)
    normalize: bool = False  # sst2 scoring: mean log-prob per token instead of the sum
    add_bos: bool = False  # prepend the tokenizer's bos token to every prompt
    out: str = ""  # run directory ("" = runs/prompt/<task>-<model>-<shots>shot)
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "float32"  # float32, bfloat16 or float16 weights
    progress: bool = True  # progress bar on stderr (generation)


def load_task_model(src: str, device: str = "auto", dtype: str = "float32", add_bos: bool = False, progress=True):
    """A TaskModel for `src` (`modernlm.load`): a modernlm checkpoint / run directory, else an HF
    model (dir, hub id, .gguf) on transformers' own causal LM."""
    from modernlm.api import load
    from modernlm.hf.text import wrap_hf
    from modernlm.textmodel import wrap_modernlm

    lm = load(src, device=device, dtype=dtype, progress=progress, what="model")
    if lm.tokenizer is None:
        raise UserError(f"model: {src} has no usable tokenizer")
    wrap = wrap_modernlm if lm.kind == "modernlm" else wrap_hf
    return wrap(lm.model, lm.tokenizer, add_bos=add_bos, name=lm.name)


def _check(cfg: Config) -> None:
    if not cfg.model:
        raise UserError("model: give a model (modernlm prompt MODEL task=sst2 data.path=...)")
    if cfg.task not in TASKS:
        import difflib

        close = difflib.get_close_matches(cfg.task, TASKS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"task: unknown task {cfg.task!r} (expected one of {', '.join(TASKS)}){hint}")
    if cfg.data.name not in ("custom", cfg.task):
        raise UserError(f"data.name: {cfg.data.name!r} does not match task={cfg.task} (leave data.name unset)")
    for name in ("shots", "max_examples", "max_new_tokens"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.mode not in ("auto", "score", "generate"):
        raise UserError(f"mode: unknown mode {cfg.mode!r} (expected auto, score or generate)")
    if cfg.mode == "score" and cfg.task != "sst2":
        raise UserError(f"mode: 'score' ranks label words, which only sst2 has; {cfg.task} generates")
    if cfg.batch_size <= 0:
        raise UserError(f"batch_size: must be positive, got {cfg.batch_size}")
    if cfg.shots and not cfg.shots_from:
        raise UserError("shots_from: few-shot needs a file to draw demonstrations from, e.g. the train split")
    if cfg.shots_from and not Path(cfg.shots_from).is_file():
        raise UserError(f"shots_from: no such file: {cfg.shots_from}")


def derived_outputs(cfg: Config) -> list[tuple[str, str, str]]:
    """Without `out`, the run directory goes under runs/prompt/ (named after the loaded model)."""
    return [] if cfg.out else [("out", DEFAULT_OUT_PARENT, "dir")]


def main(cfg: Config) -> None:
    import json
    import sys
    import time

    from modernlm.config import save_config
    from modernlm.data.tasks import load_task_examples, resolve_task_config
    from modernlm.eval.prompting import evaluate_task
    from modernlm.files import check_output_dir

    _check(cfg)
    t0 = time.perf_counter()
    data = replace(cfg.data, name=cfg.task)
    if cfg.max_examples:
        data = replace(data, max_examples=cfg.max_examples)
    resolve_task_config(data)  # bad fields or a missing file fail before the model loads
    tm = load_task_model(cfg.model, cfg.device, cfg.dtype, cfg.add_bos, cfg.progress)
    if not data.task_type:
        data = replace(data, task_type="seq2seq" if tm.is_encoder_decoder else "causal")
    examples = load_task_examples(data)
    few_shot = []
    if cfg.shots:
        pool = replace(data, path=cfg.shots_from, hf_dataset="", max_examples=cfg.shots, shuffle=True, seed=cfg.seed)
        few_shot = load_task_examples(pool)
        if len(few_shot) < cfg.shots:
            raise UserError(f"shots_from: {cfg.shots_from} has {len(few_shot)} examples, fewer than shots={cfg.shots}")
    shots_name = f"{cfg.shots}shot" if cfg.shots else "zeroshot"
    out = Path(cfg.out or f"{DEFAULT_OUT_PARENT}/{cfg.task}-{tm.name.replace('/', '_')}-{shots_name}")
    check_output_dir(out, "out")  # the name depends on the model: checked again before the evaluation
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    metrics = evaluate_task(
        tm, examples, cfg.task, mode=cfg.mode, few_shot=few_shot, batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens or None, out_dir=out, normalize=cfg.normalize, progress=cfg.progress,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    summary = {
        "model": cfg.model,
        "model_name": tm.name,
        "data": data.path or data.hf_dataset,
        **metrics,
        "wall_seconds": round(wall, 2),
        "examples_per_second": round(metrics["n"] / metrics["seconds"], 3) if metrics["seconds"] else None,
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    keys = {
        "sst2": ("accuracy", "macro_f1"),
        "samsum": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
        "gsm8k": ("exact_match_strict", "exact_match_flexible"),
    }[cfg.task]
    scores = " | ".join(f"{k} {metrics[k]:.4f}" for k in keys)
    shots = f"{cfg.shots}-shot" if cfg.shots else "zero-shot"
    print(
        f"prompt {cfg.task} {shots} {metrics['mode']} | {tm.name} | n {metrics['n']} | {scores} | {wall:.1f}s -> {out}",
        file=sys.stdout,
        flush=True,
    )

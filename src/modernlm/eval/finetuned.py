"""Task metrics of a finetuned model: `modernlm finetune`'s evaluation, before and after training.

- classification: the head's argmax (`predict_classes`) against the labels, accuracy and macro-F1
  (`evaluate_classifier`); predictions.jsonl keeps every example's logits.
- causal and seq2seq LMs: as the prompting baselines (`prompting.evaluate_task`): SST-2 by scoring
  the label words, SAMSum by ROUGE, GSM8K by exact match of the final number.
`task_metrics` picks the one for the task type; `FinetuneEvaluation` runs it before training
(eval_before/, kept across resumes) and after it (eval/), and writes eval.json. Models come in as
they compute: a PEFT model's base with its adapters active (`hf.lora.base_of`); nothing here
imports peft or transformers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modernlm.data.tasks import TaskDatasetConfig, eval_batches, tokenize_examples
from modernlm.eval.metrics import evaluate_predictions, write_predictions
from modernlm.eval.prompting import TASKS, evaluate_task
from modernlm.files import atomic_write_json
from modernlm.hf.text import wrap_hf
from modernlm.runtime import Runtime, eval_mode
from modernlm.textmodel import TaskTokenizer, wrap_modernlm

HEADLINE_METRICS = ("accuracy", "macro_f1", "exact_match_flexible", "exact_match_strict", "rouge1", "rougeL")


@dataclass
class FinetuneEvalSettings:
    """The held-out split and how to evaluate on it (`eval.` of finetune's config)."""

    path: str = ""  # eval split file, same format as data.path ("" with data.hf_dataset: the hub split below)
    split: str = "validation"  # hub split for evaluation (with data.hf_dataset)
    max_examples: int = 0  # evaluate the first N examples (0 = all)
    batch_size: int = 16  # examples per forward
    mode: Literal["auto", "score", "generate"] = "auto"  # causal sst2: score label words (auto) or generate
    max_new_tokens: int = 0  # generation budget (0 = per task: sst2 5, samsum 128, gsm8k 256)
    before: bool = False  # also evaluate before training (the zero-shot / untrained baseline)


@torch.no_grad()
def predict_classes(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device | str = "cpu", autocast: Any = None
) -> tuple[list[int], Tensor]:
    """(argmax labels, logits [N, C] float32) of a sequence classifier over collated batches."""
    out = []
    with eval_mode(model):
        for batch in batches:
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
            out.append(logits.float().cpu())
    logits = torch.cat(out) if out else torch.empty(0, 0)
    return logits.argmax(-1).tolist(), logits


def evaluate_classifier(
    model: nn.Module, tokenizer: Any, data: TaskDatasetConfig, examples: list[dict[str, Any]], batch_size: int,
    runtime: Runtime, out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Accuracy and macro-F1 of a sequence classifier's head; writes predictions.jsonl (with each
    example's logits), errors.jsonl and metrics.json to out_dir. Labels are named by
    data.label_words (else their numbers)."""
    items = tokenize_examples(examples, tokenizer, data)
    batches = eval_batches(items, batch_size, TaskTokenizer(tokenizer).pad_id)
    picked, logits = predict_classes(model, batches, runtime.device, runtime.autocast)
    words = list(data.label_words) or [str(i) for i in range(logits.size(1))]
    name = lambda k: words[k] if k < len(words) else str(k)  # noqa: E731
    predictions = [name(k) for k in picked]
    references = [name(int(ex["label"])) for ex in examples]
    inputs = [ex["input"] for ex in examples]
    metrics = evaluate_predictions("classification", inputs, predictions, references, out_dir / "errors.jsonl")
    rows = [
        {"input": ex["input"], "prediction": p, "reference": r, "index": i, "label": ex["label"],
         "predicted_label": k, "logits": logits[i].tolist(), "source": ex["source"]}
        for i, (ex, p, r, k) in enumerate(zip(examples, predictions, references, picked, strict=True))
    ]  # fmt: skip
    write_predictions(out_dir / "predictions.jsonl", rows)
    metrics.update(task=data.name, mode="head")
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def task_metrics(
    model: nn.Module, tokenizer: Any, kind: str, data: TaskDatasetConfig, examples: list[dict[str, Any]],
    settings: FinetuneEvalSettings, runtime: Runtime, out_dir: Path, *, label_words: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Task metrics of `model` (kind "modernlm" or "hf") on the examples of `data`; writes
    predictions, errors and metrics to out_dir. label_words: the run's own SST-2 label words
    (None = the task's). {} for a causal task with no metric (val_loss is then all there is)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if data.task_type == "classification":
        return evaluate_classifier(model, tokenizer, data, examples, settings.batch_size, runtime, out_dir)
    if data.name not in TASKS:
        print(f"note: no task metric for data.name={data.name} (only {', '.join(TASKS)}); val_loss only")
        return {}
    tm = (wrap_modernlm if kind == "modernlm" else wrap_hf)(model, tokenizer, add_bos=data.add_bos)
    if data.name == "sst2" and label_words:  # led by a space as the targets are
        lead = " " if examples[0]["target"].startswith(" ") else ""
        label_words = [lead + w for w in label_words]
    else:
        label_words = None
    return evaluate_task(
        tm, examples, data.name, mode=settings.mode, batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens or None, out_dir=out_dir, label_words=label_words, progress=progress,
    )  # fmt: skip


def metrics_line(metrics: dict[str, Any]) -> str:
    """The task metrics for a summary line."""
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE_METRICS if k in metrics) or "no task metric"


class FinetuneEvaluation:
    """A finetuning run's task metrics on rank 0 (`task_metrics`): before training (eval_before/,
    with settings.before; a resumed run reads them back) and after it (eval/ and eval.json)."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, kind: str, data: TaskDatasetConfig | None,
        examples: list[dict[str, Any]], settings: FinetuneEvalSettings, runtime: Runtime, run_dir: Path, *,
        label_words: Sequence[str] | None = None, progress: bool = False,
    ):  # fmt: skip
        self.model, self.tokenizer, self.kind, self.data, self.examples = model, tokenizer, kind, data, examples
        self.settings, self.runtime, self.run_dir = settings, runtime, run_dir
        self.label_words, self.progress = label_words, progress
        self.report: dict[str, Any] = {}

    def _evaluate(self, name: str) -> dict[str, Any]:
        return task_metrics(
            self.model, self.tokenizer, self.kind, self.data, self.examples, self.settings, self.runtime,
            self.run_dir / name, label_words=self.label_words, progress=self.progress,
        )  # fmt: skip

    def before(self, step: int) -> None:
        saved = self.run_dir / "eval_before" / "metrics.json"
        if self.runtime.is_main and self.examples and self.settings.before and step == 0:
            self.report["before"] = self._evaluate("eval_before")
            self.runtime.print0(f"before training: {metrics_line(self.report['before'])}")
        elif saved.is_file():
            self.report["before"] = json.loads(saved.read_text())

    def after(self, step: int, wall_time_s: float) -> dict[str, Any] | None:
        """The metrics after training (None without eval data); writes eval/ and eval.json."""
        if not self.examples:
            return None
        e = self.data
        self.report["after"] = self._evaluate("eval")
        self.report.update(step=step, eval_split=e.path or f"{e.hf_dataset}[{e.split}]", n=len(self.examples),
                           train_wall_time_s=wall_time_s)  # fmt: skip
        atomic_write_json(self.run_dir / "eval.json", self.report)
        return self.report["after"]


__all__ = [
    "HEADLINE_METRICS",
    "FinetuneEvalSettings",
    "FinetuneEvaluation",
    "evaluate_classifier",
    "task_metrics",
    "metrics_line",
    "predict_classes",
]

"""LoRA finetuning (PEFT) of an HF model or a modernlm checkpoint on a task, with the one Trainer.

    modernlm finetune -c configs/finetune/gpt2-sst2.yaml
    modernlm finetune SmolLM2-135M-Instruct.Q4_1.gguf -c configs/finetune/smollm2-sst2.yaml
    modernlm finetune -c configs/finetune/flan-t5-samsum.yaml run.dtype=bfloat16
    modernlm finetune runs/smollm2 -c configs/finetune/modernlm-sst2.yaml train.num_steps=100

MODEL (model.source) is an HF model directory, a hub id, a .gguf file, or a modernlm checkpoint or
run directory. data.task_type (default per dataset: sst2 classification, samsum seq2seq, gsm8k causal)
picks the model class and the loss:
- classification: AutoModelForSequenceClassification, a new head of model.num_labels outputs that
  trains (in full) with the LoRA adapters; the pad token is eos when the tokenizer has none.
  Evaluated by the head's accuracy and macro-F1.
- seq2seq (T5, FLAN-T5): loss on the target tokens; evaluated by ROUGE of greedy summaries.
  T5 diverges in float16: use float32 or bfloat16.
- causal (GPT-2, SmolLM2, TinyLlama, our checkpoints): loss on the answer tokens only (the prompt
  is masked); SST-2 is evaluated by scoring the label words after "Review: ... Sentiment:", GSM8K
  by exact match of the generated answer's final number (modernlm.eval.prompting, as the baselines).

Writes run.out_dir/run.name/: config.yaml, metrics.jsonl (train loss, val_loss on eval.path),
summary.json, checkpoints/step_NNNNNNN/ (each an adapter directory; rerunning resumes),
adapter/ (the final adapter + head + tokenizer + finetune.json; `modernlm.hf.lora.load_finetuned`
rebuilds the model from it), eval/ (predictions.jsonl, errors.jsonl, metrics.json), eval.json
(the task metrics, and with eval.before=true those of the model before training), and with
save_merged=true merged/: the adapter folded into the weights, a plain HF or modernlm model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modernlm.data.tasks import TaskDatasetConfig
from modernlm.files import atomic_files, atomic_write
from modernlm.hf.lora import LoraSettings
from modernlm.runtime import RunConfig, Runtime
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["model.source"]
OUTPUTS = {"run.out_dir": "dir"}


@dataclass
class ModelSettings:
    source: str = ""  # HF model dir, hub id, .gguf file, or modernlm checkpoint / run dir
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights of the frozen base (T5: no float16)
    tokenizer: str = ""  # tokenizer dir / hub id / .gguf when the model has none ("" = the model's own)
    num_labels: int = 0  # classification outputs (0 = len(data.label_words), else the largest label + 1)


@dataclass
class FinetuneEvalSettings:
    path: str = ""  # eval split file, same format as data.path ("" with data.hf_dataset: the hub split below)
    split: str = "validation"  # hub split for evaluation (with data.hf_dataset)
    max_examples: int = 0  # evaluate the first N examples (0 = all)
    batch_size: int = 16  # examples per forward
    mode: Literal["auto", "score", "generate"] = "auto"  # causal sst2: score label words (auto) or generate
    max_new_tokens: int = 0  # generation budget (0 = per task: sst2 5, samsum 128, gsm8k 256)
    before: bool = False  # also evaluate before training (the zero-shot / untrained baseline)


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: TaskDatasetConfig = field(default_factory=TaskDatasetConfig)  # the training split
    eval: FinetuneEvalSettings = field(default_factory=FinetuneEvalSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    save_merged: bool = False  # also write merged/: the adapter folded into a plain model


def eval_data_config(cfg: Config, data: TaskDatasetConfig) -> TaskDatasetConfig | None:
    """The eval split's dataset config: the training one with eval's source (None = no eval data)."""
    if cfg.eval.path:
        return replace(data, path=cfg.eval.path, hf_dataset="", max_examples=cfg.eval.max_examples, shuffle=False)
    if data.hf_dataset:
        return replace(data, split=cfg.eval.split, max_examples=cfg.eval.max_examples, shuffle=False)
    return None


def _num_labels(cfg: Config, data: TaskDatasetConfig, examples: list[dict[str, Any]]) -> int:
    if cfg.model.num_labels:
        return cfg.model.num_labels
    if data.label_words:
        return len(data.label_words)
    return max(int(ex["label"]) for ex in examples if ex["label"] is not None) + 1


def evaluate(
    model: Any,
    tokenizer: Any,
    kind: str,
    data: TaskDatasetConfig,
    examples: list[dict[str, Any]],
    cfg: Config,
    runtime: Any,
    out_dir: Path,
) -> dict[str, Any]:
    """Task metrics of `model` on the eval examples; writes predictions / errors / metrics to out_dir."""
    from modernlm.data.tasks import eval_batches, tokenize_examples
    from modernlm.eval.metrics import evaluate_predictions, write_predictions
    from modernlm.hf.lora import base_of, predict_classes
    from modernlm.textmodel import TaskTokenizer

    if data.task_type == "classification":
        tok = TaskTokenizer(tokenizer)
        items = tokenize_examples(examples, tokenizer, data)
        batches = eval_batches(items, cfg.eval.batch_size, tok.pad_id)
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
        atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        return metrics

    from modernlm.eval.prompting import TASKS, evaluate_task
    from modernlm.hf.text import wrap_hf
    from modernlm.textmodel import wrap_modernlm

    if data.name not in TASKS:
        print(f"note: no task metric for data.name={data.name} (only {', '.join(TASKS)}); val_loss only")
        return {}
    base = base_of(model)  # the model with its LoRA layers active, as the wrappers expect
    wrap = wrap_modernlm if kind == "modernlm" else wrap_hf
    tm = wrap(base, tokenizer, add_bos=data.add_bos)
    label_words = None
    if data.name == "sst2" and cfg.data.label_words:  # custom words, led by a space as the targets are
        lead = " " if examples[0]["target"].startswith(" ") else ""
        label_words = [lead + w for w in data.label_words]
    return evaluate_task(
        tm,
        examples,
        data.name,
        mode=cfg.eval.mode,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens or None,
        out_dir=out_dir,
        label_words=label_words,
        progress=cfg.train.progress,
    )


def _headline(metrics: dict[str, Any]) -> str:
    keys = ("accuracy", "macro_f1", "exact_match_flexible", "exact_match_strict", "rouge1", "rougeL")
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics) or "no task metric"


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "finetune"), "dir")]


def main(cfg: Config) -> None:
    import functools

    import torch

    from modernlm.data.tasks import TaskBatches, eval_batches, tokenize_examples
    from modernlm.hf import lora
    from modernlm.textmodel import TaskTokenizer
    from modernlm.train.run import Training, run_training
    from modernlm.train.trainer import Trainer

    p = plan(cfg)  # everything cheap first, so a typo fails before a model loads
    data, eval_cfg, eval_examples = p.data, p.eval_cfg, p.eval_examples

    def build(runtime: Runtime, run_dir: Path) -> Training:
        lora.check_precision(p.model_type, str(runtime.dtype))  # run.dtype=auto may pick fp16 on a GPU
        model, tokenizer, kind = lora.load_base_model(
            cfg.model.source, data.task_type, dtype=cfg.model.dtype, num_labels=p.num_labels or 2,
            tokenizer=cfg.model.tokenizer,
        )  # fmt: skip
        tok = TaskTokenizer(tokenizer)
        shard = dict(rank=runtime.rank, world_size=runtime.world_size)
        train_items = tokenize_examples(p.train_examples, tokenizer, data)
        val_batches = None
        if eval_examples:
            n_val = cfg.train.eval_batches * cfg.train.batch_size
            val_items = tokenize_examples(eval_examples[:n_val] if n_val else eval_examples, tokenizer, eval_cfg)
            val_batches = eval_batches(val_items, cfg.train.batch_size, tok.pad_id, **shard)
        train_batches = TaskBatches(train_items, cfg.train.batch_size, tok.pad_id, seed=cfg.run.seed, **shard)
        torch.manual_seed(cfg.run.seed)  # the same LoRA init (A is random) on every rank
        model = lora.apply_lora(model, cfg.lora, data.task_type)
        model.train()  # from_pretrained returns eval mode; dropout (and LoRA's) should be on
        info = adapter_info(cfg, p, kind, tok.pad_id)
        trainer = Trainer(
            model, lora.task_loss_fn(data.task_type, ours=kind == "modernlm"), train_batches, cfg.train, cfg.optim,
            runtime, run_dir, val_batches=val_batches, tokenizer=tokenizer,
            save_model_fn=functools.partial(_save_fn, info=info), load_model_fn=lora.load_adapter_weights,
            batch_counts=lora.task_batch_counts(data.task_type),
        )  # fmt: skip
        n_train, n_total = lora.trainable_parameters(model)
        banner = (
            f"{p.model_type} ({kind}) {data.task_type} on {data.name}, {len(train_items):,} train / "
            f"{len(eval_examples):,} eval examples; LoRA r={cfg.lora.r} trains {n_train:,} of {n_total:,} "
            f"params ({100 * n_train / n_total:.2f}%), {runtime.device} {str(runtime.dtype).removeprefix('torch.')}"
        )
        reports = Reports(cfg, p, model, tokenizer, kind, info, runtime, run_dir)
        return Training(trainer, banner, lambda: reports.before(trainer.step), lambda s: reports.after(s, trainer.step))

    run_training(cfg, "finetune", build)


class Reports:
    """Rank 0's work around training: the task metrics before it (eval_before/, kept across
    resumes; with eval.before=true) and after it (eval/, eval.json), the final adapter/ and merged/."""

    def __init__(self, cfg: Config, p: Plan, model: Any, tokenizer: Any, kind: str, info: dict[str, Any],
                 runtime: Runtime, run_dir: Path):  # fmt: skip
        self.cfg, self.p, self.model, self.tokenizer, self.kind, self.info = cfg, p, model, tokenizer, kind, info
        self.runtime, self.run_dir = runtime, run_dir
        self.report: dict[str, Any] = {}

    def _evaluate(self, name: str) -> dict[str, Any]:
        p = self.p
        out = _fresh(self.run_dir / name)
        return evaluate(self.model, self.tokenizer, self.kind, p.eval_cfg, p.eval_examples, self.cfg, self.runtime, out)

    def before(self, step: int) -> None:
        saved = self.run_dir / "eval_before" / "metrics.json"
        if self.runtime.is_main and self.p.eval_examples and self.cfg.eval.before and step == 0:
            self.report["before"] = self._evaluate("eval_before")
            self.runtime.print0(f"before training: {_headline(self.report['before'])}")
        elif saved.is_file():
            self.report["before"] = json.loads(saved.read_text())

    def after(self, summary: dict[str, Any], step: int) -> str | None:
        """Writes adapter/, eval/, eval.json and merged/; returns the done line's text."""
        from modernlm.hf.lora import save_adapter
        from modernlm.train.run import fmt_loss

        if not self.runtime.is_main:
            return None
        save_adapter(self.model, self.run_dir / "adapter", self.tokenizer, self.info)
        if self.p.eval_examples:
            e = self.p.eval_cfg
            self.report["after"] = self._evaluate("eval")
            self.report.update(step=step, eval_split=e.path or f"{e.hf_dataset}[{e.split}]",
                               n=len(self.p.eval_examples), train_wall_time_s=summary["wall_time_s"])  # fmt: skip
            atomic_write(self.run_dir / "eval.json", json.dumps(self.report, indent=2) + "\n")
        if self.cfg.save_merged:
            _save_merged(self.model, self.tokenizer, self.kind, self.run_dir / "merged")
        metrics = _headline(self.report["after"]) if self.report.get("after") else "no eval data"
        return (
            f"{summary['steps']} steps in {summary['wall_time_s']:.0f}s, loss {fmt_loss(summary['final_loss'])}, "
            f"val_loss {fmt_loss(summary['final_val_loss'])}; {metrics}"
        )


@dataclass
class Plan:
    """What `plan` settles before any model loads."""

    data: TaskDatasetConfig  # the training split, resolved
    eval_cfg: TaskDatasetConfig | None  # the eval split (None = no eval data)
    kind: str  # of the source: "modernlm" or "hf"
    model_type: str
    train_examples: list[dict[str, Any]]
    eval_examples: list[dict[str, Any]]
    num_labels: int  # classification outputs (0 for other task types)


def plan(cfg: Config) -> Plan:
    """The config's checks, the task settings and the examples: everything before a model loads."""
    from modernlm.data.tasks import load_task_examples, resolve_task_config
    from modernlm.errors import UserError
    from modernlm.hf import lora

    if not cfg.model.source:
        raise UserError("model.source: give a model (an HF directory, hub id, .gguf file or modernlm checkpoint)")
    data = resolve_task_config(cfg.data)
    eval_cfg = eval_data_config(cfg, data)
    if eval_cfg is not None:
        eval_cfg = resolve_task_config(eval_cfg)
    kind, model_type = lora.inspect_source(cfg.model.source)
    lora.check_precision(model_type, cfg.model.dtype, cfg.run.dtype)
    if kind == "modernlm" and data.task_type != "causal":
        raise UserError(
            f"data.task_type: modernlm checkpoints finetune as causal LMs, not {data.task_type}; "
            "set data.task_type=causal (SST-2 labels are then scored as words after 'Sentiment:')"
        )
    train_examples = load_task_examples(data)
    eval_examples = load_task_examples(eval_cfg) if eval_cfg is not None else []
    if data.task_type == "classification":
        unlabeled = [ex["source"] for ex in eval_examples if ex["label"] is None]
        if unlabeled:
            raise UserError(f"eval.path: {unlabeled[0]} has no label (an unlabeled split such as SST-2 test)")
    num_labels = _num_labels(cfg, data, train_examples) if data.task_type == "classification" else 0
    return Plan(data, eval_cfg, kind, model_type, train_examples, eval_examples, num_labels)


def adapter_info(cfg: Config, p: Plan, kind: str, pad_id: int | None) -> dict[str, Any]:
    """finetune.json of every adapter directory: what `load_finetuned` rebuilds the model from."""
    return {
        "base": _abs_if_local(cfg.model.source),  # load_finetuned works from any directory
        "kind": kind,
        "model_type": p.model_type,
        "task_type": p.data.task_type,
        "task": p.data.name,
        "num_labels": p.num_labels,
        "label_words": list(p.data.label_words),
        "dtype": cfg.model.dtype,
        "pad_token_id": pad_id,
        "prompt_template": p.data.prompt_template,
        "add_bos": p.data.add_bos,
    }


def _abs_if_local(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_fn(model: Any, path: Path, tokenizer: Any, info: dict[str, Any]) -> None:
    from modernlm.hf.lora import save_adapter

    save_adapter(model, path, tokenizer, info)


def _save_merged(model: Any, tokenizer: Any, kind: str, path: Path) -> None:
    """The adapter folded into a copy of the weights, saved as a plain model of the base's kind."""
    import copy

    from modernlm.hf.lora import merge_adapter

    merged = merge_adapter(copy.deepcopy(model))
    if kind == "modernlm":
        from modernlm.checkpoint import save_model

        save_model(merged, path, tokenizer)
    else:
        with atomic_files(path) as staging:
            merged.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))

"""LoRA finetuning (PEFT) of an HF model or a modernlm checkpoint on a task, with the one Trainer.

    modernlm finetune -c configs/finetune/gpt2-sst2.yaml
    modernlm finetune SmolLM2-135M-Instruct.Q4_1.gguf -c configs/finetune/smollm2-sst2.yaml
    modernlm finetune -c configs/finetune/flan-t5-samsum.yaml run.dtype=bfloat16
    modernlm finetune runs/smollm2 -c configs/finetune/modernlm-sst2.yaml train.num_steps=100

MODEL (model.source): an HF model directory, hub id, .gguf file, or modernlm checkpoint or run
directory. data.task_type (per dataset: sst2 classification, samsum seq2seq, gsm8k causal) picks
the model class, the loss (`modernlm.hf.lora`) and the evaluation (`modernlm.eval.finetuned`):
classification trains a new head with the adapters (accuracy, macro-F1); seq2seq (T5: no float16)
and causal learn the target tokens and are evaluated as the prompting baselines. Writes
run.out_dir/run.name/: config.yaml, metrics.jsonl, summary.json, checkpoints/ (adapters; a rerun
resumes), adapter/ (+ head, tokenizer, finetune.json: `modernlm.hf.lora.load_finetuned`), eval/,
eval.json (with eval.before=true also the metrics before training), and with save_merged=true
merged/: the adapter folded into a plain HF or modernlm model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modernlm.data.tasks import TaskDatasetConfig
from modernlm.eval.finetuned import FinetuneEvalSettings
from modernlm.hf.lora import LoraSettings
from modernlm.runtime import RunConfig
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


@dataclass
class Plan:
    """What `plan` settles before any model loads."""

    data: TaskDatasetConfig  # the training split, resolved
    eval_cfg: TaskDatasetConfig | None  # the eval split (None = no eval data)
    kind: str  # of the source: "modernlm" or "hf"
    model_type: str
    train_examples: list[dict[str, Any]]
    eval_examples: list[dict[str, Any]]
    val_examples: list[dict[str, Any]]  # the first of them, for val_loss (train.eval_batches of them)
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
    n_val = cfg.train.eval_batches * cfg.train.batch_size  # 0 = all
    val_examples = eval_examples[:n_val] if n_val else eval_examples
    num_labels = 0
    if data.task_type == "classification":
        unlabeled = [ex["source"] for ex in eval_examples if ex["label"] is None]
        if unlabeled:
            raise UserError(f"eval.path: {unlabeled[0]} has no label (an unlabeled split such as SST-2 test)")
        num_labels = cfg.model.num_labels or len(data.label_words)
        if not num_labels:  # the largest label + 1
            num_labels = max(int(ex["label"]) for ex in train_examples if ex["label"] is not None) + 1
    return Plan(data, eval_cfg, kind, model_type, train_examples, eval_examples, val_examples, num_labels)


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "finetune"), "dir")]


def main(cfg: Config) -> None:
    import functools

    import torch

    from modernlm.data.tasks import TaskBatches, eval_batches, tokenize_examples
    from modernlm.eval.finetuned import FinetuneEvaluation, metrics_line
    from modernlm.hf import lora
    from modernlm.textmodel import TaskTokenizer
    from modernlm.train.run import fmt_loss, training_run
    from modernlm.train.trainer import Trainer

    p = plan(cfg)  # everything cheap first, so a typo fails before a model loads
    data, eval_examples = p.data, p.eval_examples
    with training_run(cfg, "finetune") as run:
        runtime, run_dir = run.runtime, run.run_dir
        lora.check_precision(p.model_type, str(runtime.dtype))  # run.dtype=auto may pick fp16 on a GPU
        model, tokenizer, kind = lora.load_base_model(
            cfg.model.source, data.task_type, dtype=cfg.model.dtype, num_labels=p.num_labels or 2,
            tokenizer=cfg.model.tokenizer, progress=cfg.train.progress,
        )  # fmt: skip
        pad_id, shard = TaskTokenizer(tokenizer).pad_id, dict(rank=runtime.rank, world_size=runtime.world_size)
        train_items = tokenize_examples(p.train_examples, tokenizer, data)
        val_items = tokenize_examples(p.val_examples, tokenizer, p.eval_cfg) if eval_examples else []
        val_batches = eval_batches(val_items, cfg.train.batch_size, pad_id, **shard) if eval_examples else None
        train_batches = TaskBatches(train_items, cfg.train.batch_size, pad_id, seed=cfg.run.seed, **shard)
        torch.manual_seed(cfg.run.seed)  # the same LoRA init (A is random) on every rank
        model = lora.apply_lora(model, cfg.lora, data.task_type)
        model.train()  # from_pretrained returns eval mode; dropout (and LoRA's) should be on
        info = lora.adapter_info(cfg.model.source, kind, p.model_type, data, p.num_labels, cfg.model.dtype, pad_id)
        trainer = Trainer(
            model, lora.task_loss_fn(data.task_type, ours=kind == "modernlm"), train_batches, cfg.train, cfg.optim,
            runtime, run_dir, val_batches=val_batches, tokenizer=tokenizer,
            save_model_fn=functools.partial(lora.save_adapter, info=info), load_model_fn=lora.load_adapter_weights,
            batch_counts=lora.task_batch_counts(data.task_type),
            perplexity=data.task_type != "classification",  # a per-sentence label CE has no perplexity
        )  # fmt: skip
        evaluation = FinetuneEvaluation(
            lora.base_of(model), tokenizer, kind, p.eval_cfg, eval_examples, cfg.eval, runtime, run_dir,
            label_words=data.label_words if cfg.data.label_words else None, progress=cfg.train.progress,
        )  # fmt: skip
        n_train, n_total = lora.trainable_parameters(model)
        run.start(trainer, (
            f"{p.model_type} ({kind}) {data.task_type} on {data.name}, {len(train_items):,} train / "
            f"{len(eval_examples):,} eval examples; LoRA r={cfg.lora.r} trains {n_train:,} of {n_total:,} "
            f"params ({100 * n_train / n_total:.2f}%), {runtime.device} {str(runtime.dtype).removeprefix('torch.')}"
        ))  # fmt: skip
        evaluation.before(trainer.step)
        summary = trainer.train()
        text = None
        if runtime.is_main:
            lora.save_adapter(model, run_dir / "adapter", tokenizer, info)
            metrics = evaluation.after(trainer.step, summary["wall_time_s"])
            if cfg.save_merged:
                lora.save_merged(model, tokenizer, kind, run_dir / "merged")
            text = (
                f"{summary['steps']} steps in {summary['wall_time_s']:.0f}s, loss {fmt_loss(summary['final_loss'])}, "
                f"val_loss {fmt_loss(summary['final_val_loss'])}; "
                f"{metrics_line(metrics) if metrics else 'no eval data'}"
            )
        run.done(summary, text)

"""Pretrain a ModernDecoderLM on token shards made by `modernlm prepare`.

    modernlm pretrain -c configs/pretrain/tiny.yaml [train.num_steps=200 run.device=cpu ...]
    torchrun --standalone --nproc_per_node=2 -m modernlm pretrain -c configs/pretrain/tiny.yaml

Writes run.out_dir/run.name/: config.yaml, metrics.jsonl, summary.json, samples.md and
checkpoints/step_NNNNNNN/ (+ best/, latest). Running again resumes from the latest checkpoint
(train.resume=never starts over; train.resume_from=DIR starts from another checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modernlm.data.shards import TokenDataConfig, TokenStream, TrainWindows, ValBatches, read_meta
from modernlm.errors import UserError
from modernlm.model import ModelConfig
from modernlm.runtime import RunConfig
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

OUTPUTS = {"run.out_dir": "dir"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def check_data(model: ModelConfig, data: TokenDataConfig, meta: dict, tokenizer_size: int | None) -> None:
    """The shards must fit the model: ids below vocab_size, windows within max_seq_len."""
    vocab = max(meta["vocab_size"], tokenizer_size or 0)
    if vocab > model.vocab_size:
        raise UserError(
            f"model.vocab_size ({model.vocab_size}) is smaller than the data's tokenizer vocabulary "
            f"({vocab}, {Path(data.path) / 'meta.json'}); set model.vocab_size >= {vocab} "
            f"(a multiple of 64 is fastest: {64 * -(-vocab // 64)})"
        )
    if data.seq_len > model.max_seq_len:
        raise UserError(
            f"data.seq_len ({data.seq_len}) is longer than model.max_seq_len ({model.max_seq_len}); "
            "raise model.max_seq_len or lower data.seq_len"
        )


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "pretrain"), "dir")]


def main(cfg: Config) -> None:
    import torch

    from modernlm.model import ModernDecoderLM
    from modernlm.tokenizer import load_tokenizer
    from modernlm.train.losses import lm_batch_counts, lm_eval_loss, lm_loss
    from modernlm.train.run import prompt_sampler, training_run
    from modernlm.train.trainer import Trainer

    meta = read_meta(cfg.data.path)  # fail on bad data before starting process groups
    has_tokenizer = (Path(cfg.data.path) / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(cfg.data.path) if has_tokenizer else None
    check_data(cfg.model, cfg.data, meta, tokenizer.vocab_size if tokenizer else None)
    train_stream = TokenStream(cfg.data.path, "train", meta)
    has_val = bool(meta["splits"].get("val", {}).get("files"))
    val_stream = TokenStream(cfg.data.path, "val", meta) if has_val else None

    with training_run(cfg, "pretrain") as run:
        rt = run.runtime
        shard = dict(rank=rt.rank, world_size=rt.world_size)
        train_batches = TrainWindows(train_stream, cfg.data.seq_len, cfg.train.batch_size, seed=cfg.run.seed, **shard)
        val_batches = final_val_batches = None
        if val_stream is not None and len(val_stream) >= 2:
            val = lambda n: ValBatches(val_stream, cfg.data.seq_len, cfg.train.batch_size, n, **shard)  # noqa: E731
            val_batches = val(cfg.train.eval_batches)
            if cfg.train.final_eval_batches not in (-1, cfg.train.eval_batches):
                final_val_batches = val(cfg.train.final_eval_batches)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        model = ModernDecoderLM(cfg.model)
        torch.manual_seed(cfg.run.seed + rt.rank)  # dropout streams differ per rank
        trainer = Trainer(
            model, lm_loss, train_batches, cfg.train, cfg.optim, rt, run.run_dir,
            val_batches=val_batches, final_val_batches=final_val_batches, eval_loss_fn=lm_eval_loss,
            tokenizer=tokenizer, flops_per_token=model.flops_per_token(cfg.data.seq_len),
            find_unused_parameters=cfg.model.n_expert > 0,  # an expert may get no tokens in a batch
            batch_counts=lm_batch_counts,
            sample_fn=prompt_sampler(tokenizer, cfg.train.sample_prompts, cfg.train.sample_tokens),
        )  # fmt: skip
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * rt.world_size
        run.start(trainer, (
            f"{model.num_params() / 1e6:.2f}M params, {len(train_stream):,} train tokens, "
            f"{tokens_per_step:,} tokens/step, {rt.world_size} x {rt.device} {str(rt.dtype).removeprefix('torch.')}"
        ))  # fmt: skip
        run.done(trainer.train())

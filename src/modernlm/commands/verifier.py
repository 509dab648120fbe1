"""The GSM8K verifier of Cobbe et al. 2021: sample, label, train a value head, rerank best-of-N.

    modernlm verifier -c configs/align/verifier.yaml init_from=runs/sft
    modernlm verifier runs/sft sample.n_train=100 sample.n_eval=100 lm_coef=1.0   # the paper's scale
    modernlm verifier runs/sft generator=runs/sft-big data.max_eval_problems=200

INIT_FROM is the chat-ready SFT checkpoint or run directory. The stages (`modernlm.align.verifier`):
1. Sample labelled solutions of the training and held-out problems from the generator (init_from
   unless `generator` is set) into samples/; a rerun reuses them and finishes an interrupted draw.
2. Train the verifier (init_from's weights + a value head) with the one Trainer, resumable;
   data.val_fraction of the training problems give val_loss. The final one goes to verifier/.
3. Rerank the held-out samples: greedy, majority vote, best-of-N, verifier-weighted vote, pass@N
   -> eval.json, eval/predictions.jsonl, eval/errors.jsonl.
One process (CPU or one GPU). Writes run.out_dir/run.name/ (also config.yaml, metrics.jsonl,
summary.json, checkpoints/) and prints one summary line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modernlm.align.verifier import DataSettings, SampleSettings
from modernlm.runtime import RunConfig
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


@dataclass
class Config:
    init_from: str = ""  # the SFT checkpoint or run dir: the generator and the verifier's initial weights
    generator: str = ""  # sample from this checkpoint instead ("" = init_from)
    lm_coef: float = 0.0  # weight of the joint LM loss on the solution tokens (Cobbe et al. keep it on)
    data: DataSettings = field(default_factory=DataSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, warmup_steps=20, weight_decay=0.0))
    train: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=500, eval_every=100))
    run: RunConfig = field(default_factory=RunConfig)


def check(cfg: Config) -> None:
    """The config's own mistakes, before anything loads."""
    import os

    from modernlm.errors import UserError

    if not cfg.init_from:
        raise UserError("init_from: give the SFT checkpoint (a modernlm checkpoint or run directory)")
    if not (cfg.data.train_path or cfg.data.hf_dataset):
        raise UserError("data.train_path: give the training problems (GSM8K JSONL), or data.hf_dataset")
    # data.* and sample.* check themselves (DataSettings / SampleSettings), as the config loads
    if cfg.lm_coef < 0:
        raise UserError(f"lm_coef: must be >= 0, got {cfg.lm_coef}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("verifier: runs in one process (sampling and reranking are not sharded); no torchrun")


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "verifier"), "dir")]


def main(cfg: Config) -> None:
    import torch

    from modernlm.align import verifier
    from modernlm.align.sft import chat_pad_id, chat_ready, check_max_length, sft_batch_counts
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.train.run import training_run
    from modernlm.train.trainer import Trainer

    check(cfg)
    train_problems, eval_problems = verifier.read_problem_sets(cfg.data)
    backbone, tokenizer, init_ckpt = chat_ready(load(cfg.init_from, backend="modernlm", what="init_from"))
    encoder = ChatEncoder(tokenizer)
    max_length = cfg.data.max_length or backbone.config.max_seq_len
    check_max_length(max_length, backbone, init_ckpt)
    pad = chat_pad_id(encoder)
    with training_run(cfg, "verifier") as run:
        # ---- 1. samples (the generator only generates: its weights stay as loaded) ----
        gen, gen_tok, gen_ckpt = backbone, tokenizer, init_ckpt
        if cfg.generator:
            gen, gen_tok, gen_ckpt = chat_ready(load(cfg.generator, backend="modernlm", what="generator"), "generator")
        samples = verifier.draw_sample_sets(
            run.run_dir / "samples", cfg.sample, gen, ChatEncoder(gen_tok), str(gen_ckpt), train_problems,
            eval_problems, run.runtime, progress=cfg.train.progress,
        )  # fmt: skip
        del gen
        # ---- 2. the verifier: training problems split by problem into train / val ----
        examples, val_examples = verifier.split_examples(
            samples.train_rows, len(train_problems), encoder, max_length, val_fraction=cfg.data.val_fraction,
            seed=cfg.run.seed, max_val=cfg.train.eval_batches * cfg.train.batch_size,
        )  # fmt: skip
        if note := verifier.single_label_note(examples):
            run.runtime.print0(note)
        torch.manual_seed(cfg.run.seed)
        model = verifier.VerifierModel(backbone).train()
        bs = cfg.train.batch_size
        batches = verifier.VerifierBatches(examples, bs, pad, seed=cfg.run.seed)
        trainer = Trainer(
            model, verifier.verifier_loss_fn(cfg.lm_coef), batches, cfg.train, cfg.optim, run.runtime, run.run_dir,
            val_batches=verifier.collate_batches(val_examples, bs, pad) or None, eval_loss_fn=verifier.value_eval_loss,
            tokenizer=tokenizer, save_model_fn=verifier.save_verifier, load_model_fn=verifier.load_verifier_weights,
            perplexity=False, batch_counts=sft_batch_counts,
        )  # fmt: skip
        share = sum(e["correct"] for e in examples) / len(examples)
        run.start(trainer, f"{model.num_params() / 1e6:.2f}M params from {init_ckpt}, {len(examples):,} train / "
                  f"{len(val_examples):,} val solutions ({share:.1%} correct), lm_coef {cfg.lm_coef}")  # fmt: skip
        summary = trainer.train()
        verifier.save_verifier(model, run.run_dir / "verifier", tokenizer)
        text = f"{summary['steps']} steps, no data.eval_path: nothing to rerank"
        if eval_problems:  # ---- 3. rerank the held-out samples ----
            rows = verifier.examples_from_rows(samples.eval_rows, encoder, max_length)
            scores = verifier.score_examples(model, rows, cfg.sample.batch_size, pad, run.runtime.autocast)
            text = verifier.write_rerank_report(
                run.run_dir, eval_problems, samples, scores, sample=cfg.sample, eval_source=cfg.data.eval_source(),
                lm_coef=cfg.lm_coef, step=trainer.step, val_loss=summary["final_val_loss"],
            )  # fmt: skip
        run.done(summary, text)

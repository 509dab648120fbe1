"""The GSM8K verifier of Cobbe et al. 2021: sample, label, train a value head, rerank best-of-N.

    modernlm verifier -c configs/align/verifier.yaml init_from=runs/sft
    modernlm verifier runs/sft sample.n_train=100 sample.n_eval=100 lm_coef=1.0   # the paper's scale
    modernlm verifier runs/sft generator=runs/sft-big data.max_eval_problems=200

INIT_FROM is the SFT checkpoint (or its run directory: its best checkpoint), chat-ready: its
tokenizer has <|im_start|> / <|im_end|> and generation stops at <|im_end|>. Three stages:
1. Sample: sample.n_train solutions per training problem from the generator (init_from unless
   `generator` names another checkpoint), at sample.temperature, each labelled correct when its
   last number equals the reference's '#### N'. Then, for the held-out problems (data.eval_path),
   one greedy solution and sample.n_eval samples. All go to samples/*.jsonl (+ a .json each with
   the settings and the share correct); a rerun reuses them and finishes an interrupted draw.
2. Train: the verifier = init_from's weights + a scalar head on the final hidden states; every
   solution token learns to predict its solution's correctness (BCE), plus lm_coef times the LM loss
   on the solution tokens. data.val_fraction of the training problems (whole problems) give
   val_loss (the value BCE). The one Trainer: resumable, checkpoints/ hold backbone + head.
3. Rerank the held-out samples: greedy accuracy, majority vote, best-of-N by the verifier's score
   at the last token, the verifier-weighted vote, and pass@N (an oracle that picks any correct
   sample) for context. Ties go to the earliest sample.

Runs in one process (CPU or one GPU). Writes run.out_dir/run.name/: config.yaml, samples/,
metrics.jsonl, summary.json, checkpoints/, verifier/ (the final verifier: a modernlm checkpoint +
value_head.safetensors, `modernlm.align.verifier.load_verifier`), eval.json, eval/predictions.jsonl (per
problem: every answer and score, what each method picked) and eval/errors.jsonl (problems
best-of-N got wrong). Prints one summary line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modernlm.files import atomic_write
from modernlm.runtime import RunConfig, Runtime
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

POSITIONALS = ["init_from"]
OUTPUTS = {"run.out_dir": "dir"}


@dataclass
class DataSettings:
    train_path: str = ""  # GSM8K JSONL (question, answer "... #### N") to sample on
    eval_path: str = ""  # held-out problems to rerank ("" = none, unless hf_dataset)
    hf_dataset: str = ""  # instead of the files: a hub dataset with GSM8K's fields, e.g. openai/gsm8k
    hf_config: str = ""  # its config ("" = main for openai/gsm8k)
    train_split: str = "train"  # hub split to sample on
    eval_split: str = "test"  # hub split to rerank
    max_train_problems: int = 0  # the first N training problems (0 = all)
    max_eval_problems: int = 0  # the first N held-out problems (0 = all)
    val_fraction: float = 0.05  # training problems (with all their samples) held out for val_loss
    max_length: int = 0  # tokens of prompt + solution (0 = the model's max_seq_len); longer keep their end


@dataclass
class SampleSettings:
    n_train: int = 16  # solutions per training problem (Cobbe et al.: 100)
    n_eval: int = 16  # solutions per held-out problem to rerank: the N of best-of-N (Cobbe et al.: 100)
    temperature: float = 0.7  # Cobbe et al.'s sampling temperature
    top_k: int = 0  # sample among the k most likely tokens (0 = off)
    max_new_tokens: int = 256  # solution budget (a solution still open then is kept as it is)
    batch_size: int = 32  # rows per generate call and per scoring forward
    seed: int = 0  # batch b of a samples file draws with seed + b


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
    for name in ("n_train", "n_eval", "max_new_tokens", "batch_size"):
        if getattr(cfg.sample, name) <= 0:
            raise UserError(f"sample.{name}: must be positive, got {getattr(cfg.sample, name)}")
    if cfg.sample.temperature <= 0:
        raise UserError(f"sample.temperature: must be > 0 (the N samples must differ), got {cfg.sample.temperature}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.lm_coef < 0 or cfg.data.max_length < 0:
        raise UserError("lm_coef and data.max_length must be >= 0")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("verifier: runs in one process (sampling and reranking are not sharded); no torchrun")


def rerank(
    problems: list[dict[str, Any]], greedy: list[dict[str, Any]], rows: list[dict[str, Any]], scores: list[float]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(accuracies of each method, one prediction row per problem) for the held-out samples."""
    from modernlm.align.verifier import group_by_problem, rerank_metrics, rerank_problem

    picks, predictions = [], []
    for p, idxs in enumerate(group_by_problem(rows, len(problems))):
        answers, sc = [rows[i]["answer"] for i in idxs], [scores[i] for i in idxs]
        pick = rerank_problem(problems[p]["target"], answers, sc)
        picks.append(pick)
        predictions.append({
            "input": problems[p]["question"], "prediction": rows[idxs[pick["best_index"]]]["solution"],
            "reference": problems[p]["answer"], "index": p, "target": problems[p]["target"],
            "greedy": greedy[p]["solution"], "greedy_answer": greedy[p]["answer"],
            "greedy_correct": greedy[p]["correct"],
            **pick, "answers": answers, "scores": sc, "correct": [rows[i]["correct"] for i in idxs],
            "source": problems[p]["source"],
        })  # fmt: skip
    return rerank_metrics(picks, [g["correct"] for g in greedy]), predictions


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """The run directory, checked by the cli before any work."""
    return [("run.out_dir/run.name", Path(cfg.run.out_dir) / (cfg.run.name or "verifier"), "dir")]


def main(cfg: Config) -> None:
    import torch

    from modernlm.align import verifier
    from modernlm.align.sft import chat_ready, sft_batch_counts
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.errors import UserError
    from modernlm.train.run import Training, run_training
    from modernlm.train.trainer import Trainer

    check(cfg)
    train_problems, eval_problems = read_problem_sets(cfg.data)
    backbone, tokenizer, init_ckpt = chat_ready(load(cfg.init_from, backend="modernlm", what="init_from"))
    encoder = ChatEncoder(tokenizer)
    max_length = cfg.data.max_length or backbone.config.max_seq_len
    if max_length > backbone.config.max_seq_len:
        raise UserError(f"data.max_length ({max_length}) is longer than the model's context ({init_ckpt})")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else encoder.end_id
    bs = cfg.train.batch_size

    def build(runtime: Runtime, run_dir: Path) -> Training:
        # ---- 1. samples (the generator only generates: its weights stay as loaded) ----
        if cfg.generator:
            gen, gen_tok, gen_ckpt = chat_ready(load(cfg.generator, backend="modernlm", what="generator"), "generator")
        else:
            gen, gen_tok, gen_ckpt = backbone, tokenizer, init_ckpt
        drawn = draw(cfg, gen, ChatEncoder(gen_tok), str(gen_ckpt), train_problems, eval_problems, runtime, run_dir)
        del gen
        # ---- 2. the verifier: training problems split by problem into train / val ----
        examples, val_examples = split_examples(cfg, drawn["train_rows"], len(train_problems), encoder, max_length)
        starts = range(0, len(val_examples), bs)
        val_batches = [verifier.collate_verifier(val_examples[i : i + bs], pad) for i in starts]
        labels = {bool(e["correct"]) for e in examples}
        if len(labels) < 2:
            runtime.print0(
                f"note: every training sample is {'correct' if True in labels else 'wrong'}; the verifier can only "
                "learn that (more samples, a higher temperature or a stronger generator give both kinds)"
            )
        torch.manual_seed(cfg.run.seed)
        model = verifier.VerifierModel(backbone).train()
        batches = verifier.VerifierBatches(examples, bs, pad, seed=cfg.run.seed)
        trainer = Trainer(
            model, verifier.verifier_loss_fn(cfg.lm_coef), batches, cfg.train, cfg.optim, runtime, run_dir,
            val_batches=val_batches or None, eval_loss_fn=verifier.value_eval_loss, tokenizer=tokenizer,
            save_model_fn=verifier.save_verifier, load_model_fn=verifier.load_verifier_weights, eval_perplexity=False,
            batch_counts=sft_batch_counts,
        )  # fmt: skip
        banner = (
            f"{model.num_params() / 1e6:.2f}M params from {init_ckpt}, {len(examples):,} train / "
            f"{len(val_examples):,} val solutions ({sum(e['correct'] for e in examples) / len(examples):.1%} correct), "
            f"lm_coef {cfg.lm_coef}"
        )

        def after(summary: dict) -> str:
            verifier.save_verifier(model, run_dir / "verifier", tokenizer)
            if not eval_problems:
                return f"{summary['steps']} steps, no data.eval_path: nothing to rerank"
            # ---- 3. rerank the held-out samples ----
            rows = verifier.examples_from_rows(drawn["eval_rows"], encoder, max_length)
            scores = verifier.score_examples(model, rows, cfg.sample.batch_size, pad, runtime.autocast)
            return write_report(cfg, eval_problems, drawn, scores, trainer.step, summary, run_dir)

        return Training(trainer, banner, after=after)

    run_training(cfg, "verifier", build)


def read_problem_sets(d: DataSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training problems, held-out problems) from the files, or the hub dataset standing in for
    the files when no train_path is given."""
    from modernlm.align import verifier

    hub = {"hf_dataset": d.hf_dataset, "hf_config": d.hf_config} if d.hf_dataset and not d.train_path else {}
    train_problems = verifier.read_problems(d.train_path, d.max_train_problems, **hub, split=d.train_split)
    eval_problems = []
    if d.eval_path or hub:
        eval_hub = {} if d.eval_path else hub
        eval_problems = verifier.read_problems(d.eval_path, d.max_eval_problems, **eval_hub, split=d.eval_split)
    return train_problems, eval_problems


def draw(
    cfg: Config, gen: Any, gen_enc: Any, generator: str, train_problems: list[dict], eval_problems: list[dict],
    runtime: Any, run_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Stage 1: the samples of run_dir/samples/ (reused, or finished, when there): train_rows and
    train_stats, and for the held-out problems greedy_rows, eval_rows and eval_stats."""
    from modernlm.align import verifier

    gen.to(runtime.device).eval()
    s = cfg.sample
    common = dict(
        max_new_tokens=s.max_new_tokens, top_k=s.top_k, seed=s.seed, batch_size=s.batch_size,
        generator=generator, progress=cfg.train.progress, autocast=runtime.autocast,
    )  # fmt: skip
    samples = run_dir / "samples"
    train_rows, train_stats = verifier.draw_samples(
        samples / "train.jsonl", gen, gen_enc, train_problems, s.n_train, temperature=s.temperature, **common
    )
    runtime.print0(
        f"samples: {len(train_rows):,} for {len(train_problems):,} training problems from {generator}, "
        f"{train_stats['share_correct']:.1%} correct, {train_stats['problems_with_a_correct']:.1%} of problems "
        f"with a correct one -> {samples / 'train.jsonl'}"
    )
    out = {"train_rows": train_rows, "train_stats": train_stats, "generator": generator}
    out |= {"greedy_rows": [], "eval_rows": [], "eval_stats": {}}
    if eval_problems:
        out["greedy_rows"], _ = verifier.draw_samples(
            samples / "eval_greedy.jsonl", gen, gen_enc, eval_problems, 1, temperature=0.0, **common
        )
        out["eval_rows"], out["eval_stats"] = verifier.draw_samples(
            samples / "eval.jsonl", gen, gen_enc, eval_problems, s.n_eval, temperature=s.temperature, **common
        )
    return out


def split_examples(
    cfg: Config, rows: list[dict], n_problems: int, encoder: Any, max_length: int
) -> tuple[list[dict], list[dict]]:
    """(training, validation) verifier examples: data.val_fraction of the training problems, with
    all their samples, give the validation ones (at most eval_batches of them)."""
    import numpy as np

    from modernlm.align import verifier

    order = np.random.default_rng(cfg.run.seed).permutation(n_problems)
    n_val = min(round(n_problems * cfg.data.val_fraction), n_problems - 1)
    held = {int(i) for i in order[:n_val]}
    examples = verifier.examples_from_rows([r for r in rows if r["problem"] not in held], encoder, max_length)
    val_examples = verifier.examples_from_rows([r for r in rows if r["problem"] in held], encoder, max_length)
    if cfg.train.eval_batches:
        val_examples = val_examples[: cfg.train.eval_batches * cfg.train.batch_size]
    return examples, val_examples


def write_report(
    cfg: Config, eval_problems: list[dict], drawn: dict[str, Any], scores: list[float], step: int,
    summary: dict[str, Any], run_dir: Path,
) -> str:  # fmt: skip
    """Stage 3: eval.json, eval/predictions.jsonl and eval/errors.jsonl; returns the done line's text."""
    from modernlm.eval.metrics import write_predictions

    metrics, predictions = rerank(eval_problems, drawn["greedy_rows"], drawn["eval_rows"], scores)
    write_predictions(run_dir / "eval" / "predictions.jsonl", predictions)
    write_predictions(run_dir / "eval" / "errors.jsonl", [p for p in predictions if not p["best_correct"]])
    s = cfg.sample
    report = {
        **metrics,
        "sample_accuracy": drawn["eval_stats"]["share_correct"],  # one sample at the temperature: pass@1
        "n": s.n_eval,
        "n_problems": len(eval_problems),
        "step": step,
        "val_loss": summary["final_val_loss"],
        "train_samples": drawn["train_stats"],
        "settings": {
            "eval_path": cfg.data.eval_path or f"{cfg.data.hf_dataset}[{cfg.data.eval_split}]",
            "generator": drawn["generator"], "verifier": str(run_dir / "verifier"),
            "temperature": s.temperature, "top_k": s.top_k, "max_new_tokens": s.max_new_tokens, "seed": s.seed,
            "lm_coef": cfg.lm_coef,
        },
    }  # fmt: skip
    atomic_write(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
    n = s.n_eval
    return (
        f"greedy {metrics['greedy_accuracy']:.3f}, majority@{n} {metrics['majority_accuracy']:.3f}, "
        f"best-of-{n} {metrics['best_of_n_accuracy']:.3f} (weighted vote {metrics['weighted_vote_accuracy']:.3f}), "
        f"pass@{n} {metrics['pass_at_n']:.3f} on {len(eval_problems)} problems"
    )

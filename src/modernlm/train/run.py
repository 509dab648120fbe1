"""One skeleton for the training commands (pretrain, sft, dpo, verifier, finetune).

    def main(cfg):
        ...checks, data, models: whatever needs no process group...

        def build(runtime, run_dir) -> Training:
            ...this rank's batches, the Trainer...
            return Training(trainer, banner="1.2M params, ...", after=report)

        run_training(cfg, "sft", build)

`run_training` owns what every training command does alike, in this order: the runtime (device,
process group under torchrun) and its cleanup; the stage's `build`; resume BEFORE config.yaml is
written (a refused resume must not overwrite the run's config); config.yaml and the banner line
(rank 0); the stage's `before` (e.g. a baseline evaluation, knowing trainer.step); training; the
stage's `after` (reports, given the summary); and the closing `done: ... -> run_dir` line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modernlm.runtime import Runtime
from modernlm.train.trainer import SampleFn, Trainer


@dataclass
class Training:
    """What a command builds inside the runtime, for `run_training` to run."""

    trainer: Trainer
    banner: str  # the run in a line, printed (rank 0) as "<command>: <banner> -> <run dir>"
    before: Callable[[], None] | None = None  # after resume and config.yaml, before training
    after: Callable[[dict[str, Any]], str | None] | None = None  # given the summary: reports;
    # returns the done line's text ("done: <text> -> run_dir"; None = `done_text(summary)`)


def fmt_loss(v: float | None) -> str:
    """A loss for a summary line: 4 decimals, or n/a."""
    return "n/a" if v is None else f"{v:.4f}"


def done_text(summary: dict[str, Any]) -> str:
    """The default done line: steps, tokens, the last and the best validation loss."""
    return (
        f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
        f"val_loss {fmt_loss(summary['final_val_loss'])} (best {fmt_loss(summary['best_val_loss'])})"
    )


def run_training(cfg: Any, command: str, build: Callable[[Runtime, Path], Training]) -> dict[str, Any]:
    """Run a training command: cfg has `run` (RunConfig); run.name defaults to `command`; the run
    directory is run.out_dir/run.name. Returns the trainer's summary."""
    from modernlm.config import save_config
    from modernlm.runtime import cleanup, setup_runtime

    cfg.run.name = cfg.run.name or command
    runtime = setup_runtime(cfg.run)
    try:
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        stage = build(runtime, run_dir)
        stage.trainer.maybe_resume()  # before writing config.yaml: a refused resume must not overwrite it
        if runtime.is_main:
            save_config(cfg, run_dir / "config.yaml")
            runtime.print0(f"{command}: {stage.banner} -> {run_dir}")
        if stage.before is not None:
            stage.before()
        summary = stage.trainer.train()
        text = stage.after(summary) if stage.after is not None else None
        runtime.print0(f"done: {text or done_text(summary)} -> {run_dir}")
        return summary
    finally:
        cleanup(runtime)


def prompt_sampler(tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> SampleFn | None:
    """The trainer's sample_fn for modernlm models: a continuation of each prompt (temperature 0.8,
    top-k 50, seeded by the step with generation's own generator, so sampling never disturbs the
    training RNG), as "**prompt**continuation" paragraphs. None without a tokenizer or prompts."""
    if tokenizer is None or not prompts:
        return None
    prompts = list(prompts)

    def sample(model: Any, step: int) -> str:
        from modernlm.generation import generate_text

        texts = generate_text(model, tokenizer, prompts, max_new_tokens, temperature=0.8, top_k=50, seed=step)
        return "\n".join(f"**{p}**{t}\n" for p, t in zip(prompts, texts, strict=True))

    return sample


__all__ = ["Training", "done_text", "fmt_loss", "prompt_sampler", "run_training"]

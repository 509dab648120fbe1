"""One skeleton for the training commands (pretrain, sft, dpo, grpo, verifier, finetune).

    def main(cfg):
        ...checks, data, models: whatever needs no process group...
        with training_run(cfg, "sft") as run:   # the runtime (device, process group under torchrun), run_dir
            trainer = Trainer(..., run.runtime, run.run_dir, ...)   # this rank's batches
            run.start(trainer, "1.2M params, ...")   # resume, config.yaml, the banner line
            summary = trainer.train()
            run.write_eval(report)                # eval.json (rank 0)
            run.done(summary, text)               # "done: <text> -> run_dir" (done_text(summary) by default)

`training_run` owns what every training command does alike: run.name defaults to the command, the
runtime is set up and always cleaned up on exit. `start` resumes BEFORE config.yaml is written (a
refused resume must not overwrite the run's config), then writes config.yaml and prints the banner
"<command>: <banner> -> <run dir>" on rank 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modernlm.config import save_config
from modernlm.errors import UserError
from modernlm.files import atomic_write_json
from modernlm.generation import generate_text
from modernlm.runtime import Runtime, cleanup, setup_runtime
from modernlm.train.trainer import SampleFn, Trainer


@dataclass
class TrainingRun:
    """A training command's run, inside `training_run`: its runtime and run directory."""

    cfg: Any
    command: str
    runtime: Runtime
    run_dir: Path
    trainer: Trainer | None = None  # given by `start`; closed before the runtime's cleanup

    def start(self, trainer: Trainer, banner: str) -> None:
        """Resume (a refused resume raises before config.yaml is touched), then config.yaml and
        the banner line on rank 0."""
        self.trainer = trainer
        trainer.maybe_resume()
        if self.runtime.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.runtime.print0(f"{self.command}: {banner} -> {self.run_dir}")

    def write_eval(self, report: dict[str, Any]) -> None:
        """The run's evaluation report, eval.json (rank 0)."""
        if self.runtime.is_main:
            atomic_write_json(self.run_dir / "eval.json", report)

    def done(self, summary: dict[str, Any], text: str | None = None) -> None:
        """The closing line, "done: <text> -> <run dir>" (text None = `done_text(summary)`)."""
        self.runtime.print0(f"done: {text or done_text(summary)} -> {self.run_dir}")


@contextmanager
def training_run(cfg: Any, command: str) -> Iterator[TrainingRun]:
    """cfg has `run` (RunConfig); run.name defaults to `command`; the run directory is
    run.out_dir/run.name. The runtime is cleaned up however the block exits."""
    cfg.run.name = cfg.run.name or command
    runtime = setup_runtime(cfg.run)
    run = TrainingRun(cfg, command, runtime, Path(cfg.run.out_dir) / cfg.run.name)
    try:
        with _only_user(run.run_dir) if runtime.is_main else contextlib.nullcontext():
            yield run
    finally:
        if run.trainer is not None:
            run.trainer.close()  # the DDP wrapper goes before the process group (see Trainer.close)
        cleanup(runtime)


@contextmanager
def _only_user(run_dir: Path) -> Iterator[None]:
    """Hold run_dir/.lock: a second training into the same run directory is refused (its metrics,
    checkpoints and config.yaml would mix with this one's). The OS drops the lock when the process
    ends, however it ends; a run that ends on its own removes the file (while it holds the lock: a
    second training that opened it meanwhile finds it locked)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"run directory {run_dir} is in use by another training (pid {f.read().strip() or '?'}): "
                            "wait for it to end, or give another run.name") from None  # fmt: skip
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            (run_dir / ".lock").unlink(missing_ok=True)


def fmt_loss(v: float | None) -> str:
    """A loss for a summary line: 4 decimals, or n/a."""
    return "n/a" if v is None else f"{v:.4f}"


def done_text(summary: dict[str, Any]) -> str:
    """The default done line: steps, tokens, the last and the best validation loss."""
    return (
        f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
        f"val_loss {fmt_loss(summary['final_val_loss'])} (best {fmt_loss(summary['best_val_loss'])})"
    )


def prompt_sampler(tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> SampleFn | None:
    """The trainer's sample_fn for modernlm models: a continuation of each prompt (temperature 0.8,
    top-k 50, seeded by the step with generation's own generator, so sampling never disturbs the
    training RNG), as "**prompt**continuation" paragraphs. None without a tokenizer or prompts."""
    if tokenizer is None or not prompts:
        return None
    prompts = list(prompts)

    def sample(model: Any, step: int) -> str:
        texts = generate_text(model, tokenizer, prompts, max_new_tokens, temperature=0.8, top_k=50, seed=step)
        return "\n".join(f"**{p}**{t}\n" for p, t in zip(prompts, texts, strict=True))

    return sample


__all__ = ["TrainingRun", "done_text", "fmt_loss", "prompt_sampler", "training_run"]

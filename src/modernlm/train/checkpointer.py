"""The run's checkpoints: when to save, how many to keep, the best model, where to resume from.

`Checkpointer` is the component `Trainer.train` asks (`should_save`, `save`, `update_best`,
`resume_path`, `load`); the layout on disk (step_NNNNNNN/, best/, latest) is `modernlm.checkpoint`'s.
It writes and reads model files only through the `save_model_fn` / `load_model_fn` it is given
(`load_model_weights` for modernlm models).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modernlm.checkpoint import (
    BEST_DIR,
    BEST_INFO_FILE,
    CHECKPOINTS_DIR,
    TRAIN_STATE_FILE,
    checkpoint_step,
    config_differences,
    latest_checkpoint,
    load_model_config,
    load_training_state,
    load_weights_into,
    run_checkpoints,
    save_best_checkpoint,
    save_training_checkpoint,
)
from modernlm.errors import UserError
from modernlm.files import clean_leftovers, tmp_path
from modernlm.model import ModelConfig
from modernlm.runtime import Runtime
from modernlm.train.components import LoadModelFn, SaveModelFn, every
from modernlm.train.fsdp import DISTRIBUTED_DIR, full_weights, load_sharded, save_sharded


def load_model_weights(model: nn.Module, path: Path) -> None:
    """The default load_model_fn, for modernlm models: the checkpoint's weights, refused when its
    model config differs from the model's."""
    check_model_config(model, path)
    load_weights_into(model, path)


def check_model_config(model: nn.Module, path: Path) -> None:
    """Refuse a checkpoint whose config.json differs from a modernlm model's config (before its
    weights or distributed shards load); other models: no check."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        return
    diffs = config_differences(load_model_config(path), config)
    if diffs:
        raise UserError(
            f"cannot resume from {path}: its model config differs from this run's "
            f"({'; '.join(diffs)}); use the same model settings, or start a new run "
            "(another run.name, or train.resume=never)"
        )


class Checkpointer:
    """The run's checkpoints: when to save, how many to keep, the best model, where to resume from.

    `should_save`: every `save_every` steps and at the last step (save_every = 0: only the last).
    `save` writes run_dir/checkpoints/step_NNNNNNN/ (model files through `save_model_fn`, the
    trainer's state as train_state.pt) and keeps the newest `keep_last`; it is collective under DDP
    (rank 0 writes, every rank waits). `update_best` keeps checkpoints/best/ = the model of the
    lowest validation loss (with `save_best`). `resume_path`: with resume="auto" the run directory's
    newest checkpoint, else `resume_from` (a checkpoint or a run directory), else None; `load`
    reads one back (model files through `load_model_fn`) and returns its training state.
    With `fsdp` (train.parallel=fsdp) a checkpoint also holds `distributed/`: model + optimizer as
    torch.distributed.checkpoint shards, written by every rank and read back on any number of ranks.
    """

    def __init__(
        self,
        run_dir: Path,
        runtime: Runtime,
        *,
        save_model_fn: SaveModelFn,
        load_model_fn: LoadModelFn,
        tokenizer: Any = None,
        save_every: int = 0,
        keep_last: int = 3,
        save_best: bool = True,
        resume: str = "auto",
        resume_from: str = "",
        fsdp: bool = False,
    ):
        self.run_dir, self.runtime, self.tokenizer = Path(run_dir), runtime, tokenizer
        # train.parallel=fsdp: model + optimizer as sharded distributed checkpoints (see `save`)
        self.fsdp = fsdp
        self.save_model_fn, self.load_model_fn = save_model_fn, load_model_fn
        self.save_every, self.keep_last, self.save_best = save_every, keep_last, save_best
        self.resume, self.resume_from = resume, resume_from
        self.best_val_loss = math.inf
        # (step, directory) of this run's newest checkpoint; the directory is None off rank 0
        self.saved: tuple[int, Path | None] = (-1, None)

    def should_save(self, step: int, last: bool) -> bool:
        return every(step, self.save_every) or last

    def step_dir(self, step: int) -> Path:
        return self.run_dir / CHECKPOINTS_DIR / f"step_{step:07d}"

    def save(
        self, step: int, model: nn.Module, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> Path | None:
        """Write step's checkpoint (rank 0; every rank waits for it). Returns its directory on rank 0.
        Under FSDP, `optimizer` is saved with the model's shards (`_save_sharded`)."""
        if self.fsdp:
            assert optimizer is not None
            return self._save_sharded(step, model, state, optimizer)
        path = None
        if self.runtime.is_main:
            path = save_training_checkpoint(
                self.run_dir, step, model, state, self.tokenizer, self.keep_last, save_fn=self.save_model_fn
            )
        if self.runtime.distributed:
            torch.distributed.barrier()
        self.saved = (step, path)
        return path

    def _save_sharded(
        self, step: int, model: nn.Module, state: dict[str, Any], optimizer: torch.optim.Optimizer
    ) -> Path | None:
        """FSDP: every rank writes its shards of model + optimizer (torch.distributed.checkpoint) into
        a temporary directory named by rank 0; the full weights are gathered to rank 0, which writes
        them as the usual model files with train_state.pt, moves the shards in as `distributed/` and
        puts the whole directory in place atomically, like every other checkpoint. A kill at any
        point leaves temporaries that `clean_leftovers` removes (they carry rank 0's pid)."""
        rt = self.runtime
        final = self.step_dir(step)
        shards = [tmp_path(final.with_name(f"{final.name}.shards"))]  # rank 0's pid on every rank
        if rt.is_main and shards[0].exists():  # this process's own failed save: no stale shard may stay
            shutil.rmtree(shards[0])
        if rt.distributed:  # (also: no rank writes before rank 0 cleared the directory)
            torch.distributed.broadcast_object_list(shards, src=0)
        save_sharded(model, optimizer, shards[0])
        weights = full_weights(model)  # collective: the full weights land on rank 0
        path = None
        if rt.is_main:

            def save_fn(m: Any, directory: Path, tokenizer: Any) -> None:
                self.save_model_fn(m, directory, tokenizer)
                os.replace(shards[0], directory / DISTRIBUTED_DIR)

            path = save_training_checkpoint(
                self.run_dir, step, weights, state, self.tokenizer, self.keep_last, save_fn=save_fn
            )
        if rt.distributed:
            torch.distributed.barrier()
        self.saved = (step, path)
        return path

    def update_best(self, step: int, model: nn.Module, val_loss: float) -> bool:
        """Record a validation loss; a new lowest one replaces checkpoints/best/ (rank 0, save_best)."""
        if not val_loss < self.best_val_loss:
            return False
        self.best_val_loss = val_loss
        if self.save_best and self.fsdp:
            model = full_weights(model)  # collective: every rank gathers, rank 0 writes
        if self.save_best and self.runtime.is_main:
            info = {"step": step, "val_loss": val_loss}
            save_best_checkpoint(self.run_dir, model, info, self.tokenizer, save_fn=self.save_model_fn)
        return True

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from, if any; first removes what a killed save left behind.

        resume_from starts a run (torchtitan's initial_load_path rule): once the run directory holds
        checkpoints of its own, they are continued, so a run killed after it started from resume_from
        goes on from its own newest checkpoint, not back to the start. resume=never with resume_from
        starts over from it: the run directory's checkpoints after it are removed (all of them when it
        lies elsewhere)."""
        if self.runtime.is_main:  # a killed save's temporaries; best/ set aside
            clean_leftovers(self.run_dir / CHECKPOINTS_DIR)
            clean_leftovers(self.run_dir)
        own = latest_checkpoint(self.run_dir)
        source = self._resume_source() if self.resume_from else None
        if self.resume == "never":
            self._start_over(source)
            return source
        if source is None or own is None or own.resolve() == source.resolve():
            return source or own
        self.runtime.print0(
            f"train.resume_from: {self.run_dir} has checkpoints of its own: continuing from {own.name} "
            f"(train.resume=never starts over from {self.resume_from})"
        )
        return own

    def _resume_source(self) -> Path:
        """train.resume_from's checkpoint: the directory given, or a run directory's newest one."""
        path = Path(self.resume_from)
        if (path / CHECKPOINTS_DIR).is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise UserError(f"train.resume_from: no checkpoint in run directory {self.resume_from}")
            return found
        if not path.is_dir():
            raise UserError(f"train.resume_from: checkpoint directory not found: {path}")
        if not (path / TRAIN_STATE_FILE).is_file():  # (best/ has none): said before anything is removed
            raise UserError(f"train.resume_from: {path} has no {TRAIN_STATE_FILE} (not a training checkpoint)")
        return path

    def _start_over(self, source: Path | None) -> None:
        """train.resume=never: remove the run directory's checkpoints (and samples.md), which a
        later resume would pick up and `keep_last` would prune as newer; a `source` among them (going
        back to an earlier step of this run) stays, with those before it."""
        root = self.run_dir / CHECKPOINTS_DIR
        if not self.runtime.is_main or not root.is_dir() or not any(root.iterdir()):
            return
        if source is not None and source.resolve().parent == root.resolve():  # a step_N of this run
            last = checkpoint_step(source)
            later = [p for p in run_checkpoints(self.run_dir, best=False) if checkpoint_step(p) > last]
            best = root / BEST_DIR / BEST_INFO_FILE
            if best.is_file() and json.loads(best.read_text()).get("step", 0) > last:
                later.append(best.parent)
            for p in later:
                shutil.rmtree(p)
            if later:
                self.runtime.print0(f"train.resume=never: removed the {len(later)} checkpoints after {source.name}")
            return
        shutil.rmtree(root)
        (self.run_dir / "samples.md").unlink(missing_ok=True)
        self.runtime.print0(f"train.resume=never: removed the earlier run's checkpoints ({root}) and samples.md")

    def load(self, model: nn.Module, path: Path, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Load the checkpoint's model files into `model`; returns its training state. A checkpoint
        with distributed shards (saved under FSDP) loads model + `optimizer` from them, resharded to
        this run's ranks; its state's "optimizer" is then None."""
        shards = path / DISTRIBUTED_DIR
        if shards.is_dir() and optimizer is not None:
            check_model_config(model, path)
            load_sharded(model, optimizer, shards)
        elif self.fsdp:
            raise UserError(
                f"train.parallel=fsdp: cannot resume from {path}: it has no {DISTRIBUTED_DIR}/ shards "
                "(saved with train.parallel=ddp); resume it with train.parallel=ddp"
            )
        else:
            self.load_model_fn(model, path)
        state = load_training_state(path)
        self.saved = (int(state["step"]), path)
        return state


# ---- the time budget -------------------------------------------------------------------------


__all__ = ["Checkpointer", "check_model_config", "load_model_weights"]

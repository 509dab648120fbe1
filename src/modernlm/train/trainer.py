"""The one training loop, reused by every stage (pretrain, SFT, DPO, verifier, LoRA finetuning).

A stage supplies a model, batches and a `loss_fn(model, batch) -> (loss_sum, n_tokens, metrics)`:
the SUM of the micro-batch's per-token losses (a scalar tensor with grad), how many target tokens it
covers (padding excluded), and extra scalars to log. The `Trainer` does the rest: accumulation, AMP,
the LR schedule, clipping, the non-finite guard, activation checkpointing, DDP or FSDP, validation,
samples, metrics, checkpoints and exact resume. Split like torchtitan's Trainer: `train` (the loop)
-> `train_step` (one optimizer step) -> `forward_backward_step` (one micro-batch). The gradient is
exactly that of (sum of all token losses) / N over the accumulation window and all ranks, however
padding spreads the tokens.

Design notes (throughput counts from `batch_counts`, the loss normalisation, the other hooks):
docs/design.md#traintrainerpy
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from modernlm.checkpoint import save_model
from modernlm.errors import Interrupted, UserError
from modernlm.runtime import Runtime, compile_model, eval_mode, rng_state, set_rng_state, warn_once
from modernlm.train.checkpointer import Checkpointer, load_model_weights
from modernlm.train.components import (
    LoadModelFn,
    SaveModelFn,
    StopSignals,
    TimeBudget,
    TrainLog,
    Validator,
    every,
    to_device,
)
from modernlm.train.fsdp import check_fsdp, full, local, set_grad_sync, shard_model
from modernlm.train.memory import AC_MODES, ACMode, apply_activation_checkpointing
from modernlm.train.optim import OptimConfig, build_optimizer, lr_at, set_lr
from modernlm.train.tracking import add_section, read_metrics

LossFn = Callable[[nn.Module, Any], tuple[Tensor, "Tensor | int", dict[str, Any]]]
BatchCounts = Callable[[Any], tuple[int, "int | None"]]  # CPU batch -> (input tokens, examples or None)
SampleFn = Callable[[nn.Module, int], "str | None"]  # (model in eval mode, step) -> a samples.md section
STEP_KEYS = {"loss", "grad_norm", "tokens", "input_tokens", "examples", "ok", "overflow"}  # train_step's own


class Batches(Protocol):
    """The training batches: an endless iterator of CPU batches whose position a checkpoint keeps."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingConfig:
    num_steps: int = 1000  # optimizer steps (at most, with max_seconds)
    max_seconds: float = 0.0  # wall-time budget of the loop; 0 = none. The LR decays against
    # whichever of num_steps / max_seconds ends first, reaching its floor on the last step.
    batch_size: int = 8  # sequences per micro-batch, per rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # Recompute the transformer blocks' activations in the backward instead of keeping them:
    # none | full (every block) | selective (every other block). Less memory, more compute;
    # checkpoints are the same either way. See train/memory.py.
    activation_checkpointing: ACMode = "none"
    log_every: int = 10  # steps between metrics.jsonl lines (step 1 is always logged)
    eval_every: int = 250  # steps between validation runs; 0 = only at the end
    eval_at_start: bool = True  # score the untrained model first (a baseline for the curves)
    eval_batches: int = 20  # validation batches per run (per rank share of batch_size * world); 0 = whole split
    final_eval_batches: int = -1  # batches of the last validation run; -1 = eval_batches, 0 = whole split
    save_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # step checkpoints kept on disk
    save_best: bool = True  # keep checkpoints/best/ = the model with the lowest validation loss
    sample_every: int = 0  # steps between sampling from sample_prompts into samples.md; 0 = never
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time", "The history of"])
    sample_tokens: int = 48  # new tokens per sample
    max_bad_steps: int = 5  # consecutive non-finite steps that stop the run
    resume: Literal["auto", "never"] = "auto"  # auto = continue from the run dir's latest checkpoint
    resume_from: str = ""  # a checkpoint dir (or a run dir) to start from, until the run has its own
    progress: bool = True  # tqdm progress bar on rank 0
    # ddp: every rank holds the whole model; fsdp: FSDP2 shards weights, gradients and optimizer
    # state over the ranks (torch >= 2.6; checkpoints as sharded distributed checkpoints, which
    # resume on any number of ranks, plus the usual model.safetensors). See train/fsdp.py.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    fsdp_cpu_offload: bool = False  # fsdp: keep the shards and the optimizer step on the CPU

    def __post_init__(self) -> None:
        for name in (
            "num_steps",
            "batch_size",
            "grad_accum_steps",
            "log_every",
            "max_bad_steps",
            "keep_last",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.final_eval_batches < -1:
            raise ValueError(f"final_eval_batches must be >= -1, got {self.final_eval_batches}")
        for name in ("eval_every", "eval_batches", "save_every", "sample_every", "sample_tokens", "max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.activation_checkpointing not in AC_MODES:
            raise UserError(
                f"train.activation_checkpointing: expected one of {', '.join(AC_MODES)}, "
                f"got {self.activation_checkpointing!r}"
            )


class Trainer:
    """Owns the model's training: optimizer, scaler, counters, and the components of the loop.

    Args:
        model: the bare model (not compiled/DDP-wrapped; the trainer wraps it).
        loss_fn: see the module docstring.
        train_batches: an endless iterator of CPU batches with `state_dict`/`load_state_dict`
            (`Batches`): its position is checkpointed and resume is exact.
        val_batches: a re-iterable of validation batches for this rank, with a len(): None on
            every rank (no validation) or on none ([] where a rank has no share).
        final_val_batches: those of the last validation run, when they differ (e.g. the whole split
            at the end, a sample of it along the way); default: val_batches.
        eval_loss_fn: loss_fn used for validation (default: loss_fn).
        tokenizer: saved with every checkpoint (through save_model_fn).
        flops_per_token: training FLOPs per input token, for MFU (0 = no MFU).
        batch_counts: `(batch) -> (input_tokens, examples | None)` of a CPU micro-batch, for the
            throughput (docs/design.md#traintrainerpy); default: input tokens = target tokens.
        save_model_fn: `(model, dir, tokenizer)` writes a checkpoint's model files (default:
            checkpoint.save_model, for modernlm models); e.g. an adapter saver for HF LoRA.
        load_model_fn: `(model, dir)` loads them back on resume (default: a modernlm model's
            weights, refused when the checkpoint's model config differs).
        perplexity: the loss is a token NLL, so log ppl = exp(loss) on train lines and
            val_ppl = exp(val_loss); False where it is not (DPO, GRPO, the verifier).
        sample_fn: `(model, step) -> str | None`, a Markdown section appended to samples.md every
            train.sample_every steps and at the last step (rank 0, model in eval mode); a
            UserError from it skips that sample with a warning, anything else stops the run.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_batches: Batches | Iterator[Any],
        cfg: TrainingConfig,
        optim_cfg: OptimConfig,
        runtime: Runtime,
        run_dir: str | Path,
        *,
        val_batches: Iterable[Any] | None = None,
        final_val_batches: Iterable[Any] | None = None,
        eval_loss_fn: LossFn | None = None,
        tokenizer: Any = None,
        flops_per_token: float = 0.0,
        find_unused_parameters: bool = False,
        save_model_fn: SaveModelFn | None = None,
        load_model_fn: LoadModelFn | None = None,
        perplexity: bool = True,
        sample_fn: SampleFn | None = None,
        batch_counts: BatchCounts | None = None,
    ):
        self.cfg, self.optim_cfg, self.runtime = cfg, optim_cfg, runtime
        self.run_dir = Path(run_dir)
        self.model = model.to(runtime.device)
        # Before compile and DDP / FSDP wrap the model (torchtitan's order): they see the blocks
        # that recompute, so compile traces the recompute and data parallel wraps the whole.
        apply_activation_checkpointing(self.model, cfg.activation_checkpointing)
        self.loss_fn = loss_fn
        self.train_batches = train_batches
        self.flops_per_token, self.sample_fn, self.batch_counts = flops_per_token, sample_fn, batch_counts
        if cfg.sample_every and sample_fn is None:
            warn_once("train.sample_every: this stage has no sampler (no tokenizer, or not a generating model)")
        self.fsdp = cfg.parallel == "fsdp"
        # FSDP on several ranks: every forward all-gathers weights with the other ranks, so each
        # rank runs every forward (validation, samples, a stage's own evaluations) in step
        self.sharded = self.fsdp and runtime.distributed
        self.validator = Validator(
            eval_loss_fn or loss_fn, val_batches, runtime, final_batches=final_val_batches,
            every=cfg.eval_every, at_start=cfg.eval_at_start, perplexity=perplexity, sharded=self.sharded,
        )  # fmt: skip
        if self.fsdp:
            check_fsdp(runtime, optim_cfg.name)
            if save_model_fn is not None and runtime.distributed:
                # a stage's own saver (verifier head, LoRA adapter) would see sharded weights
                raise UserError("train.parallel=fsdp: this stage saves its model its own way; use train.parallel=ddp")
        self.checkpointer = Checkpointer(
            self.run_dir, runtime, save_model_fn=save_model_fn or save_model,
            load_model_fn=load_model_fn or load_model_weights, tokenizer=tokenizer, save_every=cfg.save_every,
            keep_last=cfg.keep_last, save_best=cfg.save_best, resume=cfg.resume, resume_from=cfg.resume_from,
            fsdp=self.fsdp,
        )  # fmt: skip
        self.signals = StopSignals(runtime)

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, optim_cfg)
        # fp16 needs loss scaling (its range is small); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)

        # What the loss_fn calls: compiled, then DDP-wrapped (nanoGPT's order). Saving, eval and
        # sampling use the bare model.
        self.eval_model = compile_model(self.model) if runtime.compile and not self.fsdp else self.model
        self.train_model = self.eval_model
        if self.fsdp:
            self._shard()
        elif runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.train_model = DDP(
                self.eval_model,
                device_ids=device_ids,
                find_unused_parameters=find_unused_parameters,
            )

        self.step = 0  # optimizer steps done (skipped ones included)
        self.tokens_seen = 0  # target tokens trained on, all ranks
        self.input_tokens_seen = 0  # tokens fed to the model, padding excluded, all ranks
        self.examples_seen = 0  # examples trained on, all ranks, where the loss_fn counts them
        self.skipped_steps = 0  # non-finite loss or gradient: optimizer not stepped
        self.overflow_steps = 0  # fp16 loss-scale overflows (GradScaler lowers its scale)
        self.consecutive_bad = 0
        self.last_val_loss: float | None = None
        self.elapsed_s = 0.0  # wall time over all attempts of this run
        self.resumed_from: Path | None = None
        self._resume_checked = False
        self.clock = time.perf_counter  # wall clock for the time budget (tests swap in a fake one)
        self.stopped_by = ""  # "steps" or "time", once train() returns; "SIGINT" / "SIGTERM" if interrupted
        self.log: TrainLog | None = None  # while train() runs
        self._budget: TimeBudget | None = None  # while train() runs

    def _shard(self) -> None:
        """train.parallel=fsdp: compile (run.compile) and shard each block, then the root; after
        activation checkpointing, which must wrap the blocks first."""
        shard_model(self.model, self.runtime, cpu_offload=self.cfg.fsdp_cpu_offload)
        # Sharding replaced the parameters by sharded ones: the optimizer (built after sharding,
        # so its state is sharded too) and the clipping list must hold those.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.optim_cfg)

    @property
    def best_val_loss(self) -> float:
        return self.checkpointer.best_val_loss

    # ---- the loop -------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the DDP wrapper while the process group still exists (`train.run.training_run` calls
        this before `runtime.cleanup`). Its reducer holds the group: freed after the group is
        destroyed, it would free the group too, from the main thread with the interpreter lock held,
        while a gloo thread may be waiting for that lock (a hang at exit, seen on 2 CPU ranks)."""
        self.train_model = self.eval_model

    def train(self) -> dict[str, Any]:
        """Run until cfg.num_steps (or the time budget); returns the summary also written to summary.json.

        SIGINT / SIGTERM while it runs: the current step finishes (every rank stops after the same
        one), its checkpoint is saved and `Interrupted` is raised; a second Ctrl-C exits at once."""
        cfg = self.cfg
        self.maybe_resume()
        # Drop lines a killed attempt logged after the checkpoint we resume from (all of them on a
        # fresh start), so metrics.jsonl always reads as one uninterrupted run.
        log = self.log = TrainLog(
            self.run_dir, self.runtime, num_steps=cfg.num_steps, log_every=cfg.log_every, progress=cfg.progress,
            initial_step=self.step, truncate_after=self.step if self.resumed_from else -1,
            flops_per_token=self.flops_per_token,
        )  # fmt: skip
        budget = self._budget = TimeBudget(cfg.max_seconds, self.clock, self.elapsed_s, self._agree)
        with self.signals:
            try:
                if self.validator.should_eval_first(self.step):
                    self._validate(best=False)  # the untrained baseline
                while self.step < cfg.num_steps and (lr := self._next_lr(budget)) is not None:
                    t0 = self.clock()
                    set_lr(self.optimizer, lr)
                    out = self.train_step([next(self.train_batches) for _ in range(cfg.grad_accum_steps)])
                    self.step += 1
                    self._count(out, self.clock() - t0)
                    self._check_finite(out)
                    last = self.step == cfg.num_steps or budget.out_of_time()
                    if log.should_log(self.step, last):
                        self._log_step(out, lr)
                    if self.validator.should_eval(self.step, last):
                        self._validate(best=True, final=last)
                    if self.should_sample(self.step, last):
                        self.sample()
                    if self.checkpointer.should_save(self.step, last):
                        self.save_checkpoint()
                    if self.signals.stop_requested():  # agreed by every rank in train_step
                        self._interrupt()
                    if last:
                        break
                self.stopped_by = "steps" if self.step >= cfg.num_steps else "time"
                # A signal after the last step's decision (during its eval or save) still stops the
                # command that called train(), e.g. a pipeline before its next stage.
                if self.signals.agree():
                    self._interrupt()
            finally:
                self.elapsed_s = budget.elapsed()
                self._budget = None
                summary = self.summary(log.last_record)
                log.close(summary)
        return summary

    def _next_lr(self, budget: TimeBudget) -> float | None:
        """The LR of the next step; None when the time budget leaves no room for it. After warmup
        (counted in steps) the schedule's progress is the larger of step / num_steps and
        (elapsed time + one step) / max_seconds, so the last step runs at the floor."""
        lr_step: float = self.step
        if budget.max_seconds:
            step_end = budget.next_step_end()
            # Only a resumed run stops here (its budget spent before it started): after a step,
            # out_of_time() has already decided whether it was the last, and stopping here instead
            # (time spent logging or evaluating since) would skip the final eval and save.
            if budget.step_time is None and budget.spent(step_end):
                return None
            if self.step >= self.optim_cfg.warmup_steps:
                lr_step = max(self.step, self.cfg.num_steps * min(step_end / budget.max_seconds, 1.0))
        return lr_at(lr_step, self.optim_cfg, self.cfg.num_steps)

    def _count(self, out: dict[str, Any], seconds: float) -> None:
        """Add a finished step to the run's totals, the log's interval and the time budget."""
        self.tokens_seen += out["tokens"]
        self.input_tokens_seen += out["input_tokens"]
        self.examples_seen += out["examples"] or 0
        assert self.log is not None and self._budget is not None
        self.log.step_done(out["input_tokens"], out["examples"], seconds)
        self._budget.step_done(seconds)

    def _log_step(self, out: dict[str, Any], lr: float) -> None:
        values: dict[str, Any] = {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"]}
        if self.validator.perplexity:  # a token NLL: its perplexity is what plots and reports draw
            values["ppl"] = math.exp(min(out["loss"], 50.0))
        values |= {"tokens": self.tokens_seen, "input_tokens": self.input_tokens_seen}
        if out["examples"] is not None:
            values["examples"] = self.examples_seen
        values |= {"skipped_steps": self.skipped_steps, "time_s": self._time_s()}
        values |= {k: v for k, v in out.items() if k not in STEP_KEYS}  # the loss_fn's metrics
        assert self.log is not None
        self.log.log_step(self.step, values)

    def _interrupt(self) -> None:
        """Save the step just done (unless it is saved already) and raise `Interrupted`."""
        signum = self.signals.received or self.signals.agreed
        step, path = self.checkpointer.saved
        if step != self.step:  # the same decision on every rank
            path = self.save_checkpoint()  # collective under DDP; rank 0 writes
        if path is None:  # not rank 0: the directory rank 0 wrote
            path = self.checkpointer.step_dir(self.step)
        self.stopped_by = signal.Signals(signum).name
        raise Interrupted(signum, self.step, str(path))

    def _time_s(self) -> float:
        """Wall time of the run so far (all attempts), for the time_s column of metrics.jsonl."""
        return round(self._budget.elapsed() if self._budget is not None else self.elapsed_s, 3)

    def _agree(self, value: float) -> float:
        """Rank 0's clock-derived value on every rank: they must stop, and set the LR, together."""
        if not self.runtime.distributed:
            return value

        t = torch.tensor([value], dtype=torch.float64, device=self.runtime.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def train_step(self, micro_batches: list[Any]) -> dict[str, Any]:
        """One optimizer step over an accumulation window. Skips the update (and says so in
        "ok") when the loss or the gradient is not finite, so a NaN never reaches the weights."""
        rt = self.runtime
        n_micro = len(micro_batches)
        loss_total = torch.zeros((), device=rt.device)
        tokens_total = torch.zeros((), dtype=torch.int64, device=rt.device)
        counts = [0, 0]  # input tokens, examples: host integers from batch_counts
        count_examples = False
        ref: Tensor | None = None
        weighted: dict[str, Tensor] = {}  # the loss_fn's metrics, each times its micro-batch's tokens
        for i, batch in enumerate(micro_batches):
            if self.batch_counts is not None:
                n_inputs, n_examples = self.batch_counts(batch)
                counts[0] += n_inputs
                if n_examples is not None:
                    counts[1] += n_examples
                    count_examples = True
            if self.fsdp:
                set_grad_sync(self.model, i == n_micro - 1)  # reduce-scatter on the last micro-batch only
            elif rt.distributed:
                # Sync gradients only on the last micro-batch. nanoGPT toggles this flag rather
                # than nesting `no_sync()` contexts: same effect, no context-manager plumbing.
                self.train_model.require_backward_grad_sync = i == n_micro - 1
            loss_sum, n_tokens, micro_metrics, ref = self.forward_backward_step(batch, ref, n_micro)
            loss_total += loss_sum.detach()
            tokens_total += n_tokens
            for k, v in micro_metrics.items():  # a stage's extra metrics: token-weighted, as the loss
                v = torch.as_tensor(v.detach() if isinstance(v, Tensor) else v, device=rt.device)
                weighted[k] = weighted.get(k, 0) + v.to(loss_total.dtype) * n_tokens
        names = sorted(weighted)  # the same loss_fn on every rank: the same names

        stop_flags = None
        if rt.distributed:
            # A stop request (SIGINT / SIGTERM on any rank) rides along, and so do the loss_fn's
            # metrics (every rank's tokens in the mean): every rank stops after the same step, at
            # no extra collective.
            flags = self.signals.flags(rt.device, loss_total.dtype)
            sums = torch.stack([loss_total, tokens_total.to(loss_total.dtype), *(weighted[k] for k in names)])
            packed = torch.cat([sums, torch.tensor(counts, dtype=sums.dtype, device=rt.device), flags])
            torch.distributed.all_reduce(packed)
            loss_total, tokens_float, stop_flags = packed[0], packed[1], packed[-2:]
            weighted = dict(zip(names, packed[2 : 2 + len(names)], strict=True))
            counts = [round(v) for v in packed[-4:-2].tolist()]
        else:
            tokens_float = tokens_total.to(loss_total.dtype)
        metrics = {k: weighted[k] / tokens_float.clamp_min(1) for k in names}
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        # Gradients hold grad(sum of losses) / (ref * world_size) (DDP averages over ranks):
        # rescale to grad(sum of losses) / N, N = target tokens of the window on all ranks.
        correction = ref * rt.world_size / tokens_float.clamp_min(1)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and self.fsdp:
            # FSDP's gradients are DTensors: scale each rank's shard (and on the shards' device,
            # the CPU with fsdp_cpu_offload)
            grads = [local(g) for g in grads]
            correction = correction.to(grads[0].device)
        if grads:
            torch._foreach_mul_(grads, correction)
        max_norm = self.optim_cfg.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, max_norm, foreach=True if grads and grads[0].is_cuda else None
        )
        if self.fsdp:
            grad_norm = full(grad_norm).to(tokens_float.device)  # the whole norm, on every rank
        loss = loss_total / tokens_float.clamp_min(1)
        # The one host sync per step: needed to decide whether to step at all.
        ok = bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
        overflow = False
        if ok:
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        elif self.scaler.is_enabled():
            overflow = bool(torch.isfinite(loss))  # finite loss, inf grads: the loss scale is too high
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.signals.agree_flags(stop_flags)
        tokens = round(tokens_float.item())
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "tokens": tokens,
            "input_tokens": counts[0] if self.batch_counts is not None else tokens,
            "examples": counts[1] if count_examples else None,
            "ok": ok,
            "overflow": overflow,
            **metrics,
        }

    def forward_backward_step(
        self, batch: Any, ref: Tensor | None, n_micro: int
    ) -> tuple[Tensor, Tensor, dict[str, Any], Tensor]:
        """Forward + backward of one micro-batch; returns (loss_sum, n_tokens, metrics, ref).

        `ref` is None on the first micro-batch of a window; it is then set to that micro-batch's
        token count (summed over ranks, divided by world size) times n_micro, and reused.
        """
        rt = self.runtime
        batch = to_device(batch, rt.device)
        with rt.autocast():
            loss_sum, n_tokens, metrics = self.loss_fn(self.train_model, batch)
        n_tokens = torch.as_tensor(n_tokens, device=rt.device).to(torch.int64)
        if ref is None:
            first = n_tokens.to(torch.float32)
            if rt.distributed:
                first = first.clone()
                torch.distributed.all_reduce(first)
                first = first / rt.world_size
            ref = first.clamp_min(1) * n_micro
        self.scaler.scale(loss_sum / ref).backward()
        return loss_sum, n_tokens, metrics, ref

    def _check_finite(self, out: dict[str, Any]) -> None:
        if out["ok"]:
            self.consecutive_bad = 0
            return
        if out["overflow"]:
            self.overflow_steps += 1
            return
        self.skipped_steps += 1
        self.consecutive_bad += 1
        warn_once("non-finite loss or gradient: skipping the update (counted as skipped_steps)")
        if self.consecutive_bad >= self.cfg.max_bad_steps:
            assert self.log is not None
            self.log.event(self.step, event="stopped", skipped_steps=self.skipped_steps)
            raise UserError(
                f"training stopped at step {self.step}: the loss or gradient was NaN/inf for "
                f"{self.consecutive_bad} steps in a row (train.max_bad_steps={self.cfg.max_bad_steps}); "
                "the weights are those of the last good step. Lower optim.lr, tighten optim.grad_clip "
                "or use run.dtype=bfloat16/float32, then resume from the last checkpoint"
            )

    # ---- validation and samples ----------------------------------------------------------

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Mean validation loss over all target tokens of the validation batches (all ranks), and
        perplexity; the eval loss_fn's metrics as token-weighted means, named val_<name>."""
        return self.validator.evaluate(self.model, final, forward=self.eval_model)

    def _validate(self, best: bool, final: bool = False) -> None:
        result = self.evaluate(final)
        if not result:
            return
        self.last_val_loss = result["val_loss"]
        assert self.log is not None
        self.log.log(self.step, **result, time_s=self._time_s())
        if best:
            self.checkpointer.update_best(self.step, self.model, result["val_loss"])

    def should_sample(self, step: int, last: bool) -> bool:
        n = self.cfg.sample_every
        return self.sample_fn is not None and n > 0 and (every(step, n) or last)

    def sample(self) -> None:
        """Append sample_fn's section to run_dir/samples.md (rank 0; `add_section`: rewritten
        atomically, without a killed attempt's sections past this step). A sharded model samples
        on every rank, the same tokens (sample_fn is seeded by the step), so the forwards match."""
        if not ((self.runtime.is_main or self.sharded) and self.sample_fn is not None):
            return
        try:
            with eval_mode(self.model):
                text = self.sample_fn(self.model, self.step)
        except UserError as e:  # e.g. a prompt longer than the context: the run goes on
            warn_once(f"sampling skipped: {e}")
            return
        if not text or not self.runtime.is_main:
            return

        add_section(self.run_dir / "samples.md", self.step, f"## step {self.step}\n\n{text}\n")

    # ---- checkpoints and resume ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain types (torch.load weights_only=True)."""
        rngs: list[Any] = [rng_state()]
        if self.runtime.distributed:
            rngs = [None] * self.runtime.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        return {
            "step": self.step,
            # under FSDP the optimizer is saved sharded, with the model (Checkpointer)
            "optimizer": None if self.fsdp else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs,
            "data": self.train_batches.state_dict(),
            "counters": {
                "tokens_seen": self.tokens_seen,
                "input_tokens_seen": self.input_tokens_seen,
                "examples_seen": self.examples_seen,
                "skipped_steps": self.skipped_steps,
                "overflow_steps": self.overflow_steps,
                "consecutive_bad": self.consecutive_bad,
                "best_val_loss": self.best_val_loss,
                "elapsed_s": self.elapsed_s,
                "world_size": self.runtime.world_size,
            },
        }

    def save_checkpoint(self) -> Path | None:
        """Save this step (collective under DDP: every rank takes part); rank 0 gets the directory."""
        if self._budget is not None:
            self.elapsed_s = self._budget.elapsed()
        return self.checkpointer.save(self.step, self.model, self.state_dict(), optimizer=self.optimizer)

    def maybe_resume(self) -> int:
        """Resume from the checkpoint `Checkpointer.resume_path` picks (the run dir's newest, else
        train.resume_from), if any. Returns the step training continues from. Idempotent."""
        if self._resume_checked:
            return self.step
        self._resume_checked = True
        path = self.checkpointer.resume_path()
        if path is not None:
            self.load_checkpoint(path)
        return self.step

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scaler, counters, RNG and data position from `path`."""
        path = Path(path)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = self.checkpointer.load(self.model, path, optimizer=self.optimizer)
        try:
            if state["optimizer"] is not None:  # None: loaded with the model's distributed shards
                self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"cannot resume from {path}: optimizer state does not match the model ({e})") from None
        for group, ours in zip(self.optimizer.param_groups, settings, strict=True):
            # the moments are the checkpoint's, the settings this run's config (weight_decay, betas,
            # eps, as config.yaml records them; loaded groups would keep the first run's silently)
            group.update(ours)
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.runtime.world_size:
            set_rng_state(rngs[self.runtime.rank])
        else:
            warn_once(
                f"checkpoint has RNG state for {len(rngs)} ranks, this run has {self.runtime.world_size}: not restored"
            )
        if state.get("data") is not None:
            self.train_batches.load_state_dict(state["data"])
        counters = state.get("counters", {})
        self.tokens_seen = int(counters.get("tokens_seen", 0))
        self.input_tokens_seen = int(counters.get("input_tokens_seen", 0))
        self.examples_seen = int(counters.get("examples_seen", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.overflow_steps = int(counters.get("overflow_steps", 0))
        self.consecutive_bad = int(counters.get("consecutive_bad", 0))
        self.checkpointer.best_val_loss = float(counters.get("best_val_loss", math.inf))
        self.elapsed_s = float(counters.get("elapsed_s", 0.0))
        self.step = int(state["step"])
        self.resumed_from = path
        self.runtime.print0(f"resumed from {path} at step {self.step}")

    # ---- reporting ---------------------------------------------------------------------------

    def summary(self, last_record: dict[str, Any]) -> dict[str, Any]:
        final_loss, final_val_loss = last_record.get("loss"), self.last_val_loss
        if final_loss is None or final_val_loss is None:
            # This attempt logged nothing (e.g. a rerun of a finished run): take the run's history.
            history = read_metrics(self.run_dir)
            if final_loss is None:
                final_loss = next((r["loss"] for r in reversed(history) if "loss" in r), None)
            if final_val_loss is None:
                final_val_loss = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
        summary: dict[str, Any] = {
            "params": sum(p.numel() for p in self.model.parameters()),
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "input_tokens_seen": self.input_tokens_seen,
            "examples_seen": self.examples_seen or None,
            "wall_time_s": round(self.elapsed_s, 3),
            "stopped_by": self.stopped_by or None,
            "final_loss": final_loss,
            "final_val_loss": final_val_loss,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "skipped_steps": self.skipped_steps,
            "overflow_steps": self.overflow_steps,
            "world_size": self.runtime.world_size,
        }
        if self.runtime.device.type == "cuda":
            # the whole run's: TrainLog restarts the allocator's peak at every training line
            log, device = self.log, self.runtime.device
            peak = log.run_peak_memory_bytes() if log is not None else torch.cuda.max_memory_allocated(device)
            summary["peak_memory_gb"] = round(peak / 2**30, 3)
        return summary


__all__ = ["BatchCounts", "Batches", "LossFn", "SampleFn", "Trainer", "TrainingConfig", "to_device"]

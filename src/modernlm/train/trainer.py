"""The one training loop, reused by every stage (pretrain, SFT, DPO, verifier, LoRA finetuning).

A stage supplies a model, batches and a `loss_fn`; the `Trainer` does the rest: gradient
accumulation, AMP, the LR schedule, clipping, the non-finite guard, DDP, validation, samples,
metrics, checkpoints and exact resume. Split like torchtitan's Trainer:
`train` (the loop: schedule, logging, eval, checkpoints) -> `train_step` (one optimizer step over
an accumulation window) -> `forward_backward_step` (one micro-batch).

The loss_fn contract: `loss_fn(model, batch) -> (loss_sum, n_tokens, metrics)`.
- `loss_sum`: the SUM of per-token losses of the micro-batch (a scalar tensor with grad).
- `n_tokens`: how many target tokens it covers (int or integer tensor; padding excluded).
- `metrics`: extra scalars to log (tensors are fine; they are read only at log steps).
How the loss is normalised over the whole accumulation window: each micro-batch backpropagates
loss_sum / ref, with ref a fixed per-step reference (tokens of the first micro-batch times the
accumulation steps, agreed across ranks). After the window, when the true token count N of the
window over all ranks is known, the gradients are multiplied by ref / N. Gradients are linear in
the loss, so the result is exactly the gradient of (sum of all token losses) / N, however padding
spreads the tokens over micro-batches and ranks; with equal counts the factor is exactly 1.
(Backpropagating raw sums would also be exact but can overflow fp16 activations.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modernlm.errors import UserError
from modernlm.runtime import Runtime, compile_model, rng_state, set_rng_state, warn_once
from modernlm.train.optim import OptimConfig, build_optimizer, lr_at, set_lr
from modernlm.train.tracking import MetricsWriter, format_line, read_metrics

LossFn = Callable[[nn.Module, Any], tuple[Tensor, "Tensor | int", dict[str, Any]]]


@dataclass
class TrainingConfig:
    num_steps: int = 1000  # optimizer steps (at most, with max_seconds)
    max_seconds: float = 0.0  # wall-time budget of the loop; 0 = none. The LR decays against
    # whichever of num_steps / max_seconds ends first, reaching its floor on the last step.
    batch_size: int = 8  # sequences per micro-batch, per rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step
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
    resume_from: str = ""  # a checkpoint dir (or a run dir) to resume from; overrides `resume`
    progress: bool = True  # tqdm progress bar on rank 0

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


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


class Trainer:
    """Owns the model's training: optimizer, scaler, counters, checkpoints, metrics.

    Args:
        model: the bare model (not compiled/DDP-wrapped; the trainer wraps it). It must be a
            modernlm model (with `.config`) for checkpoints; the loop itself needs only nn.Module.
        loss_fn: see the module docstring.
        train_batches: an endless iterator of CPU batches; if it has `state_dict`/`load_state_dict`
            its position is checkpointed and resume is exact.
        val_batches: a re-iterable of validation batches for this rank (or None).
        final_val_batches: those of the last validation run, when they differ (e.g. the whole split
            at the end, a sample of it along the way); default: val_batches.
        eval_loss_fn: loss_fn used for validation (default: loss_fn).
        flops_per_token: training FLOPs per token, for MFU (0 = no MFU).
        save_model_fn: `(model, dir, tokenizer)` writes a checkpoint's model files (default:
            checkpoint.save_model, for modernlm models); e.g. an adapter saver for HF LoRA.
        load_model_fn: `(model, dir)` loads them back on resume (default: load_weights_into).
        eval_perplexity: log val_ppl = exp(val_loss); off when the loss is not a token NLL (DPO).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_batches: Iterator[Any],
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
        save_model_fn: Callable[[nn.Module, Path, Any], None] | None = None,
        load_model_fn: Callable[[nn.Module, Path], None] | None = None,
        eval_perplexity: bool = True,
    ):
        self.cfg, self.optim_cfg, self.runtime = cfg, optim_cfg, runtime
        self.run_dir = Path(run_dir)
        self.model = model.to(runtime.device)
        self.loss_fn, self.eval_loss_fn = loss_fn, eval_loss_fn or loss_fn
        self.train_batches, self.val_batches = train_batches, val_batches
        self.final_val_batches = final_val_batches if final_val_batches is not None else val_batches
        self.tokenizer, self.flops_per_token = tokenizer, flops_per_token
        self.save_model_fn, self.load_model_fn = save_model_fn, load_model_fn
        self.eval_perplexity = eval_perplexity

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, optim_cfg)
        # fp16 needs loss scaling (its range is small); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)

        # What the loss_fn calls: compiled, then DDP-wrapped (nanoGPT's order). Saving, eval and
        # sampling use the bare model.
        self.eval_model = compile_model(self.model) if runtime.compile else self.model
        self.train_model = self.eval_model
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.train_model = DDP(
                self.eval_model,
                device_ids=device_ids,
                find_unused_parameters=find_unused_parameters,
            )

        self.step = 0  # optimizer steps done (skipped ones included)
        self.tokens_seen = 0  # target tokens trained on, all ranks
        self.skipped_steps = 0  # non-finite loss or gradient: optimizer not stepped
        self.overflow_steps = 0  # fp16 loss-scale overflows (GradScaler lowers its scale)
        self.consecutive_bad = 0
        self.best_val_loss = math.inf
        self.last_val_loss: float | None = None
        self.elapsed_s = 0.0  # wall time over all attempts of this run
        self.resumed_from: Path | None = None
        self._resume_checked = False
        self.clock = time.perf_counter  # wall clock for the time budget (tests swap in a fake one)
        self.stopped_by = ""  # "steps" or "time", once train() returns; "SIGINT" / "SIGTERM" if interrupted
        self._signal = 0  # the first SIGINT / SIGTERM this rank received while train() runs
        self._stop_signal = 0  # the stop request agreed by every rank (train_step); 0 = go on

    # ---- the loop -------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run until cfg.num_steps; returns the summary also written to summary.json.

        SIGINT / SIGTERM while it runs: the current step finishes (every rank stops after the same
        one), its checkpoint is saved and `Interrupted` is raised; a second Ctrl-C exits at once."""
        from tqdm import tqdm

        cfg, rt = self.cfg, self.runtime
        self.maybe_resume()
        # Drop lines a killed attempt logged after the checkpoint we resume from (all of them on a
        # fresh start), so metrics.jsonl always reads as one uninterrupted run.
        truncate = self.step if self.resumed_from is not None else -1
        writer = MetricsWriter(self.run_dir, enabled=rt.is_main, tensorboard=rt.tensorboard, truncate_after=truncate)
        bar = tqdm(
            total=cfg.num_steps,
            initial=self.step,
            disable=not (rt.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        start_wall = self._start_wall = self.clock()
        elapsed_before = self._elapsed_before = self.elapsed_s
        last_record: dict[str, Any] = {}
        step_time: float | None = None  # running mean of a step's wall time, for the time budget
        # (step, directory) of the newest checkpoint of this run; the directory is None off rank 0
        saved: tuple[int, Path | None] = (self.step, self.resumed_from) if self.resumed_from else (-1, None)
        previous_handlers = self._catch_signals()
        try:
            if self.step == 0 and self.val_batches is not None and cfg.eval_at_start:
                self._log_eval(writer, bar, best=False)  # the untrained baseline
            interval_tokens, interval_time = 0, 0.0
            while self.step < cfg.num_steps:
                lr_step: float = self.step
                if cfg.max_seconds:
                    # Where this step will end, as a share of the budget (agreed across ranks).
                    step_end = self._agree(elapsed_before + self.clock() - start_wall + (step_time or 0.0))
                    if step_end >= cfg.max_seconds + (step_time or 0.0) / 2:
                        break  # spent (a resumed run), or the next step would mostly run past it
                    if self.step >= self.optim_cfg.warmup_steps:  # warmup is counted in steps
                        lr_step = max(self.step, cfg.num_steps * min(step_end / cfg.max_seconds, 1.0))
                t0 = self.clock()
                lr = lr_at(lr_step, self.optim_cfg, cfg.num_steps)
                set_lr(self.optimizer, lr)
                micro_batches = [next(self.train_batches) for _ in range(cfg.grad_accum_steps)]
                out = self.train_step(micro_batches)
                self.step += 1
                step_tokens = int(out["tokens"])
                self.tokens_seen += step_tokens
                interval_tokens += step_tokens
                dt = self.clock() - t0
                interval_time += dt
                step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
                self._check_finite(out, writer)
                bar.update(1)
                last = self.step == cfg.num_steps or self._out_of_time(elapsed_before, start_wall, step_time)

                if self.step == 1 or _every(self.step, cfg.log_every) or last:
                    tok_per_s = interval_tokens / max(interval_time, 1e-9)
                    record: dict[str, Any] = {
                        "loss": out["loss"],
                        "lr": lr,
                        "grad_norm": out["grad_norm"],
                        "tok_per_s": tok_per_s,
                        "tokens": self.tokens_seen,
                        "skipped_steps": self.skipped_steps,
                        "time_s": self._elapsed(),
                    }
                    if self.flops_per_token and rt.peak_flops:
                        record["mfu"] = self.flops_per_token * tok_per_s / (rt.peak_flops * rt.world_size)
                    record.update(
                        {k: v for k, v in out.items() if k not in ("loss", "grad_norm", "tokens", "ok", "overflow")}
                    )
                    last_record = writer.log(self.step, **record)
                    self._write(bar, format_line(self.step, cfg.num_steps, last_record))
                    postfix = {
                        "loss": f"{last_record['loss']:.3f}"
                        if isinstance(last_record["loss"], float)
                        else last_record["loss"],
                        "lr": f"{lr:.2e}",
                        "tok/s": f"{tok_per_s:.0f}",
                    }
                    if "mfu" in record:
                        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                    bar.set_postfix(postfix, refresh=False)
                    interval_tokens, interval_time = 0, 0.0

                if self.val_batches is not None and (_every(self.step, cfg.eval_every) or last):
                    self._log_eval(writer, bar, best=True, final=last)
                if cfg.sample_every and (_every(self.step, cfg.sample_every) or last):
                    self.sample()
                if _every(self.step, cfg.save_every) or last:
                    self.elapsed_s = elapsed_before + self.clock() - start_wall
                    saved = (self.step, self.save_checkpoint())
                if self._stop_signal or (self._signal and not rt.distributed):  # agreed in train_step
                    self._interrupt(self._signal or self._stop_signal, saved)
                if last:
                    break
            self.stopped_by = "steps" if self.step >= cfg.num_steps else "time"
            # A signal after the last step's decision (during its eval or save) still stops the
            # command that called train(), e.g. a pipeline before its next stage.
            if self._agree_signal():
                self._interrupt(self._signal or self._stop_signal, saved)
        finally:
            try:
                bar.close()
                self.elapsed_s = elapsed_before + self.clock() - start_wall
                summary = self.summary(last_record)
                writer.summary(**summary)
                writer.close()
            finally:
                self._restore_signals(previous_handlers)
        return summary

    # ---- SIGINT / SIGTERM: stop after the current step with a checkpoint --------------------

    def _catch_signals(self) -> dict[int, Any]:
        """Point SIGINT and SIGTERM at `_on_signal`; returns the handlers to restore. Only the main
        thread can set handlers (elsewhere nothing changes), and an ignored signal (nohup, a
        background job) stays ignored."""
        import signal
        import threading

        self._signal = self._stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old in (signal.SIG_IGN, None):  # ignored, or set outside Python: leave it alone
                continue
            previous[sig] = old
            signal.signal(sig, self._on_signal)
        return previous

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        import signal

        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first SIGINT / SIGTERM only records itself: the loop stops after the current step.
        From then on SIGINT has its default action, so a second Ctrl-C ends the process at once
        (even inside a long forward or a collective), without a checkpoint."""
        import os
        import signal

        if signal.getsignal(signal.SIGINT) == self._on_signal:  # (a bound method: ==, not is)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._signal:
            return
        self._signal = signum
        if self.runtime.is_main:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            # os.write, not print: a handler may run in the middle of another write to stderr
            os.write(2, f"\n{name}: stopping after this step to save a checkpoint; Ctrl-C again to exit now\n".encode())

    def _agree_signal(self) -> int:
        """The stop request of any rank, on every rank (one collective under DDP); 0 = none."""
        if self.runtime.distributed:
            flags = self._signal_flags(self.runtime.device, torch.float32)
            torch.distributed.all_reduce(flags)
            self._stop_signal = self._flags_signal(flags)
        else:
            self._stop_signal = self._signal
        return self._stop_signal

    def _signal_flags(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        import signal

        return torch.tensor([self._signal == signal.SIGINT, self._signal == signal.SIGTERM], dtype=dtype, device=device)

    @staticmethod
    def _flags_signal(flags: Tensor) -> int:
        """The signal of summed flags: SIGINT if any rank got one, else SIGTERM if any did, else 0."""
        import signal

        n_int, n_term = flags.tolist()
        return int(signal.SIGINT) if n_int > 0 else int(signal.SIGTERM) if n_term > 0 else 0

    def _interrupt(self, signum: int, saved: tuple[int, Path | None]) -> None:
        """Save the step just done (unless it is saved already) and raise `Interrupted`."""
        import signal

        from modernlm.checkpoint import CHECKPOINTS_DIR
        from modernlm.errors import Interrupted

        step, path = saved
        if step != self.step:  # the same decision on every rank
            self.elapsed_s = self._elapsed_before + self.clock() - self._start_wall
            path = self.save_checkpoint()  # collective under DDP; rank 0 writes
        if path is None:  # not rank 0: the directory rank 0 wrote
            path = self.run_dir / CHECKPOINTS_DIR / f"step_{self.step:07d}"
        self.stopped_by = signal.Signals(signum).name
        raise Interrupted(signum, self.step, str(path))

    def _elapsed(self) -> float:
        """Wall time of the run so far (all attempts), for the time_s column of metrics.jsonl."""
        return round(self._elapsed_before + self.clock() - self._start_wall, 3)

    def _out_of_time(self, elapsed_before: float, start_wall: float, step_time: float | None) -> bool:
        """Whether the time budget is spent: the next step would end more than half a step past it.
        (`train` checks the same before each step; asking here too lets the last step evaluate and
        save before the loop ends.)"""
        if not self.cfg.max_seconds or step_time is None:
            return False
        step_end = self._agree(elapsed_before + self.clock() - start_wall + step_time)
        return step_end >= self.cfg.max_seconds + step_time / 2

    def _agree(self, value: float) -> float:
        """Rank 0's clock-derived value on every rank: they must stop, and set the LR, together."""
        if not self.runtime.distributed:
            return value
        import torch.distributed as dist

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
        ref: Tensor | None = None
        metrics: dict[str, Any] = {}
        for i, batch in enumerate(micro_batches):
            if rt.distributed:
                # Sync gradients only on the last micro-batch. nanoGPT toggles this flag rather
                # than nesting `no_sync()` contexts: same effect, no context-manager plumbing.
                self.train_model.require_backward_grad_sync = i == n_micro - 1
            loss_sum, n_tokens, micro_metrics, ref = self.forward_backward_step(batch, ref, n_micro)
            loss_total += loss_sum.detach()
            tokens_total += n_tokens
            for k, v in micro_metrics.items():  # a stage's extra metrics: mean over the micro-batches
                v = v.detach() if isinstance(v, Tensor) else v
                metrics[k] = metrics.get(k, 0) + v / n_micro

        stop_flags = None
        if rt.distributed:
            # A stop request (SIGINT / SIGTERM on any rank) rides along: every rank stops after
            # the same step, at no extra collective.
            flags = self._signal_flags(rt.device, loss_total.dtype)
            packed = torch.cat([torch.stack([loss_total, tokens_total.to(loss_total.dtype)]), flags])
            torch.distributed.all_reduce(packed)
            loss_total, tokens_float, stop_flags = packed[0], packed[1], packed[2:]
        else:
            tokens_float = tokens_total.to(loss_total.dtype)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        # Gradients hold grad(sum of losses) / (ref * world_size) (DDP averages over ranks):
        # rescale to grad(sum of losses) / N, N = target tokens of the window on all ranks.
        correction = ref * rt.world_size / tokens_float.clamp_min(1)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, correction)
        max_norm = self.optim_cfg.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, max_norm, foreach=True if grads and grads[0].is_cuda else None
        )
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
        self._stop_signal = self._flags_signal(stop_flags) if stop_flags is not None else self._signal
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "tokens": round(tokens_float.item()),
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

    def _check_finite(self, out: dict[str, Any], writer: MetricsWriter) -> None:
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
            writer.log(self.step, event="stopped", skipped_steps=self.skipped_steps)
            raise UserError(
                f"training stopped at step {self.step}: the loss or gradient was NaN/inf for "
                f"{self.consecutive_bad} steps in a row (train.max_bad_steps={self.cfg.max_bad_steps}); "
                "the weights are those of the last good step. Lower optim.lr, tighten optim.grad_clip "
                "or use run.dtype=bfloat16/float32, then resume from the last checkpoint"
            )

    # ---- validation and samples ----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Mean validation loss over all target tokens of val_batches (all ranks), and perplexity;
        the eval loss_fn's metrics as token-weighted means, named val_<name>."""
        batches = self.final_val_batches if final else self.val_batches
        if batches is None:
            return {}
        rt = self.runtime
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
        extra: dict[str, Tensor] = {}  # the loss_fn's metrics, weighted by n_tokens
        for batch in batches:
            with rt.autocast():
                loss_sum, n_tokens, metrics = self.eval_loss_fn(self.eval_model, to_device(batch, rt.device))
            n = torch.as_tensor(n_tokens, device=rt.device).double()
            totals[0] += loss_sum.detach().double()
            totals[1] += n
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0) + torch.as_tensor(v, device=rt.device).detach().double() * n
        names = sorted(extra)
        packed = torch.cat([totals, torch.stack([extra[k] for k in names])]) if names else totals
        if rt.distributed:
            torch.distributed.all_reduce(packed)
        self.model.train(was_training)
        if packed[1].item() == 0:
            return {}
        val_loss = (packed[0] / packed[1]).item()
        result = {"val_loss": val_loss}
        if self.eval_perplexity:
            result["val_ppl"] = math.exp(min(val_loss, 50.0))
        result.update({f"val_{k}": (packed[2 + i] / packed[1]).item() for i, k in enumerate(names)})
        return result

    def _log_eval(self, writer: MetricsWriter, bar: Any, best: bool, final: bool = False) -> None:
        result = self.evaluate(final)
        if not result:
            return
        self.last_val_loss = result["val_loss"]
        record = writer.log(self.step, **result, time_s=self._elapsed())
        self._write(bar, format_line(self.step, self.cfg.num_steps, record))
        if best and result["val_loss"] < self.best_val_loss:
            self.best_val_loss = result["val_loss"]
            if self.cfg.save_best and self.runtime.is_main:
                from modernlm.checkpoint import save_best_checkpoint

                info = {"step": self.step, "val_loss": self.best_val_loss}
                save_best_checkpoint(self.run_dir, self.model, info, self.tokenizer, save_fn=self.save_model_fn)

    def sample(self) -> None:
        """Append continuations of cfg.sample_prompts to run_dir/samples.md (rank 0; the file is
        rewritten atomically, old sections + the new one, so a kill never leaves half a section)."""
        if not (self.runtime.is_main and self.tokenizer is not None and self.cfg.sample_prompts):
            return
        from modernlm.generation import generate_text

        was_training = self.model.training
        self.model.eval()
        try:
            # A fixed seed with generation's own generator: sampling never disturbs the training RNG.
            texts = generate_text(
                self.model,
                self.tokenizer,
                list(self.cfg.sample_prompts),
                self.cfg.sample_tokens,
                temperature=0.8,
                top_k=50,
                seed=self.step,
            )
        except Exception as e:  # a sampling bug must not kill a long training run
            warn_once(f"sampling failed, skipping samples: {e}")
            return
        finally:
            self.model.train(was_training)
        lines = [f"## step {self.step}\n"]
        for prompt, text in zip(self.cfg.sample_prompts, texts, strict=True):
            lines.append(f"**{prompt}**{text}\n")
        from modernlm.files import atomic_write

        path = self.run_dir / "samples.md"
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        atomic_write(path, old + "\n".join(lines) + "\n")

    # ---- checkpoints and resume ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain types (torch.load weights_only=True)."""
        rngs: list[Any] = [rng_state()]
        if self.runtime.distributed:
            rngs = [None] * self.runtime.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        data = self.train_batches.state_dict() if hasattr(self.train_batches, "state_dict") else None
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs,
            "data": data,
            "counters": {
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps,
                "overflow_steps": self.overflow_steps,
                "consecutive_bad": self.consecutive_bad,
                "best_val_loss": self.best_val_loss,
                "elapsed_s": self.elapsed_s,
                "world_size": self.runtime.world_size,
            },
        }

    def save_checkpoint(self) -> Path | None:
        from modernlm.checkpoint import save_training_checkpoint

        state = self.state_dict()  # collective under DDP: every rank takes part
        path = None
        if self.runtime.is_main:
            path = save_training_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                state,
                self.tokenizer,
                self.cfg.keep_last,
                save_fn=self.save_model_fn,
            )
        if self.runtime.distributed:
            torch.distributed.barrier()
        return path

    def maybe_resume(self) -> int:
        """Resume from train.resume_from, or (train.resume=auto) from the run dir's latest
        checkpoint, if any. Returns the step training continues from. Idempotent."""
        from modernlm.checkpoint import CHECKPOINTS_DIR, latest_checkpoint

        if self._resume_checked:
            return self.step
        self._resume_checked = True
        if self.runtime.is_main:  # what a killed save left behind (its temporaries; best/ set aside)
            from modernlm.files import clean_leftovers

            clean_leftovers(self.run_dir / CHECKPOINTS_DIR)
            clean_leftovers(self.run_dir)
        path: Path | None = None
        if self.cfg.resume_from:
            path = Path(self.cfg.resume_from)
            if (path / CHECKPOINTS_DIR).is_dir():
                path = latest_checkpoint(path)
                if path is None:
                    raise UserError(f"train.resume_from: no checkpoint in run directory {self.cfg.resume_from}")
            elif not path.is_dir():
                raise UserError(f"train.resume_from: checkpoint directory not found: {path}")
        elif self.cfg.resume == "auto":
            path = latest_checkpoint(self.run_dir)
        if path is not None:
            self.load_checkpoint(path)
        return self.step

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scaler, counters, RNG and data position from `path`."""
        from modernlm.checkpoint import (
            config_differences,
            load_model_config,
            load_training_state,
            load_weights_into,
        )

        path = Path(path)
        if self.load_model_fn is not None:
            self.load_model_fn(self.model, path)
        elif hasattr(self.model, "config"):
            diffs = config_differences(load_model_config(path), self.model.config)
            if diffs:
                raise UserError(
                    f"cannot resume from {path}: its model config differs from this run's "
                    f"({'; '.join(diffs)}); use the same model settings, or start a new run "
                    "(another run.name, or train.resume=never)"
                )
            load_weights_into(self.model, path)
        state = load_training_state(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"cannot resume from {path}: optimizer state does not match the model ({e})") from None
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.runtime.world_size:
            set_rng_state(rngs[self.runtime.rank])
        else:
            warn_once(
                f"checkpoint has RNG state for {len(rngs)} ranks, this run has {self.runtime.world_size}: not restored"
            )
        if state.get("data") is not None and hasattr(self.train_batches, "load_state_dict"):
            self.train_batches.load_state_dict(state["data"])
        counters = state.get("counters", {})
        self.tokens_seen = int(counters.get("tokens_seen", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.overflow_steps = int(counters.get("overflow_steps", 0))
        self.consecutive_bad = int(counters.get("consecutive_bad", 0))
        self.best_val_loss = float(counters.get("best_val_loss", math.inf))
        self.elapsed_s = float(counters.get("elapsed_s", 0.0))
        self.step = int(state["step"])
        self.resumed_from = path
        self._write(None, f"resumed from {path} at step {self.step}")

    # ---- reporting ---------------------------------------------------------------------------

    def summary(self, last_record: dict[str, Any]) -> dict[str, Any]:
        n_params = (
            self.model.num_params()
            if hasattr(self.model, "num_params")
            else sum(p.numel() for p in self.model.parameters())
        )
        final_loss, final_val_loss = last_record.get("loss"), self.last_val_loss
        if final_loss is None or final_val_loss is None:
            # This attempt logged nothing (e.g. a rerun of a finished run): take the run's history.
            history = read_metrics(self.run_dir)
            if final_loss is None:
                final_loss = next((r["loss"] for r in reversed(history) if "loss" in r), None)
            if final_val_loss is None:
                final_val_loss = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
        summary: dict[str, Any] = {
            "params": n_params,
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
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
            summary["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.runtime.device) / 2**30, 3)
        return summary

    def _write(self, bar: Any, line: str) -> None:
        if not self.runtime.is_main:
            return
        if bar is not None and not bar.disable:
            bar.write(line)
        else:
            print(line, flush=True)


__all__ = ["LossFn", "Trainer", "TrainingConfig", "to_device"]

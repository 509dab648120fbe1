"""The trainer's components: each owns one job of the loop and decides when it runs.

As torchtitan's `Trainer.train` asks `should_log` / `should_eval` / `checkpointer.save(step,
last_step=...)`, `Trainer.train` asks its components, and each answers from its own settings:

- `TrainLog.should_log(step, last)`: metrics.jsonl, the log line, the progress bar, throughput;
- `Validator.should_eval(step, last)`: the validation loss, token-weighted over all ranks;
- `Checkpointer.should_save(step, last)` (checkpointer.py): step checkpoints, keep_last, best/, where to resume from;
- `TimeBudget`: train.max_seconds, agreed across ranks;
- `StopSignals`: SIGINT / SIGTERM -> stop after the current step, with a checkpoint.

None of them knows the model: the checkpointer writes and reads model files only through the
`save_model_fn` / `load_model_fn` it is given.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from modernlm.runtime import Runtime, eval_mode
from modernlm.train.memory import peak_memory_bytes, reset_peak_memory
from modernlm.train.tracking import MetricsWriter, format_line

SaveModelFn = Callable[[nn.Module, Path, Any], None]  # (model, directory, tokenizer): write the model files
LoadModelFn = Callable[[nn.Module, Path], None]  # (model, directory): load them back into the model


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def every(step: int, n: int) -> bool:
    """Whether `step` is a multiple of n (n = 0: never)."""
    return n > 0 and step % n == 0


# ---- metrics, the log line, the progress bar --------------------------------------------------


class TrainLog:
    """What a run tells: metrics.jsonl (+ TensorBoard), the human log line and the progress bar.
    Rank 0 writes; the other ranks' logs do nothing.

    `should_log`: step 1, every `log_every` steps and the last step. Throughput covers the steps
    since the previous training line: `tok_per_s` = input tokens (every token fed to the model,
    padding excluded, all ranks) per second; `examples_per_s` where the stage counts examples
    (the trainer's batch_counts);
    `mfu` = flops_per_token * tok_per_s / (the peak FLOP/s of all devices), when both are known.
    `peak_mem_mib`: this rank's peak memory in MiB (train/memory.py): on CUDA the tensors allocated
    since the previous training line, elsewhere the process's peak resident set size so far.
    """

    def __init__(
        self,
        run_dir: Path,
        runtime: Runtime,
        *,
        num_steps: int,
        log_every: int,
        progress: bool = True,
        initial_step: int = 0,
        truncate_after: int | None = None,
        flops_per_token: float = 0.0,
    ):
        self.runtime, self.num_steps, self.log_every = runtime, num_steps, log_every
        self.flops_per_token = flops_per_token
        self.writer = MetricsWriter(
            run_dir, enabled=runtime.is_main, tensorboard=runtime.tensorboard, truncate_after=truncate_after
        )
        self.bar = tqdm(
            total=num_steps, initial=initial_step, disable=not (runtime.is_main and progress), dynamic_ncols=True
        )
        self.last_record: dict[str, Any] = {}  # the newest training line
        self._tokens, self._examples, self._seconds = 0, 0, 0.0  # since the previous training line
        self._count_examples = False
        self.peak_mem_bytes = 0  # the highest peak_mem_mib so far, in bytes
        reset_peak_memory(runtime.device)  # the first line's peak: training's, not the model loading's

    def should_log(self, step: int, last: bool) -> bool:
        return step == 1 or every(step, self.log_every) or last

    def step_done(self, input_tokens: int, examples: int | None, seconds: float) -> None:
        """Count one optimizer step into the current interval."""
        self._tokens += input_tokens
        self._seconds += seconds
        if examples is not None:
            self._examples += examples
            self._count_examples = True
        self.bar.update(1)

    def throughput(self) -> dict[str, float]:
        """tok_per_s, examples_per_s (where examples are counted) and mfu (where known) of the interval."""
        seconds = max(self._seconds, 1e-9)
        out = {"tok_per_s": self._tokens / seconds}
        if self._count_examples:
            out["examples_per_s"] = self._examples / seconds
        rt = self.runtime
        if self.flops_per_token and rt.peak_flops:
            out["mfu"] = self.flops_per_token * out["tok_per_s"] / (rt.peak_flops * rt.world_size)
        return out

    def peak_memory(self) -> dict[str, float]:
        """peak_mem_mib of the interval ({} where unknown); starts the next one. Host counters only:
        no device sync."""
        peak = peak_memory_bytes(self.runtime.device)
        reset_peak_memory(self.runtime.device)
        self.peak_mem_bytes = max(self.peak_mem_bytes, peak)
        return {"peak_mem_mib": round(peak / 2**20, 1)} if peak else {}

    def run_peak_memory_bytes(self) -> int:
        """The peak of the whole run so far: the logged intervals' and the current one's."""
        return max(self.peak_mem_bytes, peak_memory_bytes(self.runtime.device))

    def log_step(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """A training line: `values`, the interval's throughput and peak memory; starts the next interval."""
        speed = self.throughput()
        record = self.log(step, **values, **speed, **self.peak_memory())
        self.last_record = record
        loss = record["loss"]
        postfix = {"loss": f"{loss:.3f}" if isinstance(loss, float) else loss, "lr": f"{record['lr']:.2e}"}
        postfix["tok/s"] = f"{speed['tok_per_s']:.0f}"
        if "examples_per_s" in speed:
            postfix["ex/s"] = f"{speed['examples_per_s']:.1f}"
        if "mfu" in speed:
            postfix["mfu"] = f"{100 * speed['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        self._tokens, self._examples, self._seconds = 0, 0, 0.0
        return record

    def log(self, step: int, **values: Any) -> dict[str, Any]:
        """A line of metrics.jsonl, also printed as the human log line."""
        record = self.writer.log(step, **values)
        self.write(format_line(step, self.num_steps, record))
        return record

    def event(self, step: int, **values: Any) -> None:
        """A line of metrics.jsonl only (e.g. why the run stopped)."""
        self.writer.log(step, **values)

    def write(self, line: str) -> None:
        if not self.runtime.is_main:
            return
        if not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self, summary: dict[str, Any]) -> None:
        """Close the bar, write summary.json, close metrics.jsonl."""
        self.bar.close()
        self.writer.summary(**summary)
        self.writer.close()


# ---- validation ------------------------------------------------------------------------------


class Validator:
    """Validation runs: when, on what, and the loss they report.

    `should_eval`: every `every` steps and at the last step (every = 0: only the last);
    `should_eval_first`: the untrained model at step 0 too (`at_start`), a baseline for the curves.
    `evaluate`: the mean loss over every target token of the batches on all ranks (val_loss),
    exp of it (val_ppl, when the loss is a token NLL: `perplexity`), and the loss_fn's metrics as
    token-weighted means named val_<name>. The last run scores `final_batches` (default: batches),
    e.g. the whole split at the end and a sample of it along the way. `batches` is None on every
    rank (no validation) or on none: a rank without its share gets [].
    """

    def __init__(
        self,
        loss_fn: Callable[[nn.Module, Any], tuple[Tensor, Any, dict[str, Any]]],
        batches: Iterable[Any] | None,
        runtime: Runtime,
        *,
        final_batches: Iterable[Any] | None = None,
        every: int = 0,
        at_start: bool = True,
        perplexity: bool = True,
        sharded: bool = False,
    ):
        self.loss_fn, self.batches, self.runtime = loss_fn, batches, runtime
        self.sharded = sharded  # FSDP on several ranks: each forward is a collective
        self.final_batches = final_batches if final_batches is not None else batches
        self.every, self.at_start, self.perplexity = every, at_start, perplexity

    def should_eval(self, step: int, last: bool) -> bool:
        return self.batches is not None and (every(step, self.every) or last)

    def should_eval_first(self, step: int) -> bool:
        return self.batches is not None and self.at_start and step == 0

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False, forward: nn.Module | None = None) -> dict[str, float]:
        """Validation metrics of `model` (in eval mode meanwhile); the loss_fn calls `forward`
        (default: model), e.g. its compiled version. {} when there is nothing to score.

        Under DDP a rank may have fewer batches than another, or none (its metrics are zeros in
        the sums). With `sharded` (FSDP on several ranks) every forward all-gathers the weights
        with the other ranks, so a rank with fewer batches runs as many more forwards, whose
        results are discarded: then the batches must have a len()."""
        batches = self.final_batches if final else self.batches
        if batches is None:
            return {}
        rt = self.runtime
        totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
        extra: dict[str, Tensor] = {}  # the loss_fn's metrics, weighted by n_tokens
        if forward is None:  # not `forward or model`: bool() of a torch.compile'd module calls len(), a TypeError
            forward = model
        padding, last = self._padding(batches) if self.sharded else (0, None)
        with eval_mode(model):
            for batch in batches:
                with rt.autocast():
                    loss_sum, n_tokens, metrics = self.loss_fn(forward, to_device(batch, rt.device))
                n = torch.as_tensor(n_tokens, device=rt.device).double()
                totals[0] += loss_sum.detach().double()
                totals[1] += n
                for k, v in metrics.items():
                    extra[k] = extra.get(k, 0) + torch.as_tensor(v, device=rt.device).detach().double() * n
                last = batch
            for _ in range(padding):  # in step with the ranks' remaining forwards; results discarded
                with rt.autocast():
                    self.loss_fn(forward, to_device(last, rt.device))
        # every rank packs the same names, in the same order (one with no batches has none)
        names = agree_names(sorted(extra), rt)
        zero = torch.zeros((), dtype=torch.float64, device=rt.device)
        packed = torch.cat([totals, torch.stack([extra.get(k, zero) for k in names])]) if names else totals
        if rt.distributed:
            torch.distributed.all_reduce(packed)
        if packed[1].item() == 0:
            return {}
        val_loss = (packed[0] / packed[1]).item()
        result = {"val_loss": val_loss}
        if self.perplexity:
            result["val_ppl"] = math.exp(min(val_loss, 50.0))
        result.update({f"val_{k}": (packed[2 + i] / packed[1]).item() for i, k in enumerate(names)})
        return result

    def _padding(self, batches: Any) -> tuple[int, Any]:
        """(forwards this rank runs past its batches, the batch to run them on when it has none):
        as many as the rank with the most batches has more; a rank with none gets the first batch
        of the lowest rank that has one."""
        rt = self.runtime
        counts: list[Any] = [None] * rt.world_size
        torch.distributed.all_gather_object(counts, len(batches))
        spare = None
        if 0 in counts and max(counts) > 0:
            src = next(r for r, c in enumerate(counts) if c)
            box = [next(iter(batches)) if rt.rank == src else None]
            torch.distributed.broadcast_object_list(box, src=src)
            spare = box[0]
        return max(counts) - counts[rt.rank], spare


def agree_names(names: list[str], runtime: Runtime) -> list[str]:
    """The sorted union of every rank's metric names (this rank's alone in one process)."""
    if not runtime.distributed:
        return names
    every_rank: list[Any] = [None] * runtime.world_size
    torch.distributed.all_gather_object(every_rank, names)
    return sorted(set().union(*every_rank))


class TimeBudget:
    """train.max_seconds over all attempts of a run (0 = none); rank 0's clock decides for every
    rank (`agree`), since they must stop, and set the LR, together.

    The next step is taken unless it would end more than half a step past the budget; `step_time`
    is a running mean of a step's wall time."""

    def __init__(
        self, max_seconds: float, clock: Callable[[], float], elapsed_before: float, agree: Callable[[float], float]
    ):
        self.max_seconds, self.clock, self.before, self.agree = max_seconds, clock, elapsed_before, agree
        self.start = clock()
        self.step_time: float | None = None

    def elapsed(self) -> float:
        """Wall time of the run so far, all attempts."""
        return self.before + self.clock() - self.start

    def next_step_end(self) -> float:
        """When the next step would end, in seconds of the run (agreed across ranks)."""
        return self.agree(self.elapsed() + (self.step_time or 0.0))

    def spent(self, step_end: float) -> bool:
        """Whether a step ending at `step_end` would run mostly past the budget."""
        return step_end >= self.max_seconds + (self.step_time or 0.0) / 2

    def step_done(self, seconds: float) -> None:
        self.step_time = seconds if self.step_time is None else 0.9 * self.step_time + 0.1 * seconds

    def out_of_time(self) -> bool:
        """After a step: whether the budget allows no other, so this one evaluates and saves as the last."""
        return bool(self.max_seconds) and self.step_time is not None and self.spent(self.next_step_end())


# ---- SIGINT / SIGTERM ------------------------------------------------------------------------


class StopSignals:
    """SIGINT / SIGTERM while training: a request to stop after the current step, with a checkpoint.

    `with signals:` points SIGINT and SIGTERM at `_on_signal` and restores the previous handlers on
    exit. Only the main thread can set handlers (elsewhere nothing changes), and an ignored signal
    (nohup, a background job) stays ignored. The first signal is only recorded (`received`); from
    then on SIGINT has its default action, so a second Ctrl-C ends the process at once. Under DDP
    every rank must stop after the same step: the flags of every rank ride on the step's loss
    all-reduce (`flags` -> `agree_flags`), or take one collective of their own (`agree`).
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.received = 0  # the first SIGINT / SIGTERM this rank received
        self.agreed = 0  # the stop request agreed by every rank; 0 = go on
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = self.agreed = 0
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old in (signal.SIG_IGN, None):  # ignored, or set outside Python: leave it alone
                continue
            self._previous[sig] = old
            signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGINT) == self._on_signal:  # (a bound method: ==, not is)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.received:
            return
        self.received = signum
        if self.runtime.is_main:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            # os.write, not print: a handler may run in the middle of another write to stderr
            os.write(2, f"\n{name}: stopping after this step to save a checkpoint; Ctrl-C again to exit now\n".encode())

    def flags(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """This rank's request as [SIGINT?, SIGTERM?], to sum over ranks."""
        got = self.received
        return torch.tensor([got == signal.SIGINT, got == signal.SIGTERM], dtype=dtype, device=device)

    def agree_flags(self, flags: Tensor | None) -> None:
        """Take the flags summed over ranks (None = one process: this rank's own request)."""
        if flags is None:
            self.agreed = self.received
            return
        n_int, n_term = flags.tolist()
        self.agreed = int(signal.SIGINT) if n_int > 0 else int(signal.SIGTERM) if n_term > 0 else 0

    def agree(self) -> int:
        """The stop request of any rank, on every rank (one collective under DDP); 0 = none."""
        if self.runtime.distributed:
            flags = self.flags(self.runtime.device, torch.float32)
            torch.distributed.all_reduce(flags)
            self.agree_flags(flags)
        else:
            self.agree_flags(None)
        return self.agreed

    def stop_requested(self) -> int:
        """The signal to stop for now, 0 = go on: the request agreed at the last step, or in one
        process a signal that came since (during the step's eval or save). Under DDP a signal
        since the last step waits for the next one, which every rank then stops after."""
        if self.agreed or (self.received and not self.runtime.distributed):
            return self.received or self.agreed
        return 0


__all__ = [
    "LoadModelFn",
    "SaveModelFn",
    "StopSignals",
    "TimeBudget",
    "TrainLog",
    "Validator",
    "agree_names",
    "every",
    "to_device",
]

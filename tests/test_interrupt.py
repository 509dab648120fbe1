"""SIGINT / SIGTERM during training: the step in progress finishes, its checkpoint is saved, the
command exits 130 / 143 with one line, and rerunning it resumes with the uninterrupted run's losses.
A second Ctrl-C exits at once. Real signals to real runs: here in-process (fast, through
`cli.run_command`), in tests/integration/test_interrupt.py to `python -m modernlm` and torchrun."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modernlm.checkpoint import save_model
from modernlm.cli import run_command
from modernlm.data.corpus import write_shards
from modernlm.train.tracking import read_metrics

TINY = ["model.vocab_size=64", "model.d_model=32", "model.n_layer=2", "model.n_head=4", "model.max_seq_len=32"]


def make_shards(path: Path) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 64, 41)
    train = np.tile(base, 100)
    train[rng.random(len(train)) < 0.1] = 7
    return write_shards(path, {"train": train, "val": np.tile(base, 5)}, vocab_size=64)


def pretrain_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", "data.seq_len=32", *TINY, f"run.out_dir={out}", "run.device=cpu",
        "train.progress=false", "train.batch_size=4", "optim.warmup_steps=5", "optim.lr=1e-2",
        "train.log_every=1", "train.save_every=1000", "model.dropout=0.1", *extra,
    ]  # fmt: skip


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a loss in metrics.jsonl so far (tolerates a line being written)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def saved_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*") if (p / "train_state.pt").is_file())


def check_interrupted(run_dir: Path, stopped_at: int, k: int, err: str, sig: signal.Signals, ranks: int = 1) -> None:
    """The run stopped at a step >= k, saved exactly that step, and said where in one line (per rank)."""
    assert stopped_at >= k
    assert saved_steps(run_dir) == [stopped_at], (k, saved_steps(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:07d}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == stopped_at and summary["stopped_by"] == sig.name
    line = [m for m in err.splitlines() if "stopped by" in m]
    assert len(line) == ranks and len(set(line)) == 1, err
    assert ranks > 1 or "Traceback" not in err, err
    assert f"stopped by {sig.name} at step {stopped_at}" in line[0] and f"step_{stopped_at:07d}" in line[0]
    assert "rerun the same command to resume" in line[0]


def signal_when_logged(run_dir: Path, k: int, sig: signal.Signals, send, running) -> threading.Thread:
    """A thread that calls send(sig) once metrics.jsonl shows step >= k, while running() holds."""

    def watch() -> None:
        deadline = time.time() + 120
        while running() and time.time() < deadline:
            steps = logged_steps(run_dir)
            if steps and steps[-1] >= k:
                send(sig)
                return
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def signal_self_while(run_dir: Path, k: int, sig: signal.Signals, run):
    """Call run() while a thread sends `sig` to this process once run_dir's metrics.jsonl shows step
    >= k; returns what run() returns. A signal that arrives only after run() returned would kill
    pytest: it is caught here and fails the test."""
    late: list[int] = []
    previous = signal.signal(sig, lambda signum, frame: late.append(signum))
    done = threading.Event()
    try:
        watcher = signal_when_logged(run_dir, k, sig, lambda s: os.kill(os.getpid(), s), lambda: not done.is_set())
        result = run()
        done.set()
        watcher.join()
    finally:
        signal.signal(sig, previous)
    assert not late, f"the run ended before the signal (k={k}); raise train.num_steps"
    return result


# ---- in-process: a real signal to this process while `modernlm pretrain` trains -----------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_step_and_rerun_resumes_with_the_same_losses(tmp_path, capsys, sig):
    shards, out = make_shards(tmp_path / "shards"), tmp_path / "runs"
    args = pretrain_args(shards, out, "train.num_steps=60", "train.eval_every=20")
    assert run_command("pretrain", [*args, "run.name=full"]) == 0

    k = random.randint(3, 20)
    run_dir = out / "stopped"
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGINT)
    code = signal_self_while(run_dir, k, sig, lambda: run_command("pretrain", [*args, "run.name=stopped"]))
    assert code == 128 + sig
    stopped_at = logged_steps(run_dir)[-1]
    check_interrupted(run_dir, stopped_at, k, capsys.readouterr().err, sig)
    assert stopped_at < 60
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored

    assert run_command("pretrain", [*args, "run.name=stopped"]) == 0  # the same command resumes
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:07d}'}" in capsys.readouterr().out
    full = losses(out / "full")
    assert [s for s, _ in full] == list(range(1, 61))
    assert losses(run_dir) == full, f"k={k}, stopped at {stopped_at}"  # exact, every step
    vals = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d) if "val_loss" in r]  # noqa: E731
    assert vals(run_dir) == vals(out / "full")


def test_sft_signal_then_resume_matches(tmp_path, capsys):
    import torch

    from modernlm.model import ModernDecoderLM
    from modernlm.tokenizer import byte_tokenizer
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    save_model(ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=64)), tmp_path / "base", byte_tokenizer())
    records = [{"instruction": f"Echo {w}.", "input": "", "output": w} for w in ("cat", "dog", "sun", "sky") * 10]
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = [str(tmp_path / "base"), f"data.path={tmp_path / 'data.json'}", "data.max_length=48",
            "train.num_steps=50", "train.batch_size=4", "optim.lr=5e-3", "train.eval_every=25", "train.log_every=1",
            "train.save_every=1000", "run.seed=3", "train.progress=false",
            "eval.generate=0", f"run.out_dir={tmp_path}", "run.device=cpu"]  # fmt: skip
    assert run_command("sft", [*args, "run.name=full"]) == 0

    k, sig = random.randint(3, 15), signal.SIGTERM
    run_dir = tmp_path / "stopped"
    capsys.readouterr()
    code = signal_self_while(run_dir, k, sig, lambda: run_command("sft", [*args, "run.name=stopped"]))
    assert code == 143
    stopped_at = logged_steps(run_dir)[-1]
    check_interrupted(run_dir, stopped_at, k, capsys.readouterr().err, sig)
    assert not (run_dir / "eval.json").exists()  # what runs after training did not run

    assert run_command("sft", [*args, "run.name=stopped"]) == 0
    assert losses(run_dir) == losses(tmp_path / "full"), f"k={k}, stopped at {stopped_at}"
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 50


def test_pipeline_stage_is_left_interrupted_and_resumed(tmp_path, capsys):
    """A training stage run in-process by the pipeline: the signal stops the pipeline (the stage
    marked interrupted, nothing after it runs); the rerun resumes the stage from its checkpoint."""
    from modernlm.commands import pretrain
    from modernlm.config import load_config
    from modernlm.errors import Interrupted
    from modernlm.pipeline.runner import Runner, Stage

    shards, out = make_shards(tmp_path / "shards"), tmp_path / "pipe"
    args = pretrain_args(shards, out, "train.num_steps=60", "train.eval_every=20")
    assert run_command("pretrain", [*args, f"run.out_dir={tmp_path}", "run.name=full"]) == 0
    calls: list[str] = []

    def stages() -> list[Stage]:
        cfg = load_config(pretrain.Config, None, [*args, "run.name=lm"])
        return [Stage("lm", "lm", (), cfg, pretrain.main, resumable=True),
                Stage("after", "after", ("lm",), cfg.train, lambda c: calls.append("after"))]  # fmt: skip

    k, sig = random.randint(3, 20), signal.SIGINT

    def run_pipeline() -> Interrupted:
        with pytest.raises(Interrupted) as e:
            Runner(out, stages(), "t").run()
        return e.value

    interrupted = signal_self_while(out / "lm", k, sig, run_pipeline)
    assert interrupted.exit_code == 130
    stopped_at = interrupted.step
    assert saved_steps(out / "lm") == [stopped_at] and stopped_at >= k and calls == []
    marker = json.loads((out / "stages" / "lm.json").read_text())
    assert marker["status"] == "interrupted" and f"stopped by SIGINT at step {stopped_at}" in marker["error"]

    capsys.readouterr()
    Runner(out, stages(), "t").run()
    assert "lm: resuming an unfinished attempt" in capsys.readouterr().out
    assert calls == ["after"] and json.loads((out / "stages" / "lm.json").read_text())["status"] == "done"
    assert losses(out / "lm") == losses(tmp_path / "full"), f"k={k}, stopped at {stopped_at}"


# ---- a subprocess: the second Ctrl-C -----------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "modernlm", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_second_ctrl_c_exits_at_once(tmp_path):
    shards, out = make_shards(tmp_path / "shards"), tmp_path / "runs"
    # Slow steps (64 micro-batches each) so that the second Ctrl-C lands inside the step the first
    # one lets finish; a run that would take minutes.
    args = pretrain_args(shards, out, "train.num_steps=1000", "train.grad_accum_steps=128", "train.eval_every=0",
                         "run.name=r")  # fmt: skip
    proc = subprocess.Popen(cli("pretrain", *args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not logged_steps(out / "r") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        first = proc.stderr.readline()
        while first and "Ctrl-C again" not in first:
            first = proc.stderr.readline()
        assert "stopping after this step" in first
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGINT  # the default action: killed by the signal (a shell says 130)
    assert waited < 5, waited
    assert saved_steps(out / "r") == []  # no checkpoint: it did not wait for the step to end
    assert logged_steps(out / "r")[-1] < 1000

"""SIGINT / SIGTERM to real `python -m modernlm` processes and to torchrun (2 gloo ranks on CPU):
exit 130 / 143 (torchrun: non-zero), one checkpoint of the step it stopped at, and rerunning the
same command resumes with the uninterrupted run's losses, step for step. The signal's step is
random: `MODERNLM_TEST_SEED` replays it (tests/test_interrupt.py, `signal_rng`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modernlm.checkpoint import save_model
from tests.test_interrupt import (
    ENV,
    check_interrupted,
    cli,
    logged_steps,
    losses,
    make_shards,
    pretrain_args,
    saved_steps,
    signal_rng,  # noqa: F401 (a fixture)
    signal_when_logged,
)

pytestmark = pytest.mark.slow


def run_and_signal(cmd: list[str], run_dir: Path, k: int, sig: signal.Signals, send=None) -> tuple[int, str]:
    """Start `cmd`, send `sig` once metrics.jsonl shows step >= k; (exit code, stderr).
    `send(proc, sig)` delivers it (default: to the process started)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deliver = (lambda s: send(proc, s)) if send else proc.send_signal
        watcher = signal_when_logged(run_dir, k, sig, deliver, lambda: proc.poll() is None)
        err = proc.communicate(timeout=600)[1]
        watcher.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def run_ok(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def pretrain_full(tmp_path_factory):
    """Shards, the common arguments and the uninterrupted run's losses."""
    tmp = tmp_path_factory.mktemp("interrupt")
    shards, out = make_shards(tmp / "shards"), tmp / "runs"
    args = pretrain_args(shards, out, "train.num_steps=150", "train.eval_every=50")
    run_ok(cli("pretrain", *args, "run.name=full"))
    full = losses(out / "full")
    assert [s for s, _ in full] == list(range(1, 151))
    return out, args, full


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_pretrain_process_stops_saves_and_resumes(pretrain_full, sig, signal_rng):  # noqa: F811
    out, args, full = pretrain_full
    k = signal_rng.randint(3, 60)
    run_dir = out / f"stopped-{sig.name}"
    cmd = cli("pretrain", *args, f"run.name={run_dir.name}")
    code, err = run_and_signal(cmd, run_dir, k, sig)
    assert code == 128 + sig, err[-2000:]  # 130 / 143
    stopped_at = logged_steps(run_dir)[-1]
    assert stopped_at < 150
    check_interrupted(run_dir, stopped_at, k, err, sig)

    assert f"at step {stopped_at}" in run_ok(cmd)  # "resumed from ... at step N"
    assert losses(run_dir) == full, f"k={k}, stopped at {stopped_at}"
    vals = lambda d: [(r["step"], r["val_loss"]) for r in map(json.loads, (d / "metrics.jsonl").open())  # noqa: E731
                      if "val_loss" in r]  # fmt: skip
    assert vals(run_dir) == vals(out / "full")


def test_dpo_process_stops_saves_and_resumes(tmp_path, signal_rng):  # noqa: F811
    from tests.test_dpo import _pairs, _policy_and_items, _write_jsonl

    model, tok, _ = _policy_and_items()
    save_model(model, tmp_path / "sft", tok)
    _write_jsonl(tmp_path / "pairs.jsonl", _pairs(64))
    _write_jsonl(tmp_path / "val.jsonl", _pairs(16, seed=1))
    args = ["dpo", str(tmp_path / "sft"), f"data.path={tmp_path / 'pairs.jsonl'}", "data.max_length=48",
            f"eval.val_path={tmp_path / 'val.jsonl'}", "train.num_steps=60", "train.batch_size=4",
            "optim.lr=2e-3", "train.eval_every=20", "train.log_every=1", "train.save_every=1000",
            "train.progress=false", "run.device=cpu", f"run.out_dir={tmp_path}"]  # fmt: skip
    run_ok(cli(*args, "run.name=full"))

    k, sig = signal_rng.randint(3, 30), signal.SIGINT
    run_dir = tmp_path / "stopped"
    code, err = run_and_signal(cli(*args, "run.name=stopped"), run_dir, k, sig)
    assert code == 130, err[-2000:]
    stopped_at = logged_steps(run_dir)[-1]
    check_interrupted(run_dir, stopped_at, k, err, sig)
    assert not (run_dir / "eval.json").exists()

    run_ok(cli(*args, "run.name=stopped"))
    assert losses(run_dir) == losses(tmp_path / "full"), f"k={k}, stopped at {stopped_at}"
    report, full = (json.loads((d / "eval.json").read_text()) for d in (run_dir, tmp_path / "full"))
    assert report["step"] == 60 and report["before"] == full["before"]  # kept from the first attempt


# ---- torchrun: every rank stops after the same step ---------------------------------------------


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "modernlm",
            *args]  # fmt: skip


def worker_pid(launcher: int, rank: int, timeout: float = 60) -> int:
    """The pid of the torchrun worker with RANK=rank (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for task in Path(f"/proc/{launcher}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under {launcher}")


@pytest.mark.parametrize("target", ["launcher", "rank1"])
def test_torchrun_sigterm_gives_one_checkpoint_and_an_exact_resume(tmp_path, target, signal_rng):  # noqa: F811
    shards, out = make_shards(tmp_path / "shards"), tmp_path / "runs"
    args = pretrain_args(shards, out, "train.num_steps=80", "train.eval_every=40", "train.batch_size=2")
    run_ok(torchrun("pretrain", *args, "run.name=full"))
    full = losses(out / "full")
    assert [s for s, _ in full] == list(range(1, 81))

    k, sig = signal_rng.randint(3, 40), signal.SIGTERM
    run_dir = out / "stopped"
    send = None if target == "launcher" else (lambda proc, s: os.kill(worker_pid(proc.pid, 1), s))
    code, err = run_and_signal(torchrun("pretrain", *args, "run.name=stopped"), run_dir, k, sig, send)
    assert code != 0, err[-3000:]  # torchrun reports its workers' 143 as a failure
    stopped_at = logged_steps(run_dir)[-1]
    assert stopped_at < 80, err[-3000:]
    # both ranks stopped after the same step: one checkpoint, of that step, with both ranks' RNG
    check_interrupted(run_dir, stopped_at, k, err, sig, ranks=2)
    import torch

    state = torch.load(run_dir / "checkpoints" / f"step_{stopped_at:07d}" / "train_state.pt", weights_only=True)
    assert state["step"] == stopped_at and len(state["rng"]) == 2

    run_ok(torchrun("pretrain", *args, "run.name=stopped"))
    assert losses(run_dir) == full, f"k={k}, stopped at {stopped_at}"
    assert saved_steps(run_dir)[-1] == 80

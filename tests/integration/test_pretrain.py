"""`modernlm pretrain` end to end: bad input -> exit 2, SIGKILL + resume == uninterrupted, and a
tiny WikiText-2 run whose validation loss falls far below its start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modernlm.cli import run_command
from modernlm.data.corpus import write_shards
from modernlm.train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_MODEL = [
    "model.vocab_size=64",
    "model.d_model=32",
    "model.n_layer=2",
    "model.n_head=4",
    "model.max_seq_len=32",
]


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 64, 41)
    train = np.tile(base, 100)
    train[rng.random(len(train)) < 0.1] = 7
    return write_shards(
        tmp_path / "shards", {"train": train, "val": np.tile(base, 5)}, vocab_size=64
    )


def pretrain_args(shards, out, *extra):
    return [
        f"data.path={shards}",
        "data.seq_len=32",
        *TINY_MODEL,
        f"run.out_dir={out}",
        "run.device=cpu",
        "train.progress=false",
        "train.batch_size=4",
        "optim.warmup_steps=5",
        "optim.lr=1e-2",
        *extra,
    ]


# ---- bad input: one line on stderr, exit code 2 (fast, in-process) -----------------------------


def one_line_error(capsys, args, pattern):
    assert run_command("pretrain", args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, shards):
    out = tmp_path / "runs"
    one_line_error(capsys, pretrain_args(tmp_path / "missing", out), "directory not found")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, pretrain_args(tmp_path / "empty", out), "no meta.json")
    one_line_error(
        capsys,
        pretrain_args(shards, out, "model.vocab_size=32"),
        "smaller than the data's tokenizer vocabulary (64",
    )
    one_line_error(
        capsys, pretrain_args(shards, out, "data.seq_len=64"), "longer than model.max_seq_len"
    )
    one_line_error(
        capsys, pretrain_args(shards, out, "optim.lr=fast"), "optim.lr: expected a number"
    )
    short = write_shards(
        tmp_path / "short", {"train": np.arange(20), "val": np.arange(10)}, vocab_size=64
    )
    one_line_error(capsys, pretrain_args(short, out), "fewer than one sequence")
    # resuming a run with another model config
    assert (
        run_command("pretrain", pretrain_args(shards, out, "train.num_steps=2", "run.name=r")) == 0
    )
    capsys.readouterr()
    one_line_error(
        capsys,
        pretrain_args(shards, out, "train.num_steps=4", "run.name=r", "model.n_layer=3"),
        "model config differs",
    )
    # the config.yaml of the original run was not overwritten by the refused one
    assert "n_layer: 2" in (out / "r" / "config.yaml").read_text()


def test_run_directory_artefacts(tmp_path, shards):
    out = tmp_path / "runs"
    args = pretrain_args(
        shards,
        out,
        "train.num_steps=6",
        "train.save_every=3",
        "train.eval_every=3",
        "train.log_every=2",
        "run.name=a",
    )
    assert run_command("pretrain", args) == 0
    run = out / "a"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["steps"] == 6
        and summary["tokens_seen"] == 6 * 4 * 32
        and summary["skipped_steps"] == 0
    )
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 4, 6]
    assert [r["step"] for r in read_metrics(run) if "val_loss" in r] == [0, 3, 6]
    # running again finds the finished run and does nothing more
    assert run_command("pretrain", args) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


# ---- SIGKILL at a random point after a checkpoint, then resume ---------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "modernlm", "pretrain", *args]


@pytest.mark.slow
def test_sigkill_then_resume_logs_the_same_losses(tmp_path, shards):
    out = tmp_path / "runs"
    common = pretrain_args(
        shards,
        out,
        "train.num_steps=150",
        "train.log_every=1",
        "train.save_every=10",
        "train.eval_every=50",
        "model.dropout=0.1",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cli(*common, "run.name=full"), check=True, env=env, capture_output=True)

    run_dir = out / "killed"
    proc = subprocess.Popen(
        cli(*common, "run.name=killed"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        latest = run_dir / "checkpoints" / "latest"
        if latest.is_file():
            saved = int(latest.read_text().strip().removeprefix("step_"))
            logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
            if logged and logged[-1] >= saved + 3:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = logged[-1]
                break
        time.sleep(0.002)
    proc.wait()
    if killed_at is None:
        pytest.fail("the run finished before it could be killed; raise train.num_steps")
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < 150

    subprocess.run(cli(*common, "run.name=killed"), check=True, env=env, capture_output=True)
    full = [(r["step"], r["loss"]) for r in read_metrics(out / "full") if "loss" in r]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]
    assert [s for s, _ in full] == list(range(1, 151))
    assert resumed == full  # exact equality on CPU fp32, every step
    vals = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d) if "val_loss" in r]  # noqa: E731
    assert vals(run_dir) == vals(out / "full")


# ---- a real corpus ---------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_wikitext2_pretrain_loss_falls(tmp_path):
    wiki = SHARED_DATA / "wikitext-2" / "wiki.train.tokens"
    if not wiki.is_file():
        pytest.skip(f"WikiText-2 not found at {wiki}")
    tok, data, out = tmp_path / "tok", tmp_path / "wt2", tmp_path / "runs"
    corpus = tmp_path / "corpus.yaml"
    corpus.write_text(f"corpus:\n  sources:\n    - path: {wiki}\n      max_documents: 150\n")
    # A near-byte-level BPE keeps the model tiny and the run short.
    assert run_command("tokenizer train", ["-c", str(corpus), f"out={tok}", "vocab_size=300"]) == 0
    assert (
        run_command(
            "prepare",
            [
                "-c",
                str(corpus),
                f"tokenizer={tok}",
                f"out={data}",
                "val_fraction=0.05",
                "progress=false",
            ],
        )
        == 0
    )
    args = [
        "-c",
        str(ROOT / "configs" / "pretrain" / "tiny.yaml"),
        f"data.path={data}",
        f"run.out_dir={out}",
        "model.vocab_size=320",
        "model.d_model=64",
        "model.n_layer=2",
        "data.seq_len=64",
        "train.num_steps=300",
        "train.eval_every=100",
        "train.save_every=300",
        "train.sample_every=0",
        "train.progress=false",
        "optim.lr=1e-2",
        "optim.warmup_steps=10",
    ]
    assert run_command("pretrain", args) == 0
    vals = [r["val_loss"] for r in read_metrics(out / "pretrain-tiny") if "val_loss" in r]
    assert len(vals) == 4
    assert vals[-1] < 0.6 * vals[0], vals


@pytest.mark.slow
def test_shakespeare_speedrun_recipe_stops_on_its_time_budget(tmp_path):
    """The speedrun recipe on the byte tokenizer, with a 6 s budget instead of its full one: it
    stops by time, decays the LR to its floor on the last step, and scores the whole val split."""
    text = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not text.is_file():
        pytest.skip("TinyShakespeare not found")
    data = tmp_path / "shakespeare-byte"
    corpus = f"corpus.sources=[{{path: {text}, documents: file}}]"
    assert run_command("prepare", ["tokenizer=byte", f"out={data}", "val_fraction=0.1", "val_split=tail", corpus]) == 0
    args = [
        "-c", str(ROOT / "configs" / "pretrain" / "shakespeare-cpu.yaml"), f"data.path={data}",
        f"run.out_dir={tmp_path}", "run.name=speedrun", "train.max_seconds=6", "train.progress=false",
        "model.n_layer=1", "model.d_model=64", "train.batch_size=4", "optim.warmup_steps=5", "train.eval_every=0",
        "train.log_every=1",
    ]  # fmt: skip
    assert run_command("pretrain", args) == 0
    summary = json.loads((tmp_path / "speedrun" / "summary.json").read_text())
    assert summary["stopped_by"] == "time" and 5 < summary["wall_time_s"] < 12
    records = read_metrics(tmp_path / "speedrun")
    lrs = [r["lr"] for r in records if "lr" in r]
    config = (tmp_path / "speedrun" / "config.yaml").read_text()
    assert "max_seconds: 6" in config
    from modernlm.commands.pretrain import Config
    from modernlm.config import load_config

    cfg = load_config(Config, tmp_path / "speedrun" / "config.yaml")
    floor = cfg.optim.lr * cfg.optim.min_lr_ratio
    assert lrs[-1] == pytest.approx(floor, rel=0.05)  # the floor on the last step
    assert max(lrs) == pytest.approx(cfg.optim.lr, rel=0.05)
    assert summary["final_val_loss"] < 5.0  # learned something in 6 s (uniform over 260 ids: 5.56)


@pytest.mark.slow
def test_compiled_pretrain_in_one_process_evaluates_and_follows_the_eager_run(tmp_path, shards):
    """run.compile=true in one process: the trainer hands the compiled module to validation (which
    once crashed taking its truth value); losses and validation match the eager run."""
    curves = {}
    for compile in ("false", "true"):
        out = tmp_path / compile
        args = pretrain_args(shards, out, f"run.compile={compile}", "train.num_steps=6", "train.log_every=1",
                             "train.eval_every=3", "train.eval_batches=2")  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "modernlm", "pretrain", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        records = read_metrics(out / "pretrain")
        logged = [r for r in records if "loss" in r or "val_loss" in r]
        curves[compile] = [(r["step"], r.get("loss"), r.get("val_loss")) for r in logged]
    eager, compiled = curves["false"], curves["true"]
    assert [s for s, *_ in compiled] == [s for s, *_ in eager] and sum(v is not None for *_, v in eager) >= 2
    for (_, loss_a, val_a), (_, loss_b, val_b) in zip(eager, compiled, strict=True):
        # inductor's fused CPU kernels round differently from eager's: equal to 1e-4
        assert (loss_a is None) == (loss_b is None) and (val_a is None) == (val_b is None)
        if loss_a is not None:
            assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-4)
        if val_a is not None:
            assert val_b == pytest.approx(val_a, rel=1e-4, abs=1e-4)

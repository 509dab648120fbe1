"""SIGINT / SIGTERM during training: the step in progress finishes, its checkpoint is saved, the
command exits 130 / 143 with one line, and rerunning it resumes with the uninterrupted run's losses.
A second Ctrl-C exits at once. Real signals to real runs: here in-process (fast, through
`cli.run_command`: pretrain, sft, verifier, finetune, a pipeline stage), in
tests/integration/test_interrupt.py to `python -m modernlm` and torchrun.

The step at which a test sends its signal is random, drawn from $MODERNLM_TEST_SEED (default: a
fresh seed per session) and the test's id; every failure's report prints the seed, and
`MODERNLM_TEST_SEED=N pytest ...` replays the same steps."""

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

SEED_VAR = "MODERNLM_TEST_SEED"
try:
    SEED = int(os.environ.get(SEED_VAR) or random.SystemRandom().randrange(2**32))
except ValueError:
    raise ValueError(f"{SEED_VAR} must be an integer, got {os.environ[SEED_VAR]!r}") from None


@pytest.fixture
def signal_rng(request) -> random.Random:
    """The random.Random that picks the step at which this test sends its signal: seeded from SEED
    and the test's id, so replaying one test gives it the same steps whatever else runs. The seed
    goes into the report of any failure ("Captured replay call")."""
    request.node.add_report_section("call", "replay", f"replay the signal steps with {SEED_VAR}={SEED}")
    return random.Random(f"{SEED} {request.node.nodeid}")


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
def test_signal_saves_the_step_and_rerun_resumes_with_the_same_losses(tmp_path, capsys, sig, signal_rng):
    shards, out = make_shards(tmp_path / "shards"), tmp_path / "runs"
    args = pretrain_args(shards, out, "train.num_steps=60", "train.eval_every=20")
    assert run_command("pretrain", [*args, "run.name=full"]) == 0

    k = signal_rng.randint(3, 20)
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


def test_sft_signal_then_resume_matches(tmp_path, capsys, signal_rng):
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

    k, sig = signal_rng.randint(3, 15), signal.SIGTERM
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


def test_pipeline_stage_is_left_interrupted_and_resumed(tmp_path, capsys, signal_rng):
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

    k, sig = signal_rng.randint(3, 20), signal.SIGINT

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


# ---- the verifier and LoRA finetune: commands with their own model files --------------------------


def stop_in_process(command: str, args: list[str], run_dir: Path, k: int, sig, capsys, steps: int) -> int:
    """Run `modernlm <command>` in this process, signalled after its k-th logged step; check the stop
    (exit code, the step's checkpoint, the one line saying where) and return the step it stopped at."""
    capsys.readouterr()
    code = signal_self_while(run_dir, k, sig, lambda: run_command(command, [*args, f"run.name={run_dir.name}"]))
    assert code == 128 + sig
    stopped_at = logged_steps(run_dir)[-1]
    check_interrupted(run_dir, stopped_at, k, capsys.readouterr().err, sig)
    assert stopped_at < steps
    return stopped_at


def resume_in_process(command: str, args: list[str], run_dir: Path, stopped_at: int, full: Path, k: int, capsys):
    """Rerun the same command: it resumes from the stop's checkpoint with the uninterrupted run's losses."""
    assert run_command(command, [*args, f"run.name={run_dir.name}"]) == 0
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:07d}'}" in capsys.readouterr().out
    assert losses(run_dir) == losses(full), f"k={k}, stopped at {stopped_at}"


@pytest.fixture(scope="module")
def verifier_full(tmp_path_factory):
    """(out_dir, the verifier's arguments but run.name): its uninterrupted run is out_dir/full."""
    from tests.test_verifier import chat_checkpoint, write_problems

    tmp = tmp_path_factory.mktemp("verifier")
    sft = chat_checkpoint(tmp / "sft")
    train = write_problems(tmp / "train.jsonl", [(f"{a}+{b}?", f"#### {a + b}") for a in range(3) for b in range(3)])
    test = write_problems(tmp / "test.jsonl", [(f"{a}*{b}?", f"#### {a * b}") for a in range(2) for b in range(2)])
    args = [str(sft), f"data.train_path={train}", f"data.eval_path={test}", "data.val_fraction=0.2",
            "sample.n_train=4", "sample.n_eval=3", "sample.max_new_tokens=8", "sample.batch_size=8", "lm_coef=0.5",
            "train.num_steps=40", "train.batch_size=4", "train.eval_every=20", "train.log_every=1",
            "train.save_every=1000", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=2",
            f"run.out_dir={tmp}", "run.device=cpu"]  # fmt: skip
    assert run_command("verifier", [*args, "run.name=full"]) == 0
    assert [s for s, _ in losses(tmp / "full")] == list(range(1, 41))
    return tmp, args


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_verifier_signal_then_resume_matches(verifier_full, capsys, sig, signal_rng):
    """The signal lands in the verifier's training (after its sampling): nothing after training runs
    (no verifier/, no rerank); the rerun reuses the samples, resumes with the same losses and ends
    with the uninterrupted run's scores."""
    out, args = verifier_full
    k, run_dir = signal_rng.randint(3, 15), out / f"stopped-{sig.name}"
    stopped_at = stop_in_process("verifier", args, run_dir, k, sig, capsys, steps=40)
    assert not (run_dir / "eval.json").exists() and not (run_dir / "verifier").exists()
    samples = {p.name: p.read_text() for p in (run_dir / "samples").glob("*.jsonl")}
    assert len(samples) == 3

    resume_in_process("verifier", args, run_dir, stopped_at, out / "full", k, capsys)
    assert {p.name: p.read_text() for p in (run_dir / "samples").glob("*.jsonl")} == samples  # not redrawn
    predictions = lambda d: (d / "eval" / "predictions.jsonl").read_text()  # noqa: E731
    assert predictions(run_dir) == predictions(out / "full")  # every verifier score, exactly
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 40


@pytest.fixture(scope="module")
def finetune_full(tmp_path_factory):
    """(out_dir, finetune's arguments but run.name): LoRA (dropout on) + a new classification head
    on a tiny GPT-2 with the real GPT-2 tokenizer, SST-2; the uninterrupted run is out_dir/full."""
    from tests.conftest import SHARED_DATA

    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    if not (SHARED_DATA / "gpt2-tokenizer").is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {SHARED_DATA / 'gpt2-tokenizer'}")
    tmp = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp / "gpt2")
    transformers.GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "gpt2-tokenizer")).save_pretrained(tmp / "gpt2")
    dev = SHARED_DATA / "sst2" / "dev.tsv"
    args = [str(tmp / "gpt2"), "data.name=sst2", f"data.path={dev}", "data.max_examples=64", f"eval.path={dev}",
            "eval.max_examples=8", "eval.before=true", "lora.dropout=0.1", "train.num_steps=40", "train.batch_size=4",
            "train.eval_every=20", "train.log_every=1", "train.save_every=1000", "train.progress=false",
            "optim.lr=5e-3", "optim.warmup_steps=2", "run.tensorboard=false", f"run.out_dir={tmp}",
            "run.device=cpu"]  # fmt: skip
    assert run_command("finetune", [*args, "run.name=full"]) == 0
    assert [s for s, _ in losses(tmp / "full")] == list(range(1, 41))
    return tmp, args


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_finetune_signal_then_resume_matches(finetune_full, capsys, sig, signal_rng):
    """LoRA finetune: the checkpoint is the adapter (+ head); nothing after training runs (adapter/,
    eval/); the rerun resumes with the same losses and ends with the uninterrupted run's adapter,
    the evaluation before training kept from the first attempt."""
    from safetensors.torch import load_file

    out, args = finetune_full
    k, run_dir = signal_rng.randint(3, 15), out / f"stopped-{sig.name}"
    stopped_at = stop_in_process("finetune", args, run_dir, k, sig, capsys, steps=40)
    assert not (run_dir / "eval.json").exists() and not (run_dir / "adapter").exists()
    assert (run_dir / "checkpoints" / f"step_{stopped_at:07d}" / "adapter_model.safetensors").is_file()

    resume_in_process("finetune", args, run_dir, stopped_at, out / "full", k, capsys)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run_dir, out / "full"))
    assert a.keys() == b.keys() and all((a[n] == b[n]).all() for n in a)
    report, full = (json.loads((d / "eval.json").read_text()) for d in (run_dir, out / "full"))
    assert report["step"] == 40 and report["before"] == full["before"] and report["after"] == full["after"]


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

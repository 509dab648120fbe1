"""Checkpoints (no transformers): save -> load is bit-identical, and every broken checkpoint
directory is a UserError naming the file (one line, exit code 2 from the CLI, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modernlm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model
from modernlm.cli import run_command
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.quant import prepare
from tests.conftest import tiny_config


def test_save_load_bit_identical(variant_config, tmp_path):
    model = ModernDecoderLM(variant_config).eval()
    with torch.no_grad():  # norms and the sink start as ones/zeros; make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # tying survives: one tensor, not two equal copies that would drift apart in training
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == variant_config.tie_embeddings
    idx = torch.randint(0, variant_config.vocab_size, (2, 12))
    with torch.no_grad():
        out_a, out_b = model(idx), loaded(idx)
    assert torch.equal(out_a.logits, out_b.logits)
    if variant_config.n_expert:
        assert torch.equal(out_a.aux_loss, out_b.aux_loss)


def test_bfloat16_checkpoint_keeps_dtype(tmp_path):
    model = ModernDecoderLM(tiny_config()).to(torch.bfloat16)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.rope.cos.dtype == torch.float32  # RoPE tables stay float32 (precision)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["file-dtype", "bfloat16"])
def test_a_quantized_load_streams_the_file_into_what_prepare_makes(variant_config, quantize, dtype, tmp_path):
    """load_model(quantize=...) reads the file a few rows at a time into a model built on meta; the
    result is what quant.prepare makes of the whole float model, buffer for buffer and parameter for
    parameter (every variant: untied heads, experts, sinks; d_ff 80 leaves w_down's K = 80 in
    floats, not whole blocks of 32), and it computes the same logits (at bfloat16 too: the
    embedding's rows come in the model's dtype, which the layers left in floats take)."""
    cfg = variant_config.__class__(**{**variant_config.__dict__, "d_ff": 80})
    model = ModernDecoderLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(model, tmp_path)
    whole = load_model(tmp_path)
    whole = prepare(whole if dtype is None else whole.to(dtype), quantize).eval()
    streamed = load_model(tmp_path, quantize=quantize, dtype=dtype)
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and any(k.endswith(".q") for k in a)
    assert any(k.endswith("w_down.weight") for k in a)  # K = 80: left in floats
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert repr(whole) == repr(streamed)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        logits = whole(idx).logits
        assert logits.dtype == (dtype or torch.float32) and torch.equal(logits, streamed(idx).logits)


def test_stored_tensors_reads_rows_as_safetensors_does(tmp_path):
    """StoredTensors (plain reads, no map) against safetensors' own reader: whole tensors and row
    ranges, in float32, bfloat16 and float16, a scalar too."""
    from safetensors.torch import load_file, save_file

    from modernlm.checkpoint import StoredTensors

    tensors = {"a": torch.randn(7, 5), "b": torch.randn(3, 4, 2).bfloat16(), "c": torch.randn(9).half(),
               "s": torch.tensor(2.5)}  # fmt: skip
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ref = load_file(tmp_path / "t.safetensors")
    with StoredTensors(tmp_path / "t.safetensors") as stored:
        assert {k: v.shape for k, v in stored.shapes().items()} == {k: v.shape for k, v in ref.items()}
        for k, v in ref.items():
            assert torch.equal(stored.read(k), v) and stored.read(k).dtype == v.dtype, k
        assert torch.equal(stored.read("a", 2, 6), ref["a"][2:6])
        assert torch.equal(stored.read("b", 1, 2), ref["b"][1:2])


# --------------------------------------------------------------------------------------------
# Broken checkpoint directories
# --------------------------------------------------------------------------------------------


def _edit_config(path: Path, **changes) -> None:
    data = json.loads((path / CONFIG_FILE).read_text())
    data.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(data))


def _truncate_weights(path: Path) -> None:
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _garble_weights(path: Path) -> None:
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


# name -> (how to break the directory, the file the message must name, words it must contain)
BREAKS = {
    "missing-config": (lambda p: (p / CONFIG_FILE).unlink(), CONFIG_FILE, "missing"),
    "missing-weights": (lambda p: (p / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "missing"),
    "truncated-weights": (_truncate_weights, WEIGHTS_FILE, "cannot read"),
    "corrupt-weights": (_garble_weights, WEIGHTS_FILE, "cannot read"),
    "empty-weights": (lambda p: (p / WEIGHTS_FILE).write_bytes(b""), WEIGHTS_FILE, "cannot read"),
    "wrong-shapes": (
        lambda p: _edit_config(p, d_ff=64),
        WEIGHTS_FILE,
        "w_gate_up.weight: file has (256, 32)",
    ),
    "fewer-layers": (
        lambda p: _edit_config(p, n_layer=1),
        WEIGHTS_FILE,
        "unexpected tensors ['layers.1.",
    ),
    "untied-no-head": (
        lambda p: _edit_config(p, tie_embeddings=False),
        WEIGHTS_FILE,
        "missing tensors ['lm_head",
    ),
    "unknown-key": (lambda p: _edit_config(p, n_layers=2), CONFIG_FILE, "did you mean 'n_layer'"),
    "bad-value": (lambda p: _edit_config(p, n_head=3), CONFIG_FILE, "n_head"),
    "not-json": (
        lambda p: (p / CONFIG_FILE).write_text("{ n_layer: 2"),
        CONFIG_FILE,
        "not valid JSON",
    ),
    "hf-dir": (
        lambda p: (p / CONFIG_FILE).write_text('{"model_type": "llama", "architectures": []}'),
        CONFIG_FILE,
        "modernlm convert",
    ),
}


@pytest.fixture
def broken(request, tmp_path) -> tuple[Path, str, str]:
    """A tiny checkpoint directory broken in the way named by the test parameter."""
    path = tmp_path / "ckpt"
    save_model(ModernDecoderLM(tiny_config()), path)  # d_ff 128, 2 layers, tied
    load_model(path)  # intact, it loads
    breaker, file, words = BREAKS[request.param]
    breaker(path)
    return path, file, words


@pytest.mark.parametrize("broken", list(BREAKS), indirect=True)
def test_broken_checkpoint_is_user_error_naming_the_file(broken, capsys, tmp_path):
    path, file, words = broken
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path / file) in message or (file in message and str(path) in message), message
    assert words in message, message
    assert "\n" not in message

    # the same through the CLI (in process): one line on stderr, exit code 2, nothing written
    assert run_command("convert", [str(path), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken", list(BREAKS), indirect=True)
def test_broken_checkpoint_read_quantized_is_the_same_user_error(broken):
    """The quantized path reads the file its own way (StoredTensors): the same one-line messages."""
    path, file, words = broken
    with pytest.raises(UserError) as info:
        load_model(path, quantize="int8")
    message = str(info.value)
    assert str(path / file) in message or (file in message and str(path) in message), message
    assert words in message and "\n" not in message, message


@pytest.mark.parametrize("broken", ["truncated-weights", "wrong-shapes"], indirect=True)
def test_broken_checkpoint_cli_subprocess(broken, tmp_path):
    """A real `python -m modernlm` process: exit 2, one stderr line, no traceback."""
    path, file, words = broken
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modernlm",
            "convert",
            str(path),
            str(tmp_path / "out"),
            "--to",
            "hf",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("modernlm convert: error: ") and file in lines[0]
    ), proc.stderr


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope")


def test_save_overwrites_atomically(tmp_path):
    """Saving again replaces the files and leaves no temporary files behind."""
    save_model(ModernDecoderLM(tiny_config()), tmp_path)
    second = ModernDecoderLM(tiny_config(n_layer=1))
    save_model(second, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert load_model(tmp_path).config.n_layer == 1


# --------------------------------------------------------------------------------------------
# A kill inside a checkpoint save: every directory left loads, best.json matches best/, resume works
# --------------------------------------------------------------------------------------------

DEAD_PID = 2**31 - 2  # above any pid_max: no process has it


class Killed(BaseException):
    pass


def _shards(root: Path) -> Path:
    import numpy as np

    from modernlm.data.corpus import write_shards

    rng = np.random.default_rng(0)
    base = rng.integers(0, 64, 37)
    train = np.tile(base, 20)
    train[rng.random(len(train)) < 0.1] = 5
    return write_shards(root / "shards", {"train": train, "val": np.tile(base, 2)}, vocab_size=64)


def _trainer(shards: Path, run_dir: Path):
    from modernlm.data.shards import TokenStream, TrainWindows, ValBatches
    from modernlm.runtime import Runtime
    from modernlm.train.losses import lm_eval_loss, lm_loss
    from modernlm.train.optim import OptimConfig
    from modernlm.train.trainer import Trainer, TrainingConfig

    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(dropout=0.1))  # dropout: resume must restore the RNG too
    cfg = TrainingConfig(
        num_steps=2, batch_size=2, progress=False, log_every=1, eval_every=1, save_every=1, keep_last=100
    )
    return Trainer(
        model, lm_loss, TrainWindows(TokenStream(shards, "train"), 16, 2, seed=0), cfg,
        OptimConfig(lr=1e-2, warmup_steps=1), Runtime(device=torch.device("cpu"), dtype=torch.float32),
        run_dir, val_batches=ValBatches(TokenStream(shards, "val"), 16, 2, 0), eval_loss_fn=lm_eval_loss,
    )  # fmt: skip


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def _assert_every_checkpoint_loads(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from modernlm.checkpoint import latest_checkpoint, load_training_state

    weights = {}
    for d in _checkpoint_dirs(run_dir):
        weights[d.name] = load_model(d).state_dict()
        if d.name == "best":
            assert json.loads((d / "best.json").read_text())["step"] >= 1
        else:
            assert load_training_state(d)["step"] == int(d.name.removeprefix("step_"))
    latest = latest_checkpoint(run_dir)
    assert latest is None or latest.name.startswith("step_") and latest.name in weights
    return weights


def _inject(monkeypatch, root: Path, at: int | None) -> list[str]:
    """Count the renames that put a checkpoint directory or the `latest` pointer in place, or a file
    into a finished checkpoint directory (the moments between which a kill can fall); raise Killed
    at call number `at`."""
    from modernlm import files

    calls: list[str] = []

    def wrap(fn, name):
        def call(a, b, *args, **kwargs):
            parent = Path(b).parent
            if parent == root or (parent.parent == root and not parent.name.startswith(".")):
                calls.append(f"{name} {Path(a).name} -> {Path(b).name}")
                if len(calls) - 1 == at:
                    raise Killed(calls[-1])
            return fn(a, b, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "rename", wrap(os.rename, "rename"))
    monkeypatch.setattr(os, "replace", wrap(os.replace, "replace"))
    monkeypatch.setattr(files, "_exchange", wrap(files._exchange, "exchange"))
    return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_a_kill_inside_a_checkpoint_save_leaves_only_loadable_checkpoints(tmp_path, monkeypatch, exchange):
    from modernlm import files
    from modernlm.train.tracking import read_metrics

    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability on power loss is not what is tested here
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    shards = _shards(tmp_path)
    full = tmp_path / "full"
    with monkeypatch.context() as m:
        points = _inject(m, full / "checkpoints", None)
        _trainer(shards, full).train()
    want = _assert_every_checkpoint_loads(full)
    want_losses = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(full)]
    # step 1: best/ and step_1 new; step 2: best/ replaced (exchanged, or an exchange tried and
    # two renames), step_2 new; each step followed by `latest`
    assert "best" in want and len(points) == (6 if exchange else 8), points
    for k, point in enumerate(points):
        run_dir = tmp_path / f"killed{k}"
        with monkeypatch.context() as m:
            _inject(m, run_dir / "checkpoints", k)
            with pytest.raises(Killed):
                _trainer(shards, run_dir).train()
        for d in (run_dir, run_dir / "checkpoints"):  # as a killed process with another pid leaves them
            for p in d.iterdir():
                if p.name.startswith(".") and p.name.endswith(f"-{os.getpid()}"):
                    p.rename(p.with_name(p.name.removesuffix(f"-{os.getpid()}") + f"-{DEAD_PID}"))
        _assert_every_checkpoint_loads(run_dir)
        _trainer(shards, run_dir).train()  # resumes
        got = _assert_every_checkpoint_loads(run_dir)
        assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")], point
        assert got.keys() == want.keys(), point
        for name in want:  # the same run as the uninterrupted one, bit for bit
            assert all(torch.equal(got[name][t], want[name][t]) for t in want[name]), (point, name)
        best_step = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())["step"]
        twin = got[f"step_{best_step:07d}"]  # best.json names the step whose weights best/ holds
        assert all(torch.equal(twin[t], got["best"][t]) for t in twin), point
        assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run_dir)] == want_losses


@pytest.mark.slow
def test_sigkill_while_saving_every_step_then_resume_matches_an_uninterrupted_run(tmp_path):
    """`modernlm pretrain` saving a checkpoint and re-saving best/ at every step, SIGKILLed at random
    moments: every checkpoint directory left behind loads, best.json describes best/, and the rerun
    logs exactly the losses of a run never killed."""
    import random
    import signal
    import time

    from modernlm.train.tracking import read_metrics
    from tests.test_interrupt import logged_steps

    shards, out = _shards(tmp_path), tmp_path / "runs"
    common = [
        sys.executable, "-m", "modernlm", "pretrain", f"data.path={shards}", "data.seq_len=16",
        "model.vocab_size=64", "model.d_model=32", "model.n_layer=2", "model.n_head=4", "model.max_seq_len=32",
        "model.dropout=0.1", f"run.out_dir={out}", "run.device=cpu", "train.progress=false", "train.batch_size=2",
        "optim.warmup_steps=5", "optim.lr=1e-2", "train.num_steps=150", "train.log_every=1",
        "train.save_every=1", "train.eval_every=1", "train.keep_last=1000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*common, "run.name=full"], check=True, env=env, capture_output=True)

    run_dir = out / "killed"
    metrics = run_dir / "metrics.jsonl"
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kills = 0
    for _ in range(4):
        before = metrics.stat().st_ino if metrics.exists() else None
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = subprocess.Popen([*common, "run.name=killed"], env=env, **quiet)
        # Kill a few steps after training restarts (the metrics file is rewritten then), at a random
        # moment inside a step: counted in steps, not seconds, so a fast machine gets its kills too.
        target = None
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if metrics.exists() and metrics.stat().st_ino != before:
                steps = logged_steps(run_dir)
                target = target or (steps[-1] if steps else 0) + rng.randint(3, 25)
                if steps and steps[-1] >= target:
                    break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        weights = _assert_every_checkpoint_loads(run_dir)
        best = run_dir / "checkpoints" / "best"
        if best.is_dir():
            step = json.loads((best / "best.json").read_text())["step"]
            twin = weights.get(f"step_{step:07d}")  # absent when killed between best/ and the step's save
            assert twin is None or all(torch.equal(twin[t], weights["best"][t]) for t in twin), (seed, step)
    assert kills >= 2, f"the run finished too early (seed {seed}); raise train.num_steps"

    subprocess.run([*common, "run.name=killed"], check=True, env=env, capture_output=True)
    weights = _assert_every_checkpoint_loads(run_dir)
    leftovers = [p.name for d in (run_dir, run_dir / "checkpoints") for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == [], seed
    step = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())["step"]
    assert all(torch.equal(weights[f"step_{step:07d}"][t], weights["best"][t]) for t in weights["best"])
    full, resumed = read_metrics(out / "full"), read_metrics(run_dir)
    losses = lambda rows, key: [(r["step"], r[key]) for r in rows if key in r]  # noqa: E731
    assert [s for s, _ in losses(full, "loss")] == list(range(1, 151))
    assert losses(resumed, "loss") == losses(full, "loss"), seed  # exact on CPU fp32, every step
    assert losses(resumed, "val_loss") == losses(full, "val_loss"), seed

"""The GPU check's scripts, run here on the CPU so they cannot rot between GPU loans:
scripts/gpu_check.sh refuses a machine without CUDA in one line, and with GPU_CHECK_SMOKE=1 runs
its whole path, benchmarks/bench_gpu.py --smoke filling every row of its table on a tiny model;
benchmarks/bench_memory.py (slow) runs its three modes on 2 ranks. Their figures are measurements;
what is asserted are the invariants they rest on (the modes train the same model) and that every
row is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# "CUDA" in the reason: a skip that CI allows (tests/conftest.py); CI has no GPU, so there it runs
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA: with CUDA the script would run")
def test_gpu_check_refuses_a_machine_without_cuda_in_one_line():
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine"
    ]
    assert done.stdout == ""


def test_gpu_check_smoke_runs_the_gpu_tests_and_fills_every_row_of_the_table(tmp_path):
    """GPU_CHECK_SMOKE=1: the script's whole path on the CPU (pytest -m gpu skips its tests here),
    with bench_gpu.py --smoke's table: every row there, and its modes train the same model."""
    pytest.importorskip("transformers")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path),
             "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "skipped" in done.stdout  # the GPU tests ran (and skipped: no CUDA here)
    out = tmp_path / "gpu_check.json"
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if "error" in r], rows
    trainer = [rows[f"pretrain seed-253m, eager{ac}"] for ac in ("", ", AC full", ", AC selective")]
    parallel = [rows[f"{kind} on one cpu (1-rank group, eager)"] for kind in ("ddp", "fsdp")]
    sides = ("modernlm", "modernlm compiled", "serve engine", "serve engine compiled", "transformers")
    decode = [rows[f"decode {side}, batch {b}"] for side in sides for b in (1, 16)]
    # activation checkpointing recomputes the same activations: the same losses, to the last bit
    assert trainer[0]["loss"] == trainer[1]["loss"] == trainer[2]["loss"]
    # FSDP over a 1-rank group is the DDP model's training, fp32 on both sides
    assert parallel[0]["loss"] == pytest.approx(parallel[1]["loss"], rel=1e-5)
    assert all(r["tok_per_s"] > 0 for r in trainer + parallel + decode)
    assert "flash" in result["info"]["attention"]  # CPU SDPA runs its flash kernel on the causal mask
    assert "| decode modernlm, batch 16 |" in done.stdout and "| measurement | tok/s | MFU |" in done.stdout


@pytest.mark.slow
def test_bench_memory_runs_ddp_fsdp_and_fsdp_ac_on_two_ranks_to_the_same_losses(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--steps", "2", "--shapes", "1x64",
         "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    by_mode = {r["mode"]: r for r in result["results"]}
    assert set(by_mode) == {"ddp", "fsdp", "fsdp+ac"}
    losses = [by_mode[m]["loss"] for m in ("ddp", "fsdp", "fsdp+ac")]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)

    def training_bytes(mode: str) -> int:
        return max(rank["train_peak"] - rank["base"] for rank in by_mode[mode]["ranks"])

    # at one 64-token sequence per rank the weights and optimizer state are the memory: sharding
    # them over 2 ranks must show (measured: ~24 vs ~29 bytes a parameter)
    assert training_bytes("fsdp") < 0.95 * training_bytes("ddp"), {m: training_bytes(m) for m in by_mode}

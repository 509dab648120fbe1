"""DDP: 2 CPU processes under torchrun (gloo) follow the same loss curve as 1 process at the same
global batch, because rank r reads the r-th slice of the same global batch (see batches.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from modernlm.data.corpus import write_shards
from modernlm.train.tracking import read_metrics

pytestmark = pytest.mark.slow


def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 64, 41)
    train = np.tile(base, 100)
    train[rng.random(len(train)) < 0.1] = 7
    shards = write_shards(
        tmp_path / "shards", {"train": train, "val": np.tile(base, 5)}, vocab_size=64
    )
    common = [
        f"data.path={shards}",
        "data.seq_len=32",
        "model.vocab_size=64",
        "model.d_model=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.max_seq_len=32",
        f"run.out_dir={tmp_path}",
        "run.device=cpu",
        "train.progress=false",
        "train.num_steps=8",
        "train.log_every=1",
        "train.eval_every=4",
        "train.save_every=4",
        "train.eval_batches=2",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "modernlm",
            "pretrain",
            *common,
            "train.batch_size=4",
            "run.name=one",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "modernlm",
            "pretrain",
            *common,
            "train.batch_size=2",
            "run.name=two",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    loss = lambda recs, k: [(r["step"], r[k]) for r in recs if k in r]  # noqa: E731
    for key in ("loss", "val_loss", "grad_norm"):
        a, b = loss(one, key), loss(two, key)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 3
        np.testing.assert_allclose(
            [v for _, v in a], [v for _, v in b], rtol=1e-5, atol=1e-6, err_msg=key
        )
    assert [r["tokens"] for r in one if "loss" in r] == [r["tokens"] for r in two if "loss" in r]
    # rank 0 alone wrote the run directory, and its checkpoints resume
    assert (tmp_path / "two" / "checkpoints" / "step_0000008" / "train_state.pt").is_file()

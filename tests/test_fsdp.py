"""train.parallel=fsdp in one process (fast): the same training as ddp, distributed checkpoints that
either mode resumes, one-line errors for what FSDP does not support. Two ranks under torchrun:
tests/integration/test_fsdp.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.train.optim import OptimConfig
from modernlm.train.tracking import read_metrics
from tests.conftest import tiny_config
from tests.test_trainer import data, make_trainer, reader  # noqa: F401 (data: a fixture)


def model():
    torch.manual_seed(0)
    return ModernDecoderLM(tiny_config(n_expert=4, attn_sink=True))


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_fsdp_in_one_process_trains_as_ddp_and_resumes_either_way(tmp_path, data):  # noqa: F811
    make_trainer(model(), tmp_path / "ddp", reader(data), num_steps=6).train()
    make_trainer(model(), tmp_path / "fsdp", reader(data), num_steps=6, save_every=3, parallel="fsdp").train()
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=1e-6)
    step3 = tmp_path / "fsdp" / "checkpoints" / "step_0000003"
    assert (step3 / "distributed" / ".metadata").is_file() and (step3 / "model.safetensors").is_file()

    for mode in ("fsdp", "ddp"):  # the distributed checkpoint resumes under either mode
        resumed = make_trainer(
            model(), tmp_path / mode / "again", reader(data), num_steps=6, parallel=mode, resume_from=str(step3)
        )
        resumed.train()
        assert losses(tmp_path / mode / "again") == losses(tmp_path / "fsdp")[3:], mode


def test_fsdp_refuses_a_ddp_checkpoint_muon_and_cleans_a_killed_save(tmp_path, data):  # noqa: F811
    make_trainer(model(), tmp_path / "ddp", reader(data), num_steps=2).train()
    ckpt = tmp_path / "ddp" / "checkpoints" / "step_0000002"
    with pytest.raises(UserError, match=r"^train.parallel=fsdp: cannot resume .* train.parallel=ddp$"):
        make_trainer(model(), tmp_path / "x", reader(data), parallel="fsdp", resume_from=str(ckpt)).train()
    with pytest.raises(UserError, match=r"^train.parallel=fsdp: optim.name=muon"):
        make_trainer(model(), tmp_path / "y", reader(data), parallel="fsdp", optim=OptimConfig(name="muon"))

    # what a kill -9 mid-save leaves (shards not yet moved into a step directory) is removed on resume
    run = tmp_path / "fsdp"
    make_trainer(model(), run, reader(data), num_steps=2, parallel="fsdp").train()
    dead = 2**22 + 12345  # above the default pid_max: no such process
    assert not os.path.exists(f"/proc/{dead}")
    leftover = run / "checkpoints" / f".step_0000004.shards.tmp-{dead}"
    leftover.mkdir()
    trainer = make_trainer(model(), run, reader(data), num_steps=3, parallel="fsdp")
    assert trainer.maybe_resume() == 2 and not leftover.exists()


def test_parallel_is_checked_by_the_config_loader():
    from modernlm.config import from_dict
    from modernlm.train.trainer import TrainingConfig

    assert TrainingConfig().parallel == "ddp"
    with pytest.raises(UserError, match="parallel"):
        from_dict(TrainingConfig, {"parallel": "zero3"})


def test_torch_without_fully_shard_is_a_one_line_error(monkeypatch):
    import torch.distributed.fsdp

    from modernlm.train.fsdp import fsdp_api

    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")  # as on torch < 2.6
    with pytest.raises(UserError, match=r"^train.parallel=fsdp needs torch >= 2.6 .*train.parallel=ddp$"):
        fsdp_api()

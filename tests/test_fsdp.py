"""train.parallel=fsdp in one process (fast): the same training as ddp, distributed checkpoints that
either mode resumes, one-line errors for what FSDP does not support and for shards that do not fit
the run (other load errors keep their traceback). Two ranks under torchrun: tests/integration/test_fsdp.py."""

from __future__ import annotations

import errno
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


def saved_shards(tmp_path):
    """A checkpoint's distributed/ (one process: the model unsharded, the format the same)."""
    from modernlm.train.fsdp import save_sharded

    m = model()
    optimizer = torch.optim.AdamW(m.parameters())
    m(torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    optimizer.step()  # with its state, as in a run's checkpoint
    save_sharded(m, optimizer, tmp_path / "ckpt" / "distributed")
    return tmp_path / "ckpt" / "distributed"


def test_shards_that_do_not_fit_are_one_line_naming_the_checkpoint_and_the_mismatch(tmp_path):
    from torch.distributed.checkpoint import CheckpointException

    from modernlm.train.fsdp import load_sharded

    path = saved_shards(tmp_path)
    fits = f"^cannot resume from {tmp_path / 'ckpt'}: its distributed/ does not fit this run "
    other_shapes = ModernDecoderLM(tiny_config(n_expert=4, attn_sink=True, d_model=64))
    other_keys = ModernDecoderLM(tiny_config())  # dense: no router
    for m, why in [
        (other_shapes, r"\(Size mismatch between saved torch.Size\(\[32\]\) and current: torch.Size\(\[64\]\) .*\)$"),
        (other_keys, r"\(Missing key in checkpoint state_dict: model\..*\)$"),
    ]:
        with pytest.raises(UserError, match=fits + why) as e:
            load_sharded(m, torch.optim.AdamW(m.parameters()), path)
        assert isinstance(e.value.__cause__, CheckpointException)  # the cause is kept
        assert "\n" not in str(e.value)
    (path / "__0_0.distcp").unlink()  # a shard file missing
    m = model()
    with pytest.raises(UserError, match=fits + r"\(\[Errno 2\] No such file or directory: .*__0_0.distcp'\)$"):
        load_sharded(m, torch.optim.AdamW(m.parameters()), path)
    (path / ".metadata").unlink()
    with pytest.raises(
        UserError, match=r"^cannot resume from .*: distributed/.metadata is missing \(an incomplete checkpoint\)$"
    ):
        load_sharded(m, torch.optim.AdamW(m.parameters()), path)


DCP = "torch.distributed.checkpoint"


@pytest.mark.parametrize(
    "where, error",
    [
        (f"{DCP}.load", OSError(errno.EIO, "Input/output error")),
        (f"{DCP}.filesystem.FileSystemReader.read_data", OSError(errno.EIO, "Input/output error")),
        (f"{DCP}.default_planner.DefaultLoadPlanner.create_local_plan", RuntimeError("a bug")),
    ],
    ids=["io-error", "io-error-in-dcp-reader", "bug-in-dcp-planner"],
)
def test_other_load_errors_are_not_turned_into_does_not_fit(tmp_path, monkeypatch, where, error):
    """An I/O error or a bug is no user mistake: it propagates with its traceback, as raised or in
    the CheckpointException DCP wraps the errors raised within it in."""
    from torch.distributed.checkpoint import CheckpointException

    from modernlm.train.fsdp import load_sharded

    def fail(*args, **kwargs):
        raise error

    path = saved_shards(tmp_path)
    monkeypatch.setattr(where, fail)
    m = model()
    with pytest.raises(BaseException) as e:  # (CheckpointException is not an Exception)
        load_sharded(m, torch.optim.AdamW(m.parameters()), path)
    wrapped = isinstance(e.value, CheckpointException)
    assert wrapped == (where != f"{DCP}.load")
    assert ([x for x, _ in e.value.failures.values()] if wrapped else [e.value]) == [error]

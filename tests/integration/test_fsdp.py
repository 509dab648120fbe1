"""FSDP2 (train.parallel=fsdp): 2 CPU processes under torchrun (gloo).

- the loss curve is DDP's and one process's at the same global batch (dense, and MoE + sink);
- with gradient accumulation too;
- its sharded checkpoints resume on another number of ranks (2 -> 1, 1 -> 2; the 1-rank side in one
  process and sharded on a 1-rank process group) with the uninterrupted run's losses;
- a checkpoint whose shards do not fit the run is one line and exit code 2 on every rank, no hang;
- its exported model.safetensors loads with the normal loader and gives the sharded model's logits;
- SIGTERM on 2 ranks writes one consistent checkpoint, and the rerun resumes exactly.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modernlm.train.tracking import read_metrics
from tests.test_interrupt import TINY, check_interrupted, logged_steps, losses, make_shards, saved_steps

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The load-balancing loss is a product of per-batch statistics: each rank's half of the batch gives
# another value than the whole batch in one process, so runs over other numbers of ranks match only
# without it (DDP and FSDP on 2 ranks match with it: checked below).
MOE_SINK = ["model.n_expert=4", "model.n_expert_per_token=2", "model.attn_sink=true", "model.moe_aux_loss_coef=0"]


def common(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", "data.seq_len=32", *TINY, f"run.out_dir={out}", "run.device=cpu",
        "train.progress=false", "train.num_steps=8", "train.log_every=1", "train.eval_every=4",
        "train.save_every=4", "train.eval_batches=2", "optim.lr=1e-2", "optim.warmup_steps=2", *extra,
    ]  # fmt: skip


def one(*args: str) -> list[str]:
    """`modernlm` in one process, at the global batch of 4."""
    return [sys.executable, "-m", "modernlm", *args, "train.batch_size=4"]


def two(*args: str) -> list[str]:
    """`modernlm` on 2 ranks under torchrun, 2 sequences each: the same global batch."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "modernlm",
            *args, "train.batch_size=2"]  # fmt: skip


# torchrun with one process joins no process group (runtime.py), so FSDP would not shard: this
# joins one first, as benchmarks/bench_gpu.py does, and says whether the model came out sharded.
ONE_RANK_SHARDED = """
import sys
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
import modernlm.train.fsdp as fsdp
from modernlm.cli import main

dist.init_process_group("gloo")
shard_model = fsdp.shard_model

def shard_and_say(model, *args, **kwargs):
    model = shard_model(model, *args, **kwargs)
    print(f"sharded on {dist.get_world_size()} rank: {isinstance(model, FSDPModule)}", flush=True)
    return model

fsdp.shard_model = shard_and_say
try:
    main(sys.argv[1:])
finally:
    dist.destroy_process_group()
"""


def run_ok(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


def assert_same_curves(a: Path, b: Path, keys=("loss", "val_loss", "grad_norm"), from_step=-1, least=3) -> None:
    for key in keys:
        ca, cb = ([(s, v) for s, v in curve(d, key) if s > from_step] for d in (a, b))
        assert [s for s, _ in ca] == [s for s, _ in cb] and len(ca) >= least, (key, ca, cb)
        np.testing.assert_allclose([v for _, v in ca], [v for _, v in cb], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("fsdp") / "shards")


@pytest.fixture(scope="module")
def one_sharded(tmp_path_factory):
    """Like `one`, sharded on 1 rank under torchrun (ONE_RANK_SHARDED)."""
    worker = tmp_path_factory.mktemp("worker") / "one_rank_sharded.py"
    worker.write_text(ONE_RANK_SHARDED)

    def cmd(*args: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(worker),
                *args, "train.batch_size=4"]  # fmt: skip

    return cmd


@pytest.mark.parametrize("model", [[], MOE_SINK], ids=["dense", "moe-sink"])
def test_fsdp_matches_ddp_and_one_process_at_the_same_global_batch(shards, tmp_path, model):
    args = ["pretrain", *common(shards, tmp_path, *model)]
    run_ok(one(*args, "run.name=one"))
    run_ok(two(*args, "run.name=ddp"))
    run_ok(two(*args, "run.name=fsdp", "train.parallel=fsdp"))
    assert len(curve(tmp_path / "one", "loss")) == 8
    assert_same_curves(tmp_path / "one", tmp_path / "fsdp")
    assert_same_curves(tmp_path / "ddp", tmp_path / "fsdp")
    if model:  # with the load-balancing loss: FSDP is still DDP on the same ranks
        aux = [*args, "model.moe_aux_loss_coef=0.01"]
        run_ok(two(*aux, "run.name=ddp-aux"))
        run_ok(two(*aux, "run.name=fsdp-aux", "train.parallel=fsdp"))
        assert_same_curves(tmp_path / "ddp-aux", tmp_path / "fsdp-aux")
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_0000008"
    # each rank wrote its own shards; the usual model files beside them
    assert sorted(p.name for p in (ckpt / "distributed").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    # the export (and best/, gathered the same way) is what every other command reads
    from modernlm.checkpoint import load_model, load_state_dict

    for d in (ckpt, ckpt.parent / "best"):
        assert load_model(d).num_params() > 0
    ddp = load_state_dict(tmp_path / "ddp" / "checkpoints" / "step_0000008")
    fsdp = load_state_dict(ckpt)
    assert sorted(fsdp) == sorted(ddp)
    for k, v in fsdp.items():  # DDP's weights, gathered from the shards
        np.testing.assert_allclose(v.numpy(), ddp[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_fsdp_with_gradient_accumulation_matches_ddp_and_one_process(shards, tmp_path):
    """2 micro-batches a step: FSDP reduce-scatters only on the last one, DDP all-reduces there."""
    args = ["pretrain", *common(shards, tmp_path), "train.grad_accum_steps=2"]
    run_ok(one(*args, "run.name=one"))
    run_ok(two(*args, "run.name=ddp"))
    run_ok(two(*args, "run.name=fsdp", "train.parallel=fsdp"))
    assert_same_curves(tmp_path / "one", tmp_path / "fsdp")
    assert_same_curves(tmp_path / "ddp", tmp_path / "fsdp")


@pytest.mark.parametrize("ranks", ["2to1", "1to2"])
def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(shards, tmp_path, one_sharded, ranks):
    """The 1-rank side both in one process (unsharded) and sharded on a 1-rank process group."""
    sharded = "sharded on 1 rank: True"
    args = ["pretrain", *common(shards, tmp_path, *MOE_SINK, "train.eval_every=2"), "train.parallel=fsdp"]
    firsts, thens = ([two], [one, one_sharded]) if ranks == "2to1" else ([one, one_sharded], [two])
    for i, first in enumerate(firsts):
        out = run_ok(first(*args, f"run.name=full{i}"))
        assert (sharded in out) == (first is one_sharded), out
    if len(firsts) == 2:  # FSDP on 1 rank is the one process
        assert_same_curves(tmp_path / "full0", tmp_path / "full1")
    for i, (j, then) in itertools.product(range(len(firsts)), enumerate(thens)):
        step4, name = tmp_path / f"full{i}" / "checkpoints" / "step_0000004", f"resumed{i}{j}"
        out = run_ok(then(*args, f"run.name={name}", f"train.resume_from={step4}"))
        assert f"resumed from {step4} at step 4" in out and (sharded in out) == (then is one_sharded), out
        assert [s for s, _ in curve(tmp_path / name, "loss")] == [5, 6, 7, 8]
        # the validation loss too: the resharded weights are the whole model's (at steps 6 and 8)
        assert_same_curves(tmp_path / f"full{i}", tmp_path / name, from_step=4, least=2)


def by_hand(cmds: list[list[str]], timeout: float = 120) -> tuple[list[int], list[list[str]]]:
    """cmds[r] run as rank r, started by hand: torchrun would stop the other ranks at the first
    exit, hiding a rank left waiting (a timeout here) and their exit codes. Exit codes, stderr lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "WORLD_SIZE": str(len(cmds)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for r, cmd in enumerate(cmds)
    ]  # fmt: skip
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], [err.strip().splitlines() for err in errs]


def test_fsdp_resume_from_shards_that_do_not_fit_is_one_line_on_every_rank(shards, tmp_path):
    """The run's config.json, another model's shards (another d_model): exit code 2 and the same
    one line on each of 2 ranks, naming the checkpoint and the mismatch; no traceback, no hang."""
    import torch

    from modernlm.model import ModernDecoderLM
    from modernlm.train.fsdp import save_sharded
    from tests.conftest import tiny_config

    args = ["pretrain", *common(shards, tmp_path, "train.num_steps=1"), "train.parallel=fsdp"]
    run_ok(one(*args, "run.name=a"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000001"
    shutil.rmtree(ckpt / "distributed")
    other = ModernDecoderLM(tiny_config(d_model=64))
    save_sharded(other, torch.optim.AdamW(other.parameters()), ckpt / "distributed")

    def resume(*ckpts: Path) -> tuple[list[int], list[list[str]]]:  # rank r from ckpts[r]
        return by_hand([[sys.executable, "-m", "modernlm", *args, "run.name=b", f"train.resume_from={c}",
                         "train.batch_size=2"] for c in ckpts])  # fmt: skip

    error = "modernlm pretrain: error: cannot resume from"
    line = (
        f"{error} {ckpt}: its distributed/ does not fit this run (Size mismatch between saved "
        "torch.Size([64, 64]) and current: torch.Size([64, 32]) for model.tok_emb.weight)"
    )
    assert resume(ckpt, ckpt) == ([2, 2], [[line], [line]])
    # rank 1 sees a copy without .metadata (as on a node without the file): both stop, neither waits
    bare = shutil.copytree(ckpt, tmp_path / "bare")
    (bare / "distributed" / ".metadata").unlink()
    missing = "distributed/.metadata is missing on rank 1 (an incomplete checkpoint)"
    assert resume(ckpt, bare) == ([2, 2], [[f"{error} {ckpt}: {missing}"], [f"{error} {bare}: {missing}"]])


def test_fsdp_with_compile_and_activation_checkpointing_follows_the_same_curve(shards, tmp_path):
    """Blocks recompute (AC), are compiled one by one, then sharded: the eager one-process curve."""
    args = ["pretrain", *common(shards, tmp_path)]
    run_ok(one(*args, "run.name=one"))
    run_ok(
        two(*args, "run.name=fsdp", "train.parallel=fsdp", "run.compile=true", "train.activation_checkpointing=full")
    )
    for key in ("loss", "val_loss", "grad_norm"):  # compiled kernels round differently: a looser rtol
        a, b = curve(tmp_path / "one", key), curve(tmp_path / "fsdp", key)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 3, key
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-4, err_msg=key)


LOGITS_WORKER = """
import sys, torch
from modernlm.model import ModelConfig, ModernDecoderLM
from modernlm.runtime import RunConfig, cleanup, setup_runtime
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import Trainer, TrainingConfig

out = sys.argv[1]
rt = setup_runtime(RunConfig(device="cpu", seed=0))
cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=32, n_expert=4, attn_sink=True,
                  tie_embeddings=False)
model = ModernDecoderLM(cfg)
gen = torch.Generator().manual_seed(1)

class Batches:
    def __next__(self):
        return torch.randint(0, 64, (2, 17), generator=gen)
    def state_dict(self):
        return {}
    def load_state_dict(self, state):
        pass

def loss_fn(m, batch):
    logits = m(batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    return loss, batch[:, 1:].numel(), {}

tcfg = TrainingConfig(num_steps=3, log_every=1, save_every=3, progress=False, parallel="fsdp", eval_at_start=False)
trainer = Trainer(model, loss_fn, Batches(), tcfg, OptimConfig(lr=1e-2, warmup_steps=1), rt, out)
trainer.train()
idx = torch.arange(24).remainder(64).view(2, 12)
with torch.no_grad():
    logits = trainer.model(idx).logits
if rt.is_main:
    torch.save({"idx": idx, "logits": logits}, out + "/logits.pt")
cleanup(rt)
"""


def test_fsdp_export_loads_with_the_normal_loader_and_gives_the_sharded_logits(tmp_path):
    import torch

    from modernlm.checkpoint import load_model

    worker = tmp_path / "worker.py"
    worker.write_text(LOGITS_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    run_ok([*cmd, str(tmp_path / "run")])
    ref = torch.load(tmp_path / "run" / "logits.pt", weights_only=True)
    model = load_model(tmp_path / "run" / "checkpoints" / "step_0000003").eval()
    with torch.no_grad():
        logits = model(ref["idx"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
    # the step's trained weights, not the initial ones
    assert (tmp_path / "run" / "checkpoints" / "step_0000003" / "distributed" / ".metadata").is_file()


def test_fsdp_sigterm_on_two_ranks_gives_one_checkpoint_and_an_exact_resume(shards, tmp_path):
    from tests.integration.test_interrupt import run_and_signal

    # with dropout: each rank's RNG is carried in the checkpoint, so the resume is exact all the same
    extra = ["train.num_steps=40", "train.eval_every=20", "train.save_every=1000", "model.dropout=0.1"]
    args = ["pretrain", *common(shards, tmp_path, *extra), "train.parallel=fsdp"]
    run_ok(two(*args, "run.name=full"))
    full = losses(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, 41))

    k, sig = random.randint(3, 20), signal.SIGTERM
    run_dir = tmp_path / "stopped"
    code, err = run_and_signal(two(*args, "run.name=stopped"), run_dir, k, sig)
    assert code != 0, err[-3000:]  # torchrun reports its workers' 143 as a failure
    stopped_at = logged_steps(run_dir)[-1]
    assert stopped_at < 40, err[-3000:]
    check_interrupted(run_dir, stopped_at, k, err, sig, ranks=2)
    ckpt = run_dir / "checkpoints" / f"step_{stopped_at:07d}"
    assert sorted(p.name for p in (ckpt / "distributed").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    out = run_ok(two(*args, "run.name=stopped"))
    assert f"at step {stopped_at}" in out
    assert losses(run_dir) == full, f"k={k}, stopped at {stopped_at}"
    assert saved_steps(run_dir)[-1] == 40


def test_fsdp_validates_when_ranks_have_different_numbers_of_val_batches(tmp_path):
    """5 validation windows: rank 0 scores 2 batches, rank 1 one. Each FSDP forward all-gathers
    the weights, so rank 1 must run one more (discarded) forward: it used to hang. val_loss is
    one process's."""
    from modernlm.data.corpus import write_shards

    rng = np.random.default_rng(0)
    val = rng.integers(0, 64, 5 * 32 + 1)
    shards = write_shards(tmp_path / "shards", {"train": np.tile(val, 20), "val": val}, vocab_size=64)
    args = ["pretrain", *common(shards, tmp_path, "train.num_steps=2", "train.eval_every=0", "train.eval_batches=0")]
    run_ok(one(*args, "run.name=one"))
    run_ok(two(*args, "run.name=fsdp", "train.parallel=fsdp"))
    assert_same_curves(tmp_path / "one", tmp_path / "fsdp", keys=("loss", "val_loss"), least=2)


def test_sft_and_dpo_with_one_held_out_example_on_two_ranks_match_one_process(tmp_path):
    """One held-out example: rank 1 has no validation batch, yet both ranks must evaluate (they
    used to disagree and hang, DDP too); under FSDP rank 1 pads with rank 0's batch, and the
    held-out replies and the training samples (SFT) and pair scores (DPO) run on every rank (rank 0
    alone hung or crashed; FSDP had no samples).
    Everything logged and reported is one process's at the same global batch, DPO's training
    metrics included (they were rank 0's share)."""
    import json

    from tests.test_verifier import chat_checkpoint

    chat = chat_checkpoint(tmp_path / "chat")
    words = ("cat", "dog", "sun", "sky", "sea")
    (tmp_path / "sft.json").write_text(json.dumps([{"instruction": f"Echo {w}.", "input": "", "output": w}
                                                   for w in words * 4]))  # fmt: skip
    pairs = [{"prompt": f"Say {w}.", "chosen": w, "rejected": f"not {w} {i}"} for i, w in enumerate(words * 4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    common_args = [
        f"run.out_dir={tmp_path}", "run.device=cpu", "train.progress=false", "train.num_steps=2", "train.log_every=1",
        "train.eval_every=1", "train.save_every=1000", "eval.max_examples=1",
    ]  # fmt: skip
    stages = {
        "sft": [str(chat), f"data.path={tmp_path / 'sft.json'}", "data.max_length=48", "eval.val_fraction=0.1",
                "eval.generate=2", "eval.max_new_tokens=6", "optim.lr=5e-3", "train.sample_every=2",
                "train.sample_prompts=[Echo]", "train.sample_tokens=6"],
        "dpo": [str(chat), f"data.path={tmp_path / 'pairs.jsonl'}", "data.max_length=48", "eval.val_fraction=0.1",
                "optim.lr=1e-3"],
    }  # fmt: skip
    for stage, args in stages.items():
        args = [stage, *args, *common_args]
        run_ok(one(*args, f"run.name={stage}-one"))
        for parallel in ("ddp", "fsdp"):
            run_ok(two(*args, f"run.name={stage}-{parallel}", f"train.parallel={parallel}"))
            a, b = tmp_path / f"{stage}-one", tmp_path / f"{stage}-{parallel}"
            keys = ["loss", "val_loss", "grad_norm"]
            if stage == "dpo":
                keys += ["logps/chosen", "rewards/margins", "val_logps/chosen"]
            assert_same_curves(a, b, keys=keys, least=2)
            reports = [json.loads((d / "eval.json").read_text()) for d in (a, b)]
            assert reports[0]["n_val"] == 1 and reports[0].keys() == reports[1].keys()
            if stage == "sft":
                assert reports[0]["n_generated"] == 1
                assert (b / "samples.md").read_text() == (a / "samples.md").read_text()
            else:
                for when in ("before", "after"):
                    for k, v in reports[0][when].items():
                        assert reports[1][when][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (when, k)

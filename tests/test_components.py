"""train/components.py and the trainer's hooks: who decides when (log, eval, save, sample, stop), and
the throughput line's counts (input tokens without padding, examples), checked against hand counts."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from modernlm.align.dpo import collate_pairs, pair_batch_counts
from modernlm.align.sft import collate_sft, pack_examples, sft_batch_counts, sft_loss
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.runtime import Runtime
from modernlm.train.checkpointer import Checkpointer
from modernlm.train.components import StopSignals, TimeBudget, TrainLog, Validator
from modernlm.train.losses import lm_batch_counts, lm_loss
from modernlm.train.optim import OptimConfig
from modernlm.train.tracking import format_line, read_metrics
from modernlm.train.trainer import Trainer, TrainingConfig
from tests.conftest import tiny_config
from tests.test_trainer import on_fake_clock

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, tensorboard=False)


# ---- decisions at step boundaries ------------------------------------------------------------


def test_should_log_on_step_one_every_n_and_the_last(tmp_path):
    log = TrainLog(tmp_path, CPU, num_steps=10, log_every=4, progress=False)
    logged = [s for s in range(1, 11) if log.should_log(s, last=s == 10)]
    assert logged == [1, 4, 8, 10]
    assert log.should_log(7, last=True)  # a time budget's last step is logged too
    log.close({})


def test_should_eval_every_n_the_last_and_at_start():
    v = Validator(sft_loss, [object()], CPU, every=5)
    assert [s for s in range(1, 13) if v.should_eval(s, last=s == 12)] == [5, 10, 12]
    assert v.should_eval_first(0) and not v.should_eval_first(3)  # a resumed run has its baseline
    only_last = Validator(sft_loss, [object()], CPU, every=0, at_start=False)
    assert [s for s in range(1, 13) if only_last.should_eval(s, last=s == 12)] == [12]
    assert not only_last.should_eval_first(0)
    none = Validator(sft_loss, None, CPU, every=1)
    assert not any(none.should_eval(s, last=True) for s in range(1, 4)) and not none.should_eval_first(0)
    assert Validator(sft_loss, ["a"], CPU, final_batches=["b"]).final_batches == ["b"]
    assert Validator(sft_loss, ["a"], CPU).final_batches == ["a"]


def test_evaluate_calls_a_compiled_forward():
    """run.compile hands evaluate a torch.compile'd module: its bool() is len(), a TypeError."""
    model = ModernDecoderLM(tiny_config())
    x = torch.randint(0, 64, (2, 8))
    v = Validator(lm_loss, [(x, x)], CPU)
    compiled = torch.compile(model, backend="eager")
    assert v.evaluate(model, forward=compiled)["val_loss"] == pytest.approx(v.evaluate(model)["val_loss"])


def test_evaluate_packs_the_metric_names_of_every_rank(monkeypatch):
    """Rank 1 of 2 without a validation batch: its loss_fn never ran, so it knows no metric name,
    yet it must all-reduce as many values as rank 0 (names agreed, its values zeros)."""
    import torch.distributed as dist

    def accuracy_fn(model, batch):
        return torch.tensor(1.0), 2, {"accuracy": 0.5}

    rank1 = Runtime(device=torch.device("cpu"), dtype=torch.float32, rank=1, world_size=2, tensorboard=False)
    reduced = []

    def gather(out, names):  # rank 0 scored a batch and has the name
        out[:] = [["accuracy"], names]

    def all_reduce(t):  # rank 0's sums join this rank's
        reduced.append(t.tolist())
        t += torch.tensor([1.0, 2.0, 1.0], dtype=t.dtype)

    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    result = Validator(accuracy_fn, [], rank1, perplexity=False).evaluate(torch.nn.Linear(1, 1))
    assert reduced == [[0.0, 0.0, 0.0]]
    assert result == {"val_loss": 0.5, "val_accuracy": 0.5}


def test_should_save_every_n_and_the_last(tmp_path):
    def ckpt(save_every):
        return Checkpointer(tmp_path, CPU, save_model_fn=None, load_model_fn=None, save_every=save_every)

    assert [s for s in range(1, 11) if ckpt(3).should_save(s, last=s == 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if ckpt(0).should_save(s, last=s == 10)] == [10]
    assert ckpt(3).step_dir(42) == tmp_path / "checkpoints" / "step_0000042"


def test_best_checkpoint_follows_the_lowest_validation_loss(tmp_path):
    saved = []

    def save(model, path, tokenizer):
        path.mkdir(parents=True)
        saved.append(path)

    c = Checkpointer(tmp_path, CPU, save_model_fn=save, load_model_fn=None)
    model = torch.nn.Linear(2, 2)
    assert c.update_best(2, model, 3.0) and c.update_best(4, model, 2.5)
    assert not c.update_best(6, model, 2.7) and not c.update_best(8, model, float("nan"))
    assert c.best_val_loss == 2.5 and len(saved) == 2
    assert json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text()) == {"step": 4, "val_loss": 2.5}
    off = Checkpointer(tmp_path / "off", CPU, save_model_fn=save, load_model_fn=None, save_best=False)
    assert off.update_best(1, model, 1.0) and off.best_val_loss == 1.0 and len(saved) == 2  # tracked, not saved


def test_time_budget_takes_a_step_unless_it_would_end_mostly_past_the_budget():
    now = [0.0]
    b = TimeBudget(10.0, lambda: now[0], elapsed_before=4.0, agree=lambda v: v)
    assert b.next_step_end() == 4.0 and not b.spent(b.next_step_end()) and not b.out_of_time()
    now[0] = 2.0
    b.step_done(2.0)  # 6 s spent, a step takes 2 s: the next ends at 8
    assert b.elapsed() == 6.0 and b.next_step_end() == 8.0 and not b.out_of_time()
    now[0] = 4.0
    b.step_done(2.0)  # 8 s: the next would end at 10 = the budget, within half a step: take it
    assert not b.out_of_time()
    now[0] = 5.2  # 9.2 s: the next would end at 11.2 >= 10 + 1
    assert b.out_of_time()
    assert not TimeBudget(0.0, lambda: 99.0, 0.0, lambda v: v).out_of_time()  # no budget


def test_stop_signals_agree_and_restore_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    s = StopSignals(CPU)
    with s:
        assert signal.getsignal(signal.SIGTERM) == s._on_signal
        assert s.stop_requested() == 0
        s._on_signal(signal.SIGTERM, None)
        assert s.received == signal.SIGTERM and s.stop_requested() == signal.SIGTERM  # one process: at once
        s.agree_flags(torch.tensor([1.0, 3.0]))  # any rank's SIGINT wins over SIGTERMs
        assert s.agreed == signal.SIGINT
        s.agree_flags(torch.tensor([0.0, 0.0]))
        assert s.agreed == 0
        assert s.flags(torch.device("cpu"), torch.float32).tolist() == [0.0, 1.0]
    assert signal.getsignal(signal.SIGTERM) is previous
    ddp = StopSignals(Runtime(device=torch.device("cpu"), dtype=torch.float32, world_size=2))
    ddp.received = signal.SIGINT
    assert ddp.stop_requested() == 0  # under DDP only what every rank agreed stops the loop
    ddp.agreed = signal.SIGINT
    assert ddp.stop_requested() == signal.SIGINT


# ---- batch counts ----------------------------------------------------------------------------


def test_batch_counts_exclude_padding_even_when_the_pad_id_is_a_real_token():
    # pad id 3 is also the rows' last (real) token: counting != pad would be wrong
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
            {"input_ids": [4, 5, 6, 7, 3], "labels": [-100] * 4 + [3]}]  # fmt: skip
    assert sft_batch_counts(collate_sft(rows, pad_id=3)) == (8, 2)
    packed = pack_examples(rows + [{"input_ids": [9, 3], "labels": [9, 3]}], length=6)  # [3 + 2 tokens], [5]
    assert len(packed) == 2 and sft_batch_counts(collate_sft(packed, pad_id=3)) == (10, 3)
    pairs = [{"chosen_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
              "rejected_ids": [1, 3], "rejected_labels": [-100, 3]}]  # fmt: skip
    assert pair_batch_counts(collate_pairs(pairs * 2, pad_id=3)) == (10, 2)  # both replies' rows, per pair
    assert lm_batch_counts((torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long))) == (64, None)


def test_task_batch_counts_for_classification_and_seq2seq():
    from modernlm.data.tasks import collate

    lora = pytest.importorskip("modernlm.hf.lora")
    lengths = (3, 9, 4, 6, 5, 7, 8, 2)
    sentences = [{"input_ids": list(range(n)), "attention_mask": [1] * n, "labels": n % 2} for n in lengths]
    batch = collate(sentences, pad_id=0)
    assert batch["input_ids"].shape == (8, 9)
    assert lora.task_batch_counts("classification")(batch) == (44, 8)  # 8 sentences a step, not 8 tokens
    summaries = [{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": [7] * m} for n, m in ((6, 2), (3, 4))]
    assert lora.task_batch_counts("seq2seq")(collate(summaries, pad_id=0)) == (6 + 3 + 2 + 4, 2)  # + decoder
    assert lora.task_batch_counts("causal")(collate(summaries[:1], pad_id=0)) == (6, 1)


# ---- the throughput line ---------------------------------------------------------------------


class Fixed:
    """The same batch every time, with a position to checkpoint."""

    def __init__(self, batch):
        self.batch, self.n = batch, 0

    def __next__(self):
        self.n += 1
        return self.batch

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def sft_rows():
    # 4 examples of 3, 5, 7 and 2 tokens (17 inputs), padded to 7 with a pad id that is also a real token
    lengths = (3, 5, 7, 2)
    rows = [{"input_ids": [5 + i] * n, "labels": [-100] + [6 + i] * (n - 1)} for i, n in enumerate(lengths)]
    return collate_sft(rows, pad_id=5), sum(lengths), sum(n - 1 for n in lengths)  # batch, inputs, targets


def timed_sft_trainer(run_dir, seconds_per_step=0.5, **kw):
    batch, _, _ = sft_rows()
    torch.manual_seed(0)
    cfg = TrainingConfig(**{"num_steps": 6, "batch_size": 4, "grad_accum_steps": 2, "progress": False,
                            "log_every": 2, "eval_every": 0, "save_every": 0, **kw})  # fmt: skip
    t = Trainer(ModernDecoderLM(tiny_config()), sft_loss, Fixed(batch), cfg, OptimConfig(lr=1e-3), CPU, run_dir,
                batch_counts=sft_batch_counts)  # fmt: skip
    return on_fake_clock(t, seconds_per_step)


def test_throughput_counts_input_tokens_and_examples_not_targets(tmp_path):
    _, inputs, targets = sft_rows()
    t = timed_sft_trainer(tmp_path)
    summary = t.train()
    lines = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(lines) == [1, 2, 4, 6]
    for step, r in lines.items():
        # 2 micro-batches of 4 examples a step; target tokens (labels, shifted) are fewer than inputs
        assert r["input_tokens"] == 2 * inputs * step and r["examples"] == 8 * step
        assert r["tokens"] == 2 * targets * step
    for prev, step in ((0, 1), (1, 2), (2, 4), (4, 6)):  # each line covers the steps since the previous one
        seconds = 0.5 * (step - prev)
        assert lines[step]["tok_per_s"] * seconds == pytest.approx(2 * inputs * (step - prev))
        assert lines[step]["examples_per_s"] * seconds == pytest.approx(8 * (step - prev))
    assert summary["input_tokens_seen"] == 6 * 2 * inputs and summary["examples_seen"] == 48
    assert summary["tokens_seen"] == 6 * 2 * targets
    assert "68 tok/s | 16.0 ex/s" in format_line(6, 6, lines[6])  # 34 tokens, 8 examples per 0.5 s


def test_without_batch_counts_input_tokens_are_the_target_tokens(tmp_path):
    batch, _, targets = sft_rows()
    cfg = TrainingConfig(num_steps=2, batch_size=4, progress=False, log_every=1, eval_every=0, save_every=0)
    t = Trainer(ModernDecoderLM(tiny_config()), sft_loss, Fixed(batch), cfg, OptimConfig(lr=1e-3), CPU, tmp_path)
    out = t.train_step([batch])
    assert out["input_tokens"] == out["tokens"] == targets and out["examples"] is None
    t.train()
    r = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert "examples" not in r and "examples_per_s" not in r and r["input_tokens"] == r["tokens"]


def test_counts_resume_exactly(tmp_path):
    full = timed_sft_trainer(tmp_path / "full", save_every=2)
    full.train()

    class Stop(Exception):
        pass

    part = timed_sft_trainer(tmp_path / "part", save_every=2)
    step = part.train_step

    def stop_at_5(micro_batches):
        if part.step == 4:
            raise Stop
        return step(micro_batches)

    part.train_step = stop_at_5
    with pytest.raises(Stop):
        part.train()
    timed_sft_trainer(tmp_path / "part", save_every=2).train()
    keys = ("step", "tokens", "input_tokens", "examples")
    rows = lambda d: [tuple(r[k] for k in keys) for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert rows(tmp_path / "part") == rows(tmp_path / "full")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", tmp_path / "part"))
    assert (a["input_tokens_seen"], a["examples_seen"]) == (b["input_tokens_seen"], b["examples_seen"])


# ---- the sample hook -------------------------------------------------------------------------


def test_sample_fn_runs_in_eval_mode_on_schedule_and_a_user_error_only_skips(tmp_path):
    batch, _, _ = sft_rows()
    calls = []

    def sample_fn(model, step):
        calls.append((step, model.training))
        if step == 2:
            raise UserError("prompt longer than the context")
        return f"**step {step}**\n"

    cfg = TrainingConfig(num_steps=5, batch_size=4, progress=False, log_every=5, eval_every=0, save_every=0,
                         sample_every=2)  # fmt: skip
    t = Trainer(ModernDecoderLM(tiny_config()), sft_loss, Fixed(batch), cfg, OptimConfig(lr=1e-3), CPU, tmp_path,
                sample_fn=sample_fn)  # fmt: skip
    with pytest.warns(UserWarning, match="sampling skipped: prompt longer"):
        t.train()
    assert calls == [(2, False), (4, False), (5, False)] and t.model.training
    assert (tmp_path / "samples.md").read_text() == "## step 4\n\n**step 4**\n\n## step 5\n\n**step 5**\n\n"


def test_a_sampling_bug_is_not_swallowed(tmp_path):
    batch, _, _ = sft_rows()

    def broken(model, step):
        raise RuntimeError("a bug")

    cfg = TrainingConfig(num_steps=3, batch_size=4, progress=False, eval_every=0, save_every=0, sample_every=1)
    t = Trainer(ModernDecoderLM(tiny_config()), sft_loss, Fixed(batch), cfg, OptimConfig(lr=1e-3), CPU, tmp_path,
                sample_fn=broken)  # fmt: skip
    with pytest.raises(RuntimeError, match="a bug"):
        t.train()

"""trainer.py: accumulation invariance, the non-finite guard, checkpoints and exact resume (in-process)."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch

from modernlm.checkpoint import latest_checkpoint, load_training_state
from modernlm.data.corpus import write_shards
from modernlm.data.shards import TokenStream, TrainWindows, ValBatches
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.runtime import Runtime
from modernlm.train.losses import lm_eval_loss, lm_loss, next_token_loss
from modernlm.train.optim import OptimConfig
from modernlm.train.run import prompt_sampler
from modernlm.train.tracking import read_metrics
from modernlm.train.trainer import Trainer, TrainingConfig
from tests.conftest import tiny_config

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, tensorboard=False)



def make_trainer(
    model, run_dir, batches=None, loss_fn=lm_loss, val=None, optim=None, **train_kw
) -> Trainer:
    kw = dict(num_steps=10, batch_size=2, progress=False, log_every=1, eval_every=0, save_every=0)
    kw.update(train_kw)
    optim = optim or OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1)
    return Trainer(
        model,
        loss_fn,
        batches if batches is not None else iter(()),
        TrainingConfig(**kw),
        optim,
        CPU,
        run_dir,
        val_batches=val,
        eval_loss_fn=lm_eval_loss,
    )


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    # a learnable stream: a repeating random "sentence" of 37 tokens, plus noise
    base = rng.integers(0, 64, 37)
    train = np.tile(base, 60)
    train[rng.random(len(train)) < 0.1] = rng.integers(0, 64)
    val = np.tile(base, 4)
    return write_shards(tmp_path / "shards", {"train": train, "val": val}, vocab_size=64)


def reader(path, seed=0, batch_size=2, seq_len=16):
    return TrainWindows(TokenStream(path, "train"), seq_len, batch_size, seed=seed)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- gradient accumulation ------------------------------------------------------------------


def padded_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 16), generator=g)
    y = torch.randint(0, 64, (4, 16), generator=g)
    # very uneven target counts per row: 4, 16, 11, 1 (padding / prompt tokens carry -100)
    y[0, 4:] = -100
    y[2, 11:] = -100
    y[3, :15] = -100
    return x, y


def accumulate_pair(tmp_path, x, y, dtype):
    """One optimizer step with accumulation 1 x batch 4 and 4 x batch 1 from the same weights;
    returns both models and the gradients each optimizer was handed."""
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config()).to(dtype)
    other = copy.deepcopy(model)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    one = make_trainer(model, tmp_path / "a", grad_accum_steps=1, batch_size=4, optim=optim)
    four = make_trainer(other, tmp_path / "b", grad_accum_steps=4, batch_size=1, optim=optim)
    grads = {}
    for name, t in (("one", one), ("four", four)):
        step = t.optimizer.step

        def capture(name=name, t=t, step=step):  # record the gradient the optimizer is handed
            grads[name] = [p.grad.clone() for p in t.params]
            step()

        t.optimizer.step = capture
    out1 = one.train_step([(x, y)])
    out4 = four.train_step([(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    assert out1["ok"] and out4["ok"]
    assert out1["tokens"] == out4["tokens"] == int((y != -100).sum())
    assert out1["loss"] == pytest.approx(out4["loss"], abs=1e-6)
    return model, other, grads


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_accumulation_4x1_equals_1x4(tmp_path, padded):
    x, y = padded_batch()
    if not padded:
        y = torch.randint(0, 64, (4, 16))
    # float32: the gradients handed to AdamW agree to float rounding.
    _, _, grads = accumulate_pair(tmp_path / "f32", x, y, torch.float32)
    for g1, g4 in zip(grads["one"], grads["four"], strict=True):
        torch.testing.assert_close(g1, g4, atol=1e-7, rtol=1e-5)
    # Parameters after the step, in float64: Adam's first step is g / (|g| + eps), which turns
    # float32 rounding in near-zero gradient entries into update differences of up to ~lr, so the
    # exact-math invariant is checked where rounding is negligible.
    model, other, _ = accumulate_pair(tmp_path / "f64", x, y, torch.float64)
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)

    if padded:
        # The test can tell the difference: a per-micro-batch mean (mean of means) is another loss.
        with torch.no_grad():
            rows = [next_token_loss(model(x[i : i + 1]).logits, y[i : i + 1]) for i in range(4)]
        token_mean = sum(s for s, _ in rows) / sum(n for _, n in rows)
        mean_of_means = sum(s / n for s, n in rows) / 4
        assert abs(token_mean - mean_of_means) > 1e-2


def test_loss_is_the_token_mean_of_the_window(tmp_path):
    x, y = padded_batch()
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config())
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            model(x).logits.reshape(-1, 64), y.reshape(-1), ignore_index=-100
        )
    t = make_trainer(model, tmp_path, grad_accum_steps=2)
    out = t.train_step([(x[:2], y[:2]), (x[2:], y[2:])])
    assert out["loss"] == pytest.approx(expected.item(), abs=1e-6)


# ---- the non-finite guard -------------------------------------------------------------------


class NaNLoss:
    """lm_loss, but NaN on the given (1-based) optimizer steps."""

    def __init__(self, bad_steps, where="loss"):
        self.bad_steps, self.where, self.calls = set(bad_steps), where, 0
        self.hooks = []

    def __call__(self, model, batch):
        self.calls += 1
        loss_sum, n, metrics = lm_loss(model, batch)
        if self.calls in self.bad_steps:
            if self.where == "loss":
                loss_sum = loss_sum * float("nan")
            else:  # finite loss, NaN gradient
                w = model.layers[0].attn.wqkv.weight
                self.hooks.append(w.register_hook(lambda g: g * float("nan")))
        else:
            for h in self.hooks:
                h.remove()
            self.hooks.clear()
        return loss_sum, n, metrics


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_leaves_weights_and_optimizer_untouched(tmp_path, where):
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config())
    loss_fn = NaNLoss({2}, where)
    t = make_trainer(model, tmp_path, loss_fn=loss_fn)
    x, y = padded_batch()
    assert t.train_step([(x, y)])["ok"]
    before, adam_steps = params(model), t.optimizer.state[model.tok_emb.weight]["step"].item()
    out = t.train_step([(x, y)])
    assert not out["ok"] and not math.isfinite(out["grad_norm"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert t.optimizer.state[model.tok_emb.weight]["step"].item() == adam_steps
    assert t.train_step([(x, y)])["ok"]  # and training goes on
    assert not torch.equal(model.tok_emb.weight, before["tok_emb.weight"])


def test_train_counts_skipped_steps_and_stops_after_n_in_a_row(tmp_path, data):
    torch.manual_seed(0)
    t = make_trainer(
        ModernDecoderLM(tiny_config()),
        tmp_path / "one",
        reader(data),
        loss_fn=NaNLoss({3}),
        num_steps=6,
    )
    summary = t.train()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r}
    assert losses[3] == "nan" and all(isinstance(losses[s], float) for s in (1, 2, 4, 5, 6))

    t = make_trainer(
        ModernDecoderLM(tiny_config()),
        tmp_path / "many",
        reader(data),
        loss_fn=NaNLoss(range(3, 100)),
        num_steps=20,
        max_bad_steps=4,
    )
    with pytest.raises(UserError, match="4 steps in a row"):
        t.train()
    assert t.step == 6 and t.skipped_steps == 4
    assert json.loads((tmp_path / "many" / "summary.json").read_text())["skipped_steps"] == 4


# ---- checkpoints and resume -----------------------------------------------------------------


class Interrupt(Exception):
    pass


def interrupt_at(step):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            raise Interrupt
        return lm_loss(model, batch)

    return loss_fn


def run(path, run_dir, seed=0, model_seed=0, loss_fn=lm_loss, cfg=None, **kw):
    torch.manual_seed(model_seed)
    model = ModernDecoderLM(cfg or tiny_config(dropout=0.1))  # dropout: the RNG state matters too
    val = ValBatches(TokenStream(path, "val"), 16, 2, 0)
    kw = dict(num_steps=12, save_every=4, eval_every=4, keep_last=2) | kw
    return make_trainer(model, run_dir, reader(path, seed), loss_fn=loss_fn, val=val, **kw)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, data):
    full = run(data, tmp_path / "full")
    full.train()
    part = run(data, tmp_path / "part", loss_fn=interrupt_at(7))
    with pytest.raises(Interrupt):
        part.train()
    assert latest_checkpoint(tmp_path / "part").name == "step_0000004"
    # a fresh process would build the model from another seed: resume must overwrite everything
    resumed = run(data, tmp_path / "part", model_seed=123)
    assert resumed.maybe_resume() == 4
    resumed.train()

    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    key = lambda r: (r["step"], "loss" in r)  # noqa: E731
    assert [key(r) for r in a] == [
        key(r) for r in b
    ]  # same lines, no duplicates from the killed attempt
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "val_loss", "grad_norm", "lr", "tokens"):
            assert ra.get(k) == rb.get(k), (ra["step"], k)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_checkpoint_layout_keep_last_best_and_state(tmp_path, data):
    t = run(data, tmp_path / "r")
    t.train()
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "best",
        "latest",
        "step_0000008",
        "step_0000012",
    ]
    assert (root / "latest").read_text().strip() == "step_0000012"
    assert sorted(p.name for p in (root / "step_0000012").iterdir()) == [
        "config.json",
        "model.safetensors",
        "train_state.pt",
    ]
    best = json.loads((root / "best" / "best.json").read_text())
    assert best["val_loss"] == pytest.approx(t.best_val_loss)
    state = load_training_state(root / "step_0000012")  # weights_only=True
    assert state["step"] == 12 and state["data"]["cursor"] >= 0 and len(state["rng"]) == 1
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 2 * 16
    assert summary["best_val_loss"] == pytest.approx(t.best_val_loss)
    # validation loss went down on this learnable stream
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "r") if "val_loss" in r]
    assert vals[-1] < vals[0]


def test_resume_with_another_model_config_is_a_user_error(tmp_path, data):
    run(data, tmp_path / "r", num_steps=4).train()
    other = run(data, tmp_path / "r", cfg=tiny_config(n_layer=3, dropout=0.1))
    with pytest.raises(UserError, match="n_layer: 3 -> 2|n_layer: 2 -> 3"):
        other.maybe_resume()
    fresh = run(data, tmp_path / "r", cfg=tiny_config(n_layer=3), resume="never")
    assert fresh.maybe_resume() == 0


def test_resume_from_explicit_checkpoint(tmp_path, data):
    run(data, tmp_path / "src").train()
    t = run(
        data,
        tmp_path / "dst",
        resume_from=str(tmp_path / "src" / "checkpoints" / "step_0000008"),
        num_steps=14,
    )
    assert t.maybe_resume() == 8
    with pytest.raises(UserError, match="not found"):
        run(data, tmp_path / "x", resume_from=str(tmp_path / "nope")).maybe_resume()


def _same_run(a, b):
    """Two runs' metrics lines and final weights are equal."""
    ra, rb = read_metrics(a.run_dir), read_metrics(b.run_dir)
    key = lambda r: (r["step"], "loss" in r)  # noqa: E731
    assert [key(r) for r in ra] == [key(r) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert all(x.get(k) == y.get(k) for k in ("loss", "val_loss", "lr", "tokens")), x["step"]
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_a_run_started_from_resume_from_resumes_from_its_own_checkpoints(tmp_path, data, capsys):
    run(data, tmp_path / "src").train()
    start = str(tmp_path / "src" / "checkpoints" / "step_0000008")
    whole = run(data, tmp_path / "whole", resume_from=start, num_steps=20)
    whole.train()
    calls = {"n": 0}

    def killed_at_step_14(model, batch):  # step 12 is saved by then
        calls["n"] += model.training
        if calls["n"] == 6:
            raise Interrupt
        return lm_loss(model, batch)

    with pytest.raises(Interrupt):
        run(data, tmp_path / "dst", resume_from=start, num_steps=20, loss_fn=killed_at_step_14).train()
    capsys.readouterr()
    again = run(data, tmp_path / "dst", resume_from=start, num_steps=20, model_seed=7)  # the same command
    assert again.maybe_resume() == 12  # its own newest, not back to step 8
    assert "has checkpoints of its own: continuing from step_0000012" in capsys.readouterr().out
    again.train()
    _same_run(whole, again)


def test_resume_never_with_resume_from_starts_over_from_it(tmp_path, data):
    full = run(data, tmp_path / "r")
    full.train()
    root = tmp_path / "r" / "checkpoints"
    assert latest_checkpoint(tmp_path / "r").name == "step_0000012"
    # best/ holds no training state: said in one line before anything is removed (was a traceback)
    with pytest.raises(UserError, match="has no train_state.pt"):
        run(data, tmp_path / "r", resume_from=str(root / "best"), resume="never").maybe_resume()
    assert latest_checkpoint(tmp_path / "r").name == "step_0000012"
    # back to an earlier step of the same run: the later checkpoints go, the earlier stay
    back = run(data, tmp_path / "r", resume_from=str(root / "step_0000008"), resume="never", model_seed=7)
    assert back.maybe_resume() == 8
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000008"]
    back.train()  # the same steps again: the same run
    _same_run(full, back)
    # into a used run directory, from elsewhere: its checkpoints are another run's, all removed
    other = run(data, tmp_path / "o", num_steps=4)
    other.train()
    fork = run(data, tmp_path / "o", resume_from=str(root / "step_0000008"), resume="never")
    assert fork.maybe_resume() == 8 and latest_checkpoint(tmp_path / "o") is None


def test_periodic_samples_are_written(tmp_path, data):
    from modernlm.tokenizer import train_bpe

    tok = train_bpe(["once upon a time there was a cat"] * 20, vocab_size=270)
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(vocab_size=tok.vocab_size))
    t = make_trainer(
        model, tmp_path / "r", reader(data), num_steps=4, sample_every=2, sample_tokens=5
    )
    t.sample_fn = prompt_sampler(tok, ["once upon", "a cat"], t.cfg.sample_tokens)
    t.train()
    text = (tmp_path / "r" / "samples.md").read_text()
    assert text.count("## step") == 2 and "## step 4" in text
    assert "**once upon**" in text and "**a cat**" in text


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path, data):
    run(data, tmp_path / "r").train()
    first = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert first["final_loss"] is not None and first["final_val_loss"] is not None
    run(data, tmp_path / "r").train()  # resumes at the last step: nothing left to train
    again = json.loads((tmp_path / "r" / "summary.json").read_text())
    for key in ("steps", "tokens_seen", "final_loss", "final_val_loss", "best_val_loss"):
        assert again[key] == first[key], key


# ---- the time budget ------------------------------------------------------------------------


def timed_trainer(tmp_path, data, seconds_per_step, **kw):
    """A trainer on a fake clock that advances `seconds_per_step` in every train_step."""
    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-2, warmup_steps=3, min_lr_ratio=0.1, schedule="cosine")
    val = ValBatches(TokenStream(data, "val"), 16, 2, 0)
    t = make_trainer(ModernDecoderLM(tiny_config()), tmp_path, reader(data), optim=optim, val=val, **kw)
    return on_fake_clock(t, seconds_per_step)


def on_fake_clock(t, seconds_per_step: float):
    """Give trainer `t` a clock that only moves, by `seconds_per_step`, in each train_step."""
    now = t.fake_now = [0.0]
    t.clock = lambda: now[0]
    step = t.train_step

    def timed_step(micro_batches):
        now[0] += seconds_per_step
        return step(micro_batches)

    t.train_step = timed_step
    return t


def test_time_budget_stops_training_and_the_schedule_reaches_its_floor(tmp_path, data):
    t = timed_trainer(tmp_path / "timed", data, 1.0, num_steps=1000, max_seconds=20, eval_every=0)
    summary = t.train()
    assert summary["steps"] == 20 and summary["stopped_by"] == "time"
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "timed") if "lr" in r}
    assert lrs[1] == pytest.approx(1e-2 / 3)  # warmup still counts steps
    assert lrs[20] == pytest.approx(1e-3)  # the floor, on the last step
    assert all(lrs[s] > lrs[s + 1] for s in range(4, 20))  # decaying by time, not by num_steps
    assert lrs[10] == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * 10 / 20)), rel=0.02)
    records = read_metrics(tmp_path / "timed")
    assert any(r["step"] == 20 and "val_loss" in r for r in records)  # the last step is evaluated
    assert latest_checkpoint(tmp_path / "timed").name == "step_0000020"  # and saved
    # resuming a run whose budget is spent trains no further
    again = timed_trainer(tmp_path / "timed", data, 1.0, num_steps=1000, max_seconds=20)
    assert again.train()["steps"] == 20


def test_time_spent_between_steps_never_skips_the_final_eval_and_save(tmp_path, data):
    """Whether to stop is decided once, after a step: time spent after that decision (logging,
    0.5 s a step here) cannot end the loop before a step marked last, which evaluates and saves.
    Step 13 ends at 19.0 s (not last: the next would end at 20.0 <= 20 + half a step); its log
    takes the clock to 19.5 s, where a fresh look would find the next step past the budget."""
    t = timed_trainer(tmp_path / "slow-log", data, 1.0, num_steps=1000, max_seconds=20, eval_every=0, log_every=1)
    log_step = t._log_step

    def slow_log(*args):
        t.fake_now[0] += 0.5
        return log_step(*args)

    t._log_step = slow_log
    summary = t.train()
    assert summary["stopped_by"] == "time" and summary["steps"] == 14
    records = read_metrics(tmp_path / "slow-log")
    assert any(r["step"] == 14 and "val_loss" in r for r in records)  # the last step is evaluated
    assert summary["final_val_loss"] == [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert latest_checkpoint(tmp_path / "slow-log").name == "step_0000014"  # and saved


def test_steps_end_first_when_the_budget_is_large(tmp_path, data):
    t = timed_trainer(tmp_path / "steps", data, 1.0, num_steps=8, max_seconds=1000)
    summary = t.train()
    assert summary["steps"] == 8 and summary["stopped_by"] == "steps"
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "steps") if "lr" in r}
    assert lrs[8] == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * 4 / 5)))  # by steps


def test_final_eval_can_score_the_whole_split_while_periodic_evals_sample_it(tmp_path, data):
    torch.manual_seed(0)
    stream = TokenStream(data, "val")
    sample, whole = ValBatches(stream, 16, 2, 1), ValBatches(stream, 16, 2, 0)
    assert len(sample) == 1 < len(whole)
    t = make_trainer(ModernDecoderLM(tiny_config()), tmp_path, reader(data), val=sample, num_steps=4, eval_every=2)
    t.validator.final_batches = whole
    t.train()
    vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}

    def direct(batches):
        sums = [lm_eval_loss(t.model, b) for b in batches]
        return float(sum(s for s, _, _ in sums) / sum(n for _, n, _ in sums))

    t.model.eval()
    with torch.no_grad():
        assert vals[4] == pytest.approx(direct(whole), rel=1e-6)
        assert vals[4] != pytest.approx(direct(sample), rel=1e-6)


def test_resume_is_exact_with_muon(tmp_path, data):
    optim = OptimConfig(name="muon", lr=1e-2, warmup_steps=2, muon_lr_scale=3)
    full = run(data, tmp_path / "full", optim=optim)
    full.train()
    part = run(data, tmp_path / "part", loss_fn=interrupt_at(7), optim=optim)
    with pytest.raises(Interrupt):
        part.train()
    resumed = run(data, tmp_path / "part", model_seed=123, optim=optim)
    resumed.train()
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_samples_of_a_killed_attempt_are_replaced_on_resume(tmp_path, data):
    """samples.md after kill + resume == uninterrupted (it read 2 4 6 4 6 8 ...: the killed
    attempt's sections past the checkpoint stayed, as metrics.jsonl's lines no longer do)."""
    from modernlm.tokenizer import train_bpe

    tok = train_bpe(["once upon a time there was a cat"] * 20, vocab_size=270)

    def trainer(run_dir, loss_fn=lm_loss):
        torch.manual_seed(0)
        t = make_trainer(ModernDecoderLM(tiny_config(vocab_size=tok.vocab_size)), run_dir, reader(data),
                         loss_fn=loss_fn, num_steps=8, save_every=4, sample_every=2, sample_tokens=4)  # fmt: skip
        t.sample_fn = prompt_sampler(tok, ["once upon"], 4)
        return t

    trainer(tmp_path / "full").train()
    with pytest.raises(Interrupt):
        trainer(tmp_path / "part", interrupt_at(7)).train()  # samples at 2, 4, 6; checkpoint at 4
    trainer(tmp_path / "part").train()
    full, part = ((tmp_path / d / "samples.md").read_text() for d in ("full", "part"))
    assert part == full and [int(x) for x in re.findall(r"^## step (\d+)", full, re.M)] == [2, 4, 6, 8]


def test_add_section_drops_later_steps_and_its_own_heading():
    """What an earlier attempt wrote past this step, or under this very heading (a rerun's end-of-run
    replies), goes; an other heading at this step (the trainer's own sample) stays."""
    import tempfile
    from pathlib import Path

    from modernlm.train.tracking import add_section

    path = Path(tempfile.mkdtemp()) / "samples.md"
    path.write_text("# title\n## step 10\n\na\n## step 10: replies\n\nold\n## step 20\n\nb\n")
    add_section(path, 10, "## step 10: replies\n\nnew\n")
    assert path.read_text() == "# title\n## step 10\n\na\n## step 10: replies\n\nnew\n"


def test_a_resumed_run_takes_its_configs_optimizer_settings(tmp_path, data):
    """weight_decay, betas and eps changed for a resumed run: config.yaml said the new ones, the
    optimizer kept the first run's (load_state_dict overwrites its groups). The moments are the
    checkpoint's, the settings the config's; unchanged settings resume exactly (tested above)."""
    run(data, tmp_path / "r", num_steps=4).train()
    changed = OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-6)
    t = run(data, tmp_path / "r", num_steps=8, optim=changed)
    assert t.maybe_resume() == 4
    groups = t.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.5} and {g["betas"] for g in groups} == {(0.8, 0.9)}
    assert {g["eps"] for g in groups} == {1e-6} and all(t.optimizer.state[p] for g in groups for p in g["params"])


def test_resume_never_starts_over_without_the_earlier_runs_checkpoints(tmp_path, data):
    """resume=never in a run directory of 12 steps, for 4: the earlier step_8/step_12 stayed
    beside the new step_4 (pruned as older than them), and the next resume took up the earlier run."""
    run(data, tmp_path / "r").train()
    fresh = run(data, tmp_path / "r", num_steps=4, resume="never")
    fresh.train()
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step_0000004"]
    assert run(data, tmp_path / "r", num_steps=4).maybe_resume() == 4

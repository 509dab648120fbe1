"""GRPO's rollouts, rewards and command: rollouts batched == alone with the same seeds, the answer
checker's rewards, the rollout's completion mask and log-probs against `LM.loglikelihood`, the
rollout state a checkpoint keeps, what `modernlm grpo` logs, and an exact resume after SIGKILL. The
loss itself is checked against TRL in tests/test_grpo_loss.py."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modernlm.align.grpo import (
    GRPOSettings,
    Rollouts,
    answer_reward,
    collate_rollout,
    completion_logps,
    grpo_loss_fn,
    rollout_seed,
    sample_completions,
)
from modernlm.align.sft import chat_ready
from modernlm.api import load
from modernlm.chat import ChatEncoder
from modernlm.cli import run_command
from modernlm.generation import prompt_ids
from modernlm.train.tracking import read_metrics
from tests.serve_util import chat_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = chat_checkpoint(tmp_path_factory.mktemp("grpo") / "chat")
    model, tok, _ = chat_ready(load(path, backend="modernlm"))
    return path, model.eval(), tok, ChatEncoder(tok)


def write_problems(path: Path, n: int, start: int = 0) -> Path:
    """GSM8K-format sums, "What is a + b?" -> "#### a+b"."""
    rows = []
    for i in range(start, start + n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_answer_reward_is_the_strict_final_number_plus_the_format_bonus():
    assert answer_reward("3 + 4 = 7\n#### 7", "7", True) == (1.0, True)
    assert answer_reward("3 + 4 = 7\n#### 7", "7", True, format_reward=0.2) == (1.2, True)
    assert answer_reward("3 + 4 = 8\n#### 8", "7", True, format_reward=0.2) == (0.2, False)  # form, wrong
    assert answer_reward("3 + 4 = 7", "7", True, format_reward=0.2) == (0.0, False)  # strict: no "####"
    assert answer_reward("#### 7 then more", "7", False, format_reward=0.2) == (1.0, True)  # unfinished: no bonus


def test_rollouts_batched_equal_each_completion_sampled_alone(chat_model):
    _, model, tok, enc = chat_model
    s = GRPOSettings(group_size=3, temperature=1.0, max_new_tokens=12)
    prompts = [enc.prompt([{"role": "user", "content": q}]) for q in ("What is 2 + 3?", "Hi, how many apples?")]
    rows = [p for p in prompts for _ in range(3)]  # two prompts of different lengths: left-padded
    seeds = [rollout_seed(0, 0, j) for j in range(len(rows))]
    batched = sample_completions(model, tok, rows, seeds, s, enc.end_id)
    alone = [sample_completions(model, tok, [r], [k], s, enc.end_id)[0] for r, k in zip(rows, seeds, strict=True)]
    assert batched == alone
    assert len({tuple(ids) for ids, _, _ in batched}) > 2  # the seeds differ, so do the samples
    again = sample_completions(model, tok, rows, seeds, s, enc.end_id)
    assert again == batched


# Float32 on both sides, the same weights; the facade scores each row alone, unpadded, the loss one
# right-padded batch: the sums agree to float32 rounding. Measured over 24 random rows (sums -12 to
# -209 nats): at most 1.5e-5 apart (1 ulp at 128..256), 1.3e-7 relative. The tolerance (atol 1e-5 +
# rtol 1e-6 * |sum|) leaves >= 10x room and is 400x below the smallest wrong alignment measured on
# those rows: the mask one position late moves a sum by >= 0.061 nats, one early by >= 0.11, and
# padding counted in by >= 18.7.
ALIGN_TOL = dict(rtol=1e-6, atol=1e-5)


def test_the_rollout_mask_picks_the_facades_loglikelihood(chat_model):
    """collate_rollout's completion_mask over completion_logps' token log-probs, summed per row, is
    log p(completion | prompt) as `LM.loglikelihood` scores it, for prompts and completions of
    different lengths in one right-padded batch (a 1-token completion, one ending in eos)."""
    lm = load(chat_model[0])
    tok = lm.tokenizer
    pairs = [
        ("What is 2 + 3?", " 5<|im_end|>"),
        ("Hi", " there was a little cat who lived in a big house."),
        ("The quick brown fox jumps over the lazy dog, again and", " again"),
        ("In 1999 the committee", " decided that the river"),
    ]
    rows = [{"prompt": prompt_ids(tok, c), "completion": tok.encode(x), "advantage": 0.5} for c, x in pairs]
    assert rows[0]["completion"][-1] == tok.eos_id and len(rows[2]["completion"]) == 1
    batch = collate_rollout(rows, tok.pad_id)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    lengths = [len(r["prompt"]) + len(r["completion"]) for r in rows]
    assert ids.shape == (4, max(lengths)) and mask.shape == (4, max(lengths) - 1) and len(set(lengths)) == 4
    assert mask.sum(1).tolist() == [len(r["completion"]) for r in rows]
    with torch.no_grad():
        logps, _ = completion_logps(lm.model, ids)
    assert logps.dtype == torch.float32 and next(lm.model.parameters()).dtype == torch.float32
    got = (logps * mask).sum(1)
    expected = torch.tensor([lm.loglikelihood(c, x) for c, x in pairs])
    torch.testing.assert_close(got, expected, **ALIGN_TOL)
    assert expected.abs().min() > 1  # real sums, not zeros agreeing


def rollouts(chat_model, problems, **kw):
    _, model, tok, enc = chat_model
    s = GRPOSettings(group_size=4, prompts_per_rollout=2, max_new_tokens=8, num_iterations=kw.pop("iters", 2))
    return Rollouts(model, tok, problems, s, batch_size=4, grad_accum_steps=1, eos_id=enc.end_id, pad_id=0, **kw)


def test_a_rollout_is_reused_num_iterations_times_and_its_state_resumes_exactly(chat_model):
    enc = chat_model[3]
    problems = [{"prompt": enc.prompt([{"role": "user", "content": f"What is {i} + 1?"}]), "target": str(i + 1)}
                for i in range(6)]  # fmt: skip
    r = rollouts(chat_model, problems)
    assert r.off_policy  # 2 micro-batches x 2 passes > 1 step: the sampling policy's log-probs are kept
    first = [next(r) for _ in range(4)]  # one rollout: 8 sequences = 2 micro-batches, 2 passes
    assert r.rollouts == 1 and first[0] is first[2] and first[1] is first[3]
    assert "old_logps" in first[0] and first[0]["old_logps"].shape == first[0]["completion_mask"].shape
    adv = torch.cat([first[0]["advantages"], first[1]["advantages"]]).view(2, 4)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-5)  # group-normalised
    state = r.state_dict()
    after = [next(r) for _ in range(3)]
    resumed = rollouts(chat_model, problems)
    resumed.load_state_dict(state)
    for a, b in zip(after, [next(resumed) for _ in range(3)], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["advantages"], b["advantages"])


class _TaggedRollouts(Rollouts):
    """Rollouts whose draw returns placeholders tagged with the rollout's index (no sampling)."""

    def draw(self):
        self.rollouts += 1
        return [{"rollout": self.rollouts - 1} for _ in range(self.s.prompts_per_rollout * self.s.group_size // 2)]


@pytest.mark.parametrize("micro, iters", [(1, 1), (2, 1), (3, 1), (2, 2), (1, 3)])
def test_old_logps_are_kept_exactly_when_a_rollout_is_used_after_an_update(chat_model, micro, iters):
    """Walk the trainer's windows (grad_accum_steps micro-batches drawn, then one optimizer step):
    off_policy must hold iff some micro-batch is used in a later window than the one that drew
    (sampled) its rollout, i.e. after an update; otherwise the extra forward is skipped."""
    _, model, tok, enc = chat_model
    problems = [{"prompt": [1, 2], "target": "1"}] * 4
    s = GRPOSettings(group_size=2, prompts_per_rollout=micro, num_iterations=iters)
    for ga in range(1, 13):
        r = _TaggedRollouts(model, tok, problems, s, batch_size=2, grad_accum_steps=ga, eos_id=enc.end_id, pad_id=0)
        drawn_in, stale = {}, False
        for window in range(3 * micro * iters):
            for _ in range(ga):
                k = next(r)["rollout"]
                drawn_in.setdefault(k, window)
                stale |= drawn_in[k] < window
        assert r.off_policy == stale, (micro, iters, ga)


def test_a_rollout_straddling_an_optimizer_step_has_the_samplers_ratio(chat_model, monkeypatch):
    """2 micro-batches per rollout, grad_accum_steps=3: rollout 2's second micro-batch is used after
    the step its first one joined. It must carry the sampling policy's log-probs, and the loss's
    ratio must be pi_new / pi_sampler (not 1, which would skip the correction and the clip)."""
    rewards = iter([1.0, 0.0] * 10)  # the tiny model gets nothing right: make the advantages nonzero
    monkeypatch.setattr("modernlm.align.grpo.answer_reward", lambda *a, **k: (next(rewards), False))
    _, model, tok, enc = chat_model
    model = copy.deepcopy(model)  # the fixture's model is shared: train a copy
    problems = [{"prompt": enc.prompt([{"role": "user", "content": f"What is {i} + 1?"}]), "target": str(i + 1)}
                for i in range(6)]  # fmt: skip
    s = GRPOSettings(group_size=2, prompts_per_rollout=1, max_new_tokens=8, epsilon=0.05)
    r = Rollouts(model, tok, problems, s, batch_size=1, grad_accum_steps=3, eos_id=enc.end_id, pad_id=0)
    assert r.off_policy
    loss_fn = grpo_loss_fn(s)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    window = [next(r) for _ in range(3)]  # rollout 1, then rollout 2's first micro-batch
    sampler = copy.deepcopy(model)  # the policy that sampled rollout 2
    sum(loss_fn(model, b)[0] for b in window).backward()
    opt.step()
    stale = next(r)  # rollout 2's second micro-batch, now after an update
    assert stale is r.micro_batches[1] and "old_logps" in stale
    with torch.no_grad():
        new, _ = completion_logps(model, stale["input_ids"])
        old, _ = completion_logps(sampler, stale["input_ids"])
        got = loss_fn(model, stale)
    mask = stale["completion_mask"]
    torch.testing.assert_close(stale["old_logps"][mask], old[mask])
    assert (new - old)[mask].abs().max() > 0.1  # the step moved the policy: the ratio is not 1
    ratio = torch.exp(new - old)
    adv = stale["advantages"][:, None]
    token = -torch.minimum(ratio * adv, ratio.clamp(1 - s.epsilon, 1 + s.epsilon) * adv)
    torch.testing.assert_close(got[0], token[mask].sum())
    assert got[2]["clip_ratio/region_mean"] > 0  # the clip acts on the stale tokens


def grpo_args(tmp_path: Path, ckpt: Path, *extra: str) -> list[str]:
    train = write_problems(tmp_path / "train.jsonl", 24)
    val = write_problems(tmp_path / "val.jsonl", 8, start=100)
    return [str(ckpt), f"data.path={train}", f"eval.path={val}", "grpo.group_size=4", "grpo.prompts_per_rollout=2",
            "grpo.max_new_tokens=12", "train.batch_size=4", "train.log_every=1", "train.progress=false",
            "optim.lr=1e-3", "run.device=cpu", f"run.out_dir={tmp_path}", *extra]  # fmt: skip


def test_grpo_command_logs_what_trl_logs_and_the_held_out_accuracy(chat_model, tmp_path):
    args = grpo_args(tmp_path, chat_model[0], "train.num_steps=4", "train.eval_every=2", "grpo.beta=0.04",
                     "grpo.num_iterations=2", "run.name=g")  # fmt: skip
    assert run_command("grpo", args) == 0
    records = read_metrics(tmp_path / "g")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio/region_mean", "entropy",
                "completions/mean_length", "completions/clipped_ratio"):  # fmt: skip
        assert key in steps[0], key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["val_loss"] == pytest.approx(1 - r["val_accuracy"]) for r in evals)
    report = json.loads((tmp_path / "g" / "eval.json").read_text())
    assert report["before"] == evals[0]["val_accuracy"] and report["after"] == evals[-1]["val_accuracy"]


def test_grpo_refuses_a_batch_size_that_does_not_divide_a_rollout(chat_model, tmp_path, capsys):
    args = grpo_args(tmp_path, chat_model[0], "train.batch_size=3")
    assert run_command("grpo", args) == 2
    err = capsys.readouterr().err
    assert "train.batch_size (3)" in err and "Traceback" not in err


@pytest.mark.parametrize("override, named", [
    ("data.skip=-3", "data: skip"), ("data.max_problems=-1", "data: max_problems"),
    ("eval.max_problems=-1", "eval: max_problems"), ("grpo.top_k=-1", "grpo.top_k"),
    ("grpo.temperature=-1", "grpo.temperature"),
])  # fmt: skip
def test_grpo_refuses_a_bad_count_or_sampling_setting_before_loading(chat_model, tmp_path, capsys, monkeypatch,
                                                                     override, named):  # fmt: skip
    """One line naming the field as the config loads: not silently (a negative count) nor at the
    first rollout, after the model loaded and the step-0 evaluation ran (top_k)."""
    monkeypatch.setattr("modernlm.api.load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run_command("grpo", grpo_args(tmp_path, chat_model[0], override)) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and err.count("\n") == 1


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every complete line of metrics.jsonl (a running process may be mid-line)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    records = [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_grpo_resumes_after_sigkill_with_the_uninterrupted_losses(chat_model, tmp_path):
    """kill -9 mid-run, rerun: the same losses. A rollout spans 4 steps here (2 micro-batches, 2 passes),
    so the checkpoint it resumes from holds a rollout half used."""
    args = grpo_args(tmp_path, chat_model[0], "train.num_steps=40", "train.eval_every=0", "train.save_every=3",
                     "grpo.num_iterations=2", "run.seed=3")  # fmt: skip
    cmd = [sys.executable, "-m", "modernlm", "grpo", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "run.name=full"], env=env, check=True, capture_output=True, timeout=300)
    full = _losses(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, 41))

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "run.name=killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(s >= 7 for s, _ in _losses(run_dir)):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _losses(run_dir)[-1][0]
    assert 7 <= killed_at < 40  # killed mid-run; checkpoints every 3 steps fall mid-rollout (4 steps each)
    subprocess.run([*cmd, "run.name=killed"], env=env, check=True, capture_output=True, timeout=300)
    assert _losses(run_dir) == full

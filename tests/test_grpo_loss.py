"""GRPO maths: our token log-probs, group advantages and clipped surrogate against TRL's GRPOTrainer
(its own _compute_loss on the same tiny Llama, loss, gradients and metrics; the trainer built
without __init__ checked once against a real one), hand-computed advantages, the accumulation
invariant our trainer relies on, and bad options refused."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from modernlm.train.losses import group_advantages, grpo_loss, token_logps_and_entropy

# GRPOConfig (a TrainingArguments) warns about a field TRL itself sets; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

B, P, C, V = 8, 5, 7, 64  # sequences, prompt width, completion width, vocab
MAX_COMPLETION = 9  # > C, so dr_grpo's constant is not the padded width
EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric (DAPO's clip-higher), so each bound is checked on its own


# --- against TRL ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    """A tiny float32 Llama with TRL's fused LM head added (what GRPOTrainer.__init__ does): TRL calls
    model(..., fused_lm_head=True) for log-probs; our side calls the same model plainly (the patch
    leaves the plain forward as it was) and takes the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().train()  # train(): TRL's mode "train"; no dropout in Llama
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    return model


def _batch(model) -> dict[str, torch.Tensor]:
    """Left-padded prompts, right-padded completions of several lengths (1 to C tokens), advantages
    of both signs, and old / ref log-probs near the current ones (finite on padding too)."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.int64)
    prompt_mask[1, :2] = 0
    prompt_mask[5, :1] = 0
    completion_ids = torch.randint(0, V, (B, C), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 7, 6, 2, 4])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).to(torch.int64)
    with torch.no_grad():
        logps, _ = _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        # num_iterations > 1: the sampling policy is a few updates old; 0.3 nats of drift puts ~half
        # the ratios outside [0.8, 1.28], so both clips bite.
        "old_per_token_logps": logps + 0.3 * torch.randn(B, C, generator=g),
        "ref_per_token_logps": logps + 0.1 * torch.randn(B, C, generator=g),
    }


def _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Our side: logits of prompt + completion; position t predicts token t + 1, so the logits at
    P - 1 .. P + C - 2 score the completion."""
    ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P + C)
    logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
    assert logits.dtype == torch.float32
    return token_logps_and_entropy(logits[:, P - 1 : -1], completion_ids)  # (B, C) each


def _grpo_config(loss_type: str, beta: float, bias_correction: bool, **extra):
    from trl import GRPOConfig

    return GRPOConfig(
        report_to=[], use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=B, num_generations=4,
        loss_type=loss_type, beta=beta, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
        max_completion_length=MAX_COMPLETION, use_bias_correction_kl=bias_correction, **extra,
    )  # fmt: skip


def _trl_trainer(model, loss_type: str, beta: float, bias_correction: bool):
    """A GRPOTrainer without its __init__ (which wants a tokenizer, reward functions, a dataset and
    an accelerator): the attributes _compute_loss and _get_per_token_logps_and_entropies read, set
    from a real GRPOConfig the way __init__ sets them (checked against a real GRPOTrainer by
    test_the_shortcut_trainer_is_the_real_one). One process, no gradient accumulation."""
    from trl import GRPOTrainer

    args = _grpo_config(loss_type, beta, bias_correction)
    assert args.steps_per_generation == 1 and args.delta is None and args.top_entropy_quantile == 1.0
    t = object.__new__(GRPOTrainer)
    t.args, t.model = args, model
    # Single process: reduce / gather are the identity, autocast is off (as accelerate's with
    # mixed_precision="no"); is_main_process is read by the profiling decorator.
    t.accelerator = SimpleNamespace(
        autocast=contextlib.nullcontext, num_processes=1, is_main_process=True,
        reduce=lambda x, reduction: x, gather=lambda x: x, gather_for_metrics=lambda x: x,
    )  # fmt: skip
    t.loss_type, t.beta, t.max_completion_length = args.loss_type, args.beta, args.max_completion_length
    t.epsilon_low, t.epsilon_high = args.epsilon, args.epsilon_high
    t.importance_sampling_level = args.importance_sampling_level  # "token"
    t.off_policy_mask_threshold = args.off_policy_mask_threshold  # None
    t.top_entropy_quantile = args.top_entropy_quantile  # 1.0: no entropy mask
    t.use_vllm, t.vllm_importance_sampling_correction = args.use_vllm, args.vllm_importance_sampling_correction
    t.aux_loss_enabled = False  # not an MoE
    t.entropy_coef, t.use_adaptive_entropy = args.entropy_coef, args.use_adaptive_entropy
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy  # False: no entropy bonus
    t.current_gradient_accumulation_steps = 1
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# Both sides run in float32 (asserted: model, log-probs, losses); float64 is not available on TRL's
# side, whose fused LM head accumulates in float32. The two add the same terms in other orders, so
# they agree to float32 rounding. Measured over the 24 cases: losses (0.19 to 0.44) differ by at most
# 3e-8 (~1 ulp), per-token log-probs (up to 4.3) by 4.8e-7 (1 ulp), entropies by 9.5e-7 (2 ulps),
# parameter gradients (up to 0.31) by 7.5e-8. LOSS_TOL (rtol 1e-5, atol 1e-6) leaves ~30x room.
# GRAD_TOL (atol 1e-6 + rtol 1e-5 * |g|, so <= 4e-6) leaves ~50x room and is still 13x below the
# smallest real change measured: the KL with vs without TRL's ratio correction moves gradients by
# >= 5.2e-5, bf16 autocast on our side by >= 3.1e-4. (On-policy with beta = 0 the loss VALUE is
# -A whatever the log-probs, ratio 1 exactly: there the gradients carry the comparison.)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.hf
@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "num_iterations>1"])
@pytest.mark.parametrize(
    ("beta", "bias_correction"), [(0.0, False), (0.04, False), (0.04, True)], ids=["beta0", "kl", "kl_corrected"]
)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_loss_gradients_and_metrics_equal_trl(llama, loss_type, beta, bias_correction, on_policy):
    model = llama
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    batch = _batch(model)
    mask = batch["completion_mask"]

    trainer = _trl_trainer(model, loss_type, beta, bias_correction)
    inputs = {k: v for k, v in batch.items() if not (on_policy and k == "old_per_token_logps")}
    inputs["num_items_in_batch"] = mask.sum()  # dapo: the tokens of the (here one-micro-batch) window
    model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = _grads(model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model.zero_grad(set_to_none=True)
    logps, entropy = _our_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask)
    loss_sum, normalizer, metrics = grpo_loss(
        logps, None if on_policy else batch["old_per_token_logps"], batch["ref_per_token_logps"],
        batch["advantages"], mask, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta,
        max_completion_length=MAX_COMPLETION, use_bias_correction_kl=bias_correction,
    )  # fmt: skip
    loss = loss_sum / normalizer
    loss.backward()
    our_grads = _grads(model)

    assert trl_loss.dtype == loss_sum.dtype == logps.dtype == entropy.dtype == torch.float32
    assert normalizer.dtype == torch.int64
    assert normalizer.item() == (mask.sum().item() if loss_type in ("dapo", "bnpo") else B)
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), **LOSS_TOL)
    assert trl_grads.keys() == our_grads.keys()
    for name, g in trl_grads.items():
        torch.testing.assert_close(our_grads[name], g, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert abs(trl_loss.item()) > 1e-3  # a real loss, not two zeros agreeing

    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", *(["kl"] * (beta != 0))):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
        assert not metrics[key].requires_grad
    assert ("kl" in metrics) == ("kl" in trl_metrics) == (beta != 0)
    # The entropy TRL logs is the masked token mean of what token_logps_and_entropy returns.
    m = mask.bool()
    assert entropy[m].mean().item() == pytest.approx(trl_metrics["entropy"], rel=1e-5)
    if on_policy:
        assert metrics["clip_ratio/region_mean"].item() == 0.0  # ratio 1: nothing clipped
    else:  # clipping active: some tokens on each side
        assert metrics["clip_ratio/low_mean"].item() > 0 and metrics["clip_ratio/high_mean"].item() > 0
        low, high = metrics["clip_ratio/low_mean"].item(), metrics["clip_ratio/high_mean"].item()
        assert metrics["clip_ratio/region_mean"].item() == pytest.approx(low + high)  # disjoint: A < 0 vs A > 0


@pytest.mark.hf
def test_token_logps_and_entropy_equal_trls_fused_head(llama):
    """Per token, not just through the loss: TRL's own log-probs and entropies of the completion."""
    batch = _batch(llama)
    mask = batch["completion_mask"]
    trainer = _trl_trainer(llama, "dapo", 0.0, False)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], mask], 1)
    with torch.no_grad():
        trl_logps, trl_entropy, _ = trainer._get_per_token_logps_and_entropies(
            llama, ids, attn, C, compute_entropy=True
        )
        logps, entropy = _our_logps(llama, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask)
    m = mask.bool()  # TRL writes 0 on padding; we score every position
    torch.testing.assert_close(logps[m], trl_logps[m], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy[m], trl_entropy[m], rtol=1e-5, atol=1e-6)


# The real trainer's config: every choice _grpo_config makes differs from GRPOConfig's default but
# epsilon's 0.2 (defaults: loss_type dapo, beta 0, epsilon_high None, max_completion_length 512,
# use_bias_correction_kl True).
REAL = dict(loss_type="dr_grpo", beta=0.04, bias_correction=False)


def _real_trl_trainer(tmp_path, args):
    """A GRPOTrainer built by its own __init__ (~0.3 s): a tiny Llama saved to a local directory
    (beta > 0 makes TRL load its reference model from the policy's _name_or_path), the byte
    tokenizer as a PreTrainedTokenizerFast, a reward function, 8 in-memory prompts, CPU."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOTrainer

    from modernlm.tokenizer import byte_tokenizer

    byte_tokenizer().save(tmp_path / "tok")
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(tmp_path / "model")
    model.config._name_or_path = str(tmp_path / "model")

    def length_reward(completions, **_):  # any reward: __init__ only stores it
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list([{"prompt": "2+3="}] * B),
        processing_class=PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok")),
    )  # fmt: skip
    trainer.model.train()  # as TRL's training loop: its metrics go to "train"
    return trainer


@pytest.mark.hf
def test_the_shortcut_trainer_is_the_real_one(tmp_path):
    """The object.__new__ trainer the comparisons above use holds what GRPOTrainer.__init__ sets for
    the same GRPOConfig, and computes the same loss, gradients and metrics as the real trainer (its
    real Accelerator, one CPU process), so the shortcut cannot drift from TRL unnoticed. The real
    one is built once, here, after the shortcut: building a GRPOConfig (a TrainingArguments) resets
    accelerate's global state, which would break an Accelerator built before it."""
    short = _trl_trainer(None, REAL["loss_type"], REAL["beta"], REAL["bias_correction"])
    args = _grpo_config(REAL["loss_type"], REAL["beta"], REAL["bias_correction"], output_dir=str(tmp_path / "out"))
    real = _real_trl_trainer(tmp_path, args)
    short.model = real.model  # with the fused LM head GRPOTrainer.__init__ added
    assert real.ref_model is not None and real.accelerator.num_processes == 1
    assert real.accelerator.mixed_precision == "no" and real.accelerator.is_main_process
    # The same config, but for where a real run writes.
    ours, theirs = short.args.to_dict(), real.args.to_dict()
    assert ours.keys() == theirs.keys()
    assert {k for k, v in ours.items() if v != theirs[k]} == {"output_dir"}
    # Every attribute the shortcut sets by hand, as __init__ set it. current_gradient_accumulation_steps
    # is set by transformers' training loop at each window (the micro-batches it fetched, as many as
    # gradient_accumulation_steps): set here as the loop would.
    assert real.args.gradient_accumulation_steps == 1 and not hasattr(real, "current_gradient_accumulation_steps")
    real.current_gradient_accumulation_steps = real.args.gradient_accumulation_steps
    hand_set = set(vars(short)) - {"args", "model", "accelerator"}
    assert len(hand_set) == 16, sorted(hand_set)
    for name in sorted(hand_set):
        value = getattr(real, name)
        assert type(value) is type(vars(short)[name]) and value == vars(short)[name], name
    assert (short.epsilon_high, short.beta, short.max_completion_length) == (EPS_HIGH, 0.04, MAX_COMPLETION)

    # And the same numbers: off-policy, with the KL, through each trainer's own _compute_loss.
    batch = _batch(real.model)
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    results = []
    for trainer in (real, short):
        real.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(real.model, batch)
        loss.backward()
        results.append((loss.detach(), _grads(real.model), {k: v[-1] for k, v in trainer._metrics["train"].items()}))
    (real_loss, real_grads, real_metrics), (short_loss, short_grads, short_metrics) = results
    assert real_loss.item() == short_loss.item() and abs(real_loss.item()) > 1e-3
    assert all(torch.equal(real_grads[n], short_grads[n]) for n in real_grads)
    assert real_metrics == short_metrics and "kl" in real_metrics


def test_token_logps_and_entropy_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    targets = torch.tensor([[0, 4, -100], [2, 2, 1]])
    logps, entropy = token_logps_and_entropy(logits, targets)
    assert logps.dtype == entropy.dtype == torch.float32  # upcast, whatever the logits' dtype
    ref = torch.log_softmax(logits.double(), -1)
    assert logps[0, 0].item() == pytest.approx(ref[0, 0, 0].item(), abs=1e-6)
    assert logps[1, 2].item() == pytest.approx(ref[1, 2, 1].item(), abs=1e-6)
    assert logps[0, 2].item() == 0.0  # ignored target
    torch.testing.assert_close(entropy.double(), -(ref.exp() * ref).sum(-1), rtol=1e-6, atol=1e-6)


# --- advantages -----------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    # Group 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.5773503;
    # advantages +-0.5 / (0.5773503 + 1e-4) = +-0.8658754. Group 2: all equal -> 0, std 0.
    adv, std = group_advantages(rewards, 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a == pytest.approx(0.8658754, abs=1e-7)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(1 / 3)] * 4 + [0.0] * 4))
    assert torch.isclose(std, torch.zeros_like(std)).float().mean().item() == 0.5  # frac_reward_zero_std

    # "none" (Dr. GRPO): the centred rewards; std still per group, for the log.
    adv, std = group_advantages(rewards, 4, scale="none")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    torch.testing.assert_close(std, torch.tensor([math.sqrt(1 / 3)] * 4 + [0.0] * 4))

    # "batch": still centred on the group mean, but over the batch's std: mean 0.75,
    # sum of squares 6 * 0.0625 + 2 * 0.5625 = 1.5, / 7 -> std sqrt(3/14) = 0.4629100;
    # advantages +-0.5 / (0.4629100 + 1e-4) = +-1.0798902.
    adv, std = group_advantages(rewards, 4, scale="batch")
    b = 0.5 / (math.sqrt(3 / 14) + 1e-4)
    assert b == pytest.approx(1.0798902, abs=1e-7)
    torch.testing.assert_close(adv, torch.tensor([b, -b, -b, b, 0, 0, 0, 0]))
    torch.testing.assert_close(std, torch.full((8,), math.sqrt(3 / 14)))


def test_equal_rewards_give_exactly_zero_advantage():
    # 0.1 is not a float32 sum-friendly number: a plain mean leaves a residual TRL would amplify.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 0.9, 0.5])
    for scale in ("group", "batch", "none"):
        adv, std = group_advantages(rewards, 3, scale=scale)
        assert adv[:6].tolist() == [0.0] * 6, scale
        assert adv[6:].abs().min() > 0
        if scale != "batch":
            assert std[:6].tolist() == [0.0] * 6
    adv, std = group_advantages(torch.tensor([1.0, 0.0, 2.0]), 1)  # groups of one: nothing to compare
    assert adv.tolist() == [0.0] * 3 and std.tolist() == [0.0] * 3


@pytest.mark.hf
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trls_formula(scale):
    """TRL's advantage code sits inside _generate_and_score_completions (generation, reward calls):
    not callable alone. Its lines for sum_then_normalize, with TRL's own nanstd, on random rewards."""
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    k = 4
    rewards = torch.randn(6 * k)
    rewards[k : 2 * k] = 0.5  # one flat group
    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k)
    std = nanstd(rewards) * torch.ones_like(rewards) if scale == "batch" else nanstd(rewards.view(-1, k), dim=1)
    std = std if scale == "batch" else std.repeat_interleave(k)
    trl_adv = rewards - mean if scale == "none" else (rewards - mean) / (std + 1e-4)
    adv, ours_std = group_advantages(rewards, k, scale=scale)
    torch.testing.assert_close(adv, trl_adv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_std, std, rtol=1e-6, atol=1e-7)
    trl_frac = torch.isclose(std, torch.zeros_like(std)).float().mean()
    assert torch.isclose(ours_std, torch.zeros_like(ours_std)).float().mean() == trl_frac


def test_group_advantages_refuse_bad_options():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="grup")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)


# --- the trainer's accumulation contract ------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_micro_batches_combine_to_the_whole_batch(loss_type, beta):
    """sum(loss_sum) / sum(normalizer) over 2 micro-batches of 4 = the loss of the batch of 8, and so
    are the gradients, though the halves hold different numbers of tokens (24 vs 12)."""
    torch.manual_seed(0)
    logits = torch.randn(8, 6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (8, 6))
    mask = torch.arange(6)[None] < torch.tensor([6, 6, 6, 6, 3, 3, 3, 3])[:, None]
    advantages = torch.randn(8)
    with torch.no_grad():
        current, _ = token_logps_and_entropy(logits, targets)
    old, ref = current + 0.3 * torch.randn(8, 6), current + 0.1 * torch.randn(8, 6)
    kw = dict(loss_type=loss_type, beta=beta, max_completion_length=8)

    def loss_on(rows):
        logps, _ = token_logps_and_entropy(logits[rows], targets[rows])
        return grpo_loss(logps, old[rows], ref[rows], advantages[rows], mask[rows], **kw)[:2]

    whole_sum, whole_n = loss_on(slice(None))
    (whole_sum / whole_n).backward()
    whole_grad, logits.grad = logits.grad.clone(), None
    parts = [loss_on(slice(0, 4)), loss_on(slice(4, 8))]
    total_n = sum(n for _, n in parts)
    for s, _ in parts:  # as the trainer: each micro-batch backpropagates its share
        (s / total_n).backward()
    combined = sum(s.detach() for s, _ in parts) / total_n
    torch.testing.assert_close(combined, (whole_sum / whole_n).detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits.grad, whole_grad, rtol=1e-5, atol=1e-7)


def test_bnpo_is_window_global_unlike_trls_per_micro_batch_mean():
    """Documented deviation: TRL's bnpo averages per-micro-batch token means; ours is the window's
    token mean (as dapo). They differ when micro-batches hold different token counts."""
    torch.manual_seed(0)
    logps = torch.randn(4, 5)
    mask = torch.arange(5)[None] < torch.tensor([5, 5, 1, 1])[:, None]
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5])
    halves = [grpo_loss(logps[r], None, None, adv[r], mask[r], loss_type="bnpo") for r in (slice(0, 2), slice(2, 4))]
    ours = sum(h[0] for h in halves) / sum(h[1] for h in halves)
    trl_like = sum(h[0] / h[1] for h in halves) / 2
    per_token = -adv[:, None].expand(4, 5)[mask]  # ratio 1: loss_t = -A
    assert ours.item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    assert abs(trl_like.item() - ours.item()) > 0.1


# --- bad options --------------------------------------------------------------------------------


def test_bad_loss_options_are_refused():
    logps, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type.*'drgrpo'"):
        grpo_loss(logps, None, None, adv, mask, loss_type="drgrpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, adv, mask, beta=0.1)


def test_dr_grpo_constant_defaults_to_the_mask_width():
    torch.manual_seed(0)
    logps, adv = torch.randn(3, 4), torch.randn(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    default = grpo_loss(logps, None, None, adv, mask, loss_type="dr_grpo")
    explicit = grpo_loss(logps, None, None, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    assert default[0].item() == explicit[0].item() and default[1].item() == 3
    # loss_t = -A on-policy: the token sum over sequences * width.
    expected = -(adv[:, None] * mask).sum() / (3 * 4)
    assert (default[0] / default[1]).item() == pytest.approx(expected.item(), rel=1e-6)

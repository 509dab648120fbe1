"""DPO: the loss against its formula and against TRL, reference handling, pair encoding and bad
records, and `modernlm dpo` raising the chosen reply's log-probability against the rejected one."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from modernlm.align.dpo import (
    PreferenceDataConfig,
    collate_pairs,
    dpo_loss_fn,
    encode_pair,
    load_pairs,
    read_pairs,
    reference_logps,
)
from modernlm.chat import IGNORE_INDEX, ChatEncoder
from modernlm.checkpoint import save_model
from modernlm.cli import run_command
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.tokenizer import byte_tokenizer
from modernlm.train.losses import dpo_loss, sequence_logps
from tests.conftest import tiny_config


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_loss_matches_the_formula(eps):
    pc, pr, rc, rr = [-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.5], [-2.5, -2.5]
    beta = 0.5
    losses, r_c, r_r = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    for i in range(2):
        h = (pc[i] - pr[i]) - (rc[i] - rr[i])  # 1.5 and -2.5
        want = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert r_c[i].item() == pytest.approx(beta * (pc[i] - rc[i]))
        assert r_r[i].item() == pytest.approx(beta * (pr[i] - rr[i]))


def test_sequence_logps_sums_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, IGNORE_INDEX], [IGNORE_INDEX, 6, 0, 2, 5]])
    logps, n = sequence_logps(logits, labels)
    lp = logits.log_softmax(-1)
    assert logps[0].item() == pytest.approx(lp[0, 1, 3].item() + lp[0, 2, 1].item(), rel=1e-6)
    assert logps[1].item() == pytest.approx(sum(lp[1, t - 1, labels[1, t]].item() for t in range(1, 5)), rel=1e-6)
    assert n.tolist() == [2, 4]


def _pairs(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        out.append({"prompt": f"Add {a} and {b}.", "chosen": f"{a + b}", "rejected": f"{wrong}"})
    return out


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_pairs_encode_with_shared_prompt_and_masked_labels(tmp_path):
    tok = byte_tokenizer()
    enc = ChatEncoder(tok)
    pair = {"prompt": [{"role": "user", "content": "Which?"}], "chosen": "this one", "rejected": "no"}
    item = encode_pair(enc, pair, 512)
    prompt = enc.prompt(pair["prompt"])
    for side in ("chosen", "rejected"):
        ids, labels = item[f"{side}_ids"], item[f"{side}_labels"]
        assert ids == prompt + enc.reply(pair[side])
        assert labels == [IGNORE_INDEX] * len(prompt) + enc.reply(pair[side])
    # Too long: the prompt is cut from the left, the replies are kept whole.
    cut = encode_pair(enc, pair, len(enc.reply("this one")) + 3)
    assert cut["chosen_ids"][-len(enc.reply("this one")) :] == enc.reply("this one")
    assert len(cut["chosen_ids"]) == len(enc.reply("this one")) + 3
    batch = collate_pairs([item, item], tok.pad_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows


def test_bad_pair_records_name_file_and_line(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    for row, message in [
        ({"prompt": "q", "chosen": "a"}, r"pairs.jsonl line 2: 'rejected' must be a non-empty string"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"line 2: 'prompt' must be a non-empty string or a list"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                "chosen": "a",
                "rejected": "b",
            },
            r"line 2: the prompt must end with a user message",
        ),  # fmt: skip
        ("{not json", r"pairs.jsonl line 2"),
    ]:
        path = _write_jsonl(tmp_path / "pairs.jsonl", [good, row])
        with pytest.raises(UserError, match=message):
            list(read_pairs(PreferenceDataConfig(path=str(path))))


def test_hh_rlhf_pairs_from_the_real_test_split(shared_data):
    cfg = PreferenceDataConfig(
        format="hh_rlhf", path=str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"), max_examples=50
    )
    items, skipped = load_pairs(cfg, ChatEncoder(byte_tokenizer()), seed=0)
    assert 40 <= len(items) <= 50
    assert all(it["chosen_ids"] != it["rejected_ids"] for it in items)


def test_held_out_pairs_are_the_first_val_fraction_and_none_is_said(tmp_path):
    from modernlm.align.dpo import DPOEvalSettings, load_pair_splits

    path = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(20))
    enc = ChatEncoder(byte_tokenizer())
    everything, _ = load_pairs(PreferenceDataConfig(path=str(path)), enc, seed=0)
    train, val, _ = load_pair_splits(PreferenceDataConfig(path=str(path)), DPOEvalSettings(val_fraction=0.2), enc)
    assert (val, train) == (everything[:4], everything[4:])
    with pytest.warns(UserWarning, match="val_fraction=0.01 holds out none of 20 examples: no validation"):
        train, val, _ = load_pair_splits(PreferenceDataConfig(path=str(path)), DPOEvalSettings(val_fraction=0.01), enc)
    assert (len(train), len(val)) == (20, 0)


def _policy_and_items(n_pairs: int = 8):
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=64))
    enc = ChatEncoder(tok)
    items = []
    for i, p in enumerate(_pairs(n_pairs)):
        pair = {**p, "prompt": [{"role": "user", "content": p["prompt"]}]}
        items.append({**encode_pair(enc, pair, 64), "source": str(i)})
    return model, tok, items


def test_first_loss_is_log2_and_live_reference_equals_precomputed():
    model, tok, items = _policy_and_items()
    reference_logps(model, items, 3, tok.pad_id, torch.device("cpu"), contextlib.nullcontext)
    batch = collate_pairs(items, tok.pad_id)
    loss_sum, n, metrics = dpo_loss_fn(0.1)(model, batch)
    assert n == len(items)
    assert (loss_sum / n).item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert abs(metrics["rewards/margins"].item()) < 1e-5
    # A reference with other weights: precomputed log-probs and a live forward give the same loss.
    ref = ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=64)).eval()
    reference_logps(ref, items, 3, tok.pad_id, torch.device("cpu"), contextlib.nullcontext)
    pre = dpo_loss_fn(0.1)(model, collate_pairs(items, tok.pad_id))
    live_batch = {k: v for k, v in collate_pairs(items, tok.pad_id).items() if k != "ref_logps"}
    live = dpo_loss_fn(0.1, ref_model=ref)(model, live_batch)
    torch.testing.assert_close(pre[0], live[0], rtol=1e-5, atol=1e-5)


def _trl_and_ours(tmp_path, sft_weight: float = 0.0, label_smoothing: float = 0.0, trl_bf16=False, our_bf16=False):
    """TRL's DPOTrainer.compute_loss on a tiny Llama and our loss_fn on the same weights converted to
    ours, with a reference that has other weights; both in float32 unless `*_bf16` (the precision
    change the test must notice). Returns (TRL's loss, TRL's metrics, our loss, our metrics).

    sft_weight > 0: TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, sft_weight] (RPO).
    label_smoothing > 0: our conservative DPO (cDPO) against TRL's "aot" loss on one pair at a time:
    TRL 1.x dropped label smoothing from "sigmoid", and "aot" is exactly cDPO's formula once the sort
    it applies over the batch has a batch of one to sort."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from modernlm.hf.convert import from_hf

    tok = byte_tokenizer()
    tok.save(tmp_path / "tok")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg).float()
    torch.manual_seed(1)
    ref = LlamaForCausalLM(cfg).float()
    pairs = _pairs(4)
    loss_type = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}
    if label_smoothing:
        loss_type = {"loss_type": ["aot"], "label_smoothing": label_smoothing}
    # bf16 / fp16 named explicitly: recent TRL turns bf16 mixed precision on by default, which runs
    # its forward passes under bf16 autocast.
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to="none", beta=0.3,
        use_cpu=True, max_steps=1, precompute_ref_log_probs=False, bf16=trl_bf16, fp16=False, **loss_type,
    )  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=hf_tok)  # fmt: skip
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    with torch.no_grad():
        if label_smoothing:
            trl_loss = sum(trainer.compute_loss(trainer.model, trainer.data_collator([r])).item() for r in rows)
            trl_loss /= len(rows)
        else:
            trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # The same token ids in our layout: prompt + completion, labels on the completion only.
    items = []
    for r in rows:
        item = {}
        for side in ("chosen", "rejected"):
            ids = r["prompt_ids"] + r[f"{side}_ids"]
            item[f"{side}_ids"] = ids
            item[f"{side}_labels"] = [IGNORE_INDEX] * len(r["prompt_ids"]) + r[f"{side}_ids"]
        items.append(item)
    ours_policy, ours_ref = from_hf(policy).eval(), from_hf(ref).eval()
    assert {p.dtype for p in ours_policy.parameters()} == {torch.float32}
    autocast = torch.autocast("cpu", torch.bfloat16) if our_bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        loss_fn = dpo_loss_fn(0.3, label_smoothing, ref_model=ours_ref, sft_weight=sft_weight)
        loss_sum, n, metrics = loss_fn(ours_policy, collate_pairs(items, tok.pad_id))
    return trl_loss, trl_metrics, (loss_sum / n).item(), {k: v.item() for k, v in metrics.items()}


# Both sides in float32. float64 is not available on TRL's side: its fused LM head computes the
# log-softmax with float32 accumulators whatever the model's dtype (ours does it in float32 too).
# The two add the same terms in other orders, so they agree to float32 rounding: measured, the loss
# (~0.68, ulp 6e-8) differs by 6e-8 and the log-probs (~17) by 0. LOSS_TOL is ~16 ulps of the loss
# and 10x below the smallest precision change measured: bf16 autocast on TRL's side moves the loss
# by 1.05e-5, bf16 on ours by 1.4e-4. Sequence log-probs are sums of ~30 float32 terms of ~0.6
# each: sqrt(30) ulps of 17 is ~1e-5.
LOSS_TOL, LOGP_TOL = 1e-6, 1e-5


@pytest.mark.hf
@pytest.mark.parametrize(("sft_weight", "label_smoothing"), [(0.0, 0.0), (0.5, 0.0), (0.0, 0.2)])
def test_loss_and_metrics_equal_trl(tmp_path, sft_weight, label_smoothing):
    pytest.importorskip("trl")
    trl_loss, trl_metrics, loss, metrics = _trl_and_ours(tmp_path, sft_weight, label_smoothing)
    assert loss == pytest.approx(trl_loss, abs=LOSS_TOL, rel=0)
    if label_smoothing:
        return  # TRL's metrics are those of the last single-pair call
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=LOSS_TOL, rel=0), key
    for key in ("logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=LOGP_TOL, rel=0), key


@pytest.mark.hf
@pytest.mark.parametrize("side", ["trl", "ours"])
def test_trl_comparison_fails_when_one_side_changes_precision(tmp_path, side):
    """The tolerance above is tight enough to see bf16 on either side."""
    pytest.importorskip("trl")
    trl_loss, _, loss, _ = _trl_and_ours(tmp_path, trl_bf16=side == "trl", our_bf16=side == "ours")
    assert abs(loss - trl_loss) > LOSS_TOL


def test_dpo_command_raises_chosen_against_rejected(tmp_path):
    from modernlm.cli import main

    model, tok, _ = _policy_and_items()
    save_model(model, tmp_path / "sft", tok)

    # A preference a small model can pick up: answer, do not refuse. The answer is the longer reply, so
    # the untrained model gives it the lower log-probability (pair accuracy ~0 before).
    def refuse(pairs):
        return [{**p, "chosen": f"The sum is {p['chosen']}.", "rejected": "No."} for p in pairs]

    _write_jsonl(tmp_path / "pairs.jsonl", refuse(_pairs(96)))
    _write_jsonl(tmp_path / "val.jsonl", refuse(_pairs(24, seed=1)))
    with pytest.raises(SystemExit) as e:
        main(["dpo", str(tmp_path / "sft"), f"data.path={tmp_path / 'pairs.jsonl'}", "data.max_length=48",
              f"eval.val_path={tmp_path / 'val.jsonl'}", "train.num_steps=40", "train.batch_size=8",
              "optim.lr=2e-3", "dpo.beta=0.5", "train.eval_every=20", "train.progress=false",
              f"run.out_dir={tmp_path}", "run.name=dpo"])  # fmt: skip
    assert e.value.code == 0
    report = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    before, after = report["before"], report["after"]
    # The chosen reply's log-probability rose against the rejected one's, on held-out pairs too.
    assert after["logps/chosen"] - after["logps/rejected"] > before["logps/chosen"] - before["logps/rejected"] + 1.0
    assert after["rewards/margins"] > 0.2 and after["rewards/accuracies"] > 0.7
    assert after["pair_accuracy"] >= before["pair_accuracy"]
    metrics = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*metrics)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= logged
    assert {"val_rewards/accuracies", "val_rewards/margins"} <= logged and not {"ppl", "val_ppl"} & logged
    # so `plot` draws its loss and no perplexity made up from it
    assert run_command("plot", [str(tmp_path / "dpo")]) == 0
    assert sorted(p.name for p in (tmp_path / "dpo").glob("*.png")) == ["loss_vs_step.png", "loss_vs_tokens.png"]

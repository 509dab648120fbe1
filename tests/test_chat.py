"""SFT: ChatML encoding and its loss mask, chat tokens in tokenizer and model, packing, batches,
bad records, and `modernlm sft` learning to answer and to stop."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from modernlm.align.sft import (
    SFTBatches,
    SFTDataConfig,
    SFTEvalSettings,
    collate_sft,
    load_sft_examples,
    load_sft_splits,
    pack_examples,
    prepare_chat_model,
    read_sft_records,
    sft_loss,
)
from modernlm.chat import IGNORE_INDEX, IM_END, IM_START, ChatEncoder, render_chat
from modernlm.checkpoint import save_model
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from modernlm.tokenizer import byte_tokenizer, load_tokenizer
from tests.conftest import tiny_config

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there!\nHow are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "And 3 + 4?"},
    {"role": "assistant", "content": " 3 + 4 = 7 "},
]


def _trained_text(tok, ids, labels):
    """The labelled tokens, as runs of text (one string per contiguous labelled span)."""
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i  # labels are aligned with the inputs (the shift is the loss's)
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


@pytest.fixture(params=["byte", "gpt2"])
def chat_tokenizer(request, shared_data):
    if request.param == "byte":
        return byte_tokenizer()
    tok = load_tokenizer(shared_data / "gpt2-tokenizer")
    model = ModernDecoderLM(tiny_config(vocab_size=50257))
    prepare_chat_model(model, tok)
    return tok


def test_encode_decodes_to_the_rendered_chat_and_trains_on_replies_only(chat_tokenizer):
    enc = ChatEncoder(chat_tokenizer)
    ids, labels = enc.encode(CHAT)
    assert chat_tokenizer.decode(ids) == render_chat(CHAT)
    assert _trained_text(chat_tokenizer, ids, labels) == [f"Fine, thanks.{IM_END}", f" 3 + 4 = 7 {IM_END}"]
    # Only the last reply trains when asked; the earlier one is context.
    _, last_only = enc.encode(CHAT, train_on_all_assistant=False)
    assert _trained_text(chat_tokenizer, ids, last_only) == [f" 3 + 4 = 7 {IM_END}"]
    # Generation starts exactly where the last reply's tokens start.
    prompt = enc.prompt(CHAT[:-1])
    assert ids[: len(prompt)] == prompt and chat_tokenizer.decode(prompt).endswith(f"{IM_START}assistant\n")
    assert ids[len(prompt) : len(prompt) + len(enc.reply(CHAT[-1]["content"]))] == enc.reply(CHAT[-1]["content"])


def test_render_matches_the_stored_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    tok = byte_tokenizer()
    template = jinja2.Environment().from_string(tok.chat_template)
    assert template.render(messages=CHAT, add_generation_prompt=True) == render_chat(CHAT, add_generation_prompt=True)


def test_prepare_chat_model_adds_tokens_and_mean_rows(shared_data):
    tok = load_tokenizer(shared_data / "gpt2-tokenizer")  # GPT-2 has no chat tokens
    model = ModernDecoderLM(tiny_config(vocab_size=50257)).eval()
    x = torch.randint(0, 50257, (1, 12))
    before = model(x).logits
    mean = model.tok_emb.weight.mean(0).clone()
    assert prepare_chat_model(model, tok) == [IM_START, IM_END]
    assert model.config.vocab_size == 50304 and tok.vocab_size == 50259  # grown to a multiple of 64
    for t in (IM_START, IM_END):
        torch.testing.assert_close(model.tok_emb.weight[tok.token_to_id(t)], mean)
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    torch.testing.assert_close(model(x).logits[..., :50257], before)  # old tokens: same predictions
    assert tok.eos_token == IM_END and tok.eos_id == tok.token_to_id(IM_END)
    assert prepare_chat_model(model, tok) == []  # idempotent


def test_prepare_chat_model_untied_head():
    tok = byte_tokenizer(special_tokens=("<|endoftext|>", "<|pad|>"))
    model = ModernDecoderLM(tiny_config(vocab_size=258, tie_embeddings=False))
    head_mean = model.lm_head.weight.mean(0).clone()
    prepare_chat_model(model, tok)
    assert model.lm_head.weight.shape == (320, 32)
    torch.testing.assert_close(model.lm_head.weight[tok.token_to_id(IM_END)], head_mean)


def test_packed_rows_give_the_unpacked_losses():
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=64)).eval()
    enc = ChatEncoder(byte_tokenizer())
    examples = []
    for a in range(5):
        ids, labels = enc.encode([{"role": "user", "content": f"q{a}"}, {"role": "assistant", "content": "ab" * a}])
        examples.append({"input_ids": ids, "labels": labels})
    rows = pack_examples(examples, 64)
    assert len(rows) < len(examples)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(ex["input_ids"]) for ex in examples)
    assert all(r["segment_ids"][0] == 0 and r["segment_ids"] == sorted(r["segment_ids"]) for r in rows)
    packed_sum, packed_n, _ = sft_loss(model, collate_sft(rows, 0))
    single = [sft_loss(model, collate_sft([ex], 0)) for ex in examples]
    torch.testing.assert_close(packed_sum, sum(s for s, _, _ in single), rtol=1e-5, atol=1e-5)
    assert packed_n == sum(n for _, n, _ in single)


def test_sft_batches_resume_exactly():
    enc = ChatEncoder(byte_tokenizer())
    examples = [
        dict(zip(("input_ids", "labels"), enc.encode([{"role": "user", "content": str(i)},
                                                      {"role": "assistant", "content": "x" * i}]), strict=True))
        for i in range(1, 30)
    ]  # fmt: skip
    for pack in (False, True):
        a = SFTBatches(examples, 4, 0, pack=pack, max_length=64, seed=3)
        for _ in range(5):
            next(a)
        b = SFTBatches(examples, 4, 0, pack=pack, max_length=64, seed=3)
        b.load_state_dict(a.state_dict())
        for _ in range(12):  # across an epoch boundary
            x, y = next(a), next(b)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sources_and_bad_records(tmp_path, shared_data):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad_role = {"messages": [{"role": "human", "content": "hi"}]}
    path = _write_jsonl(tmp_path / "chats.jsonl", [good, bad_role])
    with pytest.raises(UserError, match=r"chats.jsonl line 2: message 1 has role 'human'"):
        list(read_sft_records(SFTDataConfig(format="chat", path=str(path))))
    no_reply = _write_jsonl(tmp_path / "noreply.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match=r"line 1: a chat needs at least one assistant"):
        list(read_sft_records(SFTDataConfig(format="chat", path=str(no_reply))))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Sum", "input": "1 2", "output": "3"}, {"instruction": "x"}]))
    with pytest.raises(UserError, match=r"alpaca.json record 2: missing field 'output'"):
        list(read_sft_records(SFTDataConfig(format="alpaca", path=str(alpaca))))
    alpaca.write_text(
        json.dumps([{"instruction": "Sum", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Hello"}])
    )
    got = [m for _, m in read_sft_records(SFTDataConfig(format="alpaca", path=str(alpaca), system="S"))]
    assert got[0] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Sum\n\n1 2"},
                      {"role": "assistant", "content": "3"}]  # fmt: skip
    assert got[1][1] == {"role": "user", "content": "Hi"}
    gsm = next(read_sft_records(SFTDataConfig(format="gsm8k", path=str(shared_data / "gsm8k" / "test.jsonl"))))[1]
    assert gsm[0]["role"] == "user" and "####" in gsm[1]["content"]
    # Examples whose reply is cut off entirely are dropped; none left is an error naming the limit.
    with pytest.raises(UserError, match="max_length=8"):
        load_sft_examples(SFTDataConfig(format="alpaca", path=str(alpaca), max_length=8), ChatEncoder(byte_tokenizer()))
    # some dropped, or none held out for validation: said, not silent
    long = {"instruction": "x" * 80, "output": "y"}
    alpaca.write_text(json.dumps([long, {"instruction": "Hi", "output": "Hello"}]))
    cfg = SFTDataConfig(format="alpaca", path=str(alpaca), max_length=60)
    with pytest.warns(UserWarning, match="1 of 2 SFT examples have no assistant reply within max_length=60"):
        assert len(load_sft_examples(cfg, ChatEncoder(byte_tokenizer()))) == 1
    with pytest.warns(UserWarning, match="holds out none of 2 examples"):
        train, val, _ = load_sft_splits(replace(cfg, max_length=512), SFTEvalSettings(), ChatEncoder(byte_tokenizer()))
    assert (len(train), len(val)) == (2, 0)


def test_sft_command_learns_to_answer_and_stop(tmp_path):
    from modernlm.cli import main

    torch.manual_seed(0)
    tok = byte_tokenizer()
    save_model(ModernDecoderLM(tiny_config(vocab_size=320, d_model=64, max_seq_len=64)), tmp_path / "base", tok)
    records = [{"instruction": f"Echo {w}.", "input": "", "output": w} for w in ("cat", "dog", "sun", "sky") * 20]
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(SystemExit) as e:
        main(["sft", str(tmp_path / "base"), f"data.path={tmp_path / 'data.json'}", "data.max_length=48",
              "train.num_steps=120", "train.batch_size=16", "optim.lr=5e-3", "train.eval_every=60",
              "train.progress=false", f"run.out_dir={tmp_path}", "run.name=sft", "eval.generate=4"])  # fmt: skip
    assert e.value.code == 0
    run = tmp_path / "sft"
    report = json.loads((run / "eval.json").read_text())
    assert report["eos_rate"] == 1.0  # every held-out reply ended with <|im_end|>
    samples = (run / "samples.md").read_text()
    for w in ("cat", "dog", "sun", "sky"):
        if f"Echo {w}." in samples:
            assert f"**assistant:** {w}\n" in samples
    saved = load_tokenizer(run / "checkpoints" / "best")
    assert saved.eos_token == IM_END  # the chat model's EOS travels with the checkpoint
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert vals[-1] < 0.2 * vals[0]

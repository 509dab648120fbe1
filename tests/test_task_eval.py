"""task_eval: label scoring against a direct log-softmax computation, generation against the
reference generate functions (ours and transformers'), and evaluate_task's metrics and logs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from modernlm.data.tasks import TaskDatasetConfig, load_task_examples
from modernlm.eval.metrics import accuracy, gsm8k_exact_match, macro_f1, rouge
from modernlm.eval.prompting import STOPS, demonstrations, evaluate_task, score_choices
from modernlm.generation import generate
from modernlm.hf.text import wrap_hf
from modernlm.model import ModernDecoderLM
from modernlm.textmodel import TaskModel, TaskTokenizer, wrap_modernlm
from modernlm.tokenizer import load_tokenizer
from tests.conftest import tiny_config

GPT2_VOCAB = 50257
EOT = 50256  # <|endoftext|>: GPT-2's bos, eos (and our pad)

PROMPTS = ["Review: a gorgeous film\nSentiment:", "Hi", "Review: dull , flat and far too long\nSentiment:"]
ONE_TOKEN = [" positive", " negative"]  # one GPT-2 token each
MULTI_TOKEN = [" positive", " very negative", " so-so"]


@pytest.fixture(scope="module")
def gpt2_dir():
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "gpt2-tokenizer"
    if not path.is_dir():
        pytest.skip(f"GPT-2 tokenizer files not found at {path}")
    return path


@pytest.fixture(scope="module")
def hf_tok(gpt2_dir):
    return transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))


@pytest.fixture(scope="module")
def ours_tok(gpt2_dir):
    return load_tokenizer(gpt2_dir)


@pytest.fixture(scope="module")
def ours(ours_tok):
    torch.manual_seed(0)
    return ModernDecoderLM(tiny_config(vocab_size=GPT2_VOCAB, max_seq_len=128)).eval()


def _llama(max_positions: int = 128):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=GPT2_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=EOT, eos_token_id=EOT,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=GPT2_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        decoder_start_token_id=EOT, pad_token_id=EOT, eos_token_id=EOT,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module", params=["ours", "llama", "gpt2"])
def causal(request, ours, ours_tok, hf_tok):
    """(TaskModel, logits of one unpadded row) for each kind of decoder-only model."""
    if request.param == "ours":
        return wrap_modernlm(ours, ours_tok), lambda ids: ours(ids).logits
    model = _llama() if request.param == "llama" else _gpt2()
    return wrap_hf(model, hf_tok), lambda ids: model(input_ids=ids).logits


def direct_score(logits_fn, tok: TaskTokenizer, prompt: str, choice: str) -> float:
    """sum over the choice tokens of log_softmax(logits)[t - 1, id_t], from one full unpadded forward."""
    p, c = tok.encode(prompt), tok.encode(choice)
    ids = torch.tensor([p + c])
    with torch.no_grad():
        lp = logits_fn(ids)[0].float().log_softmax(-1)
    return sum(lp[len(p) + j - 1, t].item() for j, t in enumerate(c))


# ---------------------------------------------------------------------------------------------
# score_choices


@pytest.mark.parametrize("choices", [ONE_TOKEN, MULTI_TOKEN], ids=["one-token", "multi-token"])
def test_score_choices_matches_direct_computation(causal, choices):
    tm, logits_fn = causal
    expected = torch.tensor(
        [[direct_score(logits_fn, tm.tokenizer, p, c) for c in choices] for p in PROMPTS], dtype=torch.float64
    )
    batched = score_choices(tm, PROMPTS, choices, batch_size=4)
    assert batched.shape == (len(PROMPTS), len(choices))
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=1e-5)
    # Padding must not change a score: one by one (no padding at all) equals the padded batch.
    alone = torch.cat([score_choices(tm, [p], choices, batch_size=1) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-5)
    lengths = torch.tensor([len(tm.tokenizer.encode(c)) for c in choices], dtype=torch.float64)
    torch.testing.assert_close(score_choices(tm, PROMPTS, choices, normalize=True), expected / lengths)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_of_a_padded_batch_equal_each_row_alone(causal, side):
    from modernlm.textmodel import pad_rows

    tm, logits_fn = causal
    rows = tm.prompt_ids_batch(PROMPTS)
    ids, mask = pad_rows(rows, tm.tokenizer.pad_id, side)
    batch = tm.logits(ids, mask)
    for b, r in enumerate(rows):
        with torch.no_grad():
            alone = logits_fn(torch.tensor([r]))[0].float()
        real = batch[b, : len(r)] if side == "right" else batch[b, ids.size(1) - len(r) :]
        torch.testing.assert_close(real, alone, atol=1e-4, rtol=1e-4)


def test_score_choices_seq2seq_matches_hf_loss(hf_tok):
    """T5: log p(choice | prompt) from transformers' own loss with labels (it shifts them itself)."""
    model = _t5()
    tm = wrap_hf(model, hf_tok)
    assert tm.is_encoder_decoder
    got = score_choices(tm, PROMPTS, MULTI_TOKEN, batch_size=4)
    for i, p in enumerate(PROMPTS):
        enc = torch.tensor([tm.tokenizer.encode(p) + [EOT]])
        for j, c in enumerate(MULTI_TOKEN):
            labels = torch.tensor([tm.tokenizer.encode(c)])
            with torch.no_grad():
                loss = model(input_ids=enc, labels=labels).loss.item()  # mean over the choice tokens
            assert got[i, j].item() == pytest.approx(-loss * labels.size(1), abs=1e-4)


def test_score_choices_cuts_long_prompts_from_the_left(hf_tok):
    """A prompt past the model's context is scored on its last tokens (prompt + choice fit the context)."""
    tm = wrap_hf(_llama(max_positions=16), hf_tok)
    long = " ".join(f"word{i}" for i in range(40))
    ids = tm.tokenizer.encode(long)
    choice = tm.tokenizer.encode(" positive")
    tail = tm.tokenizer.decode(ids[-(16 - len(choice)) :])
    assert tm.tokenizer.encode(tail) == ids[-(16 - len(choice)) :]  # the decoded tail re-encodes exactly
    torch.testing.assert_close(
        score_choices(tm, [long], [" positive"]), score_choices(tm, [tail], [" positive"]), atol=1e-5, rtol=0
    )


def test_score_choices_restores_training_mode(ours, ours_tok):
    ours.train()
    try:
        score_choices(wrap_modernlm(ours, ours_tok), PROMPTS[:1], ONE_TOKEN)
        assert ours.training
    finally:
        ours.eval()


# ---------------------------------------------------------------------------------------------
# generate


GEN_PROMPTS = ["Once upon a time", "The cat", "In 1999 the committee decided that"]


def _decode(tok: TaskTokenizer, new: list[int]) -> str:
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    return tok.tokenizer.decode(new, skip_special_tokens=True)


def test_wrap_modernlm_generate_equals_generation_generate(ours, ours_tok):
    tm = wrap_modernlm(ours, ours_tok)
    got = tm.generate(GEN_PROMPTS, max_new_tokens=12)  # one left-padded batch
    for prompt, text in zip(GEN_PROMPTS, got, strict=True):
        ids = torch.tensor([ours_tok.encode(prompt)])
        out = generate(ours, ids, 12, eos_token_id=ours_tok.eos_id)
        assert text == _decode(tm.tokenizer, out[0, ids.size(1) :].tolist())


def test_generate_refuses_a_budget_that_leaves_no_room_for_the_prompt(causal):
    """As lm-eval's HFLM: max_new_tokens >= the context would cut every prompt to its last token."""
    from modernlm.errors import UserError

    tm, _ = causal
    assert tm.max_length == 128
    assert len(tm.generate(["Hi"], max_new_tokens=127)) == 1  # one token of prompt still fits
    with pytest.raises(UserError, match="^max_new_tokens: 128 leaves no room for a prompt .* 128 tokens"):
        tm.generate(GEN_PROMPTS, max_new_tokens=128)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_wrap_hf_generate_equals_hf_greedy(hf_tok, kind):
    model = _llama() if kind == "llama" else _gpt2()
    tm = wrap_hf(model, hf_tok)
    got = tm.generate(GEN_PROMPTS, max_new_tokens=12)
    for prompt, text in zip(GEN_PROMPTS, got, strict=True):
        ids = torch.tensor([hf_tok(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=EOT, eos_token_id=EOT)
        assert text == _decode(tm.tokenizer, out[0, ids.size(1) :].tolist())


def test_wrap_hf_seq2seq_generate_equals_hf_greedy(hf_tok):
    model = _t5()
    tm = wrap_hf(model, hf_tok)
    got = tm.generate(GEN_PROMPTS, max_new_tokens=6)
    for prompt, text in zip(GEN_PROMPTS, got, strict=True):
        ids = torch.tensor([hf_tok(prompt)["input_ids"] + [EOT]])
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert text == _decode(tm.tokenizer, out[0, 1:].tolist())


@pytest.mark.parametrize("kind", ["ours", "llama"])
def test_generate_cuts_at_stop_strings(ours, ours_tok, hf_tok, kind):
    tm = wrap_modernlm(ours, ours_tok) if kind == "ours" else wrap_hf(_llama(), hf_tok)
    full = tm.generate(GEN_PROMPTS, max_new_tokens=12)
    # A stop string from the middle of each continuation: the text ends right before it.
    stops = [text[len(text) // 2 : len(text) // 2 + 3] for text in full]
    assert all(len(s) == 3 for s in stops)
    got = tm.generate(GEN_PROMPTS, max_new_tokens=12, stop=stops)
    for text, cut in zip(full, got, strict=True):
        first = min(i for s in stops if (i := text.find(s)) >= 0)
        assert cut == text[:first]


def test_sampling_is_seeded_and_leaves_global_rng(ours, ours_tok, hf_tok):
    for tm in (wrap_modernlm(ours, ours_tok), wrap_hf(_llama(), hf_tok)):
        state = torch.get_rng_state()
        a = tm.generate(GEN_PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=3)
        b = tm.generate(GEN_PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=3)
        assert a == b
        assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# evaluate_task


@pytest.fixture(scope="module")
def sst2_examples(shared_data_dir):
    path = str(shared_data_dir / "sst2" / "dev.tsv")
    return load_task_examples(TaskDatasetConfig(name="sst2", path=path, task_type="causal", max_examples=12))


@pytest.fixture(scope="module")
def shared_data_dir():
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_sst2_scoring_metrics_and_logs(ours, ours_tok, sst2_examples, tmp_path):
    tm = wrap_modernlm(ours, ours_tok)
    result = evaluate_task(tm, sst2_examples, "sst2", batch_size=5, out_dir=tmp_path)
    assert (result["task"], result["mode"], result["n"]) == ("sst2", "score", len(sst2_examples))
    rows = _jsonl(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(len(sst2_examples)))
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    assert refs == [["negative", "positive"][ex["label"]] for ex in sst2_examples]
    assert result["accuracy"] == accuracy(preds, refs)
    assert result["macro_f1"] == macro_f1(preds, refs, labels=["negative", "positive"])
    # The logged scores are score_choices' and the prediction is their argmax.
    scores = score_choices(tm, [ex["prompt"] for ex in sst2_examples], [" negative", " positive"])
    torch.testing.assert_close(torch.tensor([r["scores"] for r in rows], dtype=torch.float64), scores)
    assert [r["predicted_label"] for r in rows] == scores.argmax(1).tolist()
    errors = _jsonl(tmp_path / "errors.jsonl")
    assert [e["index"] for e in errors] == [r["index"] for r in rows if r["prediction"] != r["reference"]]
    assert all(e["input"] == sst2_examples[e["index"]]["input"] for e in errors)
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == result["accuracy"]


class CannedModel(TaskModel):
    """A TaskModel that answers from a table (prompt -> continuation) and records its calls."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls = TaskTokenizer(tokenizer), answers, []

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, seed=None):
        self.calls.append((list(prompts), max_new_tokens, list(stop)))
        return [self.answers(p) for p in prompts]


def test_evaluate_sst2_generate_reads_the_first_word(ours_tok, sst2_examples):
    replies = [" Positive.", " negative", " neutral, mostly", ""]
    index = {ex["prompt"]: i for i, ex in enumerate(sst2_examples)}
    assert len(index) == len(sst2_examples)
    tm = CannedModel(ours_tok, lambda p: replies[index[p] % 4])
    result = evaluate_task(tm, sst2_examples, "sst2", mode="generate")
    preds = [["positive", "negative", "neutral", ""][i % 4] for i in range(len(sst2_examples))]
    refs = [["negative", "positive"][ex["label"]] for ex in sst2_examples]
    assert result["accuracy"] == accuracy(preds, refs)
    assert result["macro_f1"] == macro_f1(preds, refs, labels=["negative", "positive"])
    assert all(stop == STOPS["sst2"] for _, _, stop in tm.calls)


def test_evaluate_gsm8k_few_shot_prompts_and_exact_match(ours_tok, shared_data_dir, tmp_path):
    data = shared_data_dir / "gsm8k"
    examples = load_task_examples(TaskDatasetConfig(name="gsm8k", path=str(data / "test.jsonl"), max_examples=4))
    shots = load_task_examples(TaskDatasetConfig(name="gsm8k", path=str(data / "train.jsonl"), max_examples=2))
    prefix = demonstrations(shots)
    assert prefix == "".join(s["prompt"] + s["target"] + "\n\n" for s in shots)
    assert prefix.count("####") == 2  # full worked solutions, final answer included
    by_prompt = {prefix + ex["prompt"]: ex for ex in examples}
    # Right answers (the reference solution) for even examples, a wrong number for odd ones.
    wrong = " It is 1e9 #### 123456789"
    replies = {p: ex["target"] if i % 2 == 0 else wrong for i, (p, ex) in enumerate(by_prompt.items())}
    tm = CannedModel(ours_tok, lambda p: replies[p])
    result = evaluate_task(tm, examples, "gsm8k", few_shot=shots, out_dir=tmp_path, batch_size=3)
    assert result["exact_match_strict"] == result["exact_match_flexible"] == 0.5
    assert {p for prompts, _, _ in tm.calls for p in prompts} == set(by_prompt)
    assert all(n == 256 and stop == STOPS["gsm8k"] for _, n, stop in tm.calls)
    assert (tmp_path / "demonstrations.txt").read_text() == prefix
    assert [e["index"] for e in _jsonl(tmp_path / "errors.jsonl")] == [1, 3]
    rows = _jsonl(tmp_path / "predictions.jsonl")
    assert result == {**result, **gsm8k_exact_match([r["prediction"] for r in rows], [r["reference"] for r in rows])}


def test_evaluate_gsm8k_with_a_real_model_runs(ours, ours_tok, shared_data_dir):
    examples = load_task_examples(
        TaskDatasetConfig(name="gsm8k", path=str(shared_data_dir / "gsm8k" / "test.jsonl"), max_examples=2)
    )
    result = evaluate_task(wrap_modernlm(ours, ours_tok), examples, "gsm8k", max_new_tokens=6)
    assert result["n"] == 2 and 0.0 <= result["exact_match_flexible"] <= 1.0


def test_evaluate_samsum_with_seq2seq_t5(hf_tok, shared_data_dir, tmp_path):
    cfg = TaskDatasetConfig(name="samsum", path=str(shared_data_dir / "samsum" / "test.jsonl"), max_examples=3)
    examples = load_task_examples(cfg)  # seq2seq prompts: "summarize: {dialogue}"
    model = _t5()
    result = evaluate_task(wrap_hf(model, hf_tok), examples, "samsum", max_new_tokens=8, out_dir=tmp_path)
    rows = _jsonl(tmp_path / "predictions.jsonl")
    assert [r["reference"] for r in rows] == [ex["record"]["summary"] for ex in examples]
    # Each prediction is T5's own greedy output for that example alone.
    for ex, row in zip(examples, rows, strict=True):
        ids = torch.tensor([hf_tok(ex["prompt"])["input_ids"] + [EOT]])
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert row["prediction"] == _decode(TaskTokenizer(hf_tok), out[0, 1:].tolist()).split("\n\n")[0].strip()
    expected = rouge([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    assert len(_jsonl(tmp_path / "errors.jsonl")) == 3  # ROUGE logs every example


def test_evaluate_task_rejects_bad_arguments(ours, ours_tok, sst2_examples):
    from modernlm.errors import UserError

    tm = wrap_modernlm(ours, ours_tok)
    with pytest.raises(UserError, match="task"):
        evaluate_task(tm, sst2_examples, "mnli")
    with pytest.raises(UserError, match="mode"):
        evaluate_task(tm, sst2_examples, "sst2", mode="rank")
    with pytest.raises(UserError, match="only sst2"):
        evaluate_task(tm, sst2_examples, "gsm8k", mode="score")
    unlabeled = [{**sst2_examples[0], "label": None, "target": ""}]
    with pytest.raises(UserError, match="no label"):
        evaluate_task(tm, unlabeled, "sst2")

"""Supervised task datasets: real-file parsing, HH-RLHF pair splitting, prompt masks, truncation,
collation, resumable rank-sharded batches, and malformed records named by file and line."""

from __future__ import annotations

import gzip
import json
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from modernlm.data.tasks import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    HHPairError,
    TaskBatches,
    TaskDatasetConfig,
    collate,
    eval_batches,
    gsm8k_final_answer,
    hh_prompt_text,
    load_supervised_text_dataset,
    load_task_examples,
    parse_hh_transcript,
    read_alpaca,
    read_gsm8k,
    read_hh_rlhf,
    read_samsum,
    read_sst2,
    split_hh_pair,
    tokenize_examples,
)
from modernlm.errors import UserError
from modernlm.textmodel import TaskTokenizer
from tests.conftest import SHARED_DATA

HH_FILES = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return [line for line in f if line.strip()]


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    path = SHARED_DATA / "gpt2-tokenizer"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))


@pytest.fixture(scope="module")
def our_gpt2(gpt2_dir):
    from modernlm.tokenizer import load_tokenizer

    return load_tokenizer(gpt2_dir)


# ---------------------------------------------------------------------------------------------
# Real files


def test_sst2_real_files_parse_with_counts_and_first_records(shared_data):
    for name, n_labels in [("dev.tsv", 872), ("test.tsv", 0), ("test-labeled.tsv", 1821)]:
        path = shared_data / "sst2" / name
        raw = _lines(path)
        recs = list(read_sst2(path))
        assert len(recs) == len(raw) - 1  # the header
        assert sum(r["label"] is not None for r in recs) == n_labels
        header = raw[0].rstrip("\r\n").split("\t")
        first = dict(zip(header, raw[1].rstrip("\r\n").split("\t"), strict=True))
        assert recs[0]["text"] == first["sentence"].strip()
        assert recs[0]["label"] == (int(first["label"]) if "label" in first else None)
    dev = list(read_sst2(shared_data / "sst2" / "dev.tsv"))
    assert Counter(r["label"] for r in dev) == {0: 428, 1: 444}  # SOURCE.md's balance


def test_samsum_real_files_parse(shared_data):
    for split in ("train", "validation", "test"):
        path = shared_data / "samsum" / f"{split}.jsonl"
        raw = _lines(path)
        recs = list(read_samsum(path))
        assert len(recs) == len(raw)
        first = json.loads(raw[0])
        assert recs[0] == {
            "id": first["id"],
            "dialogue": first["dialogue"].replace("\r\n", "\n"),
            "summary": first["summary"],
        }
        assert not any("\r\n" in r["dialogue"] for r in recs)


def test_gsm8k_real_files_parse_with_final_answers(shared_data):
    for name in ("train.jsonl", "test.jsonl", "test_socratic.jsonl"):
        path = shared_data / "gsm8k" / name
        raw = _lines(path)
        recs = list(read_gsm8k(path))
        assert len(recs) == len(raw)
        first = json.loads(raw[0])
        assert recs[0]["question"] == first["question"] and recs[0]["answer"] == first["answer"]
        assert all(re.fullmatch(r"-?\d+(\.\d+)?", r["final"]) for r in recs)
    assert recs[0]["final"] == first["answer"].split("\n")[-1].removeprefix("#### ")
    assert next(read_gsm8k(shared_data / "gsm8k" / "train.jsonl"))["final"] == "72"  # Natalia's clips
    assert gsm8k_final_answer("so 1,000 + 250 = 1,250\n#### 1,250") == "1250"
    assert gsm8k_final_answer("no final line") is None


@pytest.mark.parametrize("subset", HH_FILES)
def test_hh_rlhf_real_file_pairs_are_clean(shared_data, subset):
    path = shared_data / "hh-rlhf" / subset / "test.jsonl.gz"
    raw = [json.loads(line) for line in _lines(path)]
    skipped: Counter = Counter()
    pairs = list(read_hh_rlhf(path, skipped=skipped))
    assert len(pairs) + sum(skipped.values()) == len(raw)
    assert sum(skipped.values()) <= 0.015 * len(raw)  # the unclean ones are rare (9..35 per file)
    for pair in pairs:
        assert pair["prompt"] and pair["prompt"][-1]["role"] == "user"
        assert pair["chosen"] and pair["chosen"] != pair["rejected"]
        assert pair["prompt_text"].endswith("\n\nAssistant:")
        # the text form parses back to the same turns, and prompt + reply is the whole chosen chat
        chat = parse_hh_transcript(pair["prompt_text"] + " " + pair["chosen"])
        assert chat == [*pair["prompt"], {"role": "assistant", "content": pair["chosen"]}]
    # Reference: SOURCE.md's rule "cut at the last '\n\nAssistant:'" gives the same replies.
    kept = iter(pairs)
    for rec in raw:
        try:
            split_hh_pair(rec["chosen"], rec["rejected"])
        except HHPairError:
            continue
        pair = next(kept)
        assert pair["chosen"] == rec["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
        assert pair["rejected"] == rec["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
        assert rec["chosen"].startswith(rec["chosen"].rsplit("\n\nAssistant:", 1)[0])


# ---------------------------------------------------------------------------------------------
# HH-RLHF on hand-written transcripts


def test_hh_multi_turn_shared_prefix():
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    pair = split_hh_pair(shared + "\n\nAssistant: An apple.", shared + "\n\nAssistant:  No.")
    assert pair["prompt"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a fruit."},
    ]
    assert pair["chosen"] == "An apple." and pair["rejected"] == "No."
    assert pair["prompt_text"] == shared + "\n\nAssistant:"
    assert hh_prompt_text(pair["prompt"]) == pair["prompt_text"]


def test_hh_prefix_is_the_longest_common_list_of_turns_ending_with_a_human_turn():
    # the replies share their first words: the split is on turns, not characters
    a = "Human: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: Sure, here it is."  # no leading blank line
    b = "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: Sure, but no."
    pair = split_hh_pair(a, b)
    assert [t["content"] for t in pair["prompt"]] == ["Q1", "A1", "Q2"]
    assert (pair["chosen"], pair["rejected"]) == ("Sure, here it is.", "Sure, but no.")
    # a "Human:" without the blank line is text inside the reply, as in the real data
    pair = split_hh_pair(a + "  Human: more?", b)
    assert pair["chosen"] == "Sure, here it is.  Human: more?"


@pytest.mark.parametrize(
    "chosen, rejected, reason",
    [
        ("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant: A", "identical"),
        ("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant: B\n\nHuman: thanks", "rejected is not one"),
        ("\n\nHuman: Q\n\nAssistant: A\n\nAssistant: A2", "\n\nHuman: Q\n\nAssistant: B", "chosen is not one"),
        ("\n\nHuman: Q\n\nAssistant:", "\n\nHuman: Q\n\nAssistant: B", "empty chosen"),
        ("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: other\n\nAssistant: B", "no shared prompt"),
        ("preamble\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant: B", "does not start"),
    ],
)
def test_hh_unclean_pairs_are_refused(chosen, rejected, reason):
    with pytest.raises(HHPairError, match=reason):
        split_hh_pair(chosen, rejected)


def test_hh_reader_skips_and_counts_unclean_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    rows = [
        {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: same", "rejected": "\n\nHuman: Q\n\nAssistant: same"},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    skipped: Counter = Counter()
    assert [p["chosen"] for p in read_hh_rlhf(path, skipped=skipped)] == ["good"]
    assert skipped == {"chosen and rejected replies are identical": 1}
    with pytest.warns(UserWarning, match="skipped 1 HH-RLHF pairs"):
        examples = load_task_examples(TaskDatasetConfig(name="hh_rlhf", path=str(path)))
    assert examples[0]["prompt"] == "\n\nHuman: Q\n\nAssistant:" and examples[0]["target"] == " good"


# ---------------------------------------------------------------------------------------------
# Examples and tokenization


def test_sst2_causal_examples_use_label_words(shared_data):
    cfg = TaskDatasetConfig(name="sst2", path=str(shared_data / "sst2" / "dev.tsv"), task_type="causal")
    ex = load_task_examples(cfg)
    assert len(ex) == 872
    rec = ex[0]["record"]
    assert ex[0]["input"] == rec["text"] and ex[0]["prompt"] == f"Review: {rec['text']}\nSentiment:"
    assert ex[0]["target"] == [" negative", " positive"][rec["label"]] and ex[0]["label"] == rec["label"]
    assert ex[0]["source"].endswith("dev.tsv line 2")


def test_shuffle_and_max_examples_are_seeded(shared_data):
    path = str(shared_data / "gsm8k" / "test.jsonl")
    first = load_task_examples(TaskDatasetConfig(name="gsm8k", path=path, max_examples=5))
    assert [e["record"]["question"] for e in first] == [r["question"] for r in list(read_gsm8k(path))[:5]]
    a = load_task_examples(TaskDatasetConfig(name="gsm8k", path=path, max_examples=5, shuffle=True, seed=1))
    b = load_task_examples(TaskDatasetConfig(name="gsm8k", path=path, max_examples=5, shuffle=True, seed=1))
    c = load_task_examples(TaskDatasetConfig(name="gsm8k", path=path, max_examples=5, shuffle=True, seed=2))
    assert [e["prompt"] for e in a] == [e["prompt"] for e in b] != [e["prompt"] for e in c]


@pytest.mark.parametrize("which", ["hf", "ours"])
def test_causal_prompt_is_masked_and_the_rest_decodes_to_target_and_eos(shared_data, hf_gpt2, our_gpt2, which):
    tokenizer = hf_gpt2 if which == "hf" else our_gpt2
    cfg = TaskDatasetConfig(name="gsm8k", path=str(shared_data / "gsm8k" / "test.jsonl"), max_examples=20)
    examples = load_task_examples(cfg)
    data = load_supervised_text_dataset(cfg, tokenizer)
    for ex, item in zip(examples, data, strict=True):
        n_prompt = len(hf_gpt2(ex["prompt"], add_special_tokens=False)["input_ids"])  # the reference tokenizer
        labels, ids = item["labels"], item["input_ids"]
        assert len(labels) == len(ids) == len(item["attention_mask"])
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        assert hf_gpt2.decode(labels[n_prompt:]) == ex["target"] + "<|endoftext|>"
        assert ex["target"] == " " + ex["record"]["answer"]
        # the separate tokenization equals the joint one here (targets start with a space)
        assert ids[:-1] == hf_gpt2(ex["prompt"] + ex["target"], add_special_tokens=False)["input_ids"]
        assert ids[-1] == hf_gpt2.eos_token_id


def test_hf_and_our_tokenizer_give_identical_data(shared_data, hf_gpt2, our_gpt2):
    cfg = TaskDatasetConfig(name="samsum", path=str(shared_data / "samsum" / "test.jsonl"), max_examples=10)
    for task_type in ("causal", "seq2seq"):
        cfg.task_type = task_type
        assert load_supervised_text_dataset(cfg, hf_gpt2) == load_supervised_text_dataset(cfg, our_gpt2)


def _toy(prompt: str, target: str, label=None) -> dict:
    return {"input": prompt, "prompt": prompt, "target": target, "label": label, "record": {}, "source": "toy"}


def test_causal_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answer(our_gpt2):
    tok = TaskTokenizer(our_gpt2)
    prompt = " ".join(f"word{i}" for i in range(100)) + "\nAnswer:"
    target = " forty two"
    p, t = tok.encode(prompt), tok.encode(target) + [tok.eos_id]
    cfg = TaskDatasetConfig(name="custom", text_fields=["x"], target_field="y", max_length=16)
    with pytest.warns(UserWarning, match="1 of 1 examples exceed max_length=16"):
        (item,) = tokenize_examples([_toy(prompt, target)], our_gpt2, cfg)
    assert len(item["input_ids"]) == 16
    assert item["input_ids"] == p[-(16 - len(t)) :] + t  # the prompt's end survives next to the answer
    assert item["labels"] == [-100] * (16 - len(t)) + t
    # with bos: bos stays first, the prompt is cut after it
    cfg.add_bos = True
    with pytest.warns(UserWarning, match="prompts cut from the left"):
        (item,) = tokenize_examples([_toy(prompt, target)], our_gpt2, cfg)
    assert item["input_ids"] == [tok.bos_id] + p[-(15 - len(t)) :] + t
    # a target longer than max_length: no prompt left, the target cut from the right (no eos)
    cfg.add_bos, cfg.max_length = False, 3
    with pytest.warns(UserWarning, match="exceed max_length=3"):
        (item,) = tokenize_examples([_toy(prompt, " one two three four five")], our_gpt2, cfg)
    assert item["input_ids"] == tok.encode(" one two three four five")[:3] == item["labels"]


def test_classification_shapes_and_labels(shared_data, hf_gpt2):
    cfg = TaskDatasetConfig(name="sst2", path=str(shared_data / "sst2" / "dev.tsv"), max_examples=8, max_length=12)
    examples = load_task_examples(cfg)
    with pytest.warns(UserWarning, match="cut from the right"):
        data = load_supervised_text_dataset(cfg, hf_gpt2)
    for ex, item in zip(examples, data, strict=True):
        ids = hf_gpt2(ex["record"]["text"], add_special_tokens=False)["input_ids"]
        assert item["input_ids"] == ids[:12] and item["labels"] == ex["record"]["label"]
    batch = collate(data, pad_id=hf_gpt2.eos_token_id)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [e["label"] for e in examples]
    width = max(len(d["input_ids"]) for d in data)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, width) and width <= 12
    assert batch["attention_mask"].sum(1).tolist() == [len(d["input_ids"]) for d in data]


def test_seq2seq_inputs_and_labels_end_with_eos(shared_data, hf_gpt2):
    cfg = TaskDatasetConfig(
        name="samsum", path=str(shared_data / "samsum" / "validation.jsonl"), max_examples=4, max_target_length=8
    )
    examples = load_task_examples(cfg)
    assert examples[0]["prompt"] == "summarize: " + examples[0]["record"]["dialogue"]
    assert examples[0]["target"] == examples[0]["record"]["summary"]
    with pytest.warns(UserWarning, match="or max_target_length=8: cut from the right, eos kept"):
        data = load_supervised_text_dataset(cfg, hf_gpt2)
    eos = hf_gpt2.eos_token_id
    for ex, item in zip(examples, data, strict=True):
        assert item["input_ids"] == hf_gpt2(ex["prompt"], add_special_tokens=False)["input_ids"] + [eos]
        target = hf_gpt2(ex["target"], add_special_tokens=False)["input_ids"] + [eos]
        assert item["labels"] == (target if len(target) <= 8 else target[:7] + [eos])
    batch = collate(data, pad_id=eos)
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == 4
    assert batch["input_ids"].shape[1] == max(len(d["input_ids"]) for d in data)
    assert batch["labels"].shape[1] == max(len(d["labels"]) for d in data) <= 8


def test_collate_pads_right_and_left():
    items = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    right = collate(items, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(items, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert all(t.dtype == torch.long for t in right.values())


# ---------------------------------------------------------------------------------------------
# Batches


def _numbered(n: int) -> list[dict]:
    # example i holds token i, so a batch shows which examples it took
    return [{"input_ids": [i] * (1 + i % 3), "attention_mask": [1] * (1 + i % 3), "labels": i} for i in range(n)]


def test_task_batches_resume_exactly():
    examples = _numbered(10)
    a = TaskBatches(examples, batch_size=3, pad_id=-1, seed=7)
    for _ in range(5):  # crosses the first epoch's end
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    b = TaskBatches(examples, batch_size=3, pad_id=-1, seed=7)
    b.load_state_dict(state)
    for want, got in zip(expected, (next(b) for _ in range(6)), strict=True):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(UserError, match="different task dataset or seed"):
        TaskBatches(_numbered(11), batch_size=3, pad_id=-1, seed=7).load_state_dict(state)


def test_task_batches_epochs_cover_all_and_reshuffle():
    tb = TaskBatches(_numbered(12), batch_size=4, pad_id=-1, seed=0)
    epochs = [[i for _ in range(3) for i in next(tb)["labels"].tolist()] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12)) and epochs[0] != epochs[1]
    ordered = TaskBatches(_numbered(12), batch_size=4, pad_id=-1, shuffle=False)
    assert next(ordered)["labels"].tolist() == [0, 1, 2, 3]


def test_task_batches_ranks_are_disjoint_and_equal_one_process():
    examples = _numbered(13)
    one = TaskBatches(examples, batch_size=4, pad_id=-1, seed=3)
    ranks = [TaskBatches(examples, batch_size=2, pad_id=-1, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # 12 of the 13 examples: one epoch, no wrap
        r0, r1 = (next(r)["labels"].tolist() for r in ranks)
        assert not set(r0) & set(r1)
        assert r0 + r1 == next(one)["labels"].tolist()


def test_eval_batches_one_ordered_pass():
    examples = _numbered(7)
    batches = eval_batches(examples, batch_size=3, pad_id=-1)
    assert len(batches) == 3
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]  # re-iterable
    rank1 = eval_batches(examples, batch_size=2, pad_id=-1, rank=1, world_size=2)
    assert [b["labels"].tolist() for b in rank1] == [[1, 3], [5]]


# ---------------------------------------------------------------------------------------------
# Alpaca, custom data, the hub path


def test_alpaca_from_a_tiny_file(tmp_path, our_gpt2):
    path = tmp_path / "alpaca.json"
    recs = [
        {"instruction": "Give a synonym for happy.", "input": "", "output": "Glad."},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "output": "Hi!"},  # no input field at all
    ]
    path.write_text(json.dumps(recs))
    assert [r["input"] for r in read_alpaca(path)] == ["", "cat", ""]
    examples = load_task_examples(TaskDatasetConfig(name="alpaca", path=str(path)))
    assert examples[0]["prompt"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Give a synonym for happy.")
    assert examples[1]["prompt"] == ALPACA_PROMPT.format(instruction="Translate to French.", input="cat")
    assert examples[1]["input"] == "Translate to French.\n\ncat"
    assert [e["target"] for e in examples] == ["Glad.", "chat", "Hi!"]
    data = load_supervised_text_dataset(TaskDatasetConfig(name="alpaca", path=str(path)), our_gpt2)
    for ex, item in zip(examples, data, strict=True):
        n = len(our_gpt2.encode(ex["prompt"]))
        assert item["labels"][:n] == [-100] * n
        assert our_gpt2.decode(item["labels"][n:]) == ex["target"] + "<|endoftext|>"


def test_custom_dataset_fields_and_templates(tmp_path, our_gpt2):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"title": "T", "question": "Q?", "answer": "A", "y": 2})
        + "\n\n"
        + json.dumps({"title": "", "question": "R?", "answer": "B", "y": 0})
        + "\n"
    )
    cfg = TaskDatasetConfig(
        path=str(path), text_fields=["title", "question"], target_field="answer", prompt_template="{input}\nA:"
    )
    ex = load_task_examples(cfg)
    assert [(e["input"], e["prompt"], e["target"]) for e in ex] == [
        ("T\n\nQ?", "T\n\nQ?\nA:", "A"),
        ("R?", "R?\nA:", "B"),
    ]
    cfg = TaskDatasetConfig(path=str(path), text_fields=["question"], label_field="y", task_type="classification")
    assert [(e["label"], e["target"]) for e in load_task_examples(cfg)] == [(2, "2"), (0, "0")]
    assert [d["labels"] for d in load_supervised_text_dataset(cfg, our_gpt2)] == [2, 0]


def test_hub_path_passes_config_split_and_data_dir(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, data_dir=None):
        calls.append((name, config, split, data_dir))
        if name == "glue":
            return [{"sentence": "a fine film ", "label": 1, "idx": 0}, {"sentence": "dull", "label": -1, "idx": 1}]
        return [{"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(read_sst2(hf_dataset="glue", split="validation")) == [
        {"text": "a fine film", "label": 1},
        {"text": "dull", "label": None},  # GLUE test rows carry label -1
    ]
    cfg = TaskDatasetConfig(name="hh_rlhf", hf_dataset="Anthropic/hh-rlhf", hf_data_dir="helpful-base", split="test")
    assert load_task_examples(cfg)[0]["target"] == " yes"
    assert calls == [("glue", "sst2", "validation", None), ("Anthropic/hh-rlhf", None, "test", "helpful-base")]


# ---------------------------------------------------------------------------------------------
# User errors name the file and line (or the config field)


@pytest.mark.parametrize(
    "name, content, reader, message",
    [
        ("samsum.jsonl", '{"dialogue": "a", "summary": "b"}\n{"dialogue": "c"', read_samsum, "line 2: not valid JSON"),
        (
            "samsum.jsonl",
            '{"dialogue": "a", "summary": "b"}\n\n{"dialogue": "c"}\n',
            read_samsum,
            "samsum.jsonl line 3: missing field 'summary'",
        ),
        ("gsm.jsonl", '{"question": "q", "answer": 42}\n', read_gsm8k, "line 1: field 'answer' must be a string"),
        ("gsm.jsonl", '{"question": "q", "answer": "42"}\n', read_gsm8k, "line 1: field 'answer' has no final"),
        ("gsm.jsonl", "[1, 2]\n", read_gsm8k, "line 1: expected a JSON object"),
        ("dev.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n", read_sst2, "dev.tsv line 3: bad label '2'"),
        ("dev.tsv", "sentence\tlabel\ngood\t1\nbad\n", read_sst2, "dev.tsv line 3: expected 2 tab-separated"),
        ("dev.jsonl", '{"sentence": "x", "label": "pos"}\n', read_sst2, "line 1: bad label 'pos'"),
        ("a.json", '[{"instruction": "i", "output": "o"}, {"instruction": "j"}]', read_alpaca, "record 2: missing"),
        ("a.json", '[{"instruction": "i",\n "output": }]', read_alpaca, "a.json line 2: not valid JSON"),
        ("a.json", '{"instruction": "i"}', read_alpaca, "expected a JSON list"),
        ("hh.jsonl", '{"chosen": "x"}\n', read_hh_rlhf, "hh.jsonl line 1: missing field 'rejected'"),
        ("data.csv", "a,b\n", read_samsum, "unsupported file type"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, name, content, reader, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        list(reader(path))
    assert name in str(err.value)


def test_a_bad_line_in_a_gzipped_file(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(
            '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\nnot json\n'
        )
    with pytest.raises(UserError, match=r"test\.jsonl\.gz line 2: not valid JSON"):
        list(read_hh_rlhf(path))


def test_a_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "train.json"  # SAMSum's zip ships JSON Lines under .json names
    path.write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": "c", "summary": "d"}\n')
    assert [r["summary"] for r in read_samsum(path)] == ["b", "d"]


def test_config_errors_name_the_field(tmp_path, shared_data, our_gpt2):
    dev = str(shared_data / "sst2" / "dev.tsv")
    cases = [
        (TaskDatasetConfig(name="sst3", path=dev), "name: unknown task dataset 'sst3'.*did you mean 'sst2'"),
        (TaskDatasetConfig(name="sst2", path=str(tmp_path / "none.tsv")), "path: no such file"),
        (TaskDatasetConfig(name="sst2"), "path: no data"),
        (TaskDatasetConfig(name="sst2", path=dev, task_type="regression"), "task_type: unknown 'regression'"),
        (TaskDatasetConfig(name="custom", path=dev), "text_fields"),
        (
            TaskDatasetConfig(name="custom", path=dev, text_fields=["sentence"], task_type="classification"),
            "label_field",
        ),
        (TaskDatasetConfig(name="sst2", path=dev, prompt_template="{review}"), "prompt_template: .*no field 'review'"),
        (TaskDatasetConfig(name="gsm8k", path=dev), "dev.tsv line 2: missing field 'question'"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError, match=message):
            load_task_examples(cfg)
    unlabeled = TaskDatasetConfig(name="sst2", path=str(shared_data / "sst2" / "test.tsv"), max_examples=2)
    assert [e["label"] for e in load_task_examples(unlabeled)] == [None, None]  # fine for prompting
    with pytest.raises(UserError, match=r"test\.tsv line 2: no label"):
        load_supervised_text_dataset(unlabeled, our_gpt2)

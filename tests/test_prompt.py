"""`modernlm prompt` end to end on tiny models (a modernlm checkpoint and an HF directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from modernlm.checkpoint import load_model, save_model
from modernlm.cli import run_command
from modernlm.config import load_config
from modernlm.data.tasks import TaskDatasetConfig, load_task_examples
from modernlm.eval.metrics import accuracy
from modernlm.eval.prompting import score_choices
from modernlm.model import ModernDecoderLM
from modernlm.textmodel import wrap_modernlm
from modernlm.tokenizer import load_tokenizer
from tests.conftest import tiny_config

GPT2_VOCAB = 50257


@pytest.fixture
def ckpt(shared_data, tmp_path):
    tokenizer = load_tokenizer(shared_data / "gpt2-tokenizer")
    torch.manual_seed(0)
    save_model(ModernDecoderLM(tiny_config(vocab_size=GPT2_VOCAB, max_seq_len=128)), tmp_path / "ckpt", tokenizer)
    return tmp_path / "ckpt"


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompt_sst2_end_to_end(ckpt, shared_data, tmp_path, capsys):
    dev = shared_data / "sst2" / "dev.tsv"
    out = tmp_path / "run"
    code = run_command("prompt", [str(ckpt), "task=sst2", f"data.path={dev}", "max_examples=8", "--out", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prompt sst2 zero-shot score") and "accuracy" in lines[0]
    for name in ("config.yaml", "metrics.json", "predictions.jsonl", "errors.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["task"] == "sst2"
    rows = _jsonl(out / "predictions.jsonl")
    assert len(rows) == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == accuracy([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert json.loads((out / "summary.json").read_text())["accuracy"] == metrics["accuracy"]
    assert [e["index"] for e in _jsonl(out / "errors.jsonl")] == [
        r["index"] for r in rows if r["prediction"] != r["reference"]
    ]
    # The scores are those of the same model and causal prompts through the API.
    examples = load_task_examples(TaskDatasetConfig(name="sst2", path=str(dev), task_type="causal", max_examples=8))
    assert [r["prompt"] for r in rows] == [ex["prompt"] for ex in examples]
    tm = wrap_modernlm(load_model(ckpt), load_tokenizer(ckpt))
    expected = score_choices(tm, [ex["prompt"] for ex in examples], [" negative", " positive"])
    torch.testing.assert_close(torch.tensor([r["scores"] for r in rows], dtype=torch.float64), expected)


def test_prompt_few_shot_draws_seeded_demonstrations(ckpt, shared_data, tmp_path, capsys):
    sst2 = shared_data / "sst2"
    args = [str(ckpt), f"data.path={sst2 / 'dev.tsv'}", "max_examples=2", "shots=3", f"shots_from={sst2 / 'train.tsv'}"]
    assert run_command("prompt", [*args, "--out", str(tmp_path / "a")]) == 0
    assert run_command("prompt", [*args, "--out", str(tmp_path / "b"), "mode=generate"]) == 0
    demo = (tmp_path / "a" / "demonstrations.txt").read_text()
    assert demo.count("Review: ") == 3 and demo.count("\nSentiment: ") == 3
    assert demo == (tmp_path / "b" / "demonstrations.txt").read_text()  # same seed, same draw
    assert "3-shot generate" in capsys.readouterr().out


def test_prompt_hf_model_directory(shared_data, tmp_path, capsys):
    """An HF causal LM directory goes through transformers (modernlm.load)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=GPT2_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    transformers.GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer")).save_pretrained(tmp_path / "hf")
    data = shared_data / "gsm8k" / "test.jsonl"
    args = [str(tmp_path / "hf"), "task=gsm8k", f"data.path={data}", "max_examples=2", "max_new_tokens=4"]
    assert run_command("prompt", [*args, "--out", str(tmp_path / "run"), "progress=false"]) == 0
    assert "exact_match_strict" in capsys.readouterr().out
    assert len(_jsonl(tmp_path / "run" / "predictions.jsonl")) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=mnli"], "task: unknown task 'mnli'"),
        (["data.path=/no/such/dev.tsv"], "path: no such file: /no/such/dev.tsv"),
        (["shots=2"], "shots_from:"),
        (["mode=rank", "max_examples=1"], "mode: unknown mode 'rank'"),
    ],
)
def test_prompt_bad_config_is_one_line_exit_2(ckpt, shared_data, tmp_path, capsys, args, message):
    base = [str(ckpt), f"data.path={shared_data / 'sst2' / 'dev.tsv'}", "--out", str(tmp_path / "run")]
    assert run_command("prompt", base + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_prompt_refuses_max_new_tokens_that_fill_the_context_before_generating(ckpt, shared_data, tmp_path, capsys):
    """Not every prompt cut to its last token (the checkpoint's context is 128 tokens)."""
    data = shared_data / "gsm8k" / "test.jsonl"
    args = [str(ckpt), "task=gsm8k", f"data.path={data}", "max_examples=2", "max_new_tokens=128", "progress=false"]
    assert run_command("prompt", [*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_new_tokens: 128 leaves no room for a prompt" in err, err
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "prompt").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_prompt_recipes_load_and_point_at_the_shared_data(path, shared_data, monkeypatch):
    from modernlm.commands.prompt import Config, _check

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipes' paths are relative to the repo root
    cfg = load_config(Config, path, ["model=x"])
    _check(cfg)  # a valid task, mode and shots_from
    assert (root / cfg.data.path).resolve().is_file()
    assert (root / cfg.data.path).resolve().is_relative_to(shared_data.resolve())

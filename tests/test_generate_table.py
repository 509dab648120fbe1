"""`modernlm generate` side by side: run-directory expansion, the Markdown table (settings recorded,
cells equal to `generate_text` with the same seed, identical weights -> identical cells)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modernlm.checkpoint import (
    checkpoint_dirs,
    checkpoint_label,
    save_best_checkpoint,
    save_model,
    save_training_checkpoint,
    saved_step,
)
from modernlm.cli import main
from modernlm.errors import UserError
from modernlm.eval.compare import markdown_table, md_escape
from modernlm.generation import generate_text
from modernlm.model import ModernDecoderLM
from modernlm.tokenizer import train_bpe
from tests.conftest import tiny_config

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little robot who liked to sing.",
    "In 1999, the team won the cup and the city celebrated for a week.",
    "She said: let us go to the sea, and they went.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, 300, special_tokens=[], pad_token=None, chat_template=None)


def tiny_model(tokenizer, seed: int) -> ModernDecoderLM:
    torch.manual_seed(seed)
    return ModernDecoderLM(tiny_config(vocab_size=tokenizer.vocab_size, init_std=0.1)).eval()


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_run_dir_expands_to_its_checkpoints_in_step_order(tmp_path, tokenizer):
    model = tiny_model(tokenizer, 0)
    run = tmp_path / "run"
    for step in (10, 2, 100):  # written out of order; 10 sorts after 2 only as a number
        save_training_checkpoint(run, step, model, {"step": step}, tokenizer, keep_last=10)
    save_best_checkpoint(run, model, {"step": 10, "val_loss": 1.0}, tokenizer)
    (run / "checkpoints" / "step_0000050").mkdir()  # no config.json: not a checkpoint
    dirs = checkpoint_dirs(run)
    assert [d.name for d in dirs] == ["step_0000002", "step_0000010", "step_0000100", "best"]
    assert [saved_step(d) for d in dirs] == [2, 10, 100, 10]
    assert checkpoint_label(dirs[0], outside_a_run="path") == "run/step_0000002"
    # a checkpoint directory (or anything else) stands for itself
    assert checkpoint_dirs(dirs[1]) == [dirs[1]]
    assert checkpoint_dirs("org/model") == [Path("org/model")]  # a hub id
    with pytest.raises(UserError, match="no such file or directory"):  # said now, not after tries at the hub
        checkpoint_dirs("./missing")
    assert saved_step(tmp_path) is None and checkpoint_label(tmp_path, outside_a_run="path") == str(tmp_path)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoints"):
        checkpoint_dirs(tmp_path / "empty")


def test_markdown_escaping():
    assert md_escape("a|b\nc\r\nd") == "a\\|b<br>c<br>d"
    assert md_escape("x\\y <unk> & z") == "x\\\\y &lt;unk&gt; &amp; z"
    assert markdown_table(["h1", "h2"], [("a|b", 1)]) == "| h1 | h2 |\n|---|---|\n| a\\|b | 1 |\n"
    with pytest.raises(ValueError):
        markdown_table(["h1", "h2"], [("only one",)])


def test_table_same_seed_same_weights_same_cell(tmp_path, tokenizer, capsys):
    a, b, other = tiny_model(tokenizer, 0), tiny_model(tokenizer, 0), tiny_model(tokenizer, 1)
    for name, model in (("a", a), ("b", b), ("c", other)):
        save_model(model, tmp_path / name, tokenizer)
    prompts = ["Once upon a time", "The team | the cup"]
    out = tmp_path / "tables" / "samples.md"
    args = ["generate", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--out", str(out)]
    settings = ["max_new_tokens=12", "temperature=1.0", "top_k=20", "top_p=0.9", "repetition_penalty=1.2", "seed=3"]
    assert _cli([*args, f"prompts={prompts}", *settings]) == 0
    assert "samples.md" in capsys.readouterr().out
    lines = out.read_text().splitlines()

    for key, value in [
        ("max_new_tokens", "12"),
        ("temperature", "1.0"),
        ("top_k", "20"),
        ("top_p", "0.9"),
        ("repetition_penalty", "1.2"),
        ("seed", "3"),
        ("window", "0"),
        ("sink_size", "4"),
    ]:
        assert f"| {key} | {value} |" in lines
    options = dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=3)
    differs = []
    for prompt in prompts:
        assert f"**Prompt:** {md_escape(prompt)}" in lines
        same = generate_text(a, tokenizer, prompt, 12, **options)
        assert generate_text(b, tokenizer, prompt, 12, **options) == same  # identical weights
        text_c = generate_text(other, tokenizer, prompt, 12, **options)
        for name, text in (("a", same), ("b", same), ("c", text_c)):
            assert f"| {tmp_path / name} | - | {md_escape(text)} |" in lines
        differs.append(text_c != same)
    assert any(differs)  # other weights, other text: the cells do show the weights


def test_run_dir_table_to_stdout_with_seed_0_by_default(tmp_path, tokenizer, capsys):
    run = tmp_path / "run"
    models = {step: tiny_model(tokenizer, step) for step in (5, 20)}
    for step, model in models.items():
        save_training_checkpoint(run, step, model, {"step": step}, tokenizer)
    assert _cli(["generate", str(run), "prompt=In 1999", "max_new_tokens=8", "temperature=1.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| seed | 0 |" in lines  # a table never samples unseeded
    rows = [line for line in lines if line.startswith("| run/")]
    assert [r.split(" | ")[:2] for r in rows] == [["| run/step_0000005", "5"], ["| run/step_0000020", "20"]]
    for row, model in zip(rows, models.values(), strict=True):
        text = generate_text(model, tokenizer, "In 1999", 8, temperature=1.0, seed=0)
        assert row.endswith(f" | {md_escape(text)} |")


def test_single_checkpoint_still_streams(tmp_path, tokenizer, capsys):
    model = tiny_model(tokenizer, 0)
    save_model(model, tmp_path / "ckpt", tokenizer)
    assert _cli(["generate", str(tmp_path / "ckpt"), "prompt=The quick", "max_new_tokens=10", "temperature=0"]) == 0
    assert capsys.readouterr().out == generate_text(model, tokenizer, "The quick", 10) + "\n"


def test_prompt_and_prompts_together_is_an_error(tmp_path, tokenizer, capsys):
    save_model(tiny_model(tokenizer, 0), tmp_path / "ckpt", tokenizer)
    assert _cli(["generate", str(tmp_path / "ckpt"), "prompt=a", "prompts=[b]"]) == 2
    assert "not both" in capsys.readouterr().err

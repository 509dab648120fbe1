"""`modernlm eval perplexity` on a tiny modernlm checkpoint (no transformers needed): its input checks
and a model whose scores are not finite."""

from __future__ import annotations

import json

import pytest
import torch

from modernlm.checkpoint import save_model
from modernlm.cli import run_command
from modernlm.model import ModernDecoderLM
from modernlm.tokenizer import load_tokenizer
from tests.conftest import tiny_config


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A random tiny checkpoint with the byte tokenizer, and a text file to score."""
    tok = load_tokenizer("byte")
    save_model(ModernDecoderLM(tiny_config(vocab_size=tok.vocab_size)), tmp_path / "ckpt", tok)
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 8, encoding="utf-8")
    return tmp_path / "ckpt", text


def test_a_file_and_a_hub_dataset_is_one_line_before_loading(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import modernlm.api

    ckpt, text = tiny_ckpt
    monkeypatch.setattr(modernlm.api, "load", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "r.json"
    code = run_command("eval perplexity", [str(ckpt), str(text), "hf_dataset=foo/bar", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(text) in err and "hf_dataset" in err and "foo/bar" in err
    assert not out.exists()


def test_non_finite_scores_are_null_in_valid_json_with_a_warning(tiny_ckpt, tmp_path, capsys):
    ckpt, text = tiny_ckpt
    model = ModernDecoderLM(tiny_config(vocab_size=260))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # the embeddings: every logit is nan
    save_model(model, tmp_path / "nan", load_tokenizer("byte"))
    out = tmp_path / "report.json"
    code = run_command("eval perplexity", [str(tmp_path / "nan"), str(text), "device=cpu", "progress=false",
                                           "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert report["perplexity"] is None and report["loss"] is None and report["tokens"] > 0
    assert "not finite" in capsys.readouterr().err

    code = run_command("eval perplexity", [str(ckpt), str(text), "device=cpu", "progress=false", "--out", str(out)])
    assert code == 0 and "not finite" not in capsys.readouterr().err  # a sane model: no warning
    assert json.loads(out.read_text())["perplexity"] > 1

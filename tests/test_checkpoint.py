"""Checkpoints (no transformers): save -> load is bit-identical, and every broken checkpoint
directory is a UserError naming the file (one line, exit code 2 from the CLI, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modernlm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model
from modernlm.cli import run_command
from modernlm.errors import UserError
from modernlm.model import ModernDecoderLM
from tests.conftest import tiny_config


def test_save_load_bit_identical(variant_config, tmp_path):
    model = ModernDecoderLM(variant_config).eval()
    with torch.no_grad():  # norms and the sink start as ones/zeros; make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    loaded = ModernDecoderLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # tying survives: one tensor, not two equal copies that would drift apart in training
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == variant_config.tie_embeddings
    idx = torch.randint(0, variant_config.vocab_size, (2, 12))
    with torch.no_grad():
        out_a, out_b = model(idx), loaded(idx)
    assert torch.equal(out_a.logits, out_b.logits)
    if variant_config.n_expert:
        assert torch.equal(out_a.aux_loss, out_b.aux_loss)


def test_bfloat16_checkpoint_keeps_dtype(tmp_path):
    model = ModernDecoderLM(tiny_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = ModernDecoderLM.from_pretrained(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.rope.cos.dtype == torch.float32  # RoPE tables stay float32 (precision)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# Broken checkpoint directories
# --------------------------------------------------------------------------------------------


def _edit_config(path: Path, **changes) -> None:
    data = json.loads((path / CONFIG_FILE).read_text())
    data.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(data))


def _truncate_weights(path: Path) -> None:
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _garble_weights(path: Path) -> None:
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


# name -> (how to break the directory, the file the message must name, words it must contain)
BREAKS = {
    "missing-config": (lambda p: (p / CONFIG_FILE).unlink(), CONFIG_FILE, "missing"),
    "missing-weights": (lambda p: (p / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "missing"),
    "truncated-weights": (_truncate_weights, WEIGHTS_FILE, "cannot read"),
    "corrupt-weights": (_garble_weights, WEIGHTS_FILE, "cannot read"),
    "empty-weights": (lambda p: (p / WEIGHTS_FILE).write_bytes(b""), WEIGHTS_FILE, "cannot read"),
    "wrong-shapes": (
        lambda p: _edit_config(p, d_ff=64),
        WEIGHTS_FILE,
        "w_gate_up.weight: file has (256, 32)",
    ),
    "fewer-layers": (
        lambda p: _edit_config(p, n_layer=1),
        WEIGHTS_FILE,
        "unexpected tensors ['layers.1.",
    ),
    "untied-no-head": (
        lambda p: _edit_config(p, tie_embeddings=False),
        WEIGHTS_FILE,
        "missing tensors ['lm_head",
    ),
    "unknown-key": (lambda p: _edit_config(p, n_layers=2), CONFIG_FILE, "did you mean 'n_layer'"),
    "bad-value": (lambda p: _edit_config(p, n_head=3), CONFIG_FILE, "n_head"),
    "not-json": (
        lambda p: (p / CONFIG_FILE).write_text("{ n_layer: 2"),
        CONFIG_FILE,
        "not valid JSON",
    ),
    "hf-dir": (
        lambda p: (p / CONFIG_FILE).write_text('{"model_type": "llama", "architectures": []}'),
        CONFIG_FILE,
        "modernlm convert",
    ),
}


@pytest.fixture
def broken(request, tmp_path) -> tuple[Path, str, str]:
    """A tiny checkpoint directory broken in the way named by the test parameter."""
    path = tmp_path / "ckpt"
    ModernDecoderLM(tiny_config()).save_pretrained(path)  # d_ff 128, 2 layers, tied
    load_model(path)  # intact, it loads
    breaker, file, words = BREAKS[request.param]
    breaker(path)
    return path, file, words


@pytest.mark.parametrize("broken", list(BREAKS), indirect=True)
def test_broken_checkpoint_is_user_error_naming_the_file(broken, capsys, tmp_path):
    path, file, words = broken
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path / file) in message or (file in message and str(path) in message), message
    assert words in message, message
    assert "\n" not in message

    # the same through the CLI (in process): one line on stderr, exit code 2, nothing written
    assert run_command("convert", [str(path), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken", ["truncated-weights", "wrong-shapes"], indirect=True)
def test_broken_checkpoint_cli_subprocess(broken, tmp_path):
    """A real `python -m modernlm` process: exit 2, one stderr line, no traceback."""
    path, file, words = broken
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modernlm",
            "convert",
            str(path),
            str(tmp_path / "out"),
            "--to",
            "hf",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("modernlm convert: error: ") and file in lines[0]
    ), proc.stderr


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope")


def test_save_overwrites_atomically(tmp_path):
    """Saving again replaces the files and leaves no temporary files behind."""
    ModernDecoderLM(tiny_config()).save_pretrained(tmp_path)
    second = ModernDecoderLM(tiny_config(n_layer=1))
    second.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert load_model(tmp_path).config.n_layer == 1

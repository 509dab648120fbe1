"""`modernlm experiment sinks`: the shipped recipes load and fit their context; end to end at a tiny
size, the artefacts exist and every number is finite and in range; a rerun skips training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import modernlm.commands.experiment_sinks as experiment_sinks
from modernlm.checkpoint import save_model
from modernlm.cli import main
from modernlm.commands.experiment_sinks import Config, check
from modernlm.config import load_config
from modernlm.data.corpus import write_shards
from modernlm.errors import UserError
from modernlm.eval.sinks import SinksEvalConfig, arms, summary_markdown
from modernlm.model import ModernDecoderLM
from tests.conftest import tiny_config

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "experiment"


def params(cfg: Config) -> int:
    with torch.device("meta"):
        return ModernDecoderLM(cfg.model).num_params()


def test_cpu_recipe_is_cpu_sized():
    cfg = load_config(Config, RECIPES / "sinks-cpu.yaml")
    assert check(cfg) == cfg.model.max_seq_len - 4 - 1  # the default window
    assert params(cfg) < 3e6 and cfg.device in ("auto", "cpu")
    assert cfg.data.corpus.sources and cfg.eval.multiples == 4


def test_gpu_recipe_is_the_seeds_setting_at_50m():
    cfg = load_config(Config, RECIPES / "sinks-gpu.yaml")
    check(cfg)
    assert cfg.model.max_seq_len == 512 and abs(params(cfg) - 50e6) / 50e6 < 0.1
    assert (cfg.eval.temperature, cfg.eval.top_k) == (1.0, 50) and cfg.eval.multiples >= 3
    assert {s.hf_dataset for s in cfg.data.corpus.sources} == {"Salesforce/wikitext", "roneneldan/TinyStories"}


def test_every_arm_stays_on_trained_positions():
    cfg = Config()
    C = cfg.model.max_seq_len
    window = check(cfg)
    for arm in arms(window, cfg.eval.streamingllm_sinks):
        if arm.window:  # slots written: up to sink_size + window + chunk - 1 (the sink token is slot 0)
            assert arm.sink_size + arm.window + cfg.eval.chunk - 1 <= C - 1 + int(arm.model == "sink")
    with pytest.raises(UserError, match="eval.window"):
        check(load_config(Config, overrides=[f"eval.window={C - 2}"]))
    with pytest.raises(UserError, match="prompt_tokens"):
        check(load_config(Config, overrides=[f"eval.prompt_tokens={C}"]))


def test_no_data_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "sinks", "--out", str(tmp_path)])
    assert e.value.code == 2 and "data.path" in capsys.readouterr().err


# ---- mistakes found before training, and what the outputs show -------------------------------------

C = 16  # the tiny models' context
TINY = ["model.vocab_size=64", "model.d_model=32", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2",
        f"model.max_seq_len={C}", "eval.multiples=2", "eval.num_sequences=2", "eval.num_samples=1",
        "eval.prompt_tokens=4", "eval.plot_points=2", "device=cpu"]  # fmt: skip


def shards(tmp_path: Path, val_tokens: int) -> Path:
    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, 64, 500), "val": rng.integers(0, 64, val_tokens)}
    return write_shards(tmp_path / "shards", splits, vocab_size=64)


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "setting,field", [("eval.temperature=-1", "eval.temperature"), ("eval.top_k=-1", "eval.top_k"),
                      ("eval.top_p=0", "eval.top_p"), ("eval.top_p=1.5", "eval.top_p")],
)  # fmt: skip
def test_bad_sampling_is_one_line_before_training(tmp_path, capsys, monkeypatch, setting, field):
    monkeypatch.setattr(experiment_sinks, "train_models", lambda *a: pytest.fail("trained before the error"))
    data = shards(tmp_path, 4 * C)
    err = one_line_error(capsys, ["experiment", "sinks", "--out", str(tmp_path / "out"), f"data.path={data}",
                                  *TINY, setting])  # fmt: skip
    assert field in err


def test_a_val_split_too_short_for_the_multiples_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment_sinks, "train_models", lambda *a: pytest.fail("trained before the error"))
    data = shards(tmp_path, 2 * C - 1)  # eval.multiples=2: one sequence needs 2 C tokens
    err = one_line_error(capsys, ["experiment", "sinks", "--out", str(tmp_path / "out"), f"data.path={data}", *TINY])
    assert "val split" in err and "eval.multiples" in err


def fake_run(run_dir: Path, sink: bool, val_loss: object) -> Path:
    """A run dir as train_models leaves it: a (random) checkpoint and the val_loss it logged."""
    step = run_dir / "checkpoints" / "step_0000001"
    save_model(ModernDecoderLM(tiny_config(max_seq_len=C, attn_sink=sink)), step)
    (step / "train_state.pt").write_bytes(b"")  # what makes it a complete checkpoint
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": val_loss}) + "\n")
    return run_dir


def test_a_run_that_logged_a_nan_val_loss_is_reported_as_na(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    # the trainer writes a non-finite value as the string "nan" (metrics.jsonl stays JSON)
    runs = {"sink": fake_run(out / "sink", True, "nan"), "nosink": fake_run(out / "nosink", False, 3.5)}
    monkeypatch.setattr(experiment_sinks, "train_models", lambda *a: runs)
    with pytest.raises(SystemExit) as e:
        main(["experiment", "sinks", "--out", str(out), f"data.path={shards(tmp_path, 4 * C)}", *TINY])
    assert e.value.code == 0, capsys.readouterr().err
    models = json.loads((out / "results.json").read_text())["models"]
    assert (models["sink"]["val_loss"], models["nosink"]["val_loss"]) == (None, 3.5)
    summary = (out / "summary.md").read_text()
    assert "| sink | " in summary and "| n/a |" in summary and "| 3.5000 |" in summary


def results(sample: str, prompt: str, val_loss: object = 2.0) -> dict:
    """results.json as measure() makes it, one arm, one span."""
    stats = {k: [0.5] for k in ("repetition", "distinct_1", "distinct_2", "distinct_3")}
    arm = {"name": "sink", "model": "sink", "about": "sink + window", "ppl": [9.0], "sample": sample, **stats}
    return {
        "context": C, "multiples": 1, "window": 11, "num_sequences": 1, "num_samples": 1, "sequence_tokens": C,
        "models": {"sink": {"params": 1000, "val_loss": val_loss, "checkpoint": "ckpt"}},
        "arms": {"sink": arm}, "reference_text": stats, "sample_prompt": prompt,
    }  # fmt: skip


def test_summary_shows_model_text_as_text_never_html():
    from markdown_it import MarkdownIt

    sample = "story\n```\n<img src=x onerror=alert(1)>\n````` and ~~~\n</details><script>alert(2)</script>"
    prompt = "a `tick` and ``two`` <img src=y onerror=alert(3)>"
    md = summary_markdown(results(sample, prompt), SinksEvalConfig(), steps=1, batch_size=1, seed=0)
    page = MarkdownIt().render(md)  # CommonMark: raw HTML in Markdown passes through
    assert page.count("<img") == 1 and '<img src="sinks.png"' in page and "<script" not in page  # the plot only
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;img src=y onerror=alert(3)&gt;" in page
    assert "<code>" + repr(prompt).replace("<", "&lt;").replace(">", "&gt;") + "</code>" in page


@pytest.mark.parametrize("val_loss", ["nan", "inf", None, float("nan"), [1.0]])
def test_summary_prints_na_for_anything_but_a_finite_number(val_loss):
    md = summary_markdown(results("text", "prompt", val_loss), SinksEvalConfig(), steps=1, batch_size=1, seed=0)
    assert "| sink | 1,000 | n/a | ckpt |" in md


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path, shared_data, capsys):
    out = tmp_path / "sinks"
    argv = [
        "experiment", "sinks", "-c", str(RECIPES / "sinks-cpu.yaml"), "--out", str(out),
        f"data.corpus.sources=[{{path: {shared_data / 'tinystories' / 'tinystories_train_prefix.txt'}}}]",
        "data.vocab_size=384", "data.val_fraction=0.1", "data.num_workers=1",
        "model.vocab_size=384", "model.d_model=32", "model.n_layer=2", "model.max_seq_len=16",
        "train.num_steps=6", "train.eval_every=0", "train.eval_batches=2", "train.progress=false",
        "eval.num_sequences=4", "eval.num_samples=2", "eval.prompt_tokens=4", "device=cpu",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    for name in ("results.json", "summary.md", "sinks.png"):
        assert (out / name).is_file()
    assert (out / "sinks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((out / "results.json").read_text())
    assert (r["context"], r["window"], r["multiples"], r["sequence_tokens"]) == (16, 11, 4, 64)
    assert set(r["arms"]) == {"sink", "window", "streamingllm", "dense"}
    assert {m: info["params"] > 0 for m, info in r["models"].items()} == {"sink": True, "nosink": True}
    for arm in r["arms"].values():
        assert len(arm["ppl"]) == 4 and all(math.isfinite(p) and p > 1 for p in arm["ppl"])
        assert arm["ppl"] == pytest.approx([math.exp(v) for v in arm["nll"]])
        assert len(arm["nll_by_position"]) == 63
        for key in ("repetition", "distinct_1", "distinct_2", "distinct_3"):
            assert len(arm[key]) == 4 and all(0 <= v <= 1 for v in arm[key])
        assert all(0 < v <= 1 for v in arm["distinct_1"])
        assert isinstance(arm["sample"], str)
    assert r["config"]["train"]["num_steps"] == 6
    summary = (out / "summary.md").read_text()
    assert "| arm | 1x | 2x | 3x | 4x |" in summary and "| real text |" in summary
    first = (out / "sink" / "checkpoints" / "step_0000006" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    with pytest.raises(SystemExit) as e:  # again: training is done, only the measuring runs
        main(argv)
    assert e.value.code == 0
    assert "finished" in capsys.readouterr().out
    assert (out / "sink" / "checkpoints" / "step_0000006" / "model.safetensors").stat().st_mtime_ns == first
    assert json.loads((out / "results.json").read_text())["arms"]["sink"]["ppl"] == r["arms"]["sink"]["ppl"]

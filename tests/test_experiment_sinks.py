"""`modernlm experiment sinks`: the shipped recipes load and fit their context; end to end at a tiny
size, the artefacts exist and every number is finite and in range; a rerun skips training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from modernlm.cli import main
from modernlm.commands.experiment_sinks import Config, check
from modernlm.config import load_config
from modernlm.errors import UserError
from modernlm.eval.sinks import arms
from modernlm.model import ModernDecoderLM

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

"""Config loading: precedence, coercion by annotation, and errors that name the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from modernlm.config import from_dict, load_config, save_config, to_dict
from modernlm.errors import UserError
from modernlm.model import ModelConfig


@dataclass
class Optim:
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"


@dataclass
class Cfg:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Optim = field(default_factory=Optim)
    name: str = "run"
    steps: int = 10
    compile: bool = False
    layers: list[int] | None = None


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\nsteps: 20\nname: from-file\n")
    cfg = load_config(Cfg, path, ["steps=30", "--model.n_layer=2"])
    assert cfg.optim.lr == 3e-4  # PyYAML reads 3e-4 as a string; the float field coerces it
    assert cfg.steps == 30  # override beats file
    assert cfg.name == "from-file"  # file beats default
    assert cfg.model.n_layer == 2 and cfg.model.d_model == 256  # untouched defaults stay
    assert load_config(Cfg).steps == 10


def test_json_file_and_coercions(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"betas": [0.8, 0.9], "schedule": "wsd"}, "compile": "true"}))
    cfg = load_config(Cfg, path, ["layers=1,2,3", "model.moe_layers=[0]"])
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.schedule == "wsd"
    assert cfg.compile is True
    assert cfg.layers == [1, 2, 3]
    assert cfg.model.moe_layers == [0]
    assert load_config(Cfg, None, ["layers=none"]).layers is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("optim.learning_rate=1", "unknown key 'optim.learning_rate'; valid keys: lr, betas, schedule"),
        ("stepz=3", "did you mean 'steps'?"),
        ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
        ("steps=1.5", "steps: expected an integer, got '1.5'"),
        ("compile=maybe", "compile: expected true or false, got 'maybe'"),
        ("optim.schedule=linear", "optim.schedule: expected one of ['cosine', 'wsd', 'constant']"),
        ("optim.betas=[1,2,3]", "optim.betas: expected 2 values"),
        ("model.n_kv_head=3", "n_kv_head (3) must divide n_head (4)"),
        ("steps", "expected key=value"),
    ],
)
def test_errors_name_the_field(override, message):
    with pytest.raises(UserError, match=None) as info:
        load_config(Cfg, None, [override])
    assert message in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: cannot parse: line 2, column 1: expected ',' or '\]'"):
        load_config(Cfg, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(Cfg, top)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Cfg, None, ["optim.lr=0.01", "model.n_expert=4", "layers=[1]"])
    for name in ("c.yaml", "c.json"):
        save_config(cfg, tmp_path / name)
        assert load_config(Cfg, tmp_path / name) == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["optim"]["betas"] == [0.9, 0.95]
    assert from_dict(Cfg, to_dict(cfg)) == cfg

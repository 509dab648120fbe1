"""Every shipped align and pipeline recipe loads into its command's Config (unknown keys and wrong
types fail here, not in a user's run), and round-trips through its saved form."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from modernlm.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted([*ROOT.glob("align/*.yaml"), *ROOT.glob("pipeline/*.yaml")])
COMMAND = {"sft": "sft", "dpo": "dpo", "verifier": "verifier", "grpo": "grpo"}


def command_of(path: Path) -> str:
    return "pipeline" if path.parent.name == "pipeline" else COMMAND[path.stem]


def test_the_recipes_are_there():
    assert {f"{p.parent.name}/{p.stem}" for p in RECIPES} >= {
        "align/sft", "align/dpo", "align/verifier", "align/grpo", "pipeline/demo", "pipeline/seed",
    }  # fmt: skip


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipe_loads_and_round_trips(path, tmp_path):
    module = importlib.import_module(f"modernlm.commands.{command_of(path)}")
    cfg = load_config(module.Config, path)
    saved = tmp_path / "c.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(module.Config, saved) == cfg

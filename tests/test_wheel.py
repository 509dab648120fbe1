"""The shipped recipes are package data: `-c NAME` finds them by name for each command, a path
works as before, and a wheel (built here, offline) carries them, so an installed modernlm runs
`--print-config` of every recipe from any directory."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from modernlm import cli
from modernlm.config import RECIPE_GROUPS, load_config, recipe_names, to_dict

REPO = Path(__file__).resolve().parents[1]
PACKAGED = Path(str(files("modernlm") / "recipes"))
RECIPES = sorted(PACKAGED.glob("*/*.yaml"))
IDS = [f"{p.parent.name}/{p.stem}" for p in RECIPES]


def command_of(recipe: Path) -> str:
    """The command a recipe is for: its group's command (align/sft is `sft`, ...)."""
    commands = [c for c, g in RECIPE_GROUPS.items() if g == recipe.parent.name]
    return recipe.stem if len(commands) > 1 else commands[0]


def expected(recipe: Path) -> dict:
    """The config `modernlm <command> -c <recipe> --print-config` prints, resolved in this process."""
    command = command_of(recipe)
    module = importlib.import_module(cli.COMMANDS[command][0])
    return to_dict(load_config(module.Config, recipe))


def test_the_checkout_configs_folder_is_the_packaged_recipes():
    assert (REPO / "configs").resolve() == PACKAGED.resolve()
    assert {p.parent.name for p in RECIPES} == set(RECIPE_GROUPS.values())
    for command in RECIPE_GROUPS:
        assert recipe_names(command), command
    assert "tiny" in recipe_names("pretrain") and "demo" in recipe_names("pipeline")
    assert recipe_names("convert") == []


@pytest.mark.parametrize(
    ("command", "spec", "recipe"),
    [
        ("pretrain", "tiny", "pretrain/tiny"),
        ("pipeline", "demo", "pipeline/demo"),
        ("sft", "sft", "align/sft"),
        ("experiment sinks", "sinks-cpu", "experiment/sinks-cpu"),
        ("pretrain", "pretrain/shakespeare-cpu", "pretrain/shakespeare-cpu"),  # group/name: any command
        ("pretrain", str(REPO / "configs" / "pretrain" / "tiny.yaml"), "pretrain/tiny"),  # a path as before
    ],
)
def test_config_by_name_or_path(command, spec, recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkout around: the name alone finds the recipe
    assert cli.run_command(command, ["-c", spec, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == expected(PACKAGED / f"{recipe}.yaml")


def test_a_file_in_the_working_directory_wins_over_a_recipe_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "tiny").write_text("train: {num_steps: 7}\n")
    assert cli.run_command("pretrain", ["-c", "pretrain/tiny", "--print-config"]) == 2
    assert "expected a .yaml" in capsys.readouterr().err  # the file was read, not the recipe


def test_an_unknown_recipe_is_one_line_listing_the_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.run_command("pretrain", ["-c", "tny", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modernlm pretrain: error: config 'tny'")
    assert "did you mean 'tiny'" in err and ", ".join(recipe_names("pretrain")) in err
    with pytest.raises(SystemExit) as info:
        cli.main(["pipeline", "-c", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recipes: demo, seed" in err
    assert cli.run_command("convert", ["-c", "tiny"]) == 2  # no recipes: the old message
    assert capsys.readouterr().err == "modernlm convert: error: config file not found: tiny\n"


def test_command_help_lists_its_recipes(capsys):
    with pytest.raises(SystemExit) as info:
        cli.run_command("pretrain", ["--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "or a recipe: " + ", ".join(recipe_names("pretrain")) in help_text


def _has(printed, written) -> bool:
    """Every value the recipe file writes is in the printed config (which adds the defaults)."""
    if isinstance(written, dict):
        return isinstance(printed, dict) and all(k in printed and _has(printed[k], v) for k, v in written.items())
    if isinstance(written, list):
        return isinstance(printed, list) and len(printed) == len(written) and all(map(_has, printed, written))
    if isinstance(written, str) and isinstance(printed, float):  # PyYAML reads 3e-4 as a string
        return float(written) == printed
    return printed == written


@pytest.mark.slow
def test_the_installed_wheel_runs_every_recipe_by_name(tmp_path):
    # Build from a copy of the sources: no build/ or egg-info in the checkout, no stale build/lib files.
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"  # offline
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], check=True, env=env)
    (wheel,) = wheels.glob("modernlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"modernlm/recipes/{i}.yaml" for i in IDS} <= names
    # the chat page `modernlm serve` answers at /, and the harness's offline tasks with their helper
    tasks = {f"modernlm/eval/tasks/offline/{n}" for n in ("sst2_local.yaml", "gsm8k_local.yaml", "wikitext_local.yaml",
                                                      "utils.py")}
    assert {"modernlm/serve/chat.html", *tasks} <= names

    # A clean venv that sees the dev environment's dependencies (a plain path line: the editable
    # modernlm's .pth there is not executed), with the wheel installed into it, not editable.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, env=env)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "dev-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True, env=env)

    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run(
        [python, "-c", "import modernlm; print(modernlm.__file__)"],
        cwd=empty, check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO), where

    for recipe, ident in zip(RECIPES, IDS, strict=True):
        command = command_of(recipe)
        done = subprocess.run(
            [venv / "bin" / "modernlm", *command.split(), "-c", recipe.stem, "--print-config"],
            cwd=empty, capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert done.returncode == 0, (ident, done.stderr)
        printed = yaml.safe_load(done.stdout)
        assert printed == expected(recipe), ident
        assert _has(printed, yaml.safe_load(recipe.read_text())), ident  # the file's own values, as written
    assert list(empty.iterdir()) == []

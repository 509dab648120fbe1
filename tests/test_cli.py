"""The `modernlm` entry point: fast help, dispatch, overrides, and one-line errors with exit 2."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest

from modernlm import cli
from modernlm.errors import UserError


@dataclass
class EchoConfig:
    src: str = ""
    dst: str = ""
    to: str = "modernlm"
    n: int = 1


def _install_fake_command(monkeypatch, calls: list):
    module = types.ModuleType("modernlm_fake_echo")
    module.__doc__ = "Echo the config.\n\n    modernlm echo SRC DST"
    module.Config = EchoConfig
    module.POSITIONALS = ["src", "dst"]
    module.FLAGS = {"--to": "to"}

    def main(cfg: EchoConfig) -> None:
        if cfg.n < 0:
            raise UserError("n must be >= 0")
        calls.append(cfg)

    module.main = main
    monkeypatch.setitem(sys.modules, "modernlm_fake_echo", module)
    monkeypatch.setitem(cli.COMMANDS, "fake echo", ("modernlm_fake_echo", "echo"))


def test_dispatch_positionals_flags_and_overrides(monkeypatch):
    calls: list = []
    _install_fake_command(monkeypatch, calls)
    assert cli.run_command("fake echo", ["a", "b", "--to", "hf", "n=3"]) == 0
    assert calls == [EchoConfig(src="a", dst="b", to="hf", n=3)]
    with pytest.raises(SystemExit) as info:
        cli.main(["fake", "echo", "x", "src=explicit"])  # an explicit override beats the positional
    assert info.value.code == 0
    assert calls[-1].src == "explicit"


@dataclass
class ManyConfig:
    out: str = ""
    paths: list[str] = field(default_factory=list)


def test_a_trailing_list_positional_takes_the_rest(monkeypatch):
    calls: list = []
    module = types.ModuleType("modernlm_fake_many")
    module.__doc__ = "Take many.\n\n    modernlm many OUT PATH..."
    module.Config, module.POSITIONALS, module.main = ManyConfig, ["out", "paths..."], calls.append
    monkeypatch.setitem(sys.modules, "modernlm_fake_many", module)
    monkeypatch.setitem(cli.COMMANDS, "fake many", ("modernlm_fake_many", "many"))
    assert cli.run_command("fake many", ["o", "a b", "c,d", "x: y"]) == 0
    assert calls[-1] == ManyConfig(out="o", paths=["a b", "c,d", "x: y"])
    assert cli.run_command("fake many", ["o"]) == 0
    assert calls[-1] == ManyConfig(out="o", paths=[])


def test_user_errors_exit_2_with_one_line(monkeypatch, capsys):
    _install_fake_command(monkeypatch, [])
    assert cli.run_command("fake echo", ["n=-1"]) == 2
    assert cli.run_command("fake echo", ["nn=1"]) == 2
    assert cli.run_command("fake echo", ["a", "b", "c"]) == 2
    err = capsys.readouterr().err
    assert "modernlm fake echo: error: n must be >= 0" in err
    assert "unknown key 'nn'; did you mean 'n'?" in err
    assert "unexpected argument 'c'" in err
    assert "Traceback" not in err


def test_print_config(monkeypatch, capsys):
    _install_fake_command(monkeypatch, [])
    assert cli.run_command("fake echo", ["a", "--print-config", "n=5"]) == 0
    assert capsys.readouterr().out.splitlines() == ["src: a", "dst: ''", "to: modernlm", "n: 5"]


def test_unknown_command_suggests():
    proc = subprocess.run([sys.executable, "-m", "modernlm", "pretrian"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'pretrain'?" in proc.stderr


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from modernlm.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in cli.COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_module_has_config_main_and_help(name):
    import importlib

    module = importlib.import_module(cli.COMMANDS[name][0])
    assert module.__doc__ and callable(module.main)
    module.Config()  # defaults construct
    with pytest.raises(SystemExit) as info:
        cli.run_command(name, ["--help"])
    assert info.value.code == 0

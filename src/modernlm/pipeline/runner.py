"""The pipeline runner: stages in order, each in its own directory, skipped when done with the same config.

A `Stage` is a name, a directory under the pipeline directory, the stages it reads from, its resolved
config and a function that runs it. Its hash covers its config and its inputs' hashes (paths inside the
pipeline directory taken relative to it, so a moved pipeline directory is still done): a changed pretrain
config re-runs everything after it, a changed verifier config only what reads the verifier. Each stage
writes `stages/<name>.json` (status "running", then "done" with its wall time). On the next run a stage is
- skipped when done with the current hash;
- resumed in place when its hash is current but it did not finish (killed, failed, or interrupted:
  SIGINT / SIGTERM stop a training stage after a checkpoint): training stages continue from their
  latest checkpoint, the others start over;
- re-run from scratch (its directory cleared) when its hash changed or `--from` / `--only` select it.
`pipeline.json` (recipe, environment, every stage's status, directory and wall time) is rewritten after
every stage, so `modernlm report` can read a pipeline that is still running or stopped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from modernlm.config import to_dict
from modernlm.errors import UserError
from modernlm.files import atomic_write, clean_leftovers

PIPELINE_FILE = "pipeline.json"
STAGES_DIR = "stages"


@dataclass
class Stage:
    name: str
    run_dir: str  # relative to the pipeline directory
    deps: tuple[str, ...]  # stages whose outputs this one reads
    config: Any  # the stage's resolved config section (a dataclass)
    run: Callable[[Any], Any]  # runs the stage; may return a dict of results for stages/<name>.json
    resumable: bool = False  # an unfinished attempt continues in place (training stages)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _under(value: Any, root: str) -> Any:
    """`value` with every path inside `root` written relative to it ("<out>/sft")."""
    if isinstance(value, dict):
        return {k: _under(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_under(v, root) for v in value]
    if isinstance(value, str) and root and (value == root or value.startswith(root + "/")):
        return "<out>" + value[len(root) :]
    return value


def config_hash(config: Any, dep_hashes: list[str], root: str | Path = "") -> str:
    """The hash of a stage's config and its inputs' hashes. Paths inside the pipeline directory
    (`root`) are hashed relative to it, so a pipeline directory copied or moved elsewhere, run with
    out_dir pointing there, is still done."""
    blob = json.dumps({"config": _under(to_dict(config), str(root)), "deps": dep_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The instructions that change a float's rounding: which vector width and fused multiply-adds the
# kernels (torch's, MKL's, ours built with -march=native) use, so which order they add in.
SIMD_FLAGS = ("fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "asimd", "sve")  # fmt: skip


def cpu_kind() -> dict[str, Any]:
    """The CPU's name and its rounding-relevant instruction sets (Linux: /proc/cpuinfo). Training and
    decoding are deterministic on one kind of CPU; another kind rounds differently, and a few
    thousand steps amplify that (the demo's table: docs/pipeline.md)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first core's lines win
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set((info.get("flags") or info.get("Features") or "").split())
    name = info.get("model name") or platform.processor() or platform.machine()
    return {"cpu": name, "cpu_simd": [f for f in SIMD_FLAGS if f in flags]}


def environment() -> dict[str, Any]:
    """What the report states about where the pipeline ran."""
    import torch  # here: nothing else in the runner needs it

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **cpu_kind(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector kernels torch dispatched to
        "modernlm": version("modernlm"),
    }
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)  # fmt: skip
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


class Runner:
    """Runs `stages` (in order) under `out_dir`; see the module docstring."""

    def __init__(self, out_dir: str | Path, stages: list[Stage], recipe: str, config_text: str = ""):
        self.out = Path(out_dir)
        self.stages = stages
        self.by_name = {s.name: s for s in stages}
        self.recipe = recipe
        self.config_text = config_text
        self.hashes: dict[str, str] = {}
        for s in stages:  # in order, so every dependency's hash is known first
            self.hashes[s.name] = config_hash(s.config, [self.hashes[d] for d in s.deps], self.out)

    def _marker(self, name: str) -> Path:
        return self.out / STAGES_DIR / f"{name}.json"

    def state(self, name: str) -> dict[str, Any]:
        path = self._marker(name)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}

    def is_current(self, name: str) -> bool:
        st = self.state(name)
        return st.get("status") == "done" and st.get("hash") == self.hashes[name]

    def _write_marker(self, name: str, data: dict[str, Any]) -> None:
        path = self._marker(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")

    def write_summary(self, started: str, env: dict[str, Any], finished: str | None = None) -> None:
        stages = []
        for s in self.stages:
            st = self.state(s.name)
            status = st.get("status", "pending")
            if status == "done" and st.get("hash") != self.hashes[s.name]:
                status = "stale"
            entry = {"name": s.name, "run_dir": s.run_dir, "status": status}
            for key in ("wall_s", "started", "finished", "error", "skipped"):
                if key in st:
                    entry[key] = st[key]
            stages.append(entry)
        data = {"recipe": self.recipe, "started": started, "finished": finished, "environment": env, "stages": stages}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / PIPELINE_FILE, json.dumps(data, indent=2, default=str) + "\n")

    def select(self, from_stage: str = "", only: str = "") -> tuple[list[Stage], set[str]]:
        """(stages to consider, stages forced to re-run), checking --from / --only and their inputs."""
        names = [s.name for s in self.stages]
        for flag, value in (("--from", from_stage), ("--only", only)):
            if value and value not in self.by_name:
                close = difflib.get_close_matches(value, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UserError(f"{flag}: no stage '{value}'{hint} (stages: {', '.join(names)})")
        if from_stage and only:
            raise UserError("give --from or --only, not both")
        if not (from_stage or only):
            return self.stages, set()
        start = names.index(from_stage or only)
        chosen = self.stages[start : start + 1] if only else self.stages[start:]
        chosen_names = {s.name for s in chosen}
        for s in chosen:  # every input from outside the selection must be there and current
            for d in s.deps:
                if d not in chosen_names and not self.is_current(d):
                    why = "has not completed" if self.state(d).get("status") != "done" else "is out of date"
                    raise UserError(
                        f"stage {s.name} reads stage {d}, which {why} with this recipe; "
                        f"run the pipeline with --from {d} (or without --from / --only)"
                    )
        return chosen, chosen_names

    def run(self, from_stage: str = "", only: str = "") -> None:
        chosen, forced = self.select(from_stage, only)
        env = environment()
        started = _now()
        self.out.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.out)  # what a killed write of an earlier run left behind
        if self.config_text:
            atomic_write(self.out / "pipeline.yaml", self.config_text)
        self.write_summary(started, env)
        total = len(chosen)
        for i, stage in enumerate(chosen, 1):
            h = self.hashes[stage.name]
            st = self.state(stage.name)
            directory = self.out / stage.run_dir
            banner = f"== [{i}/{total}] {stage.name}"
            if stage.name not in forced and self.is_current(stage.name):
                print(f"{banner}: done with this config, skipped ({directory})", flush=True)
                continue
            if stage.name in forced or st.get("hash") != h or not stage.resumable:
                why = "selected" if stage.name in forced else "config changed" if st else "new"
                if directory.exists() and directory != self.out:
                    shutil.rmtree(directory)
                print(f"{banner} ({why}) -> {directory}", flush=True)
            else:
                print(f"{banner}: resuming an unfinished attempt -> {directory}", flush=True)
            t0 = time.perf_counter()
            marker = {"name": stage.name, "hash": h, "status": "running", "started": _now(), "run_dir": stage.run_dir}
            self._write_marker(stage.name, marker)
            # The last stage (the report) reads pipeline.json: give it the finish time already.
            self.write_summary(started, env, finished=_now() if i == total else None)
            try:
                result = stage.run(stage.config)
            except BaseException as e:  # Ctrl-C / SIGTERM too: the stage stays unfinished, resumed next time
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                marker.update(status=status, error=f"{type(e).__name__}: {e}".splitlines()[0][:500],
                              wall_s=round(time.perf_counter() - t0, 2), finished=_now())  # fmt: skip
                self._write_marker(stage.name, marker)
                self.write_summary(started, env)
                raise
            marker.update(status="done", wall_s=round(time.perf_counter() - t0, 2), finished=_now())
            if isinstance(result, dict):
                marker["result"] = result
            self._write_marker(stage.name, marker)
            self.write_summary(started, env)
            print(f"{banner}: done in {marker['wall_s']:.1f}s", flush=True)
        self.write_summary(started, env, finished=_now())

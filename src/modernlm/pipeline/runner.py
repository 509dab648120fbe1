"""The pipeline runner: stages in order, each in its own directory, skipped when done with the same config.

A stage is a name, a directory under the pipeline directory, the stages it reads from, its
resolved config section and a function that runs it. Before a stage runs, the runner writes
`stages/<name>.json` with status "running" and the stage's hash: the hash of its config and of
the hashes of the stages it reads from (paths inside the pipeline directory relative to it), so a
changed pretrain config re-runs SFT, DPO, the verifier and the evaluations, and a changed verifier
config re-runs only what reads the verifier.
After it, the status is "done", with its wall time. On the next run a stage is:
- skipped when its status is done and its hash is the current one;
- resumed in place when its hash is the current one but it did not finish (killed, failed,
  interrupted: SIGINT / SIGTERM stop a training stage after a checkpoint of its last step): the
  training stages continue from their latest checkpoint, the others start over;
- re-run from scratch (its directory cleared) when its hash changed, or when `--from` / `--only`
  select it.
`pipeline.json` (recipe, environment, every stage's status, directory and wall time) is rewritten
after every stage, so `modernlm report` can read a pipeline that is still running or stopped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modernlm.align.dpo import PreferenceDataConfig
from modernlm.errors import UserError
from modernlm.files import atomic_open, atomic_write, clean_leftovers

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
    from modernlm.config import to_dict

    blob = json.dumps({"config": _under(to_dict(config), str(root)), "deps": dep_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def environment() -> dict[str, Any]:
    """What the report states about where the pipeline ran."""
    import os
    import subprocess
    from importlib.metadata import version

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
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
                import difflib

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


# ---------------------------------------------------------------------------------------------
# The evaluation stages: every model on the same held-out data


@dataclass
class Source:
    path: str = ""  # a local file ("" with synthetic data: filled by the pipeline)
    hf_dataset: str = ""  # or a hub dataset, e.g. Salesforce/wikitext, openai/gsm8k
    hf_config: str = ""  # e.g. wikitext-2-raw-v1, main
    split: str = "test"

    def given(self) -> bool:
        return bool(self.path or self.hf_dataset)


@dataclass
class PipelineEvalSettings:
    text: Source = field(default_factory=Source)  # held-out text for perplexity (synthetic: corpus/val.txt)
    problems: Source = field(default_factory=Source)  # held-out word problems, GSM8K records (synthetic: gsm/test)
    pairs: PreferenceDataConfig = field(default_factory=lambda: PreferenceDataConfig(split="test", shuffle=False))
    max_problems: int = 200  # problems answered greedily per model (0 = all)
    max_pairs: int = 200  # pairs scored per model (0 = all)
    max_tokens: int = 0  # perplexity on the first N tokens of the text (0 = all)
    context: int = 0  # perplexity window (0 = the model's context); stride = context / 2
    max_new_tokens: int = 128  # answer budget
    batch_size: int = 32  # rows per forward / generate call
    plain_prompt: str = "Question: {question}\nAnswer:"  # how a model without chat training is asked
    device: str = "auto"  # auto = cuda when available (bf16 autocast there), else cpu
    # lm-evaluation-harness tasks scored for every model (columns "<task> <metric>"): ours offline
    # (sst2_local, gsm8k_local, wikitext_local, under harness_data_dir) or any harness task name
    harness_tasks: list[str] = field(default_factory=list)
    harness_limit: int | None = None  # the first N examples of each task (null = all)
    harness_num_fewshot: int | None = None  # null = each task's own default
    harness_data_dir: str = "../shared/data"


def read_problems(src: Source, limit: int = 0) -> list[dict[str, Any]]:
    """The first `limit` (0 = all) problems of `src`, with their gold number ("target")."""
    from modernlm.align import verifier

    return verifier.read_problems(src.path, limit, hf_dataset=src.hf_dataset, hf_config=src.hf_config, split=src.split)


def problem_kinds(src: Source, limit: int = 0) -> list[str | None]:
    """The kind of each of the first `limit` problems of a local GSM8K JSONL file whose rows carry
    the synthetic data's "record" ({"kind": ...}); [] for other sources (no kinds to report)."""
    path = Path(src.path) if src.path else None
    if path is None or path.suffix != ".jsonl" or not path.is_file():
        return []
    kinds: list[str | None] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line).get("record")
                kinds.append(record.get("kind") if isinstance(record, dict) else None)
                if limit and len(kinds) >= limit:
                    break
    return kinds if any(kinds) else []


def accuracy_by_kind(correct: list[bool], kinds: list[str | None]) -> dict[str, float]:
    """{"answer_accuracy/<kind>": share correct, "answer_count/<kind>": problems} over the problems of each
    kind (in KINDS' order); the counts give the report its intervals."""
    if not kinds or len(kinds) < len(correct):
        return {}
    from modernlm.data.synthetic import KINDS

    groups: dict[str, list[bool]] = {}
    for c, k in zip(correct, kinds, strict=False):
        if k is not None:
            groups.setdefault(k, []).append(c)
    order = [k for k in KINDS if k in groups] + sorted(k for k in groups if k not in KINDS)
    out: dict[str, float] = {}
    for k in order:
        out[f"answer_accuracy/{k}"] = sum(groups[k]) / len(groups[k])
        out[f"answer_count/{k}"] = len(groups[k])
    return out


def eval_device(name: str) -> tuple[Any, Any]:
    """(device, autocast factory) for evaluation: bf16 autocast on a GPU, none on the CPU."""
    import contextlib
    import functools

    import torch

    from modernlm.runtime import resolve_device

    device = resolve_device(name)
    if device.type == "cuda":
        return device, functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return device, contextlib.nullcontext


def plain_answers(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of plain-text prompts, cut at a blank line or the next "Question:"."""
    from modernlm.generation import generate_text

    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        out += generate_text(model, tok, prompts[i : i + batch_size], max_new_tokens, temperature=0.0,
                             stop=["\n\n", "Question:"], add_bos=False)  # fmt: skip
    return out


def evaluate_model(name: str, source: str | Path, chat: bool, cfg: PipelineEvalSettings) -> dict[str, Any]:
    """One row of the results table: params, held-out perplexity, answer accuracy, pair accuracy.

    Chat models (SFT, DPO) are asked in ChatML; the pretrained model, which has never seen a chat,
    with `plain_prompt`, and its pairs scored as prompt + " " + reply + eos.
    """
    from modernlm.align.dpo import collate_pairs, evaluate_pairs, load_pairs
    from modernlm.align.sft import chat_ready, generate_replies
    from modernlm.align.verifier import label_solution
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.checkpoint import resolve_checkpoint
    from modernlm.data.readers import load_text
    from modernlm.perplexity import evaluate_text

    ckpt = resolve_checkpoint(source)
    if ckpt is None:
        raise UserError(f"eval: {source} has no checkpoint")
    device, autocast = eval_device(cfg.device)
    lm = load(ckpt, device=device, what=name)
    if chat:
        model, tok, _ = chat_ready(lm, name)
        enc = ChatEncoder(tok)
    else:
        model, tok, enc = lm.model, lm.tokenizer, None
    model.eval()
    row: dict[str, Any] = {"model": name, "params": model.num_params()}
    if cfg.text.given():
        context = cfg.context or model.config.max_seq_len
        text, _ = load_text(cfg.text.path, cfg.text.hf_dataset, cfg.text.hf_config, cfg.text.split)
        ppl = evaluate_text(lm, text, context=context,
                            stride=max(1, context // 2), batch_size=8, max_tokens=cfg.max_tokens)  # fmt: skip
        row["val_ppl"] = ppl["perplexity"]
        row["bits_per_byte"] = ppl["bits_per_byte"]
    if cfg.problems.given():
        problems = read_problems(cfg.problems, cfg.max_problems)
        if enc is not None:
            chats = [[{"role": "user", "content": p["question"]}] for p in problems]
            with autocast():
                replies = generate_replies(model, enc, chats, cfg.max_new_tokens, batch_size=cfg.batch_size)
            texts = [r["text"] for r in replies]
            row["eos_rate"] = sum(r["stopped"] for r in replies) / len(replies)
        else:
            prompts = [cfg.plain_prompt.format(question=p["question"]) for p in problems]
            with autocast():
                texts = plain_answers(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size)
        right = [label_solution(t, p["target"])[1] for t, p in zip(texts, problems, strict=True)]
        row["answer_accuracy"], row["answer_count"] = sum(right) / len(right), len(right)
        row.update(accuracy_by_kind(right, problem_kinds(cfg.problems, cfg.max_problems)))
        row["_answers"] = [{"question": p["question"], "answer": t, "correct": c}
                           for p, t, c in zip(problems, texts, right, strict=True)]  # fmt: skip
    if cfg.pairs.path or cfg.pairs.hf_dataset:
        if enc is not None:
            pair_cfg = replace(cfg.pairs, shuffle=False, max_length=min(cfg.pairs.max_length, model.config.max_seq_len))
            items, _ = load_pairs(pair_cfg, enc, max_examples=cfg.max_pairs)
        else:
            items = _plain_pairs(cfg, tok, model.config.max_seq_len)
        batches = [collate_pairs(items[i : i + cfg.batch_size], tok.pad_id or 0)
                   for i in range(0, len(items), cfg.batch_size)]  # fmt: skip
        pairs = evaluate_pairs(model, batches, 1.0, device, autocast)
        row["pair_accuracy"] = pairs["pair_accuracy"]
        row["pair_logp_margin"] = pairs["logps/chosen"] - pairs["logps/rejected"]
    if cfg.harness_tasks:
        from modernlm.eval.tasks.run import headline_metrics

        row.update(headline_metrics(lm, cfg.harness_tasks, cfg.harness_data_dir, limit=cfg.harness_limit,
                                    num_fewshot=cfg.harness_num_fewshot, batch_size=cfg.batch_size))
    return row


def _plain_pairs(cfg: PipelineEvalSettings, tok: Any, max_length: int) -> list[dict[str, Any]]:
    from modernlm.align.dpo import read_pairs
    from modernlm.chat import IGNORE_INDEX

    items = []
    for _, pair in read_pairs(cfg.pairs):
        question = pair["prompt"][-1]["content"]
        prompt = tok.encode(cfg.plain_prompt.format(question=question))
        item = {}
        for side in ("chosen", "rejected"):
            reply = tok.encode(" " + pair[side]) + [tok.eos_id]
            item[f"{side}_ids"] = (prompt + reply)[-max_length:]
            item[f"{side}_labels"] = ([IGNORE_INDEX] * len(prompt) + reply)[-max_length:]
        items.append(item)
        if cfg.max_pairs and len(items) >= cfg.max_pairs:
            break
    return items


def write_rows(out_dir: Path, rows: list[dict[str, Any]], notes: str = "") -> dict[str, Any]:
    """eval.json (rows + every model's answers) and results.json (the headline table) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = {r["model"]: r.pop("_answers") for r in rows if "_answers" in r}
    columns = ["model"]
    for r in rows:
        columns += [k for k in r if k not in columns]
    results = {"columns": columns, "rows": rows, "notes": notes}
    atomic_write(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(out_dir / "eval.json", json.dumps({r["model"]: {k: v for k, v in r.items() if k != "model"}
                                                    for r in rows}, indent=2) + "\n")  # fmt: skip
    with atomic_open(out_dir / "answers.jsonl") as f:
        for model, items in answers.items():
            for a in items:
                f.write(json.dumps({"model": model, **a}) + "\n")
    return results

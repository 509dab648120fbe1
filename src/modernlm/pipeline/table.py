"""The results table: every model scored on the same held-out data (the eval_pretrain and eval stages).

A row per model: parameters, held-out perplexity and bits per byte, greedy answer accuracy on word
problems (overall and per kind of problem, with the counts the report's intervals need), preference
pair accuracy, and any lm-evaluation-harness task metrics; then the verifier's reranking rows. Chat
models are asked in ChatML, the pretrained model with a plain prompt. `eval_pretrain_stage` scores
the pretrained model as soon as it exists; `eval_stage` adds SFT, DPO, RL and the verifier and
writes eval/results.json, the table the report leads with.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from modernlm.align import verifier
from modernlm.align.dpo import PreferenceDataConfig, collate_pairs, evaluate_pairs, load_pairs, read_pairs
from modernlm.align.sft import chat_ready, generate_replies
from modernlm.api import load
from modernlm.chat import IGNORE_INDEX, ChatEncoder
from modernlm.checkpoint import resolve_checkpoint
from modernlm.data.readers import load_text
from modernlm.data.synthetic import KINDS
from modernlm.errors import UserError
from modernlm.eval.tasks.run import headline_metrics, prepare_tasks
from modernlm.files import atomic_open, atomic_write
from modernlm.generation import generate_text
from modernlm.perplexity import evaluate_text
from modernlm.runtime import resolve_device


@dataclass
class HeldOutData:
    """Held-out data for the table: a local file or a split of a hub dataset."""

    path: str = ""  # a local file ("" with synthetic data: filled by the pipeline)
    hf_dataset: str = ""  # or a hub dataset, e.g. Salesforce/wikitext, openai/gsm8k
    hf_config: str = ""  # e.g. wikitext-2-raw-v1, main
    split: str = "test"

    def __post_init__(self) -> None:
        if self.path and self.hf_dataset:  # one source is read: the other would be ignored silently
            raise ValueError(f"path ({self.path}) or hf_dataset ({self.hf_dataset}): give one, not both")

    def given(self) -> bool:
        return bool(self.path or self.hf_dataset)


@dataclass
class PipelineEvalSettings:
    text: HeldOutData = field(default_factory=HeldOutData)  # held-out text for perplexity (synthetic: corpus/val.txt)
    problems: HeldOutData = field(default_factory=HeldOutData)  # held-out GSM8K word problems (synthetic: gsm/test)
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


def held_out_problems(src: HeldOutData, limit: int = 0) -> list[dict[str, Any]]:
    """The first `limit` (0 = all) problems of `src`, with their gold number ("target")."""
    return verifier.read_problems(src.path, limit, hf_dataset=src.hf_dataset, hf_config=src.hf_config, split=src.split)


def problem_kinds(src: HeldOutData, limit: int = 0) -> list[str | None]:
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
    device = resolve_device(name)
    if device.type == "cuda":
        return device, functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return device, contextlib.nullcontext


def plain_answers(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of plain-text prompts, cut at a blank line or the next "Question:"."""
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
        problems = held_out_problems(cfg.problems, cfg.max_problems)
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
        right = [verifier.label_solution(t, p["target"])[1] for t, p in zip(texts, problems, strict=True)]
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
        row.update(headline_metrics(lm, cfg.harness_tasks, cfg.harness_data_dir, limit=cfg.harness_limit,
                                    num_fewshot=cfg.harness_num_fewshot, batch_size=cfg.batch_size))
    return row


def _plain_pairs(cfg: PipelineEvalSettings, tok: Any, max_length: int) -> list[dict[str, Any]]:
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
    """results.json (the headline table), eval.json (each model's metrics) and answers.jsonl (every
    model's answers) in out_dir."""
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


def check_harness_tasks(cfg: PipelineEvalSettings) -> None:
    """A wrong harness task name or a missing task file fails before the first stage, not after pretraining."""
    if not cfg.harness_tasks:
        return
    try:
        prepare_tasks(cfg.harness_tasks, cfg.harness_data_dir)
    except ImportError as e:
        raise UserError(f"eval.harness_tasks needs lm-evaluation-harness: pip install 'modernlm[harness]' "
                        f"({e})") from None


RESULT_NOTES = (
    "val_ppl: perplexity of the held-out stories (sliding window, stride = context / 2). answer_accuracy: "
    "greedy answers to held-out word problems, right when the last number equals the reference (chat models "
    "are asked in ChatML, the pretrained model with a plain 'Question: ... Answer:' prompt); "
    "answer_accuracy/<kind>: the same per kind of problem (compare: the 'more / fewer than' problems the SFT "
    "demonstrations get wrong). pair_accuracy: held-out preference pairs whose right solution gets the higher "
    "log-probability; the pairs' prompts are the first gsm/test problems, so pair and answer accuracy share "
    "their questions. The verifier rows rerank N samples of the SFT model on the same problems. None of these "
    "problems or pairs chose a checkpoint, and no training text states their computations."
)


def verifier_rows(run_dir: Path, kinds: list[str | None] | None = None) -> list[dict[str, Any]]:
    """The verifier's reranking results as rows of the results table; with the problems' kinds
    (in eval order), each method's accuracy per kind too (from eval/predictions.jsonl)."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    n = r.get("n")
    rows = [
        ({"model": f"sft, majority vote of {n}", "answer_accuracy": r["majority_accuracy"]}, "majority_correct"),
        ({"model": f"sft + verifier, best of {n}", "answer_accuracy": r["best_of_n_accuracy"]}, "best_correct"),
        ({"model": f"sft + verifier, weighted vote of {n}", "answer_accuracy": r["weighted_vote_accuracy"]},
         "weighted_correct"),
        ({"model": f"sft, pass@{n} (oracle)", "answer_accuracy": r["pass_at_n"]}, "pass_at_n"),
    ]  # fmt: skip
    predictions = run_dir / "eval" / "predictions.jsonl"
    if kinds and predictions.is_file():
        picks = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
        problem_kinds = [kinds[p["index"]] if p["index"] < len(kinds) else None for p in picks]
        for row, key in rows:
            row["answer_count"] = len(picks)
            row.update(accuracy_by_kind([bool(p[key]) for p in picks], problem_kinds))
    return [row for row, _ in rows]


# The two evaluation stages; `dirs` is each stage's directory by stage name.


def eval_pretrain_stage(dirs: dict[str, str], cfg: PipelineEvalSettings) -> dict[str, Any]:
    """The pretrained model's row, in eval_pretrain/ (the eval stage starts its table from it)."""
    row = evaluate_model("pretrain", dirs["pretrain"], chat=False, cfg=cfg)
    write_rows(Path(dirs["eval_pretrain"]), [row])
    return {k: v for k, v in row.items() if not k.startswith("_")}


def eval_stage(dirs: dict[str, str], cfg: PipelineEvalSettings) -> dict[str, Any]:
    """The results table in eval/: the pretrained model's row, then sft, dpo, rl and the verifier's rows."""
    rows = json.loads((Path(dirs["eval_pretrain"]) / "results.json").read_text())["rows"]
    for name in ("sft", "dpo", "rl"):
        rows.append(evaluate_model(name, dirs[name], chat=True, cfg=cfg))
    rows += verifier_rows(Path(dirs["verifier"]), problem_kinds(cfg.problems, cfg.max_problems))
    results = write_rows(Path(dirs["eval"]), rows, notes=RESULT_NOTES)
    return {"rows": len(results["rows"])}

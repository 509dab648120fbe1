"""Prompting baselines: label scoring, generation, metrics and logged predictions for any model.

Models come in as `textmodel.TaskModel` (ours: `textmodel.wrap_modernlm`; transformers':
`hf.text.wrap_hf`). `score_choices` ranks fixed answers by the summed log-probability of each
choice's tokens given the prompt (GPT-3's and lm-evaluation-harness's zero-shot method); prompt and
choice are tokenized apart, as `data/tasks.py` builds training examples, and batches are
right-padded, so a row scores the same alone or in any batch. `evaluate_task` runs a whole task
(sst2: scored labels or the first generated word; samsum: a greedy summary, ROUGE; gsm8k: a greedy
chain of thought, strict and flexible exact match), few-shot demonstrations first, and with
`out_dir` writes predictions.jsonl, errors.jsonl, metrics.json (and demonstrations.txt).

Design notes: docs/design.md#evalpromptingpy
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modernlm.errors import UserError
from modernlm.eval.metrics import evaluate_predictions, macro_f1, write_predictions
from modernlm.files import atomic_write
from modernlm.textmodel import TaskModel, pad_rows

TASKS = ("sst2", "samsum", "gsm8k")
MODES = ("auto", "score", "generate")

# A task's kind of metric in metrics.evaluate_predictions.
METRIC_KIND = {"sst2": "classification", "samsum": "summarization", "gsm8k": "gsm8k"}
# Generation budget when the caller gives none: a label word, a summary, a worked solution.
DEFAULT_MAX_NEW_TOKENS = {"sst2": 5, "samsum": 128, "gsm8k": 256}
# Where a continuation ends: the model starting the next demonstration or a new block. GSM8K
# solutions and SAMSum summaries hold no blank line, so "\n\n" never cuts a real answer.
STOPS = {
    "sst2": ["\n"],
    "samsum": ["\n\n", "\nDialogue:", "\nSummarize this dialogue:"],
    "gsm8k": ["\n\n", "Question:"],
}
SST2_LABEL_WORDS = ["negative", "positive"]
DEMO_SEPARATOR = "\n\n"


# ---------------------------------------------------------------------------------------------
# Scoring


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def _score_pairs_causal(
    tm: TaskModel, pairs: list[tuple[list[int], list[int]]], batch_size: int, bar: Any
) -> list[float]:
    """Summed log p(choice | prompt) per (prompt ids, choice ids) pair, from prompt + choice forwards."""
    out = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # less padding
    for chunk in _batches(order, batch_size):
        bar.update(len(chunk))
        ids, mask = pad_rows([pairs[i][0] + pairs[i][1] for i in chunk], tm.tokenizer.pad_id, "right")
        logits = tm.logits(ids, mask)
        for b, i in enumerate(chunk):
            p, c = pairs[i]
            # position t predicts token t + 1: the choice tokens are predicted from len(p) - 1 on
            lp = logits[b, len(p) - 1 : len(p) + len(c) - 1].log_softmax(-1)
            out[i] = lp.gather(-1, torch.tensor(c, device=lp.device)[:, None]).sum().item()
    return out


def _score_single_tokens(
    tm: TaskModel, prompts: list[list[int]], choice_ids: list[int], batch_size: int, bar: Any
) -> list[list[float]]:
    """log p(token | prompt) of one-token choices: one forward per prompt, its last position."""
    out: list[list[float]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    index = torch.tensor(choice_ids)
    for chunk in _batches(order, batch_size):
        bar.update(len(chunk))
        ids, mask = pad_rows([prompts[i] for i in chunk], tm.tokenizer.pad_id, "right")
        logits = tm.logits(ids, mask)
        for b, i in enumerate(chunk):
            lp = logits[b, len(prompts[i]) - 1].log_softmax(-1)
            out[i] = lp[index.to(lp.device)].tolist()
    return out


def _score_pairs_seq2seq(
    tm: TaskModel, pairs: list[tuple[list[int], list[int]]], batch_size: int, bar: Any
) -> list[float]:
    """Summed log p(choice | encoder input) per pair; the decoder reads start + choice[:-1]."""
    if tm.decoder_start_id is None:
        raise UserError("model: an encoder-decoder without a decoder start token (config.decoder_start_token_id)")
    out = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    eos = tm.tokenizer.eos_id
    for chunk in _batches(order, batch_size):
        bar.update(len(chunk))
        enc = [pairs[i][0] + ([eos] if eos is not None else []) for i in chunk]
        ids, mask = pad_rows(enc, tm.tokenizer.pad_id, "right")
        dec, _ = pad_rows([[tm.decoder_start_id] + pairs[i][1][:-1] for i in chunk], tm.tokenizer.pad_id, "right")
        logits = tm.logits(ids, mask, decoder_input_ids=dec)
        for b, i in enumerate(chunk):
            c = pairs[i][1]
            lp = logits[b, : len(c)].log_softmax(-1)
            out[i] = lp.gather(-1, torch.tensor(c, device=lp.device)[:, None]).sum().item()
    return out


def score_choices(
    tm: TaskModel,
    prompts: list[str],
    choices: list[str],
    *,
    batch_size: int = 8,
    normalize: bool = False,
    progress: bool = False,
) -> Tensor:
    """[N, C] log-probability of each choice's tokens given each prompt, summed over the choice's
    tokens (normalize=True: divided by their count, a per-token mean).

    The choice text is appended as given: include its leading space (" positive") when the prompt
    ends before one. Prompts longer than the model's context are cut from the left.
    """
    if batch_size <= 0:
        raise UserError(f"batch_size: must be positive, got {batch_size}")
    if not choices:
        raise UserError("choices: give at least one")
    choice_rows = tm.tokenizer.encode_batch(list(choices))
    for text, row in zip(choices, choice_rows, strict=True):
        if not row:
            raise UserError(f"choice {text!r} encodes to no tokens")
    if not prompts:
        return torch.empty(0, len(choices))
    longest = max(len(c) for c in choice_rows)
    prompt_rows = [tm.fit_prompt(r, longest) for r in tm.prompt_ids_batch(list(prompts))]
    if not tm.is_encoder_decoder:
        for text, row in zip(prompts, prompt_rows, strict=True):
            if not row:
                raise UserError(f"prompt {text[:40]!r} encodes to no tokens, so the first choice token has no context")
    if not tm.is_encoder_decoder and longest == 1:
        bar = _progress(len(prompt_rows), progress)
        scores = torch.tensor(_score_single_tokens(tm, prompt_rows, [c[0] for c in choice_rows], batch_size, bar))
    else:
        pairs = [(p, c) for p in prompt_rows for c in choice_rows]
        bar = _progress(len(pairs), progress)
        score = _score_pairs_seq2seq if tm.is_encoder_decoder else _score_pairs_causal
        scores = torch.tensor(score(tm, pairs, batch_size, bar)).view(len(prompts), len(choices))
    bar.close()
    scores = scores.to(torch.float64)
    if normalize:
        scores = scores / torch.tensor([len(c) for c in choice_rows], dtype=torch.float64)
    return scores


# ---------------------------------------------------------------------------------------------
# Tasks


def demonstrations(few_shot: Sequence[dict[str, Any]]) -> str:
    """The few-shot prefix: each example's prompt + target, blocks separated by a blank line
    (empty for zero-shot)."""
    blocks = []
    for ex in few_shot:
        if not ex.get("target"):
            raise UserError(f"{ex.get('source', 'few_shot')}: a demonstration needs a target (an unlabeled row)")
        blocks.append(ex["prompt"] + ex["target"])
    return "".join(b + DEMO_SEPARATOR for b in blocks)


def label_choices(examples: Sequence[dict[str, Any]], label_words: Sequence[str] | None = None) -> list[str]:
    """The text scored for each label: label_words as given, else SST-2's words with the leading
    space the examples' targets use (" negative" after "Sentiment:"), so scoring matches training."""
    if label_words:
        return list(label_words)
    lead = " " if any(str(ex.get("target", "")).startswith(" ") for ex in examples) else ""
    return [lead + w for w in SST2_LABEL_WORDS]


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'()").lower() if words else ""


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_predictions(path, rows)  # the same atomic JSONL writer; every row has input / prediction / reference


def evaluate_task(
    tm: TaskModel,
    examples: list[dict[str, Any]],
    task: str,
    *,
    mode: str = "auto",
    few_shot: Sequence[dict[str, Any]] = (),
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    out_dir: str | Path | None = None,
    label_words: Sequence[str] | None = None,
    normalize: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `tm` on examples of `tasks.load_task_examples` for `task` (sst2 | samsum | gsm8k).

    mode: "auto" (sst2: "score"; samsum, gsm8k: "generate"), "score" (sst2 only) or "generate".
    few_shot: examples prepended to every prompt as demonstrations (see `demonstrations`).
    max_new_tokens: generation budget (None = per task: sst2 5, samsum 128, gsm8k 256).
    label_words: the choice texts per label for sst2 (None = `label_choices`).
    normalize: sst2 scoring by per-token mean log-probability instead of the sum.
    out_dir: writes predictions.jsonl, errors.jsonl, metrics.json (and demonstrations.txt).
    Returns the metrics (see `metrics.evaluate_predictions`) plus "task", "mode", "few_shot",
    "n", "seconds".
    """
    if task not in TASKS:
        raise UserError(f"task: unknown task {task!r} (expected one of {', '.join(TASKS)})")
    if mode not in MODES:
        raise UserError(f"mode: unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    if mode == "auto":
        mode = "score" if task == "sst2" else "generate"
    if mode == "score" and task != "sst2":
        raise UserError(f"mode: 'score' ranks label words, which only sst2 has; {task} generates")
    if not examples:
        raise UserError("data: no examples to evaluate")
    if batch_size <= 0:
        raise UserError(f"batch_size: must be positive, got {batch_size}")
    budget = DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    if budget <= 0 and mode == "generate":
        raise UserError(f"max_new_tokens: must be positive, got {budget}")
    if mode == "generate":
        tm.check_room(budget)  # before any example runs
    prefix = demonstrations(few_shot)
    prompts = [prefix + ex["prompt"] for ex in examples]
    t0 = time.perf_counter()
    extra: list[dict[str, Any]] = [{} for _ in examples]

    if task == "sst2":
        missing = [ex["source"] for ex in examples if ex["label"] is None]
        if missing:
            raise UserError(f"{missing[0]}: no label to evaluate against (an unlabeled split such as SST-2 test)")
        choices = label_choices(examples, label_words)
        words = [c.strip() for c in choices]
        n_labels = len(choices)
        bad = [ex["source"] for ex in examples if not 0 <= ex["label"] < n_labels]
        if bad:
            raise UserError(f"{bad[0]}: label outside the {n_labels} label words {words}")
        references: list[Any] = [words[ex["label"]] for ex in examples]
        if mode == "score":
            scores = score_choices(tm, prompts, choices, batch_size=batch_size, normalize=normalize, progress=progress)
            picked = scores.argmax(dim=1).tolist()
            predictions: list[Any] = [words[k] for k in picked]
            for i, k in enumerate(picked):
                extra[i] = {"label": examples[i]["label"], "predicted_label": k, "scores": scores[i].tolist()}
        else:
            texts = _generate_all(tm, prompts, budget, STOPS[task], batch_size, progress)
            lowered = [w.lower() for w in words]
            predictions = []
            for i, text in enumerate(texts):
                first = _first_word(text)
                k = lowered.index(first) if first in lowered else None
                # An answer that is no label word stays as the model wrote it: counted wrong.
                predictions.append(words[k] if k is not None else first)
                extra[i] = {"label": examples[i]["label"], "predicted_label": k, "generated": text}
    else:
        predictions = _generate_all(tm, prompts, budget, STOPS[task], batch_size, progress)
        predictions = [p.strip() for p in predictions]
        if task == "gsm8k":
            references = [ex["record"]["answer"] for ex in examples]
        else:
            references = [ex["target"].strip() for ex in examples]
    seconds = time.perf_counter() - t0

    inputs = [ex["input"] for ex in examples]
    out = Path(out_dir) if out_dir is not None else None
    errors_path = out / "errors.jsonl" if out is not None else None
    metrics = evaluate_predictions(METRIC_KIND[task], inputs, predictions, references, errors_path)
    if task == "sst2":
        # Over the label words, so an unseen class or a non-label answer does not add a class.
        metrics["macro_f1"] = macro_f1(predictions, references, labels=words)
    metrics.update(task=task, mode=mode, few_shot=len(few_shot), seconds=round(seconds, 3))
    if out is not None:
        rows = []
        for i, ex in enumerate(examples):
            row = {
                "input": ex["input"],
                "prediction": predictions[i],
                "reference": references[i],
                "index": i,
                "prompt": ex["prompt"],
                "source": ex["source"],
                **extra[i],
            }
            rows.append(row)
        _write_jsonl(out / "predictions.jsonl", rows)
        if prefix:
            atomic_write(out / "demonstrations.txt", prefix)
        atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _generate_all(
    tm: TaskModel, prompts: list[str], max_new_tokens: int, stop: Sequence[str], batch_size: int, progress: bool
) -> list[str]:
    """Greedy continuations of all prompts, in batches of similar length (less padding)."""
    out = [""] * len(prompts)
    lengths = [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    bar = _progress(len(prompts), progress)
    for chunk in _batches(order, batch_size):
        texts = tm.generate([prompts[i] for i in chunk], max_new_tokens=max_new_tokens, stop=stop)
        for i, text in zip(chunk, texts, strict=True):
            out[i] = text
        bar.update(len(chunk))
    bar.close()
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        warnings.warn("progress needs tqdm", stacklevel=3)
        return _NoBar()
    return tqdm(total=total, unit="ex", dynamic_ncols=True)


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "STOPS",
    "TASKS",
    "demonstrations",
    "evaluate_task",
    "label_choices",
    "score_choices",
]

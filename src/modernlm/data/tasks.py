"""Supervised task datasets: raw records -> uniform examples -> token ids with a loss mask -> batches.

Four layers, each usable on its own: one reader per dataset (`read_sst2`, `read_samsum`,
`read_gsm8k`, `read_alpaca`, `read_hh_rlhf`) -> `load_task_examples` (uniform examples {"input",
"prompt", "target", "label", "record", "source"}) -> `load_supervised_text_dataset` (token ids;
causal examples have labels -100 over the prompt, so the loss is on the answer only) -> `collate`,
`TaskBatches` (endless, seeded, rank-sharded, exactly resumable, as `data.shards.TrainWindows`) and
`eval_batches` (one finite pass).

HH-RLHF pairs that do not split cleanly into one shared prompt and one assistant reply each (about
1% of the real test pairs) are skipped and counted. The tokenizer is duck-typed
(`textmodel.TaskTokenizer`): ours or any transformers tokenizer.

Design notes (the layers, HH-RLHF splitting): docs/design.md#datataskspy
"""

from __future__ import annotations

import difflib
import itertools
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modernlm.chat import IGNORE_INDEX  # label value that contributes no loss (as in HF)
from modernlm.data.readers import Rows, file_rows, hub_rows
from modernlm.errors import UserError
from modernlm.textmodel import TaskTokenizer

TASK_NAMES = ("sst2", "samsum", "gsm8k", "alpaca", "hh_rlhf", "custom")
TASK_TYPES = ("classification", "seq2seq", "causal")

# Alpaca's two prompts (stanford_alpaca train.py), with a newline after "### Response:" so the
# output starts on its own line; a record picks one by whether its "input" is empty.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class TaskDatasetConfig:
    name: str = "custom"  # sst2 | samsum | gsm8k | alpaca | hh_rlhf | custom (your own fields)
    path: str = ""  # local file: .tsv (SST-2 GLUE layout), .json (a list), .jsonl or .jsonl.gz
    hf_dataset: str = ""  # hub dataset id instead of path, e.g. "glue", "knkarthick/samsum", "openai/gsm8k"
    hf_config: str = ""  # hub config ("" = the dataset's default: "sst2" for glue, "main" for openai/gsm8k)
    hf_data_dir: str = ""  # hub data_dir, e.g. "helpful-base" for Anthropic/hh-rlhf
    split: str = "train"  # hub split
    task_type: str = ""  # classification | seq2seq | causal ("" = the dataset's usual one)
    text_fields: list[str] = field(default_factory=list)  # fields joined into "input" ([] = per dataset)
    text_separator: str = "\n\n"  # joins text_fields (empty fields are left out)
    target_field: str = ""  # field holding the reference output ("" = per dataset, e.g. gsm8k "answer")
    label_field: str = ""  # int class label field ("" = per dataset: sst2 "label"; custom: none)
    label_words: list[str] = field(default_factory=list)  # label i -> target text ([] = sst2 negative/positive)
    prompt_template: str = ""  # str.format over the record's fields and {input} = text_fields joined ("" = per dataset)
    target_template: str = ""  # str.format for the target ("" = "{target_field}", space-led for causal built-ins)
    max_length: int = 512  # token cap of input_ids (0 = none); causal cuts the prompt from the left first
    max_target_length: int = 0  # seq2seq: token cap of labels (0 = max_length)
    add_bos: bool = False  # prepend the tokenizer's bos to inputs (Llama-style models expect it)
    max_examples: int = 0  # keep at most this many examples (0 = all), taken after shuffling
    shuffle: bool = False  # shuffle the examples (seeded) before max_examples
    seed: int = 0  # shuffle seed


# Per-dataset defaults: the input fields, the usual task type, the target / label fields, whether a
# causal target starts with a space (the prompt ends with ":"), and prompts per task type.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sst2": dict(
        text_fields=["text"],
        task_type="classification",
        label_field="label",
        label_words=["negative", "positive"],
        space=True,
        prompts={
            "causal": "Review: {text}\nSentiment:",
            "seq2seq": "sst2 sentence: {text}",
            "classification": "{text}",
        },
    ),
    "samsum": dict(
        text_fields=["dialogue"],
        task_type="seq2seq",
        target_field="summary",
        space=True,
        # T5 was pretrained with the "summarize: " prefix, so seq2seq keeps it.
        prompts={"causal": "Summarize this dialogue:\n{dialogue}\nSummary:", "seq2seq": "summarize: {dialogue}"},
    ),
    "gsm8k": dict(
        text_fields=["question"],
        task_type="causal",
        target_field="answer",
        space=True,
        prompts={"causal": "Question: {question}\nAnswer:", "seq2seq": "Question: {question}\nAnswer:"},
    ),
    "alpaca": dict(text_fields=["instruction", "input"], task_type="causal", target_field="output", space=False),
    "hh_rlhf": dict(
        text_fields=["prompt_text"],
        task_type="causal",
        target_field="chosen",
        space=True,
        prompts={"causal": "{prompt_text}", "seq2seq": "{prompt_text}"},
    ),
    "custom": dict(task_type="causal", space=False),
}


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def resolve_task_config(cfg: TaskDatasetConfig, check_source: bool = True) -> TaskDatasetConfig:
    """A copy of cfg with every per-dataset default filled in, after checking the fields.

    check_source=False skips the path / hf_dataset checks (for examples already in memory).
    """
    if cfg.name not in TASK_NAMES:
        raise UserError(
            f"name: unknown task dataset '{cfg.name}' (expected one of {', '.join(TASK_NAMES)})"
            + _did_you_mean(cfg.name, TASK_NAMES)
        )
    d = _DEFAULTS[cfg.name]
    task_type = cfg.task_type or d["task_type"]
    if task_type not in TASK_TYPES:
        raise UserError(
            f"task_type: unknown '{task_type}' (expected one of {', '.join(TASK_TYPES)})"
            + _did_you_mean(task_type, TASK_TYPES)
        )
    if check_source:
        if cfg.path and cfg.hf_dataset:
            raise UserError("path / hf_dataset: give one source, not both")
        if not cfg.path and not cfg.hf_dataset:
            raise UserError(f"path: no data for task dataset '{cfg.name}'; give a local file (path=...) or hf_dataset")
        if cfg.path and not Path(cfg.path).is_file():
            raise UserError(f"path: no such file: {cfg.path}")
    for name in ("max_length", "max_target_length", "max_examples"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    text_fields = list(cfg.text_fields) or list(d.get("text_fields", []))
    if not text_fields:
        raise UserError("text_fields: a custom task dataset needs the fields that make the input, e.g. [question]")
    label_field = cfg.label_field or d.get("label_field", "")
    target_field = cfg.target_field or d.get("target_field", "")
    if task_type == "classification" and not label_field:
        raise UserError("label_field: task_type classification needs the field holding the int label")
    if not label_field and not target_field and not cfg.target_template:
        raise UserError("target_field: name the field holding the reference output (or set label_field)")
    prompt = cfg.prompt_template
    if not prompt and cfg.name != "alpaca":  # alpaca: "" = its two prompts, picked per record
        prompt = d.get("prompts", {}).get(task_type, "{input}")
    target = cfg.target_template
    if not target and target_field and not label_field:
        target = (" " if task_type == "causal" and d["space"] else "") + "{" + target_field + "}"
    hf_config = cfg.hf_config
    if not hf_config and cfg.hf_dataset == "glue" and cfg.name == "sst2":
        hf_config = "sst2"
    hf_config = hf_config or HUB_DEFAULT_CONFIGS.get(cfg.hf_dataset, "")
    return replace(
        cfg,
        task_type=task_type,
        text_fields=text_fields,
        label_field=label_field,
        target_field=target_field,
        label_words=list(cfg.label_words) or list(d.get("label_words", [])),
        prompt_template=prompt,
        target_template=target,
        hf_config=hf_config,
    )


# ---------------------------------------------------------------------------------------------
# Rows from files or the hub: (where, dict) pairs; `where` names the file and line for errors.


# A hub dataset's config when none is given: the one with the records our readers parse.
HUB_DEFAULT_CONFIGS = {"openai/gsm8k": "main"}


def source_rows(
    path: str | Path | None, hf_dataset: str = "", hf_config: str = "", split: str = "train", hf_data_dir: str = ""
) -> Rows:
    """(where, record) of a local file (.tsv, .json, .jsonl, .jsonl.gz) or of a hub dataset's split."""
    if hf_dataset:
        config = hf_config or HUB_DEFAULT_CONFIGS.get(hf_dataset, "")
        return hub_rows(hf_dataset, config, split, data_dir=hf_data_dir)
    if not path:
        raise UserError("path: give a local file or hf_dataset")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"path: no such file: {path}")
    return file_rows(path)


def _field(row: dict[str, Any], name: str, where: str, *, optional: bool = False) -> str:
    if name not in row or row[name] is None:
        if optional:
            return ""
        raise UserError(f"{where}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _label(value: Any, where: str, name: str, num_labels: int | None) -> int | None:
    """An int class label from an int or a digit string; -1 marks an unlabeled row (GLUE test on the hub)."""
    label = None
    if isinstance(value, int) and not isinstance(value, bool):
        label = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        label = int(value)
    if label == -1:
        return None
    if label is None or label < 0 or (num_labels is not None and label >= num_labels):
        expected = f"0..{num_labels - 1}" if num_labels else "an int >= 0"
        raise UserError(f"{where}: bad label {value!r} in field '{name}' (expected {expected})")
    return label


# ---------------------------------------------------------------------------------------------
# Raw records per dataset. The _iter_* functions keep `where` (for later error messages); the
# public read_* functions yield the plain records.


def _iter_sst2(rows: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, row in rows:
        name = "sentence" if "sentence" in row else "text"
        # GLUE's train rows keep a trailing space before the tab: stripped.
        text = _field(row, name, where).strip()
        label = _label(row["label"], where, "label", 2) if "label" in row else None  # test.tsv: no labels
        yield where, {"text": text, "label": label}


def _iter_samsum(rows: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, row in rows:
        # Turns are separated by "\r\n" in most records and "\n" in some: one convention, "\n".
        dialogue = _field(row, "dialogue", where).replace("\r\n", "\n")
        summary = _field(row, "summary", where)
        rid = row.get("id")
        yield where, {"id": None if rid is None else str(rid), "dialogue": dialogue, "summary": summary}


def gsm8k_final_answer(answer: str) -> str | None:
    """The number after the last '####' of a GSM8K solution, without commas ('1,000' -> '1000'); None if absent."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def iter_gsm8k(rows: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, row in rows:
        question, answer = _field(row, "question", where), _field(row, "answer", where)
        final = gsm8k_final_answer(answer)
        if not final:
            raise UserError(f"{where}: field 'answer' has no final '#### <number>' line")
        yield where, {"question": question, "answer": answer, "final": final}


def iter_alpaca(rows: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, row in rows:
        yield (
            where,
            {
                "instruction": _field(row, "instruction", where),
                "input": _field(row, "input", where, optional=True),  # often absent or "" (no context)
                "output": _field(row, "output", where),
            },
        )


class HHPairError(ValueError):
    """A chosen/rejected pair that does not split into one shared prompt and two final replies."""


_HH_TAG = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    if text.startswith(("Human:", "Assistant:")):  # tolerate a missing leading blank line
        text = "\n\n" + text
    parts = _HH_TAG.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise HHPairError("transcript does not start with a 'Human:' or 'Assistant:' turn")
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def hh_prompt_text(turns: list[dict[str, str]]) -> str:
    """The HH-RLHF text form of a prompt, for models without a chat template: '\\n\\nHuman: ...\\n\\nAssistant:'."""
    names = {v: k for k, v in _HH_ROLES.items()}
    return "".join(f"\n\n{names[t['role']]}: {t['content']}" for t in turns) + "\n\nAssistant:"


def split_hh_pair(chosen: str, rejected: str) -> dict[str, Any]:
    """{"prompt": shared turns ending with a human turn, "chosen": reply, "rejected": reply, "prompt_text"}.

    Raises HHPairError when the pair does not split cleanly (docs/design.md#datataskspy).
    """
    c, r = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    while n > 0 and c[n - 1]["role"] != "user":  # the prompt ends where the assistant must answer
        n -= 1
    if n == 0:
        raise HHPairError("no shared prompt ending with a human turn")
    replies = []
    for name, turns in (("chosen", c), ("rejected", r)):
        rest = turns[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise HHPairError(f"{name} is not one assistant turn after the shared prompt")
        if not rest[0]["content"]:
            raise HHPairError(f"empty {name} reply")
        replies.append(rest[0]["content"])
    if replies[0] == replies[1]:
        raise HHPairError("chosen and rejected replies are identical")
    prompt = c[:n]
    return {"prompt": prompt, "chosen": replies[0], "rejected": replies[1], "prompt_text": hh_prompt_text(prompt)}


def iter_hh_rlhf(
    rows: Iterable[tuple[str, dict[str, Any]]], skipped: Counter | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, row in rows:
        chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
        try:
            yield where, split_hh_pair(chosen, rejected)
        except HHPairError as e:
            if skipped is not None:
                skipped[str(e)] += 1


def _iter_custom(rows: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from rows  # fields are checked when the input, prompt and target are built


def read_sst2(
    path: str | Path | None = None, *, hf_dataset: str = "", hf_config: str = "", split: str = "train"
) -> Iterator[dict[str, Any]]:
    """SST-2 records {"text", "label": 0/1, or None for the unlabeled test split}.

    Local: GLUE tsv with a header (`sentence<TAB>label`; test.tsv is `index<TAB>sentence`), or
    .json/.jsonl with "sentence" (or "text") and "label". Hub: "glue" (config "sst2") or "stanfordnlp/sst2".
    """
    if hf_dataset == "glue" and not hf_config:
        hf_config = "sst2"
    for _, rec in _iter_sst2(source_rows(path, hf_dataset, hf_config, split)):
        yield rec


def read_samsum(
    path: str | Path | None = None, *, hf_dataset: str = "", hf_config: str = "", split: str = "train"
) -> Iterator[dict[str, Any]]:
    """SAMSum records {"id", "dialogue" (turns joined by "\\n"), "summary"}; hub: "knkarthick/samsum"."""
    for _, rec in _iter_samsum(source_rows(path, hf_dataset, hf_config, split)):
        yield rec


def read_gsm8k(
    path: str | Path | None = None, *, hf_dataset: str = "", hf_config: str = "", split: str = "train"
) -> Iterator[dict[str, Any]]:
    """GSM8K records {"question", "answer" (full solution), "final" (after ####, no commas)}; hub: "openai/gsm8k"."""
    for _, rec in iter_gsm8k(source_rows(path, hf_dataset, hf_config, split)):
        yield rec


def read_alpaca(
    path: str | Path | None = None, *, hf_dataset: str = "", hf_config: str = "", split: str = "train"
) -> Iterator[dict[str, Any]]:
    """Alpaca records {"instruction", "input" ("" when absent), "output"}; hub: "tatsu-lab/alpaca"."""
    for _, rec in iter_alpaca(source_rows(path, hf_dataset, hf_config, split)):
        yield rec


def read_hh_rlhf(
    path: str | Path | None = None,
    *,
    hf_dataset: str = "",
    hf_config: str = "",
    split: str = "train",
    hf_data_dir: str = "",
    skipped: Counter | None = None,
) -> Iterator[dict[str, Any]]:
    """HH-RLHF pairs {"prompt": [{"role", "content"}...], "chosen", "rejected", "prompt_text"}.

    Local .jsonl / .jsonl.gz of {"chosen", "rejected"} transcripts; hub: "Anthropic/hh-rlhf" with
    hf_data_dir e.g. "helpful-base". Pairs that do not split cleanly are skipped; pass a Counter
    as `skipped` to get the count per reason.
    """
    for _, rec in iter_hh_rlhf(source_rows(path, hf_dataset, hf_config, split, hf_data_dir), skipped):
        yield rec


_ITERS = {
    "sst2": _iter_sst2,
    "samsum": _iter_samsum,
    "gsm8k": iter_gsm8k,
    "alpaca": iter_alpaca,
    "hh_rlhf": iter_hh_rlhf,
    "custom": _iter_custom,
}


# ---------------------------------------------------------------------------------------------
# Uniform examples


def _format(template: str, fields: dict[str, Any], what: str, where: str) -> str:
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise UserError(f"{what}: {where} has no field {e} (fields: {', '.join(sorted(fields))})") from None
    except (ValueError, IndexError, AttributeError) as e:
        raise UserError(f"{what}: bad template {template!r}: {e}") from None


def _example(cfg: TaskDatasetConfig, where: str, record: dict[str, Any]) -> dict[str, Any]:
    parts = []
    for name in cfg.text_fields:
        if name not in record:
            raise UserError(f"{where}: missing field '{name}' (text_fields)")
        value = record[name]
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__} (text_fields)")
        if value:
            parts.append(value)
    input_text = cfg.text_separator.join(parts)
    fields = {"input": input_text, **record}  # a record's own "input" (Alpaca's context) wins
    label = None
    if cfg.label_field:
        if cfg.label_field not in record:
            raise UserError(f"{where}: missing field '{cfg.label_field}' (label_field)")
        value = record[cfg.label_field]  # None (JSON null, SST-2 test) = unlabeled
        label = None if value is None else _label(value, where, cfg.label_field, len(cfg.label_words) or None)
    template = cfg.prompt_template
    if not template:  # alpaca's pair of prompts
        template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = _format(template, fields, "prompt_template", where)
    if cfg.target_template:
        target = _format(cfg.target_template, fields, "target_template", where)
    elif label is not None:
        word = cfg.label_words[label] if cfg.label_words else str(label)
        space = cfg.task_type == "causal" and _DEFAULTS[cfg.name]["space"]
        target = (" " if space else "") + word
    else:
        target = ""  # an unlabeled row (SST-2 test): fine for prompting, refused for training
    return {"input": input_text, "prompt": prompt, "target": target, "label": label, "record": record, "source": where}


def load_task_examples(cfg: TaskDatasetConfig) -> list[dict[str, Any]]:
    """Uniform examples {"input", "prompt", "target", "label" (int or None), "record", "source"}.

    "input" is the raw input text (text_fields joined), "prompt" the formatted prompt, "target" the
    reference output ("" for an unlabeled row), "source" the file and line it came from.
    """
    cfg = resolve_task_config(cfg)
    skipped: Counter = Counter()
    rows = source_rows(cfg.path, cfg.hf_dataset, cfg.hf_config, cfg.split, cfg.hf_data_dir)
    records = iter_hh_rlhf(rows, skipped) if cfg.name == "hh_rlhf" else _ITERS[cfg.name](rows)
    if cfg.max_examples and not cfg.shuffle:
        records = itertools.islice(records, cfg.max_examples)  # stop reading early
    examples = [_example(cfg, where, rec) for where, rec in records]
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        warnings.warn(
            f"{cfg.path or cfg.hf_dataset}: skipped {sum(skipped.values())} HH-RLHF pairs ({reasons})", stacklevel=2
        )
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(examples)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    return examples


# ---------------------------------------------------------------------------------------------
# Tokenization


def _need(token_id: int | None, what: str) -> int:
    if token_id is None:
        raise UserError(f"tokenizer: has no {what} token, which this task needs")
    return token_id


def _build(
    example: dict[str, Any], prompt: list[int], target: list[int] | None, tok: TaskTokenizer, cfg: TaskDatasetConfig
) -> tuple[dict[str, Any], bool]:
    """input_ids / attention_mask / labels from the prompt's and target's ids; also whether it was cut.

    Prompt and target are tokenized separately and concatenated, so the boundary between prompt
    and answer is exact. With byte-level BPE (GPT-2) a target that starts with a space (" 42",
    " positive") tokenizes as in the joint text, since the pre-tokenizer splits before a space +
    word anyway; a target glued to the prompt's last word (no space) would get a token border the
    joint text does not have, which is why the causal targets default to " {answer}".
    """
    head = [_need(tok.bos_id, "bos")] if cfg.add_bos else []
    max_len = cfg.max_length
    truncated = False
    if cfg.task_type == "classification":
        if example["label"] is None:
            raise UserError(f"{example['source']}: no label to train on (an unlabeled row)")
        ids = head + prompt
        if max_len and len(ids) > max_len:
            ids, truncated = ids[:max_len], True  # keep the beginning, as HF truncation does
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(example["label"])}, truncated
    if example["label"] is None and not example["target"]:
        raise UserError(f"{example['source']}: no target to train on (an unlabeled row)")
    eos = _need(tok.eos_id, "eos")
    assert target is not None
    target = target + [eos]
    if cfg.task_type == "causal":
        if max_len and len(head) + len(prompt) + len(target) > max_len:
            truncated = True
            # Cut the prompt from the left (its end, next to the answer, matters most); only when
            # the target alone is too long, cut the target from the right (its eos goes with it:
            # the answer does not end there).
            room = max_len - len(head) - len(target)
            if room >= 0:
                prompt = prompt[len(prompt) - room :] if room else []
            else:
                prompt, target = [], target[: max_len - len(head)]
        prompt = head + prompt
        ids = prompt + target
        labels = [IGNORE_INDEX] * len(prompt) + target
    else:  # seq2seq: the encoder input and the labels each end with eos (T5's convention)
        ids = head + prompt + [eos]
        labels = target
        max_target = cfg.max_target_length or max_len
        if max_len and len(ids) > max_len:
            ids, truncated = ids[: max_len - 1] + [eos], True
        if max_target and len(labels) > max_target:
            labels, truncated = labels[: max_target - 1] + [eos], True
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated


def _as_task_tokenizer(tokenizer: Any) -> TaskTokenizer:
    return tokenizer if isinstance(tokenizer, TaskTokenizer) else TaskTokenizer(tokenizer)


def tokenize_example(example: dict[str, Any], tokenizer: Any, cfg: TaskDatasetConfig) -> dict[str, Any]:
    """One example of `load_task_examples(cfg)` -> {"input_ids", "attention_mask", "labels"}."""
    cfg = resolve_task_config(cfg, check_source=False)
    tok = _as_task_tokenizer(tokenizer)
    target = None if cfg.task_type == "classification" else tok.encode(example["target"])
    return _build(example, tok.encode(example["prompt"]), target, tok, cfg)[0]


def tokenize_examples(examples: list[dict[str, Any]], tokenizer: Any, cfg: TaskDatasetConfig) -> list[dict[str, Any]]:
    """Tokenize examples of `load_task_examples(cfg)` (in batches); warns how many were truncated."""
    cfg = resolve_task_config(cfg, check_source=False)  # idempotent: a resolved cfg stays as it is
    tok = _as_task_tokenizer(tokenizer)
    out, n_truncated, chunk = [], 0, 1024
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        prompts = tok.encode_batch([ex["prompt"] for ex in part])
        targets: list[Any] = [None] * len(part)
        if cfg.task_type != "classification":
            targets = tok.encode_batch([ex["target"] for ex in part])
        for ex, prompt, target in zip(part, prompts, targets, strict=True):
            item, truncated = _build(ex, prompt, target, tok, cfg)
            out.append(item)
            n_truncated += truncated
    if n_truncated:
        limit = f"max_length={cfg.max_length}"
        if cfg.task_type == "causal":
            how = "prompts cut from the left, targets kept"
        elif cfg.task_type == "classification":
            how = "cut from the right"
        else:
            limit += f" or max_target_length={cfg.max_target_length or cfg.max_length}"
            how = "cut from the right, eos kept"
        warnings.warn(f"{n_truncated} of {len(examples)} examples exceed {limit}: {how}", stacklevel=2)
    return out


def load_supervised_text_dataset(cfg: TaskDatasetConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """Examples of cfg tokenized for training: {"input_ids", "attention_mask", "labels"} (python lists/ints)."""
    cfg = resolve_task_config(cfg)
    return tokenize_examples(load_task_examples(cfg), tokenizer, cfg)


# ---------------------------------------------------------------------------------------------
# Batches


def collate(examples: list[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, Tensor]:
    """Pad tokenized examples into tensors: input_ids (pad_id), attention_mask (0), labels (-100).

    Each key is padded to its own longest row (seq2seq labels differ in length from the inputs);
    int labels (classification) become a LongTensor [B]. padding_side="left" suits generation.
    """
    if not examples:
        raise ValueError("collate: no examples")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_id is None:
        raise UserError("tokenizer: has no pad or eos token to pad batches with")
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch: dict[str, Tensor] = {}
    for key, pad in pads.items():
        if key not in examples[0]:
            continue
        rows = [ex[key] for ex in examples]
        if isinstance(rows[0], int):
            batch[key] = torch.tensor(rows, dtype=torch.long)
            continue
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                if padding_side == "right":
                    out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                else:
                    out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        batch[key] = out
    return batch


class TaskBatches:
    """Endless collated training batches of tokenized examples, this rank's share.

    Every epoch visits all examples once in a fresh order (seeded by (seed, epoch); in order when
    shuffle=False). Each step takes the next batch_size * world_size examples of that order and
    rank r keeps the r-th slice, so ranks never share an example within an epoch. The position is
    (epoch, cursor), so `state_dict()` / `load_state_dict()` resume exactly, as data.shards.TrainWindows.
    """

    def __init__(
        self,
        examples: list[dict[str, Any]],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        padding_side: str = "right",
    ):
        if not examples:
            raise UserError("data: no training examples")
        if batch_size <= 0:
            raise UserError(f"batch_size: must be positive, got {batch_size}")
        if pad_id is None:
            raise UserError("tokenizer: has no pad or eos token to pad batches with")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.padding_side = shuffle, padding_side
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = len(self.examples)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """Example indices of this rank's next batch; advances the position."""
        picked: list[int] = []
        need = self.batch_size * self.world_size
        while len(picked) < need:
            take = self._epoch_order(self.epoch)[self.cursor : self.cursor + need - len(picked)]
            picked.extend(int(i) for i in take)
            self.cursor += len(take)
            if self.cursor >= len(self.examples):
                self.epoch, self.cursor = self.epoch + 1, 0
        return picked[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return collate([self.examples[i] for i in self.next_indices()], self.pad_id, self.padding_side)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_examples", len(self.examples)) != len(self.examples) or state.get("seed", self.seed) != (
            self.seed
        ):
            raise UserError(
                "data: the checkpoint's data position was saved for a different task dataset or seed; "
                "resume with the same data and run.seed"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class EvalBatches:
    """Re-iterable collated batches over this rank's examples (every world_size-th), in order."""

    def __init__(
        self,
        examples: list[dict[str, Any]],
        batch_size: int,
        pad_id: int,
        padding_side: str = "right",
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0:
            raise UserError(f"batch_size: must be positive, got {batch_size}")
        mine = examples[rank::world_size]
        self.chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        self.pad_id, self.padding_side = pad_id, padding_side

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for chunk in self.chunks:
            yield collate(chunk, self.pad_id, self.padding_side)


def eval_batches(
    examples: list[dict[str, Any]],
    batch_size: int,
    pad_id: int,
    padding_side: str = "right",
    *,
    rank: int = 0,
    world_size: int = 1,
) -> EvalBatches:
    """One finite, ordered pass over the examples in collated batches (re-iterable)."""
    return EvalBatches(examples, batch_size, pad_id, padding_side, rank, world_size)


__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE_INDEX",
    "EvalBatches",
    "HHPairError",
    "TaskBatches",
    "TaskDatasetConfig",
    "collate",
    "eval_batches",
    "gsm8k_final_answer",
    "hh_prompt_text",
    "load_supervised_text_dataset",
    "load_task_examples",
    "parse_hh_transcript",
    "read_alpaca",
    "read_gsm8k",
    "read_hh_rlhf",
    "read_samsum",
    "read_sst2",
    "resolve_task_config",
    "source_rows",
    "split_hh_pair",
    "tokenize_example",
    "tokenize_examples",
]

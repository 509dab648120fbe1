"""Task evaluation for any model: label scoring, generation, metrics and logged predictions.

One small interface, `TaskModel`, is all evaluation needs from a model: a tokenizer, `logits`
for a padded batch, and `generate` (prompts in, continuations out). Two wrappers provide it:
`wrap_modernlm` (our ModernDecoderLM + our Tokenizer, generating through `modernlm.generation`)
and `wrap_hf` (a transformers causal LM, encoder-decoder such as T5, or a PEFT-wrapped one, with
an HF tokenizer or ours; transformers is never imported here, the objects are duck-typed).

`score_choices` ranks fixed answers by log-probability, the zero-shot classification method of
GPT-3 and lm-evaluation-harness: the summed log-probability of each choice's tokens given the
prompt. Prompt and choice are tokenized separately and concatenated (as `tasks.py` builds training
examples), so the scored tokens are exactly the choice's, with the same boundary the model is
finetuned on. Batches are right-padded: under a causal mask padding after a sequence never changes
its logits, so a row scores the same alone or in any batch. When every choice is one token (SST-2's
" negative" / " positive" with GPT-2-style BPE) one forward of the prompt scores them all.

`evaluate_task` runs a whole task and computes its metrics (`metrics.evaluate_predictions`):
- sst2: mode "score" (default) predicts the label whose word scores highest; mode "generate" reads
  the first word of a short greedy continuation (a word that is no label counts as wrong).
  Accuracy and macro F1 over the label words.
- samsum: a greedy summary up to the first blank line; ROUGE-1/2/L/Lsum.
- gsm8k: a greedy chain of thought up to the next "Question:" or blank line; exact match of the
  final number, strict ("#### N") and flexible (the last number).
Few-shot demonstrations are prepended as "prompt + target" blocks separated by a blank line (for
GSM8K the targets are the full worked solutions ending in "#### N", which teaches the format the
strict extractor reads).

With `out_dir`, it writes predictions.jsonl (every example: index, input, prompt, prediction,
reference, ...), errors.jsonl (the wrong ones, via `metrics.evaluate_predictions`), metrics.json,
and demonstrations.txt when few-shot.
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

from modernlm.data.tasks import TaskTokenizer
from modernlm.errors import UserError
from modernlm.eval.metrics import evaluate_predictions, macro_f1, write_predictions
from modernlm.files import atomic_write
from modernlm.generation import Sampling, StopOnText, TextGeneration, TextStream
from modernlm.runtime import eval_mode

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
# Models


class TaskModel:
    """What evaluation needs from a model, ours or HF; see `wrap_modernlm` / `wrap_hf`.

    Attributes: `tokenizer` (a TaskTokenizer), `is_encoder_decoder`, `add_bos` (prepend the bos
    token to every prompt), `max_length` (the model's context in tokens, None = unbounded; longer
    prompts are cut from the left), `device`, `name`.
    """

    tokenizer: TaskTokenizer
    is_encoder_decoder: bool = False
    add_bos: bool = False
    max_length: int | None = None
    device: torch.device
    name: str = "model"
    decoder_start_id: int | None = None

    def logits(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor | None = None) -> Tensor:
        """[B, T, V] float logits. Decoder-only: of input_ids; encoder-decoder: of decoder_input_ids
        given the encoder's input_ids."""
        raise NotImplementedError

    def generate(self, prompts: list[str], sampling: Sampling | int | None = None, **settings: Any) -> list[str]:
        """The continuation of each prompt (not the prompt), ending before eos or the first stop
        string. `sampling` / `settings` as in `generation.Sampling.make` (max_new_tokens, stop,
        temperature, seed, ...)."""
        if not prompts:
            return []
        return self.complete(self.prompt_ids_batch(prompts), Sampling.make(sampling, **settings))

    def complete(self, rows: list[list[int]], sampling: Sampling) -> list[str]:
        """`generate` from prompt token ids."""
        raise NotImplementedError

    # Shared helpers ----------------------------------------------------------------------

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if self.add_bos:
            if self.tokenizer.bos_id is None:
                raise UserError("add_bos: the tokenizer has no bos token")
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    def prompt_ids_batch(self, texts: list[str]) -> list[list[int]]:
        rows = self.tokenizer.encode_batch(texts)
        if self.add_bos:
            if self.tokenizer.bos_id is None:
                raise UserError("add_bos: the tokenizer has no bos token")
            rows = [[self.tokenizer.bos_id, *r] for r in rows]
        return rows

    def _fit(self, prompt: list[int], room_after: int) -> list[int]:
        """Cut a prompt from the left (keeping a leading bos) so it plus room_after tokens fit the context."""
        if self.max_length is None or len(prompt) + room_after <= self.max_length:
            return prompt
        keep = max(self.max_length - room_after, 1)
        if self.add_bos and keep > 1:
            return prompt[:1] + prompt[len(prompt) - keep + 1 :]
        return prompt[len(prompt) - keep :]

    def _streams(self, rows: list[list[int]], sampling: Sampling) -> list[TextStream]:
        """One `generation.TextStream` per row: the text side, shared with our generation."""
        eos = sampling.eos_ids or ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else [])
        return [TextStream(self.tokenizer.tokenizer, sampling.stop, context=r, eos=eos) for r in rows]


class ModernLMTaskModel(TaskModel):
    """Our ModernDecoderLM + our Tokenizer (see `wrap_modernlm`)."""

    def __init__(self, model: Any, tokenizer: Any, add_bos: bool = False, name: str = "modernlm"):
        self.model, self.tokenizer = model, TaskTokenizer(tokenizer)
        self.add_bos, self.name = add_bos, name
        self.is_encoder_decoder = False
        # RoPE extends past max_seq_len but quality falls off there: cut prompts to the trained context.
        self.max_length = int(model.config.max_seq_len)
        self.device = next(model.parameters()).device
        self.vocab_size = getattr(tokenizer, "vocab_size", None)

    def logits(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor | None = None) -> Tensor:
        if decoder_input_ids is not None:
            raise ValueError("a decoder-only model takes no decoder_input_ids")
        mask = attention_mask.to(self.device, torch.bool)
        # Right padding needs no mask (causal attention never looks ahead); only left padding
        # (real tokens at the end of every row) is passed on, which is what the model supports.
        pad_mask = mask if not mask.all() and bool(mask[:, -1].all()) else None
        with eval_mode(self.model), torch.inference_mode():
            return self.model(input_ids.to(self.device), pad_mask=pad_mask).logits.float()

    def complete(self, rows: list[list[int]], sampling: Sampling) -> list[str]:
        if not rows:
            return []
        rows = [self._fit(r, sampling.max_new_tokens) for r in rows]
        if any(not r for r in rows):
            raise UserError("a prompt encodes to no tokens; set add_bos")
        return [s.text for s in TextGeneration(self.model, self.tokenizer.tokenizer, rows, sampling).run()]


class HFTaskModel(TaskModel):
    """A transformers model (causal LM, encoder-decoder, or PEFT-wrapped) + tokenizer (see `wrap_hf`)."""

    def __init__(self, model: Any, tokenizer: Any, add_bos: bool = False, name: str = "hf"):
        self.model, self.tokenizer = model, TaskTokenizer(tokenizer)
        self.add_bos, self.name = add_bos, name
        config = model.config  # a PeftModel forwards attribute access to its base model
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # T5's relative positions have no hard limit; decoder-only models with absolute or RoPE
        # positions are cut to what they were built for.
        self.max_length = None if self.is_encoder_decoder or not limit else int(limit)
        start = getattr(config, "decoder_start_token_id", None)
        self.decoder_start_id = start if start is not None else self.tokenizer.pad_id
        self.device = next(model.parameters()).device

    def logits(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor | None = None) -> Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids")
            kwargs["decoder_input_ids"] = decoder_input_ids.to(self.device)
        elif not bool(attention_mask[:, 0].all()):
            # Left padding: positions count real tokens only, as HF generate computes them.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with eval_mode(self.model), torch.inference_mode():
            return self.model(**kwargs).logits.float()

    def complete(self, rows: list[list[int]], sampling: Sampling) -> list[str]:
        if not rows:
            return []
        tok = self.tokenizer
        if self.is_encoder_decoder:
            if tok.eos_id is not None:
                rows = [r + [tok.eos_id] for r in rows]  # T5's encoder inputs end with eos
            input_ids, attention_mask = _pad(rows, tok.pad_id, "right")
            start = 1  # outputs begin with the decoder start token
        else:
            rows = [self._fit(r, sampling.max_new_tokens) for r in rows]
            if any(not r for r in rows):
                raise UserError("a prompt encodes to no tokens; set add_bos")
            input_ids, attention_mask = _pad(rows, tok.pad_id, "left")
            start = input_ids.size(1)
        if sampling.max_new_tokens == 0:
            return [""] * len(rows)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), pad_token_id=tok.pad_id
        )
        if tok.eos_id is not None:
            kwargs["eos_token_id"] = tok.eos_id
        kwargs |= sampling.transformers_kwargs()  # the same settings as our generation
        contexts = [[] if self.is_encoder_decoder else r for r in rows]
        if sampling.stop:
            kwargs["stopping_criteria"] = [StopOnText(self._streams(contexts, sampling), start)]
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with rng, eval_mode(self.model), torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)  # inside fork_rng: the caller's global RNG is left as it was
            out = self.model.generate(**kwargs)
        streams = self._streams(contexts, sampling)
        return [s.feed(row).text for s, row in zip(streams, out[:, start:].tolist(), strict=True)]


def wrap_modernlm(model: Any, tokenizer: Any, *, add_bos: bool = False, name: str = "modernlm") -> TaskModel:
    """A TaskModel over our ModernDecoderLM and our Tokenizer (add_bos: prepend bos to prompts)."""
    return ModernLMTaskModel(model, tokenizer, add_bos=add_bos, name=name)


def wrap_hf(model: Any, tokenizer: Any, *, add_bos: bool = False, name: str = "hf") -> TaskModel:
    """A TaskModel over a transformers causal LM, encoder-decoder (T5) or PEFT model and its tokenizer
    (an HF tokenizer or ours). Decoder-only models generate from left-padded batches; an
    encoder-decoder generates from the prompt (+ eos) as encoder input."""
    return HFTaskModel(model, tokenizer, add_bos=add_bos, name=name)


# ---------------------------------------------------------------------------------------------
# Scoring


def _pad(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Token lists -> (ids [B, T], attention_mask [B, T] long), padded on `side`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


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
        ids, mask = _pad([pairs[i][0] + pairs[i][1] for i in chunk], tm.tokenizer.pad_id, "right")
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
        ids, mask = _pad([prompts[i] for i in chunk], tm.tokenizer.pad_id, "right")
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
        ids, mask = _pad(enc, tm.tokenizer.pad_id, "right")
        dec, _ = _pad([[tm.decoder_start_id] + pairs[i][1][:-1] for i in chunk], tm.tokenizer.pad_id, "right")
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
    prompt_rows = [tm._fit(r, longest) for r in tm.prompt_ids_batch(list(prompts))]
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
    "HFTaskModel",
    "ModernLMTaskModel",
    "TaskModel",
    "demonstrations",
    "evaluate_task",
    "label_choices",
    "score_choices",
    "wrap_hf",
    "wrap_modernlm",
]

"""The GSM8K verifier of Cobbe et al. 2021 ("Training Verifiers to Solve Math Word Problems").

`modernlm verifier` runs its three stages from here, each usable alone:
- Problems and samples: `read_problem_sets` (GSM8K records with their gold number; a bad record
  names file and line); `draw_sample_sets` draws N solutions per problem from a chat model into
  run_dir/samples/ (`draw_samples`, one file: batch b draws with seed + b, so a rerun finishes an
  interrupted draw with exactly the rows an uninterrupted one holds), each labelled by
  `label_solution` (the last number vs the gold one).
- The verifier: `VerifierModel` = a ModernDecoderLM backbone + a scalar value head on its
  final-norm hidden states. Every solution token learns whether the whole solution is correct
  (token-level BCE), optionally plus the LM loss (`lm_coef`); a solution scores sigmoid(value) at
  its last token. `save_verifier` writes a modernlm checkpoint + value_head.safetensors.
- Reranking: greedy, majority vote, best-of-N, verifier-weighted vote and pass@N accuracy
  (`rerank`, `write_rerank_report`). Ties go to the earliest sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm import tqdm

from modernlm.align.sft import collate_sft, generate_replies
from modernlm.chat import IGNORE_INDEX, ChatEncoder
from modernlm.checkpoint import config_differences, load_model, load_model_config, load_weights_into, save_model
from modernlm.data import tasks
from modernlm.data.readers import json_object, numbered_lines
from modernlm.data.tasks import TaskBatches
from modernlm.errors import UserError
from modernlm.eval.metrics import extract_flexible, gsm8k_target, write_predictions
from modernlm.files import atomic_write, atomic_write_json
from modernlm.generation import Sampling
from modernlm.runtime import Runtime, eval_mode
from modernlm.train.losses import next_token_loss, verifier_loss

HEAD_FILE = "value_head.safetensors"
SAMPLE_FIELDS = ("problem", "sample", "solution", "answer", "correct")


# ---------------------------------------------------------------------------------------------
# Problems and labels


@dataclass
class DataSettings:
    """Where the problems come from (`data.` of the verifier's config)."""

    train_path: str = ""  # GSM8K JSONL (question, answer "... #### N") to sample on
    eval_path: str = ""  # held-out problems to rerank ("" = none, unless hf_dataset)
    hf_dataset: str = ""  # instead of the files: a hub dataset with GSM8K's fields, e.g. openai/gsm8k
    hf_config: str = ""  # its config ("" = main for openai/gsm8k)
    train_split: str = "train"  # hub split to sample on
    eval_split: str = "test"  # hub split to rerank
    max_train_problems: int = 0  # the first N training problems (0 = all)
    max_eval_problems: int = 0  # the first N held-out problems (0 = all)
    val_fraction: float = 0.05  # training problems (with all their samples) held out for val_loss
    max_length: int = 0  # tokens of prompt + solution (0 = the model's max_seq_len); longer keep their end

    def __post_init__(self) -> None:
        # ValueErrors: the config loader names the section (data., or verifier.data. in a pipeline)
        for name in ("max_train_problems", "max_eval_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = all), got {getattr(self, name)}")
        if self.max_length < 0:
            raise ValueError(f"max_length must be >= 0 (0 = the model's max_seq_len), got {self.max_length}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def eval_source(self) -> str:
        """The held-out problems' source, as the report names it."""
        return self.eval_path or f"{self.hf_dataset}[{self.eval_split}]"


def read_problem_sets(d: DataSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training problems, held-out problems) from the files, or the hub dataset standing in for
    the files when no train_path is given."""
    hub = {"hf_dataset": d.hf_dataset, "hf_config": d.hf_config} if d.hf_dataset and not d.train_path else {}
    train_problems = read_problems(d.train_path, d.max_train_problems, **hub, split=d.train_split)
    eval_problems = []
    if d.eval_path or hub:
        eval_hub = {} if d.eval_path else hub
        eval_problems = read_problems(d.eval_path, d.max_eval_problems, **eval_hub, split=d.eval_split)
    return train_problems, eval_problems


def read_problems(
    path: str | Path, max_problems: int = 0, *, hf_dataset: str = "", hf_config: str = "", split: str = "train"
) -> list[dict[str, Any]]:
    """GSM8K problems {"question", "answer", "target" (normalized gold number), "source"}, from a
    local file or (hf_dataset) the hub.

    A missing field, an answer without '#### N', or one whose N is not a number is a UserError
    naming the file and line.
    """
    out = []
    for where, rec in tasks.iter_gsm8k(tasks.source_rows(path, hf_dataset, hf_config, split)):
        try:
            target = gsm8k_target(rec["answer"])
        except ValueError:
            raise UserError(f"{where}: the final '#### {rec['final']}' is not a number") from None
        out.append({"question": rec["question"], "answer": rec["answer"], "target": target, "source": where})
        if max_problems and len(out) >= max_problems:
            break
    if not out:
        raise UserError(f"{path or hf_dataset}: no problems")
    return out


def label_solution(solution: str, target: str) -> tuple[str | None, bool]:
    """(the solution's final number, whether it equals the gold one): the last number anywhere in
    the text, as Cobbe's and lm-eval's flexible match read it, so a solution need not end in '####'."""
    answer = extract_flexible(solution)
    return answer, answer is not None and answer == target


def chat_prompt(encoder: Any, question: str) -> list[int]:
    """A problem as the SFT model saw it: one user turn, then the assistant header."""
    return encoder.prompt([{"role": "user", "content": question}])


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class SampleSettings:
    """How the solutions are drawn (`sample.` of the verifier's config)."""

    n_train: int = 16  # solutions per training problem (Cobbe et al.: 100)
    n_eval: int = 16  # solutions per held-out problem to rerank: the N of best-of-N (Cobbe et al.: 100)
    temperature: float = 0.7  # Cobbe et al.'s sampling temperature
    top_k: int = 0  # sample among the k most likely tokens (0 = off)
    max_new_tokens: int = 256  # solution budget (a solution still open then is kept as it is)
    batch_size: int = 32  # rows per generate call and per scoring forward
    seed: int = 0  # batch b of a samples file draws with seed + b

    def __post_init__(self) -> None:
        # here, not at the first draw after the model loads (ValueErrors: the loader names the section)
        for name in ("n_train", "n_eval", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the N samples must differ), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class SampleSets:
    """A verifier run's samples (its samples/ directory), problem-major rows of `draw_samples`."""

    generator: str  # the checkpoint they were drawn from
    train_rows: list[dict[str, Any]]  # sample.n_train per training problem: the verifier's data
    train_stats: dict[str, Any]
    greedy_rows: list[dict[str, Any]] = field(default_factory=list)  # one greedy solution per held-out problem
    eval_rows: list[dict[str, Any]] = field(default_factory=list)  # sample.n_eval per held-out problem: to rerank
    eval_stats: dict[str, Any] = field(default_factory=dict)


def draw_sample_sets(
    samples_dir: Path, sample: SampleSettings, model: nn.Module, encoder: ChatEncoder, generator: str,
    train_problems: list[dict[str, Any]], eval_problems: list[dict[str, Any]], runtime: Runtime,
    progress: bool = False,
) -> SampleSets:  # fmt: skip
    """The samples of samples_dir (reused, or finished, when there): train.jsonl, and for the
    held-out problems eval_greedy.jsonl and eval.jsonl. Prints a line on the training samples."""
    model.to(runtime.device).eval()
    s = sample
    common = dict(
        max_new_tokens=s.max_new_tokens, top_k=s.top_k, seed=s.seed, batch_size=s.batch_size,
        generator=generator, progress=progress, autocast=runtime.autocast,
    )  # fmt: skip
    train_rows, train_stats = draw_samples(
        samples_dir / "train.jsonl", model, encoder, train_problems, s.n_train, temperature=s.temperature, **common
    )
    runtime.print0(
        f"samples: {len(train_rows):,} for {len(train_problems):,} training problems from {generator}, "
        f"{train_stats['share_correct']:.1%} correct, {train_stats['problems_with_a_correct']:.1%} of problems "
        f"with a correct one -> {samples_dir / 'train.jsonl'}"
    )
    out = SampleSets(generator, train_rows, train_stats)
    if eval_problems:
        out.greedy_rows, _ = draw_samples(
            samples_dir / "eval_greedy.jsonl", model, encoder, eval_problems, 1, temperature=0.0, **common
        )
        out.eval_rows, out.eval_stats = draw_samples(
            samples_dir / "eval.jsonl", model, encoder, eval_problems, s.n_eval, temperature=s.temperature, **common
        )
    return out


def _fingerprint(problems: Sequence[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p['question']}\0{p['target']}\0".encode())
    return h.hexdigest()[:16]


def _read_rows(path: Path, total: int) -> list[dict[str, Any]]:
    """Complete rows of a samples file; a last line cut by a kill is dropped (it is redrawn)."""
    if not path.is_file():
        return []
    rows = []
    for lineno, line in numbered_lines(path):
        if not line.endswith("\n"):
            break
        where = f"{path} line {lineno}"
        try:
            row = json_object(line, where)
        except UserError as e:
            raise UserError(f"{e}; delete the file to resample") from None
        missing = [k for k in SAMPLE_FIELDS if k not in row]
        if missing:
            raise UserError(f"{where}: missing field '{missing[0]}'; delete the file to resample")
        rows.append(row)
    if len(rows) > total:
        raise UserError(f"{path}: {len(rows)} rows, more than the {total} this draw makes; delete it to resample")
    return rows


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def draw_samples(
    path: str | Path,
    model: nn.Module,
    encoder: Any,
    problems: Sequence[dict[str, Any]],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    generator: str = "",
    progress: bool = False,
    autocast: Callable[[], Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """n labelled solutions per problem, problem-major, in `path` (JSONL) + `path`.json (settings, stats).

    Rows: {"problem", "sample", "question", "solution", "answer", "target", "correct", "finished"}.
    The (problem, sample) pairs go in batches of batch_size rows; batch b samples with seed + b.
    A rerun with the same settings reuses the file, drawing only the batches it lacks; other
    settings are refused (delete the file, or use another run directory). Returns (rows, stats).
    """
    sampling = Sampling(max_new_tokens, temperature=temperature, top_k=top_k or None)
    path = Path(path)
    meta_path = path.with_suffix(".json")
    settings = {
        "generator": generator, "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_k": top_k, "seed": seed, "batch_size": batch_size, "problems": len(problems),
        "fingerprint": _fingerprint(problems),
    }  # fmt: skip
    old_stats: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            old, old_stats = meta["settings"], meta.get("stats", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{meta_path}: unreadable; delete it and {path.name} to resample") from None
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diffs:
            raise UserError(
                f"{path} was sampled with other settings ({'; '.join(diffs)}); "
                "delete it to resample, or use another run.name"
            )
    pairs = [(p, k) for p in range(len(problems)) for k in range(n)]
    # Without its settings file a samples file cannot be trusted (a kill before the first batch).
    rows = _read_rows(path, len(pairs)) if meta_path.is_file() else []
    for i, row in enumerate(rows):
        if (row["problem"], row["sample"]) != pairs[i]:
            want = f"problem {pairs[i][0]} sample {pairs[i][1]}"
            raise UserError(f"{path} line {i + 1}: expected {want}; delete the file to resample")
    if len(rows) < len(pairs):
        rows = rows[: len(rows) // batch_size * batch_size]  # whole batches only: each has its own seed
        _write_text(meta_path, json.dumps({"settings": settings}, indent=2) + "\n")
        _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    start = time.perf_counter()
    batches = range(-(-len(rows) // batch_size), -(-len(pairs) // batch_size))  # none left when complete
    with open(path, "a", encoding="utf-8") as f:
        for b in tqdm(batches, desc=path.name, disable=not progress or not batches, dynamic_ncols=True):
            chunk = pairs[b * batch_size : (b + 1) * batch_size]
            chats = [[{"role": "user", "content": problems[p]["question"]}] for p, _ in chunk]
            with autocast() if autocast else contextlib.nullcontext():
                replies = generate_replies(model, encoder, chats, sampling, batch_size=len(chunk), seed=seed + b)
            new = []
            for (p, k), reply in zip(chunk, replies, strict=True):
                answer, correct = label_solution(reply["text"], problems[p]["target"])
                new.append({
                    "problem": p, "sample": k, "question": problems[p]["question"], "solution": reply["text"],
                    "answer": answer, "target": problems[p]["target"], "correct": correct, "finished": reply["stopped"],
                })  # fmt: skip
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
            rows += new
    stats = sample_stats(rows, len(problems))
    stats["wall_time_s"] = round(old_stats.get("wall_time_s", 0.0) + time.perf_counter() - start, 3)
    _write_text(meta_path, json.dumps({"settings": settings, "stats": stats}, indent=2) + "\n")
    return rows, stats


def sample_stats(rows: Sequence[dict[str, Any]], n_problems: int) -> dict[str, Any]:
    """Share of correct samples, of problems with at least one, of samples that finished."""
    solved = {r["problem"] for r in rows if r["correct"]}
    n = max(len(rows), 1)
    return {
        "samples": len(rows),
        "share_correct": sum(r["correct"] for r in rows) / n,
        "problems_with_a_correct": len(solved) / max(n_problems, 1),
        "share_finished": sum(bool(r.get("finished", True)) for r in rows) / n,
    }


# ---------------------------------------------------------------------------------------------
# The verifier model


class VerifierOutput(NamedTuple):
    values: Tensor  # (B, T) value logits: the predicted log-odds that the solution is correct
    logits: Tensor  # (B, T, V) the backbone's LM logits (for the joint LM loss)
    aux_loss: Tensor | None  # MoE load-balancing loss of the backbone


class VerifierModel(nn.Module):
    """A ModernDecoderLM backbone with a scalar value head on its final-norm hidden states."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, 1)
        # Zero init: every solution starts at p = 0.5 (loss log 2), with no random preference.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).device)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def num_params(self) -> int:
        return self.backbone.num_params() + sum(p.numel() for p in self.head.parameters())

    def forward(self, idx: Tensor, pad_mask: Tensor | None = None) -> VerifierOutput:
        out = self.backbone(idx, pad_mask=pad_mask, return_hidden=True)
        values = self.head(out.hidden).squeeze(-1).float()
        return VerifierOutput(values, out.logits, out.aux_loss)


def save_verifier(model: VerifierModel, path: str | Path, tokenizer: Any = None) -> None:
    """The backbone as a modernlm checkpoint (config.json, model.safetensors, tokenizer) + the head."""
    path = Path(path)
    save_model(model.backbone, path, tokenizer)
    head = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
    atomic_write(path / HEAD_FILE, save(head, metadata={"format": "pt"}))


def _load_head(model: VerifierModel, path: Path) -> None:
    file = path / HEAD_FILE
    if not file.is_file():
        raise UserError(f"verifier {path}: missing {HEAD_FILE} (a plain checkpoint, not a verifier)")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"verifier {file}: cannot read safetensors ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise UserError(f"verifier {file}: expected tensors {expected}, found {found}")
    model.head.load_state_dict(state)


def load_verifier_weights(model: VerifierModel, path: str | Path) -> None:
    """Load a saved verifier into `model` (the Trainer's load_model_fn: resume)."""
    path = Path(path)
    diffs = config_differences(load_model_config(path), model.config)
    if diffs:
        raise UserError(f"cannot resume from {path}: its model config differs from this run's ({'; '.join(diffs)})")
    load_weights_into(model.backbone, path)
    _load_head(model, path)


def load_verifier(path: str | Path, device: str | torch.device = "cpu") -> VerifierModel:
    """A verifier saved by `save_verifier` (e.g. RUN/verifier), in eval mode."""
    path = Path(path)
    model = VerifierModel(load_model(path, device=device))
    _load_head(model, path)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Examples, batches, loss


def verifier_example(prompt: Sequence[int], reply: Sequence[int], correct: bool, max_length: int) -> dict[str, Any]:
    """{"input_ids", "labels", "correct"}: labels = the reply's ids, -100 on the prompt.

    Longer than max_length keeps the last max_length tokens: the end of the solution, where the
    final answer is and where the score is read, matters more than the start of the question.
    """
    ids = [*prompt, *reply]
    labels = [IGNORE_INDEX] * len(prompt) + list(reply)
    if not reply:
        raise ValueError("a solution needs at least one token (the closing <|im_end|>)")
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:], "correct": float(correct)}


def collate_verifier(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids, labels (-100 off the solution) and correct (B,) float."""
    batch = collate_sft([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_id)
    batch["correct"] = torch.tensor([float(r["correct"]) for r in rows])
    return batch


class VerifierBatches(TaskBatches):
    """Endless, seeded, exactly resumable batches of verifier examples (tasks.TaskBatches)."""

    def __next__(self) -> dict[str, Tensor]:
        return collate_verifier([self.examples[i] for i in self.next_indices()], self.pad_id)


def verifier_loss_fn(lm_coef: float = 0.0) -> Callable[[nn.Module, Any], tuple[Tensor, Tensor, dict[str, Any]]]:
    """The Trainer's loss_fn: summed token-level value BCE (+ lm_coef * the summed LM loss on the
    same solution tokens), over the solution tokens; metrics: the mean value and LM losses."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
        out = model(batch["input_ids"])
        mask = batch["labels"] != IGNORE_INDEX
        loss_sum, n = verifier_loss(out.values, batch["correct"], mask)
        metrics: dict[str, Any] = {"value_loss": loss_sum.detach() / n.clamp_min(1)}
        if lm_coef:
            # Targets shifted as in SFT: position t predicts token t + 1; a solution never starts at
            # position 0 (the prompt precedes it), so these are the same n tokens.
            lm_sum, lm_n = next_token_loss(out.logits[:, :-1], batch["labels"][:, 1:])
            loss_sum = loss_sum + lm_coef * lm_sum
            metrics["lm_loss"] = lm_sum.detach() / lm_n.clamp_min(1)
        if out.aux_loss is not None:
            loss_sum = loss_sum + out.aux_loss.float() * n
        return loss_sum, n, metrics

    return loss_fn


@torch.no_grad()
def value_eval_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Validation loss_fn: the value BCE alone, so val_loss reads the same for any lm_coef."""
    loss_sum, n = verifier_loss(model(batch["input_ids"]).values, batch["correct"], batch["labels"] != IGNORE_INDEX)
    return loss_sum, n, {}


@torch.no_grad()
def score_examples(
    model: VerifierModel,
    examples: Sequence[dict[str, Any]],
    batch_size: int = 32,
    pad_id: int = 0,
    autocast: Callable[[], Any] | None = None,
) -> list[float]:
    """sigmoid(value) at each example's last token: the verifier's probability it is correct."""
    device = next(model.parameters()).device
    scores: list[float] = []
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = collate_verifier(chunk, pad_id)
            with autocast() if autocast else contextlib.nullcontext():
                values = model(batch["input_ids"].to(device)).values
            last = torch.tensor([len(e["input_ids"]) - 1 for e in chunk], device=device)
            scores += torch.sigmoid(values[torch.arange(len(chunk), device=device), last]).tolist()
    return scores


def examples_from_rows(rows: Sequence[dict[str, Any]], encoder: Any, max_length: int) -> list[dict[str, Any]]:
    """Verifier examples of sample rows (question -> chat prompt, solution -> reply + <|im_end|>)."""
    prompts: dict[str, list[int]] = {}
    out = []
    for r in rows:
        if r["question"] not in prompts:
            prompts[r["question"]] = chat_prompt(encoder, r["question"])
        out.append(verifier_example(prompts[r["question"]], encoder.reply(r["solution"]), r["correct"], max_length))
    return out


def split_examples(
    rows: Sequence[dict[str, Any]], n_problems: int, encoder: Any, max_length: int, *, val_fraction: float,
    seed: int, max_val: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """(training, validation) verifier examples of the training samples: val_fraction of the
    problems (drawn with `seed`), with all their samples, give the first max_val (0 = all)
    validation ones; at least one problem stays for training."""
    order = np.random.default_rng(seed).permutation(n_problems)
    n_val = min(round(n_problems * val_fraction), n_problems - 1)
    held = {int(i) for i in order[:n_val]}
    examples = examples_from_rows([r for r in rows if r["problem"] not in held], encoder, max_length)
    val_examples = examples_from_rows([r for r in rows if r["problem"] in held], encoder, max_length)
    return examples, val_examples[:max_val] if max_val else val_examples


def single_label_note(examples: Sequence[dict[str, Any]]) -> str | None:
    """A note for the log when every training example is correct, or every one wrong."""
    labels = {bool(e["correct"]) for e in examples}
    if len(labels) == 2:
        return None
    return (
        f"note: every training sample is {'correct' if True in labels else 'wrong'}; the verifier can only "
        "learn that (more samples, a higher temperature or a stronger generator give both kinds)"
    )


def collate_batches(examples: Sequence[dict[str, Any]], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    """The examples as consecutive batches (validation: each example once, in order)."""
    return [collate_verifier(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


# ---------------------------------------------------------------------------------------------
# Reranking


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (None, no number found, never wins); a tie goes to the answer
    whose first sample comes earliest. None when no sample has an answer."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None  # max keeps the first of equals


def best_of_n(scores: Sequence[float]) -> int:
    """Index of the highest-scored sample; a tie goes to the earliest."""
    if not scores:
        raise ValueError("best_of_n of no samples")
    return max(range(len(scores)), key=scores.__getitem__)


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer with the largest summed verifier score (Cobbe et al.'s verifier-weighted vote);
    ties go to the answer seen first; None when no sample has an answer."""
    totals: dict[str, float] = {}
    for a, s in zip(answers, scores, strict=True):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + s
    return max(totals, key=totals.__getitem__) if totals else None


def rerank_problem(target: str, answers: Sequence[str | None], scores: Sequence[float]) -> dict[str, Any]:
    """What each selection picks for one problem and whether it is right."""
    best = best_of_n(scores)
    majority, weighted = majority_vote(answers), weighted_vote(answers, scores)
    return {
        "best_index": best,
        "best_answer": answers[best],
        "best_correct": answers[best] == target,
        "majority_answer": majority,
        "majority_correct": majority is not None and majority == target,
        "weighted_answer": weighted,
        "weighted_correct": weighted is not None and weighted == target,
        "pass_at_n": any(a == target for a in answers if a is not None),
    }


def rerank_metrics(picks: Sequence[dict[str, Any]], greedy_correct: Sequence[bool] | None = None) -> dict[str, float]:
    """Accuracy over problems of each selection (rerank_problem's dicts), plus greedy if given."""
    n = max(len(picks), 1)
    out = {}
    if greedy_correct is not None:
        out["greedy_accuracy"] = sum(greedy_correct) / n
    out["majority_accuracy"] = sum(p["majority_correct"] for p in picks) / n
    out["best_of_n_accuracy"] = sum(p["best_correct"] for p in picks) / n
    out["weighted_vote_accuracy"] = sum(p["weighted_correct"] for p in picks) / n
    out["pass_at_n"] = sum(p["pass_at_n"] for p in picks) / n
    return out


def group_by_problem(rows: Sequence[dict[str, Any]], n_problems: int) -> Iterator[list[int]]:
    """Row indices of each problem, in problem order (rows are problem-major, see draw_samples)."""
    groups: list[list[int]] = [[] for _ in range(n_problems)]
    for i, r in enumerate(rows):
        groups[r["problem"]].append(i)
    yield from groups


def rerank(
    problems: list[dict[str, Any]], greedy: list[dict[str, Any]], rows: list[dict[str, Any]], scores: list[float]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(accuracies of each method, one prediction row per problem) for the held-out samples `rows`
    (problem-major, scored by the verifier) and the greedy solution of each problem."""
    picks, predictions = [], []
    for p, idxs in enumerate(group_by_problem(rows, len(problems))):
        answers, sc = [rows[i]["answer"] for i in idxs], [scores[i] for i in idxs]
        pick = rerank_problem(problems[p]["target"], answers, sc)
        picks.append(pick)
        predictions.append({
            "input": problems[p]["question"], "prediction": rows[idxs[pick["best_index"]]]["solution"],
            "reference": problems[p]["answer"], "index": p, "target": problems[p]["target"],
            "greedy": greedy[p]["solution"], "greedy_answer": greedy[p]["answer"],
            "greedy_correct": greedy[p]["correct"],
            **pick, "answers": answers, "scores": sc, "correct": [rows[i]["correct"] for i in idxs],
            "source": problems[p]["source"],
        })  # fmt: skip
    return rerank_metrics(picks, [g["correct"] for g in greedy]), predictions


def write_rerank_report(
    run_dir: Path, problems: list[dict[str, Any]], samples: SampleSets, scores: list[float], *,
    sample: SampleSettings,
    eval_source: str, lm_coef: float, step: int, val_loss: float | None,
) -> str:  # fmt: skip
    """The reranking of the held-out samples by their verifier `scores`: eval.json (each method's
    accuracy, the settings), eval/predictions.jsonl and eval/errors.jsonl (the problems best-of-N
    got wrong). Returns the summary line's text."""
    metrics, predictions = rerank(problems, samples.greedy_rows, samples.eval_rows, scores)
    write_predictions(run_dir / "eval" / "predictions.jsonl", predictions)
    write_predictions(run_dir / "eval" / "errors.jsonl", [p for p in predictions if not p["best_correct"]])
    report = {
        **metrics,
        "sample_accuracy": samples.eval_stats["share_correct"],  # one sample at the temperature: pass@1
        "n": sample.n_eval,
        "n_problems": len(problems),
        "step": step,
        "val_loss": val_loss,
        "train_samples": samples.train_stats,
        "settings": {
            "eval_path": eval_source, "generator": samples.generator, "verifier": str(run_dir / "verifier"),
            "temperature": sample.temperature, "top_k": sample.top_k, "max_new_tokens": sample.max_new_tokens,
            "seed": sample.seed, "lm_coef": lm_coef,
        },
    }  # fmt: skip
    atomic_write_json(run_dir / "eval.json", report)
    n = sample.n_eval
    return (
        f"greedy {metrics['greedy_accuracy']:.3f}, majority@{n} {metrics['majority_accuracy']:.3f}, "
        f"best-of-{n} {metrics['best_of_n_accuracy']:.3f} (weighted vote {metrics['weighted_vote_accuracy']:.3f}), "
        f"pass@{n} {metrics['pass_at_n']:.3f} on {len(problems)} problems"
    )


__all__ = [
    "HEAD_FILE",
    "DataSettings",
    "SampleSets",
    "SampleSettings",
    "VerifierBatches",
    "VerifierModel",
    "VerifierOutput",
    "best_of_n",
    "chat_prompt",
    "collate_batches",
    "collate_verifier",
    "draw_sample_sets",
    "draw_samples",
    "examples_from_rows",
    "group_by_problem",
    "label_solution",
    "load_verifier",
    "load_verifier_weights",
    "majority_vote",
    "read_problem_sets",
    "read_problems",
    "rerank",
    "rerank_metrics",
    "rerank_problem",
    "sample_stats",
    "save_verifier",
    "score_examples",
    "single_label_note",
    "split_examples",
    "value_eval_loss",
    "verifier_example",
    "verifier_loss_fn",
    "weighted_vote",
    "write_rerank_report",
]

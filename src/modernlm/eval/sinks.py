"""Measuring a model past its trained context: streaming perplexity and long-generation statistics.

StreamingLLM (Xiao et al. 2023) keeps a rolling KV cache, the first `sink_size` tokens plus the last
`window` ones with positions taken from the cache slot, so a model reads and writes any length on
positions it was trained on. Whether that works depends on the kept first tokens: models dump
attention mass there (an "attention sink"); evict them and quality collapses. `streaming_nll` reads
long sequences through that cache as generation does; `position_buckets` averages its NLLs per span
of positions. `segment_stats` measures generations on token ids, per span: the repetition rate (the
share of n-grams starting there that already started earlier in the text; real text repeats too, so
compare with real text cut the same way) and distinct-n (Li et al. 2016).

`modernlm experiment sinks` compares the `arms` (models and caches): `measure_arm` gives one arm's
numbers, `summary_markdown` the report of them all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modernlm.data.shards import TokenStream
from modernlm.errors import UserError
from modernlm.eval.compare import markdown_table, md_fence
from modernlm.generation import generate
from modernlm.runtime import eval_mode

if TYPE_CHECKING:
    from modernlm.model import ModernDecoderLM
    from modernlm.tokenizer import Tokenizer


@torch.inference_mode()
def streaming_nll(
    model: ModernDecoderLM,
    ids: Tensor,
    *,
    window: int = 0,
    sink_size: int = 0,
    chunk: int = 1,
    batch_size: int = 16,
) -> Tensor:
    """Per-target NLL of `ids` (B, N) read through a rolling KV cache; returns (B, N - 1) float32.

    Column j is -log p(ids[:, j + 1] | what the model sees after reading ids[:, : j + 1]): with
    chunk = 1, the first `sink_size` cache slots (a learned sink token is slot 0 and counts as one
    of them), the `window` tokens before it, and itself; with chunk > 1, the last token of a chunk
    sees up to chunk - 1 more. window = 0: one dense forward over the whole sequence.
    Rows go `batch_size` at a time; the result is on the CPU.
    """
    if ids.dim() != 2 or ids.size(1) < 2:
        raise ValueError(f"ids must be (batch, tokens >= 2), got {tuple(ids.shape)}")
    if window < 0 or sink_size < 0 or chunk < 1:
        raise ValueError(f"need window >= 0, sink_size >= 0, chunk >= 1; got {window}, {sink_size}, {chunk}")
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for rows in ids.split(batch_size):
            rows = rows.to(device)
            inputs, targets = rows[:, :-1], rows[:, 1:]
            if not window:
                logits = model(inputs).logits
                out.append(_nll(logits, targets))
                continue
            cache = model.new_cache(rows.size(0), window=window, sink_size=sink_size, chunk=chunk)
            pieces = []
            for start in range(0, inputs.size(1), chunk):
                logits = model(inputs[:, start : start + chunk], cache=cache).logits
                pieces.append(_nll(logits, targets[:, start : start + chunk]))
            out.append(torch.cat(pieces, dim=1))
    return torch.cat(out).cpu()


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T, V) logits, (B, T) targets -> (B, T) float32 NLL."""
    flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return flat.view_as(targets)


def position_buckets(nll: Tensor, size: int) -> list[float]:
    """Mean NLL per span of `size` target positions.

    `nll` is (B, N - 1) as `streaming_nll` returns it: column j holds the target at position
    j + 1, so bucket k averages targets at positions [k * size, (k + 1) * size) over all rows (the
    first bucket has one target fewer per row: position 0 is never a target).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    positions = torch.arange(1, nll.size(1) + 1)
    buckets = positions // size
    return [float(nll[:, buckets == k].double().mean()) for k in range(int(buckets.max()) + 1)]


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """All n-grams of `tokens`, in order (overlapping)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct n-grams / n-grams of `tokens`; nan when it has fewer than n tokens."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(tokens: Sequence[int], n: int = 4, start: int = 0, end: int | None = None) -> float:
    """Share of the n-grams that start at positions [start, end) of `tokens` (and fit in `tokens`)
    that also start at some earlier position; nan when there are none."""
    end = len(tokens) if end is None else end
    seen: set[tuple[int, ...]] = set()
    repeated = total = 0
    for i in range(min(end, len(tokens) - n + 1)):
        gram = tuple(tokens[i : i + n])
        if i >= start:
            total += 1
            repeated += gram in seen
        seen.add(gram)
    return repeated / total if total else math.nan


def segment_stats(
    tokens: Sequence[int],
    segment: int,
    *,
    prompt_len: int = 0,
    n_segments: int | None = None,
    ngram: int = 4,
    distinct: Sequence[int] = (1, 2, 3),
) -> list[dict[str, float]]:
    """Repetition rate and distinct-n of a text's generated part, per span of `segment` positions.

    `tokens` is prompt + generation; span k covers positions [k * segment, (k + 1) * segment) of it,
    less the prompt (its first `prompt_len` tokens). Repetition looks back over the whole text.
    Returns one dict per span: {"repetition": .., "distinct_1": .., ...}.
    """
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    n_segments = n_segments if n_segments is not None else -(-len(tokens) // segment)
    stats = []
    for k in range(n_segments):
        lo, hi = max(k * segment, prompt_len), (k + 1) * segment
        row = {"repetition": repetition_rate(tokens, ngram, lo, hi)}
        for n in distinct:
            row[f"distinct_{n}"] = distinct_n(tokens[lo:hi], n)
        stats.append(row)
    return stats


def mean_stats(per_text: Sequence[Sequence[dict[str, float]]]) -> dict[str, list[float]]:
    """Average `segment_stats` of several texts: {measure: [mean over texts, per span]}."""
    keys = list(per_text[0][0])
    spans = len(per_text[0])
    return {key: [sum(text[k][key] for text in per_text) / len(per_text) for k in range(spans)] for key in keys}


# ---- the experiment: arms, their measurements, the report ------------------------------------------


@dataclass
class SinksEvalConfig:
    multiples: int = 4  # measure at 1x .. this many times the trained context C
    window: int = 0  # W: recent tokens the rolling cache keeps; 0 = C - streamingllm_sinks - chunk
    streamingllm_sinks: int = 4  # initial tokens the streamingllm arm keeps (StreamingLLM's 4)
    chunk: int = 1  # tokens per forward while streaming (1 = token by token, the exact setting)
    num_sequences: int = 32  # validation sequences of multiples * C tokens scored for perplexity
    batch_size: int = 16  # sequences per forward
    num_samples: int = 8  # generations per arm, each continuing the start of a validation sequence
    prompt_tokens: int = 16  # tokens of that sequence given as the prompt
    temperature: float = 1.0  # sampling of the generations (0 = greedy)
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0  # sampling seed, the same for every arm
    ngram: int = 4  # n of the repetition rate
    plot_points: int = 8  # perplexity points per context length in sinks.png


@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # "sink" or "nosink": which trained model
    window: int  # 0 = dense attention, no rolling cache
    sink_size: int  # first cache slots kept (a learned sink token is slot 0)
    about: str


def arms(window: int, streamingllm_sinks: int) -> list[Arm]:
    return [
        Arm("sink", "sink", window, 1, f"learned sink token + last {window} tokens"),
        Arm("window", "nosink", window, 0, f"last {window} tokens only (pure sliding window)"),
        Arm(
            "streamingllm",
            "nosink",
            window,
            streamingllm_sinks,
            f"first {streamingllm_sinks} tokens + last {window} (StreamingLLM)",
        ),
        Arm("dense", "nosink", 0, 0, "all tokens, positions past the trained context"),
    ]


def eval_sequences(data_path: Path, length: int, count: int) -> Tensor:
    """`count` (or as many as fit) consecutive, non-overlapping val sequences of `length` tokens."""
    stream = TokenStream(data_path, "val")
    fit = len(stream) // length
    if fit == 0:
        raise UserError(
            f"data: the val split has {len(stream)} tokens, fewer than one evaluation sequence of "
            f"{length} (eval.multiples x model.max_seq_len); raise data.val_fraction"
        )
    if fit < count:
        print(f"eval: the val split holds {fit} sequences of {length} tokens (asked for {count})")
    n = min(fit, count)
    return torch.from_numpy(stream.read(0, n * length)).view(n, length)


def text_stats(rows: Tensor, e: SinksEvalConfig, context: int) -> dict[str, list[float]]:
    """`segment_stats` per span of `context` positions, averaged over the rows (prompt + text)."""
    return mean_stats(
        [
            segment_stats(row.tolist(), context, prompt_len=e.prompt_tokens, n_segments=e.multiples, ngram=e.ngram)
            for row in rows
        ]
    )


def measure_arm(
    model: ModernDecoderLM, arm: Arm, ids: Tensor, e: SinksEvalConfig, context: int, tokenizer: Tokenizer | None
) -> dict[str, Any]:
    """One arm's entry of results.json. `ids`: validation sequences of multiples x `context` tokens;
    the first num_sequences are read through the arm's cache (NLL and perplexity per span of
    `context` positions), the first num_samples are cut to their first prompt_tokens and continued
    to the full length (text_stats of the generations)."""
    start = time.perf_counter()
    nll = streaming_nll(
        model, ids[: e.num_sequences], window=arm.window, sink_size=arm.sink_size, chunk=e.chunk,
        batch_size=e.batch_size,
    )  # fmt: skip
    buckets = position_buckets(nll, context)[: e.multiples]
    prompts = ids[: e.num_samples, : e.prompt_tokens].to(next(model.parameters()).device)
    tokens = generate(
        model, prompts, ids.size(1) - e.prompt_tokens, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
        seed=e.seed, window=arm.window, sink_size=arm.sink_size, chunk=e.chunk,
        vocab_size=tokenizer.vocab_size if tokenizer else None,
    ).cpu()  # fmt: skip
    return {
        **asdict(arm),
        "nll": buckets,
        "ppl": [math.exp(min(v, 700.0)) for v in buckets],
        **text_stats(tokens, e, context),
        "nll_by_position": [float(v) for v in nll.double().mean(0)],
        "sample": tokenizer.decode(tokens[0, e.prompt_tokens :].tolist()) if tokenizer else None,
        "seconds": round(time.perf_counter() - start, 2),
    }


def nan_to_none(value: Any) -> Any:
    """nan/inf -> None, recursively, so that results.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value


def summary_markdown(results: dict[str, Any], e: SinksEvalConfig, *, steps: int, batch_size: int, seed: int) -> str:
    """summary.md: the setting, the models, the arms, then per span of the context perplexity and
    the generations' statistics, the first sample of each arm, and the plot (sinks.png)."""
    C, M, W = results["context"], results["multiples"], results["window"]
    cols = [f"{k + 1}x" for k in range(M)]
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"  # noqa: E731
    arms_ = results["arms"]
    parts = [
        "# Attention sinks past the trained context\n",
        f"Two models identical but for `model.attn_sink`: context C = {C} tokens, {steps} steps of "
        f"{batch_size} x {C} tokens, seed {seed}. Measured on {results['num_sequences']} validation "
        f"sequences of {results['sequence_tokens']} tokens ({M} x C), rolling-cache window W = {W}. "
        f"Wall time {results.get('wall_time_s', 0):.0f} s.\n",
        markdown_table(
            ["model", "params", "val loss (end of training)", "checkpoint"],
            [(n, f"{m['params']:,}", fmt(m["val_loss"], ".4f"), m["checkpoint"]) for n, m in results["models"].items()],
        ),
        markdown_table(["arm", "model", "KV cache"], [(a["name"], a["model"], a["about"]) for a in arms_.values()]),
        f"## Perplexity by position\n\nColumn kx: targets at positions [(k-1)C, kC), each read through the arm's "
        f"cache token by token (chunk {e.chunk}).\n",
        markdown_table(["arm", *cols], [(a["name"], *(fmt(v, ".2f") for v in a["ppl"])) for a in arms_.values()]),
        f"## Generations\n\n{results['num_samples']} samples per arm of {results['sequence_tokens']} tokens (prompt: "
        f"the first {e.prompt_tokens} tokens of a validation sequence; temperature {e.temperature}, "
        f"top_k {e.top_k}, top_p {e.top_p}, seed {e.seed}). Column kx: the generated tokens at "
        f"positions [(k-1)C, kC). Repetition rate: share of {e.ngram}-grams (token ids) starting there that "
        "already started earlier in the same text. distinct-n: distinct n-grams / n-grams within the span. "
        "Real text: the same measures on the validation sequences themselves.\n",
    ]
    measures = [("repetition", f"Repetition rate ({e.ngram}-grams)")]
    measures += [(f"distinct_{n}", f"distinct-{n}") for n in (1, 2, 3)]
    for key, title in measures:
        rows = [(a["name"], *(fmt(v, ".3f") for v in a[key])) for a in arms_.values()]
        rows.append(("real text", *(fmt(v, ".3f") for v in results["reference_text"][key])))
        parts.append(f"### {title}\n")
        parts.append(markdown_table(["arm", *cols], rows))
    parts.append("## Samples\n")
    if results.get("sample_prompt") is not None:
        # model text as code, quoted by more backticks than it holds: it cannot end the quote and turn into HTML
        prompt = repr(results["sample_prompt"])
        tick = md_fence(prompt, 1)
        parts.append(f"Prompt: {tick} {prompt} {tick}; the first sample of each arm.\n")
        for a in arms_.values():
            fence = md_fence(a["sample"])
            parts.append(f"<details><summary>{a['name']}</summary>\n\n{fence}\n{a['sample']}\n{fence}\n</details>\n")
    parts.append("![perplexity by position](sinks.png)\n")
    return "\n".join(parts)


__all__ = [
    "Arm",
    "SinksEvalConfig",
    "arms",
    "distinct_n",
    "eval_sequences",
    "mean_stats",
    "measure_arm",
    "nan_to_none",
    "ngrams",
    "position_buckets",
    "repetition_rate",
    "segment_stats",
    "streaming_nll",
    "summary_markdown",
    "text_stats",
]

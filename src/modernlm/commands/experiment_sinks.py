"""Attention sinks vs none past the trained context: StreamingLLM's experiment, small.

    modernlm experiment sinks -c configs/experiment/sinks-cpu.yaml      # ~10 min on a 2-core CPU
    modernlm experiment sinks -c configs/experiment/sinks-gpu.yaml      # one GPU, context 512
    modernlm experiment sinks -c configs/experiment/sinks-cpu.yaml train.num_steps=50 --out runs/sinks-quick

Trains two models identical but for `model.attn_sink` (same data, seed, steps: the pretrain recipe)
into OUT/sink and OUT/nosink, then reads and writes 1x .. Mx their trained context C with the
rolling KV cache (window W; see modernlm.eval.sinks). The arms:

    arm           model      KV cache
    sink          sink       learned sink token + the last W tokens (sink_size=1)
    window        no sink    the last W tokens only (sink_size=0): a pure sliding window
    streamingllm  no sink    the first 4 tokens + the last W (sink_size=4): StreamingLLM
    dense         no sink    no window: full attention, positions run past C

Measured per span of C positions (1x = [0, C), 2x = [C, 2C), ...): perplexity of long validation
sequences read through the cache, and, of generations sampled past C, the repetition rate and
distinct-1/2/3 (real validation text, cut the same way, is the reference row).

Data: data.path (shards from `modernlm prepare`), or data.corpus, from which OUT/data is built once
(a BPE, then the shards). Writes OUT/results.json, OUT/summary.md and OUT/sinks.png. Rerunning
skips finished training (an unfinished run resumes) and only measures again.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modernlm.data.corpus import CorpusConfig
from modernlm.errors import UserError
from modernlm.files import atomic_open, atomic_write
from modernlm.model import ModelConfig
from modernlm.train.optim import OptimConfig
from modernlm.train.trainer import TrainingConfig

FLAGS = {"--out": "out"}
OUTPUTS = {"out": "dir"}


@dataclass
class DataConfig:
    path: str = ""  # prepared token shards to train and evaluate on; "" = build OUT/data from corpus
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # text for OUT/data (see modernlm.data.corpus)
    vocab_size: int = 4096  # BPE vocabulary trained on the corpus for OUT/data
    tokenizer_bytes: int = 0  # train the BPE on the corpus' first this many bytes; 0 = all of it
    val_fraction: float = 0.01  # documents held out: validation loss and the evaluation text
    num_workers: int = 0  # tokenizer processes for OUT/data; 0 = one per core


@dataclass
class EvalConfig:
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


@dataclass
class Config:
    out: str = "runs/experiment-sinks"  # experiment directory: data/, sink/, nosink/, results
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # both models; attn_sink is set per model
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)  # both models; windows of max_seq_len
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1337  # training seed (initial weights, data order), the same for both models
    device: Literal["auto", "cpu", "cuda"] = "auto"  # training and measuring
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # training autocast; eval is fp32
    compile: bool = False  # torch.compile the training steps


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


# ------------------------------------------------------------------------------------------------
# Steps of the recipe


def check(cfg: Config) -> int:
    """Validate the settings that only make sense together; return the window W."""
    e, C = cfg.eval, cfg.model.max_seq_len
    for name in ("multiples", "num_sequences", "batch_size", "num_samples", "prompt_tokens", "ngram", "chunk"):
        if getattr(e, name) < 1:
            raise UserError(f"eval.{name} must be >= 1, got {getattr(e, name)}")
    if e.window < 0 or e.streamingllm_sinks < 0 or e.plot_points < 1:
        raise UserError("eval.window and eval.streamingllm_sinks must be >= 0, eval.plot_points >= 1")
    window = e.window or C - e.streamingllm_sinks - e.chunk
    # Every arm must stay on trained positions: a rolling cache writes at slots up to
    # sink_size + window + chunk - 1, and the no-sink model was trained on positions < C.
    if window < 1 or e.streamingllm_sinks + window + e.chunk > C:
        raise UserError(
            f"eval.window: streamingllm_sinks + window + chunk = {e.streamingllm_sinks} + {window} + {e.chunk} "
            f"must be <= model.max_seq_len ({C}), so no arm reads positions it was not trained on"
        )
    if e.prompt_tokens >= C:
        raise UserError(f"eval.prompt_tokens ({e.prompt_tokens}) must be < model.max_seq_len ({C})")
    return window


def prepare_data(cfg: Config, out: Path) -> Path:
    """data.path, or OUT/data built from data.corpus (once: an existing one is reused)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    path = out / "data"
    if (path / "meta.json").is_file():
        print(f"data: reusing {path}")
        return path
    if not cfg.data.corpus.sources:
        raise UserError(
            "data: set data.path (shards from `modernlm prepare`) or data.corpus.sources "
            "(see configs/experiment/sinks-cpu.yaml)"
        )
    from modernlm.data.corpus import default_workers, iter_documents, prepare_tokens
    from modernlm.tokenizer import train_bpe

    def texts():  # the corpus, or its first data.tokenizer_bytes
        seen = 0
        for _, doc in iter_documents(cfg.data.corpus):
            yield doc
            seen += len(doc.encode("utf-8"))
            if cfg.data.tokenizer_bytes and seen >= cfg.data.tokenizer_bytes:
                return

    start = time.perf_counter()
    tokenizer = train_bpe(texts(), cfg.data.vocab_size)
    prepare_tokens(
        cfg.data.corpus,
        tokenizer,
        path,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers or default_workers(),
        progress=False,
    )
    print(f"data: BPE {tokenizer.vocab_size} + shards in {time.perf_counter() - start:.1f}s -> {path}")
    return path


def train_models(cfg: Config, data_path: Path, out: Path) -> dict[str, Path]:
    """Pretrain the sink and the no-sink model with the pretrain recipe; return their run dirs."""
    from modernlm.checkpoint import checkpoint_step, latest_checkpoint
    from modernlm.commands import pretrain
    from modernlm.data.shards import TokenDataConfig
    from modernlm.runtime import RunConfig

    runs = {}
    for name, sink in (("sink", True), ("nosink", False)):
        run_dir = out / name
        runs[name] = run_dir
        pcfg = pretrain.Config(
            model=replace(cfg.model, attn_sink=sink),
            data=TokenDataConfig(path=str(data_path), seq_len=cfg.model.max_seq_len),
            optim=copy.deepcopy(cfg.optim),
            train=copy.deepcopy(cfg.train),
            run=RunConfig(
                out_dir=str(out), name=name, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile
            ),
        )
        last = latest_checkpoint(run_dir)
        if last is not None:
            _check_same_run(run_dir, pcfg)
            if checkpoint_step(last) >= cfg.train.num_steps:
                print(f"train {name}: finished ({last}), skipping")
                continue
        print(f"train {name}: model.attn_sink={sink}")
        pretrain.main(pcfg)
    return runs


def _check_same_run(run_dir: Path, pcfg: Any) -> None:
    """A run found in OUT must have been trained with these settings, or its numbers would be
    reported under settings they do not belong to."""
    from modernlm.config import read_config_file, to_dict

    file = run_dir / "config.yaml"
    if not file.is_file():
        return
    saved, wanted = read_config_file(file), to_dict(pcfg)
    keys = [("model", None), ("data", None), ("optim", None), ("run", "seed")]
    keys += [("train", k) for k in ("num_steps", "batch_size", "grad_accum_steps")]
    diffs = []
    for section, key in keys:
        a = saved.get(section, {}) if key is None else saved.get(section, {}).get(key)
        b = wanted[section] if key is None else wanted[section][key]
        if a != b:
            diffs.append(section if key is None else f"{section}.{key}")
    if diffs:
        raise UserError(
            f"{run_dir} was trained with other settings ({', '.join(diffs)} differ from {file}); "
            "use another --out, or delete that run"
        )


def eval_sequences(data_path: Path, length: int, count: int):
    """`count` (or as many as fit) consecutive, non-overlapping val sequences of `length` tokens."""
    import torch

    from modernlm.data.shards import TokenStream

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


def measure(cfg: Config, runs: dict[str, Path], data_path: Path, window: int) -> dict[str, Any]:
    """Every arm's perplexity by position and generation statistics; the numbers of results.json."""
    import torch

    from modernlm.api import load
    from modernlm.checkpoint import latest_checkpoint
    from modernlm.eval.sinks import mean_stats, position_buckets, segment_stats, streaming_nll
    from modernlm.generation import generate
    from modernlm.tokenizer import load_tokenizer
    from modernlm.train.tracking import SUMMARY_FILE, read_metrics

    e, C = cfg.eval, cfg.model.max_seq_len
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    N = e.multiples * C
    ids = eval_sequences(data_path, N, max(e.num_sequences, e.num_samples))
    ppl_ids, prompts = ids[: e.num_sequences], ids[: e.num_samples, : e.prompt_tokens].to(device)
    tokenizer = load_tokenizer(data_path) if (data_path / "tokenizer.json").is_file() else None

    models, model_info = {}, {}
    for name, run_dir in runs.items():
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"{run_dir}: no checkpoint to measure")
        models[name] = load(ckpt, device=device).model
        evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
        summary = run_dir / SUMMARY_FILE
        model_info[name] = {
            "run_dir": str(run_dir),
            "checkpoint": str(ckpt),
            "params": models[name].num_params(),
            "val_loss": evals[-1]["val_loss"] if evals else None,
            "train_seconds": json.loads(summary.read_text()).get("wall_time_s") if summary.is_file() else None,
        }

    results: dict[str, Any] = {}
    for arm in arms(window, e.streamingllm_sinks):
        start = time.perf_counter()
        model = models[arm.model]
        nll = streaming_nll(
            model, ppl_ids, window=arm.window, sink_size=arm.sink_size, chunk=e.chunk, batch_size=e.batch_size
        )
        buckets = position_buckets(nll, C)[: e.multiples]
        tokens = generate(
            model, prompts, N - e.prompt_tokens, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
            seed=e.seed, window=arm.window, sink_size=arm.sink_size, chunk=e.chunk,
            vocab_size=tokenizer.vocab_size if tokenizer else None,
        ).cpu()  # fmt: skip
        stats = mean_stats(
            [
                segment_stats(row.tolist(), C, prompt_len=e.prompt_tokens, n_segments=e.multiples, ngram=e.ngram)
                for row in tokens
            ]
        )
        sample = tokenizer.decode(tokens[0, e.prompt_tokens :].tolist()) if tokenizer else None
        results[arm.name] = {
            **asdict(arm),
            "nll": buckets,
            "ppl": [math.exp(min(v, 700.0)) for v in buckets],
            **stats,
            "nll_by_position": [float(v) for v in nll.double().mean(0)],
            "sample": sample,
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(f"eval {arm.name}: ppl by x of context " + " ".join(f"{p:.2f}" for p in results[arm.name]["ppl"]))

    reference = mean_stats(
        [
            segment_stats(row.tolist(), C, prompt_len=e.prompt_tokens, n_segments=e.multiples, ngram=e.ngram)
            for row in ids[: e.num_samples]
        ]
    )
    prompt_text = tokenizer.decode(ids[0, : e.prompt_tokens].tolist()) if tokenizer else None
    return {
        "context": C,
        "window": window,
        "multiples": e.multiples,
        "sequence_tokens": N,
        "num_sequences": int(ppl_ids.size(0)),
        "num_samples": int(prompts.size(0)),
        "models": model_info,
        "arms": results,
        "reference_text": reference,
        "sample_prompt": prompt_text,
    }


# ------------------------------------------------------------------------------------------------
# Reports


def _finite(value: Any) -> Any:
    """nan/inf -> None, recursively: results.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def summary_markdown(results: dict[str, Any], cfg: Config) -> str:
    from modernlm.eval.compare import markdown_table

    C, M, W = results["context"], results["multiples"], results["window"]
    cols = [f"{k + 1}x" for k in range(M)]
    fmt = lambda v, spec: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)  # noqa: E731
    arms_ = results["arms"]
    t = cfg.train
    parts = [
        "# Attention sinks past the trained context\n",
        f"Two models identical but for `model.attn_sink`: context C = {C} tokens, {t.num_steps} steps of "
        f"{t.batch_size} x {C} tokens, seed {cfg.seed}. Measured on {results['num_sequences']} validation "
        f"sequences of {results['sequence_tokens']} tokens ({M} x C), rolling-cache window W = {W}. "
        f"Wall time {results.get('wall_time_s', 0):.0f} s.\n",
        markdown_table(
            ["model", "params", "val loss (end of training)", "checkpoint"],
            [(n, f"{m['params']:,}", fmt(m["val_loss"], ".4f"), m["checkpoint"]) for n, m in results["models"].items()],
        ),
        markdown_table(["arm", "model", "KV cache"], [(a["name"], a["model"], a["about"]) for a in arms_.values()]),
        f"## Perplexity by position\n\nColumn kx: targets at positions [(k-1)C, kC), each read through the arm's "
        f"cache token by token (chunk {cfg.eval.chunk}).\n",
        markdown_table(["arm", *cols], [(a["name"], *(fmt(v, ".2f") for v in a["ppl"])) for a in arms_.values()]),
        f"## Generations\n\n{results['num_samples']} samples per arm of {results['sequence_tokens']} tokens (prompt: "
        f"the first {cfg.eval.prompt_tokens} tokens of a validation sequence; temperature {cfg.eval.temperature}, "
        f"top_k {cfg.eval.top_k}, top_p {cfg.eval.top_p}, seed {cfg.eval.seed}). Column kx: the generated tokens at "
        f"positions [(k-1)C, kC). Repetition rate: share of {cfg.eval.ngram}-grams (token ids) starting there that "
        "already started earlier in the same text. distinct-n: distinct n-grams / n-grams within the span. "
        "Real text: the same measures on the validation sequences themselves.\n",
    ]
    measures = [("repetition", f"Repetition rate ({cfg.eval.ngram}-grams)")]
    measures += [(f"distinct_{n}", f"distinct-{n}") for n in (1, 2, 3)]
    for key, title in measures:
        rows = [(a["name"], *(fmt(v, ".3f") for v in a[key])) for a in arms_.values()]
        rows.append(("real text", *(fmt(v, ".3f") for v in results["reference_text"][key])))
        parts.append(f"### {title}\n")
        parts.append(markdown_table(["arm", *cols], rows))
    parts.append("## Samples\n")
    if results.get("sample_prompt") is not None:
        parts.append(f"Prompt: `{results['sample_prompt']!r}`; the first sample of each arm.\n")
        for a in arms_.values():
            parts.append(f"<details><summary>{a['name']}</summary>\n\n```\n{a['sample']}\n```\n</details>\n")
    parts.append("![perplexity by position](sinks.png)\n")
    return "\n".join(parts)


def plot(results: dict[str, Any], path: Path, points: int) -> None:
    """Perplexity by position, one line per arm, in spans of C / points tokens (log scale)."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import ScalarFormatter

    C, M = results["context"], results["multiples"]
    size = max(C // points, 1)
    fig = Figure(figsize=(7, 4.8), dpi=120)
    ax = fig.add_subplot()
    for arm in results["arms"].values():
        nll = np.asarray(arm["nll_by_position"], dtype=float)  # column j: the target at position j + 1
        positions = np.arange(1, len(nll) + 1)
        spans = positions // size
        x = [(k + 0.5) * size / C for k in range(spans.max() + 1)]
        y = [float(np.exp(nll[spans == k].mean())) for k in range(spans.max() + 1)]
        ax.plot(x, y, marker=".", label=f"{arm['name']}: {arm['about']}")
    for k in range(1, M):
        ax.axvline(k, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")  # a collapsing arm can be orders of magnitude off
    low, high = ax.get_ylim()
    if high / low < 10:  # within one decade: plain numbers, on the minor ticks too (else 10^k labels)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("position / trained context C")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity past the trained context (C = {C}, window {results['window']})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix[1:] or "png")


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """What the experiment writes in OUT: its data, the two runs, and the results at the very end."""
    out = Path(cfg.out)
    dirs = ([] if cfg.data.path else ["data"]) + ["sink", "nosink"]
    files = ["results.json", "summary.md", "sinks.png"]
    return [("out", out / d, "dir") for d in dirs] + [("out", out / f, "file") for f in files]


def main(cfg: Config) -> None:
    from modernlm.config import to_dict

    start = time.perf_counter()
    window = check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = prepare_data(cfg, out)
    runs = train_models(cfg, data_path, out)
    trained = time.perf_counter()
    results = measure(cfg, runs, data_path, window)
    results["eval_seconds"] = round(time.perf_counter() - trained, 1)
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    results["config"] = to_dict(cfg)
    results = _finite(results)
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(out / "summary.md", summary_markdown(results, cfg))
    plot(results, out / "sinks.png", cfg.eval.plot_points)
    print(f"experiment sinks: {results['wall_time_s']:.0f}s -> {out}/summary.md, results.json, sinks.png")

"""Attention sinks vs none past the trained context: StreamingLLM's experiment, small.

    modernlm experiment sinks -c configs/experiment/sinks-cpu.yaml      # ~10 min on a 2-core CPU
    modernlm experiment sinks -c configs/experiment/sinks-gpu.yaml      # one GPU, context 512

Trains two models identical but for `model.attn_sink` (the pretrain recipe; same data, seed, steps)
into OUT/sink and OUT/nosink, then reads and writes 1x .. Mx their trained context C through four
arms (see modernlm.eval.sinks): sink (the sink model: its sink token + the last W tokens), window
(no sink: the last W only), streamingllm (no sink: the first 4 + the last W) and dense (no sink, no
window: positions run past C). Per span of C positions: perplexity of long validation sequences,
and the repetition rate and distinct-1/2/3 of generations (real validation text is the reference).
Data: data.path (shards from `modernlm prepare`), or OUT/data built once from data.corpus. Writes
OUT/results.json, summary.md and sinks.png; a rerun resumes or skips training and measures again.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modernlm.data.corpus import CorpusConfig
from modernlm.errors import UserError
from modernlm.eval.sinks import SinksEvalConfig
from modernlm.files import atomic_write
from modernlm.generation import Sampling
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
class Config:
    out: str = "runs/experiment-sinks"  # experiment directory: data/, sink/, nosink/, results
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # both models; attn_sink is set per model
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)  # both models; windows of max_seq_len
    eval: SinksEvalConfig = field(default_factory=SinksEvalConfig)
    seed: int = 1337  # training seed (initial weights, data order), the same for both models
    device: Literal["auto", "cpu", "cuda"] = "auto"  # training and measuring
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # training autocast; eval is fp32
    compile: bool = False  # torch.compile the training steps


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
    try:  # generate()'s own checks, now rather than after training both models
        Sampling(temperature=e.temperature, top_k=e.top_k, top_p=e.top_p, seed=e.seed)
    except UserError as err:
        raise UserError(f"eval.{err}") from None
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
    from modernlm.data.corpus import CorpusPrefix, default_workers, prepare_tokens
    from modernlm.tokenizer import train_bpe

    start = time.perf_counter()
    tokenizer = train_bpe(CorpusPrefix(cfg.data.corpus, cfg.data.tokenizer_bytes), cfg.data.vocab_size)
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


def load_models(runs: dict[str, Path], device: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Each run's latest checkpoint on `device`, and what results.json says about it."""
    from modernlm.api import load
    from modernlm.checkpoint import latest_checkpoint
    from modernlm.pipeline.report import finite
    from modernlm.train.tracking import SUMMARY_FILE, read_metrics

    models, info = {}, {}
    for name, run_dir in runs.items():
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"{run_dir}: no checkpoint to measure")
        models[name] = load(ckpt, device=device).model
        evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
        summary = run_dir / SUMMARY_FILE
        info[name] = {
            "run_dir": str(run_dir),
            "checkpoint": str(ckpt),
            "params": models[name].num_params(),
            "val_loss": finite(evals[-1]["val_loss"]) if evals else None,  # a diverged run logs the string "nan"
            "train_seconds": json.loads(summary.read_text()).get("wall_time_s") if summary.is_file() else None,
        }
    return models, info


def measure(cfg: Config, runs: dict[str, Path], data_path: Path, window: int, ids: Any) -> dict[str, Any]:
    """Every arm's perplexity by position and generation statistics on `ids` (the validation
    sequences of `eval_sequences`); the numbers of results.json."""
    import torch

    from modernlm.eval.sinks import arms, measure_arm, text_stats
    from modernlm.tokenizer import load_tokenizer

    e, C = cfg.eval, cfg.model.max_seq_len
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    tokenizer = load_tokenizer(data_path) if (data_path / "tokenizer.json").is_file() else None
    models, info = load_models(runs, torch.device("cuda" if use_cuda else "cpu"))
    results = {}
    for arm in arms(window, e.streamingllm_sinks):
        results[arm.name] = measure_arm(models[arm.model], arm, ids, e, C, tokenizer)
        print(f"eval {arm.name}: ppl by x of context " + " ".join(f"{p:.2f}" for p in results[arm.name]["ppl"]))
    return {
        "context": C,
        "window": window,
        "multiples": e.multiples,
        "sequence_tokens": e.multiples * C,
        "num_sequences": len(ids[: e.num_sequences]),
        "num_samples": len(ids[: e.num_samples]),
        "models": info,
        "arms": results,
        "reference_text": text_stats(ids[: e.num_samples], e, C),
        "sample_prompt": tokenizer.decode(ids[0, : e.prompt_tokens].tolist()) if tokenizer else None,
    }


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """What the experiment writes in OUT: its data, the two runs, and the results at the very end."""
    out = Path(cfg.out)
    dirs = ([] if cfg.data.path else ["data"]) + ["sink", "nosink"]
    files = ["results.json", "summary.md", "sinks.png"]
    return [("out", out / d, "dir") for d in dirs] + [("out", out / f, "file") for f in files]


def main(cfg: Config) -> None:
    from modernlm.config import to_dict
    from modernlm.eval.sinks import eval_sequences, nan_to_none, summary_markdown
    from modernlm.pipeline.plotting import plot_sinks

    start = time.perf_counter()
    window = check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = prepare_data(cfg, out)
    e = cfg.eval  # read before training: a val split too short for eval.multiples is an error now, not after it
    ids = eval_sequences(data_path, e.multiples * cfg.model.max_seq_len, max(e.num_sequences, e.num_samples))
    runs = train_models(cfg, data_path, out)
    trained = time.perf_counter()
    results = measure(cfg, runs, data_path, window, ids)
    results["eval_seconds"] = round(time.perf_counter() - trained, 1)
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    results["config"] = to_dict(cfg)
    results = nan_to_none(results)
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    summary = summary_markdown(
        results, cfg.eval, steps=cfg.train.num_steps, batch_size=cfg.train.batch_size, seed=cfg.seed
    )
    atomic_write(out / "summary.md", summary)
    plot_sinks(results, out / "sinks.png", cfg.eval.plot_points)
    print(f"experiment sinks: {results['wall_time_s']:.0f}s -> {out}/summary.md, results.json, sinks.png")

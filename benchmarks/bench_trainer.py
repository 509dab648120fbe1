"""Trainer throughput: our full `Trainer` loop vs a plain loop over transformers' LlamaForCausalLM.

Same shape (vocab 8192, d_model 256, 4 layers, 4 heads, SwiGLU 704, tied embeddings), same batch
(8 x 256 tokens), AdamW, fp32, on this machine's CPU, in one process. Ours includes everything the
trainer does per step (memmapped batch reading, LR schedule, token-normalised accumulation,
clipping, the non-finite check); the baseline is forward/backward/step/zero_grad only.

    python benchmarks/bench_trainer.py [--steps 30] [--rounds 2] [--no-compile]

A third row runs the same Trainer with `run.compile=true` (torch.compile, inductor's C++ kernels
on CPU), the setting a user would turn on for a long run; the HF loop stays eager.

Throughput is timed over steps after a warm-up; each loop runs `rounds` times, alternating, and
the best round counts (other processes on a shared machine only ever slow a round down).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VOCAB, D, LAYERS, HEADS, BATCH, SEQ = 8192, 256, 4, 4, 8, 256


def bench_ours(steps: int, warmup: int, shards: Path, out: Path, compile: bool = False) -> float:
    from modernlm.data.shards import TokenStream, TrainWindows
    from modernlm.model import ModelConfig, ModernDecoderLM
    from modernlm.runtime import Runtime
    from modernlm.train.losses import lm_loss
    from modernlm.train.optim import OptimConfig
    from modernlm.train.tracking import read_metrics
    from modernlm.train.trainer import Trainer, TrainingConfig

    torch.manual_seed(0)
    model = ModernDecoderLM(
        ModelConfig(vocab_size=VOCAB, d_model=D, n_layer=LAYERS, n_head=HEADS, max_seq_len=SEQ)
    )
    batches = TrainWindows(TokenStream(shards, "train"), SEQ, BATCH, seed=0)
    cfg = TrainingConfig(
        num_steps=warmup + steps,
        batch_size=BATCH,
        log_every=warmup,
        eval_every=0,
        save_every=0,
        progress=False,
        resume="never",
    )
    runtime = Runtime(
        device=torch.device("cpu"), dtype=torch.float32, tensorboard=False, compile=compile
    )
    trainer = Trainer(
        model, lm_loss, batches, cfg, OptimConfig(lr=3e-4, warmup_steps=10), runtime, out
    )
    trainer._write = lambda bar, line: None  # keep the table readable
    trainer.train()
    # metrics.jsonl: tok_per_s of the interval after the warm-up steps (train-step time only)
    records = [r for r in read_metrics(out) if "tok_per_s" in r and r["step"] > warmup]
    seconds = sum(
        cfg.log_every * BATCH * SEQ / r["tok_per_s"]
        for r in records
        if r["step"] % cfg.log_every == 0
    )
    return steps * BATCH * SEQ / seconds


def bench_hf(steps: int, warmup: int, tokens: np.ndarray) -> float:
    from transformers import LlamaForCausalLM

    from modernlm.hf.convert import model_config_to_llama_config
    from modernlm.model import ModelConfig

    torch.manual_seed(0)
    # the same config as ours, mapped the way `modernlm convert --to hf` maps it
    config = model_config_to_llama_config(
        ModelConfig(vocab_size=VOCAB, d_model=D, n_layer=LAYERS, n_head=HEADS, max_seq_len=SEQ)
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        starts = rng.integers(0, len(tokens) - SEQ - 1, BATCH)
        x = torch.from_numpy(np.stack([tokens[s : s + SEQ + 1] for s in starts]).astype(np.int64))
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * BATCH * SEQ / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the run.compile=true row (~20 s compile per round)"
    )
    args = parser.parse_args()

    from modernlm.data.corpus import write_shards

    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    tokens = np.random.default_rng(0).integers(0, VOCAB, 2_000_000).astype(np.uint16)
    shards = write_shards(
        tmp / "shards", {"train": tokens, "val": tokens[:10_000]}, vocab_size=VOCAB
    )
    ours, compiled, theirs = [], [], []
    for r in range(args.rounds):
        ours.append(bench_ours(args.steps, args.warmup, shards, tmp / f"run{r}"))
        if not args.no_compile:  # the first (warm-up) step pays the compile
            compiled.append(bench_ours(args.steps, args.warmup, shards, tmp / f"crun{r}", compile=True))
        theirs.append(bench_hf(args.steps, args.warmup, tokens))
        extra = f", modernlm compiled {compiled[-1]:,.0f}" if compiled else ""
        print(f"round {r + 1}: modernlm {ours[-1]:,.0f} tok/s{extra}, HF {theirs[-1]:,.0f} tok/s", flush=True)
    best_ours, best_hf = max(ours), max(theirs)
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}x{SEQ}, fp32 CPU, "
        f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.rounds}\n"
    )
    print("| loop | tokens/s | rounds | vs HF |")
    print("|---|---:|---|---:|")

    def rounds(values: list[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    print(f"| modernlm Trainer (ModernDecoderLM) | {best_ours:,.0f} | {rounds(ours)} | {best_ours / best_hf:.2f}x |")
    if compiled:
        best_c = max(compiled)
        print(f"| modernlm Trainer, run.compile=true | {best_c:,.0f} | {rounds(compiled)} | {best_c / best_hf:.2f}x |")
    print(
        f"| plain loop (HF LlamaForCausalLM) | {best_hf:,.0f} | {', '.join(f'{v:,.0f}' for v in theirs)} | 1.00x |"
    )


if __name__ == "__main__":
    main()

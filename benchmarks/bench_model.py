"""ModernDecoderLM vs transformers' LlamaForCausalLM: training step and greedy generation speed.

Both models hold the same weights (ours, converted with `modernlm.hf.convert.to_hf`), run float32 on the
same device with torch's default thread count, and are timed on identical work:

- train: forward + cross-entropy (same `F.cross_entropy` call for both) + backward +
  `torch.optim.AdamW` step, batch x seq random tokens; tokens/s = batch * seq / step time.
- generate: batch 1, a random prompt, greedy with a KV cache for exactly N new tokens (no EOS):
  ours `generate(model, temperature=0)`, HF `generate(do_sample=False)`; tokens/s = N / time.
  A second row runs ours with `compile=True` (decode steps through torch.compile, compiled in
  the untimed warm-up call) against the same eager HF `generate`.

Steps (and generate calls) alternate ours / HF one at a time, so a noisy neighbour hurts both
sides alike; tokens/s comes from the *fastest* step of each side (noise only ever adds time), and
the ratio of medians is printed too as a check. Run from the repo root:

    python benchmarks/bench_model.py                       # defaults below
    python benchmarks/bench_model.py --d-model 512 --n-layer 8 --batch 4 --seq 512
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from modernlm.generation import generate
from modernlm.hf.convert import to_hf
from modernlm.model import ModelConfig, ModernDecoderLM

TARGETS = {"train": 1.0, "generate": 1.5}  # ours / HF speed ratio the project aims for


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=0, help="0 = n_head (MHA)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--rounds", type=int, default=3, help="timed generate calls per model")
    p.add_argument("--prompt", type=int, default=32, help="generation prompt length")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument(
        "--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument(
        "--no-compile", action="store_true", help="skip the generate(compile=True) row (~20 s compile)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model: torch.nn.Module, logits_of, vocab: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits = logits_of(model, x)
        loss = F.cross_entropy(logits.view(-1, vocab), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summarize(times: dict[str, list[float]], work: int) -> tuple[float, float, float]:
    """tokens/s of ours and HF from their fastest run, and the ratio of their median times."""
    best = {k: work / min(v) for k, v in times.items()}
    return (
        best["ours"],
        best["hf"],
        statistics.median(times["hf"]) / statistics.median(times["ours"]),
    )


def bench_train(args, cfg: ModelConfig, device: torch.device) -> tuple[float, float, float]:
    torch.manual_seed(args.seed)
    ours = ModernDecoderLM(cfg).to(device).train()
    hf = to_hf(ours, attn_implementation=args.attn).to(device).train()  # same initial weights
    steps = {
        "ours": make_step(ours, lambda m, x: m(x).logits, cfg.vocab_size),
        "hf": make_step(hf, lambda m, x: m(input_ids=x, use_cache=False).logits, cfg.vocab_size),
    }
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    first = {name: step(x, y) for name, step in steps.items()}
    assert abs(first["ours"] - first["hf"]) < 1e-4, f"not the same model: losses {first}"
    for step in steps.values():
        for _ in range(args.warmup - 1):
            step(x, y)
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(lambda step=step: step(x, y), device))
    return summarize(times, args.batch * args.seq)


def bench_generate(
    args, cfg: ModelConfig, device: torch.device, compile: bool = False
) -> tuple[float, float, float, bool]:
    torch.manual_seed(args.seed)
    ours = ModernDecoderLM(cfg).to(device).eval()
    hf = to_hf(ours, attn_implementation=args.attn).to(device).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early, both do N tokens
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=device)
    n = args.new_tokens

    def run_ours() -> torch.Tensor:
        return generate(ours, prompt, max_new_tokens=n, temperature=0.0, compile=compile)

    def run_hf() -> torch.Tensor:
        return hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )

    runs = {"ours": run_ours, "hf": run_hf}
    outs = {name: run() for name, run in runs.items()}  # warmup (and compile), correctness check
    assert all(o.shape[1] == args.prompt + n for o in outs.values()), {
        k: o.shape for k, o in outs.items()
    }
    same = torch.equal(outs["ours"].cpu(), outs["hf"].cpu())
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(timed(run, device))
    return (*summarize(times, n), same)


def main() -> None:
    args = parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_kv_head=args.n_kv_head,
        max_seq_len=max(args.seq, args.prompt + args.new_tokens),
    )
    n_params = ModernDecoderLM(cfg).num_params()
    print(
        f"shape: vocab {cfg.vocab_size}, d_model {cfg.d_model}, {cfg.n_layer} layers, "
        f"{cfg.n_head}/{cfg.n_kv_head} heads, d_ff {cfg.d_ff}, {n_params / 1e6:.1f}M params; "
        f"train batch {args.batch} x {args.seq}; "
        f"generate 1 x {args.prompt} + {args.new_tokens} new"
    )
    print(
        f"env: torch {torch.__version__}, transformers {transformers.__version__}, {device}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"float32; HF attn={args.attn}; "
        f"{args.steps} timed train steps and {args.rounds} generate calls per model, alternating\n"
    )
    rows = []
    if not args.skip_train:
        ours, ref, med = bench_train(args, cfg, device)
        rows.append(
            ("training step (fwd + CE + bwd + AdamW)", ours, ref, med, TARGETS["train"], "")
        )
    if not args.skip_generate:
        ours, ref, med, same = bench_generate(args, cfg, device)
        note = "same tokens" if same else "tokens differ"
        rows.append(
            (
                f"greedy generation, KV cache, batch 1 ({note})",
                ours,
                ref,
                med,
                TARGETS["generate"],
                "",
            )
        )
    if not args.skip_generate and not args.no_compile:
        ours, ref, med, same = bench_generate(args, cfg, device, compile=True)
        note = "same tokens" if same else "tokens differ"
        rows.append(
            (
                f"greedy generation, `generate(compile=True)` vs HF eager ({note})",
                ours,
                ref,
                med,
                TARGETS["generate"],
                "",
            )
        )
    print(
        "| measurement | modernlm tok/s | HF Llama tok/s | ratio (best) | ratio (median) | target |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, ours, ref, med, target, _ in rows:
        ratio = ours / ref
        ok = "met" if ratio >= target else "within 2%" if ratio >= 0.98 * target else "NOT met"
        print(
            f"| {name} | {ours:,.0f} | {ref:,.0f} | {ratio:.2f}x | {med:.2f}x "
            f"| >= {target}x ({ok}) |"
        )


if __name__ == "__main__":
    main()

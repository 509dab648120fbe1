"""The decode matmuls against the machine's memory bound: what a decode step of SmolLM2 can cost.

A decode step reads every weight once, so its floor is the weights' bytes over the memory's read
rate. This prints, in one run on this machine: the bound (a copy, read + write bytes; a sum, read
bytes; a sum over each packed Q8_0 matrix in turn, the per-call stream a decode step makes), then
one pass over SmolLM2-135M's 30 layers of projection weights (576x960, 576x576, 576x3072,
1536x576: 106M weights, random values; the LM head apart) at M = 1, 4, 8, 16 rows (a
decode step) and 64 (a prefill's chunk): PyTorch's `F.linear` on float32 weights, and modernlm's
kernels on float32, Q8_0 (activations rounded to 8 bits, products in int32) and Q4_1 ones.
GB/s = weight bytes read / time (Q8_0: 34 bytes per 32 weights as stored in a .gguf, Q4_1: 20;
ours keep float32 scales, a little more); GMAC/s = multiply-adds / time. Each figure is the best of
`--rounds` passes after a warm-up pass.

Then whole decode steps: a SmolLM2-135M-shaped model (random weights) at float32 and int8, `model(...)`
over a paged cache of 100 tokens a row at 1, 4 and 16 rows, the head and embedding included: fused
(every layer in one `kernels.decode_layers` call, what `modernlm serve` runs on a CPU), op by op
(`PagedCache.fused = False`), and with `--compile` through torch.compile as the engine ran them
before (`generation.compiled_decoder`; ~1 min more). Each is the median of `--steps` steps.

    python benchmarks/bench_kernels.py [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from modernlm import kernels
from modernlm.generation import compiled_decoder
from modernlm.model import ModelConfig, ModernDecoderLM, PagedCache
from modernlm.quant import pack_q8, prepare, quantize_q4, quantize_q8

SMOLLM2 = dict(vocab_size=49152, d_model=576, n_head=9, n_kv_head=3, d_ff=1536, max_seq_len=2048, tie_embeddings=True)

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of wqkv, wo, w_gate_up, w_down


def best(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def memory_bound(rounds: int) -> tuple[float, float]:
    """GB/s of a copy (read + write bytes) and of a sum (read bytes) over 512 MiB, past every cache."""
    big = torch.ones(512 * 2**20 // 4)
    out = torch.empty_like(big)
    copy = best(lambda: out.copy_(big), rounds)
    read = best(lambda: big.sum(), rounds)
    return 2 * big.numel() * 4 / copy / 1e9, big.numel() * 4 / read / 1e9


def passes(xs: dict, weights: list, q8: list, q4: list) -> dict:
    """name -> (one pass over every layer's weight, bytes per weight as a .gguf stores them)."""
    return {
        "F.linear float32": (lambda: [F.linear(xs[w.size(1)], w) for w in weights], 4.0),
        "modernlm float32": (lambda: [kernels.linear_f32(xs[w.size(1)], w) for w in weights], 4.0),
        "modernlm Q8_0": (lambda: [kernels.linear_q8(xs[4 * q.size(1)], q, s) for q, s in q8], 34 / 32),
        "modernlm Q4_1": (lambda: [kernels.linear_q4(xs[2 * q.size(1)], q, s, mn) for q, s, mn in q4], 20 / 32),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=30, help="decode steps timed per row count")
    p.add_argument("--compile", action="store_true", help="also time torch.compile's steps (~1 min)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"bench_kernels: the kernels are not available here ({kernels.why_not()})")
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.05 for _ in range(args.layers) for n, k in LAYER_SHAPES]
    q8 = [pack_q8(*quantize_q8(w)) for w in weights]
    q4 = [quantize_q4(w) for w in weights]
    n_weights = sum(w.numel() for w in weights)

    copy, read = memory_bound(args.rounds)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n_weights / 1e6:.0f}M weights")  # fmt: skip
    # the same bytes as the Q8_0 pass, read one matrix at a time: what a per-matrix stream can reach
    chunks = [qp.view(torch.float32) for qp, _ in q8]
    per_matrix = best(lambda: [c.sum() for c in chunks], args.rounds)
    per_matrix_gbs = sum(c.numel() * 4 for c in chunks) / per_matrix / 1e9
    print(f"memory: copy {copy:.1f} GB/s (read + write), sum {read:.1f} GB/s (read), "
          f"sum of each packed Q8_0 matrix in turn {per_matrix_gbs:.1f} GB/s\n")

    print("| rows | matmul | ms per pass | GB/s of weights | GMAC/s |")
    print("|---:|---|---:|---:|---:|")
    for m in (1, 4, 8, 16, 64):
        xs = {k: torch.randn(m, k) for _, k in LAYER_SHAPES}
        with torch.inference_mode():
            for name, (fn, bytes_per_weight) in passes(xs, weights, q8, q4).items():
                t = best(fn, args.rounds)
                print(f"| {m} | {name} | {t * 1e3:.1f} | {n_weights * bytes_per_weight / t / 1e9:.1f} | "
                      f"{m * n_weights / t / 1e9:.0f} |")  # fmt: skip
    decode_steps(args)


def step_ms(model, rows: int, fused: bool, steps: int, step=None) -> float:
    """Median ms of a decode step of `rows` rows, each with 100 tokens in the paged cache."""
    cache = PagedCache(model.config, rows * 16, 16, device="cpu", dtype=torch.float32)
    cache.fused = fused
    tables = [list(range(r * 16, r * 16 + 16)) for r in range(rows)]
    times = []
    with torch.inference_mode():
        for r in range(rows):
            cache.select([tables[r]], [0])
            model(torch.randint(0, 1000, (1, 100)), cache=cache, last_only=True)
        for t in range(steps + 1):  # the first untimed
            cache.select(tables, [100 + t] * rows)
            start = time.perf_counter()
            (model if step is None else step)(torch.randint(0, 1000, (rows, 1)), cache=cache, last_only=True)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[steps // 2] * 1e3


def decode_steps(args) -> None:
    print("\n| weights | rows | fused step ms | op by op ms | compiled ms |\n|---|---:|---:|---:|---:|")
    for quantize in ("none", "int8"):
        torch.manual_seed(0)
        model = prepare(ModernDecoderLM(ModelConfig(**SMOLLM2, n_layer=args.layers)), quantize).eval()
        compiled = compiled_decoder(model) if args.compile else None
        for rows in (1, 4, 16):
            fused, by_op = step_ms(model, rows, True, args.steps), step_ms(model, rows, False, args.steps)
            slow = f"{step_ms(model, rows, False, args.steps, compiled):.2f}" if compiled is not None else "-"
            print(f"| {'float32' if quantize == 'none' else quantize} | {rows} | {fused:.2f} | {by_op:.2f} | {slow} |")


if __name__ == "__main__":
    main()

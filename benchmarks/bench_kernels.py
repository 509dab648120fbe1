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
before (`torch.compile(model, dynamic=True)`; ~1 min more). Each is the median of `--steps` steps. Then
`paged_attention` alone: 30 layers of SmolLM2's heads (9 query, 3 kv, 64 wide) for 1 and 16 rows
over 300 keys each, with a float32 and a float16 cache.

`--against REV` times another version of the kernels beside this one: decode.cpp as commit REV has
it is built apart, and this script runs `--passes` times with each build in turn, each run in a
process of its own (the VM's speed drifts between minutes, so the two alternate); it prints each
figure's median for both builds and their ratio. REV's ops are called as this checkout calls them:
a REV whose ops take other arguments cannot be timed this way.

    python benchmarks/bench_kernels.py [--threads N] [--compile]
    python benchmarks/bench_kernels.py --against 4b2516f --passes 3
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modernlm import kernels
from modernlm.model import ModelConfig, ModernDecoderLM, PagedCache
from modernlm.quant import pack_q8, prepare, quantize_q4, quantize_q8
from modernlm.runtime import compile_model

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
    p.add_argument("--against", default="", help="a commit: time its decode.cpp beside this one's")
    p.add_argument("--passes", type=int, default=3, help="--against: runs per build, in turn")
    p.add_argument("--library", default="", help="use this build of the kernels (a .so) instead of building")
    p.add_argument("--json", default="", help="write every figure (ms) here")
    args = p.parse_args()
    if args.against:
        return against(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.library:  # loaded first, so `kernels.available()` finds the ops registered
        torch.ops.load_library(args.library)
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

    figures: dict[str, float] = {}  # what --json writes: a name -> ms
    print("| rows | matmul | ms per pass | GB/s of weights | GMAC/s |")
    print("|---:|---|---:|---:|---:|")
    for m in (1, 4, 8, 16, 64):
        xs = {k: torch.randn(m, k) for _, k in LAYER_SHAPES}
        with torch.inference_mode():
            for name, (fn, bytes_per_weight) in passes(xs, weights, q8, q4).items():
                t = best(fn, args.rounds)
                figures[f"{name}, {m} rows, every layer's linears"] = t * 1e3
                print(f"| {m} | {name} | {t * 1e3:.1f} | {n_weights * bytes_per_weight / t / 1e9:.1f} | "
                      f"{m * n_weights / t / 1e9:.0f} |")  # fmt: skip
    decode_steps(args, figures)
    attention(args, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


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


def decode_steps(args, figures: dict[str, float]) -> None:
    print("\n| weights | rows | fused step ms | op by op ms | compiled ms |\n|---|---:|---:|---:|---:|")
    for quantize in ("none", "int8"):
        torch.manual_seed(0)
        model = prepare(ModernDecoderLM(ModelConfig(**SMOLLM2, n_layer=args.layers)), quantize).eval()
        compiled = compile_model(model, dynamic=True) if args.compile else None
        weights = "float32" if quantize == "none" else quantize
        for rows in (1, 4, 16):
            fused, by_op = step_ms(model, rows, True, args.steps), step_ms(model, rows, False, args.steps)
            figures[f"fused decode step, {weights}, {rows} rows"] = fused
            slow = f"{step_ms(model, rows, False, args.steps, compiled):.2f}" if compiled is not None else "-"
            print(f"| {weights} | {rows} | {fused:.2f} | {by_op:.2f} | {slow} |")


def attention(args, figures: dict[str, float], keys: int = 300, block: int = 16) -> None:
    """`paged_attention` alone over `args.layers` layers' pools: each row's keys in blocks of its own."""
    cfg = ModelConfig(**SMOLLM2, n_layer=1)
    heads, kv_heads, dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    width = -(-keys // block)
    print(f"\n| cache | rows | paged_attention ms ({args.layers} layers, {keys} keys a row) |\n|---|---:|---:|")
    for dtype in (torch.float32, torch.float16):
        for rows in (1, 16):
            shape = (rows * width, kv_heads, block, dim)
            pools = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(args.layers)]
            table = torch.arange(rows * width).view(rows, width)
            lengths, q = torch.full((rows,), keys), torch.randn(rows, heads, dim)

            def layers(q=q, pools=pools, table=table, lengths=lengths) -> list:
                return [kernels.paged_attention(q, k, v, table, lengths, dim**-0.5) for k, v in pools]

            t = best(layers, args.rounds)
            name = str(dtype).removeprefix("torch.")
            figures[f"paged_attention, {name} cache, {rows} rows x {keys} keys, {args.layers} layers"] = t * 1e3
            print(f"| {name} | {rows} | {t * 1e3:.2f} |")


def refuse(why: str) -> None:
    print(f"bench_kernels: {why}", file=sys.stderr)
    sys.exit(2)


def against(args) -> None:
    """Time commit `args.against`'s decode.cpp beside this checkout's: each build `args.passes`
    times, in turn, each run a process of this script; print each figure's medians and ratio."""
    root = Path(__file__).resolve().parents[1]
    where = Path(tempfile.mkdtemp(prefix="bench_kernels-"))
    source = where / "decode.cpp"
    shown = subprocess.run(["git", "-C", str(root), "show", f"{args.against}:src/modernlm/kernels/decode.cpp"],
                           capture_output=True)  # fmt: skip
    if shown.returncode != 0:
        refuse(f"--against {args.against}: {shown.stderr.decode().strip()}")
    source.write_bytes(shown.stdout)
    try:
        built = subprocess.run(kernels.compile_command(where / "old.so", source=source), capture_output=True, text=True)
        if built.returncode != 0:
            errors = [line for line in built.stderr.splitlines() if "error" in line] or built.stderr.splitlines()
            refuse(f"--against {args.against}: its decode.cpp did not build here: {errors[0] if errors else ''}")
        if not kernels.available():
            refuse(f"the kernels are not available here ({kernels.why_not()})")
        compare({args.against: where / "old.so", "this checkout": kernels.library()}, where, args)
    finally:
        shutil.rmtree(where)


def compare(builds: dict[str, Path], where: Path, args) -> None:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    passthrough = ["--threads", str(args.threads), "--rounds", str(args.rounds), "--layers", str(args.layers),
                   "--steps", str(args.steps)]  # fmt: skip
    for i in range(args.passes):
        for name, library in builds.items():
            out = where / f"{len(runs[name])}-{name.replace(' ', '_')}.json"
            print(f"pass {i + 1} of {args.passes}: {name}", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, *passthrough, "--library", str(library), "--json", str(out)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            runs[name].append(json.loads(out.read_text()))
    old, new = builds
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}; "
          f"medians of {args.passes} runs per build, in turn\n")  # fmt: skip
    print(f"| figure | {old} ms | {new} ms | {new} / {old} |\n|---|---:|---:|---:|")
    for figure in runs[new][0]:
        a = statistics.median(r[figure] for r in runs[old])
        b = statistics.median(r[figure] for r in runs[new])
        print(f"| {figure} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()

"""Training memory past DDP: peak RSS per rank and tokens/s for DDP, FSDP and FSDP + activation
checkpointing, 2 CPU ranks under torchrun (gloo), a ~21M-parameter model.

    python benchmarks/bench_memory.py [--steps 6] [--shapes 1x64,8x256] [--modes ddp,fsdp,fsdp+ac]

Every mode runs the real command, `torchrun --nproc_per_node 2 -m modernlm pretrain ...`, on the
same random-token shards and the same global batch (2 ranks x BATCH sequences of SEQ tokens, for
each --shapes BATCHxSEQ: 1x64, where the weights and optimizer state are nearly all the memory,
and 8x256, where activations count); only train.parallel and train.activation_checkpointing
change. The peer is torch's own DDP: modernlm's default, torchtitan's `data_parallel_replicate`,
litgpt's `strategy=ddp`.

Each rank records its resident set size (RSS) after importing torch and modernlm (`base`: the
libraries, the same in every mode), its peak RSS while training (when the last step is done,
before the final validation and checkpoints: saving is measured apart, in the peak at exit, as
FSDP gathers the whole model to rank 0 for model.safetensors), and its peak at exit.
`bytes/param` = (training peak - base) / parameters: everything training added, weights +
gradients + AdamW's two moments (16 bytes a parameter in fp32 when nothing is sharded) + the
activations of one micro-batch + the communication buffers and optimizer temporaries. The
`weights + AdamW state` column counts the tensors themselves on each rank after the last step
(12 bytes a parameter unsharded; the gradients, 4 more, exist from the backward to the step). tok/s is
the trainer's own (the last logging interval: the first step, the warm-up, is left out); the loss
of the last step shows that the modes train the same model.

RSS counts memory glibc's allocator holds, live or not. By default glibc raises its mmap threshold
after the first large free, so later blocks up to 32 MiB come from the heap and stay in RSS once
freed: FSDP's gather / free of each block's weights at every forward and backward then shows up as
RSS that no tensor uses. The ranks run with MALLOC_MMAP_THRESHOLD_=131072 (blocks of 128 KiB and
more are mmapped and returned when freed), so RSS follows the live tensors; --glibc-default
measures what a user gets without it. The ranks run one thread each (OMP_NUM_THREADS=1), on this
2-core VM one core each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB, D_MODEL, LAYERS, HEADS, D_FF = 8192, 512, 5, 8, 1536  # 21.3M parameters (tied embeddings)
MODES = {
    "ddp": ["train.parallel=ddp"],
    "fsdp": ["train.parallel=fsdp"],
    "fsdp+ac": ["train.parallel=fsdp", "train.activation_checkpointing=full"],
    "ddp+ac": ["train.parallel=ddp", "train.activation_checkpointing=full"],
}


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; the peak where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def state_bytes(model, optimizer) -> int:
    """The bytes of this rank's weights and optimizer state (its shards under FSDP), between steps:
    the gradients (4 bytes a parameter, 4 / ranks under FSDP) live from the backward to the step."""
    import torch

    from modernlm.train.fsdp import local

    tensors = [local(p) for p in model.parameters()]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if t.numel() > 1)  # not the step counters


def worker(report_dir: Path, argv: list[str]) -> None:
    """One rank: `modernlm` with `argv`, recording its RSS into report_dir/rank<R>.json."""
    import atexit

    import torch  # noqa: F401  (the libraries are in the base)

    from modernlm.cli import main
    from modernlm.train.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "base": rss_bytes(), "train_peak": 0}
    validate = Trainer._validate

    def note_peak_then_validate(self, *args, **kwargs):
        if kwargs.get("final"):  # after the last step: the final eval, then the best and last checkpoints
            record["train_peak"] = peak_rss_bytes()
            record["state"] = state_bytes(self.model, self.optimizer)
        return validate(self, *args, **kwargs)

    Trainer._validate = note_peak_then_validate

    def write() -> None:
        record["exit_peak"] = peak_rss_bytes()
        record["train_peak"] = record["train_peak"] or record["exit_peak"]
        (report_dir / f"rank{rank}.json").write_text(json.dumps(record))

    atexit.register(write)
    main(argv)


def make_shards(path: Path, tokens: int) -> Path:
    import numpy as np

    from modernlm.data.corpus import write_shards

    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, VOCAB, tokens), "val": rng.integers(0, VOCAB, 16 * 1024)}
    return write_shards(path, splits, vocab_size=VOCAB)


def run_mode(name: str, batch: int, seq: int, shards: Path, work: Path, args: argparse.Namespace) -> dict:
    out, reports = work / f"{name}-{batch}x{seq}", work / f"{name}-{batch}x{seq}-rss"
    reports.mkdir(parents=True)
    argv = [
        "pretrain", f"data.path={shards}", f"data.seq_len={seq}", f"run.out_dir={out}", "run.device=cpu",
        "run.tensorboard=false", f"model.vocab_size={VOCAB}", f"model.d_model={D_MODEL}",
        f"model.n_layer={LAYERS}", f"model.n_head={HEADS}", f"model.d_ff={D_FF}", f"model.max_seq_len={seq}",
        f"train.batch_size={batch}", f"train.num_steps={args.steps}", f"train.log_every={args.steps - 1}",
        "train.eval_every=0", "train.save_every=0", "train.progress=false", "optim.warmup_steps=2",
        *MODES[name],
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, "--worker", str(reports), "--", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "tok_per_s" in m][-1]  # steps 2..N: the first step (warm-up) excluded
    return {"mode": name, "batch": batch, "seq": seq, "ranks": ranks, "tok_per_s": last["tok_per_s"],
            "loss": last["loss"], "wall_s": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--shapes", default="1x64,8x256", help="batches per rank: sequences x tokens, comma-separated")
    p.add_argument("--modes", default="ddp,fsdp,fsdp+ac", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument(
        "--glibc-default",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS then also holds freed heap blocks)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        sys.exit(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    try:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
        assert all(len(shape) == 2 and min(shape) > 0 for shape in shapes)
    except (ValueError, AssertionError):
        sys.exit(f"--shapes: expected BATCHxSEQ[,BATCHxSEQ...], e.g. 8x256; got {args.shapes!r}")
    if args.steps < 2:
        sys.exit("--steps: at least 2 (the first step is the warm-up)")

    import torch

    from modernlm.model import ModelConfig, ModernDecoderLM

    config = ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layer=LAYERS, n_head=HEADS, d_ff=D_FF)
    with torch.device("meta"):
        n_params = ModernDecoderLM(config).num_params()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens = max(2 * b * t for b, t in shapes) * (args.steps + 2)
        shards = make_shards(work / "shards", tokens)
        for batch, seq in shapes:
            for name in modes:
                print(f"running {name} at {batch}x{seq} ...", file=sys.stderr, flush=True)
                results.append(run_mode(name, batch, seq, shards, work, args))

    mib = 2**20
    glibc = "glibc's default mmap threshold" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=131072"
    print(f"\n{n_params / 1e6:.1f}M parameters, 2 ranks, {args.steps} steps, AdamW fp32, torch {torch.__version__}, "
          f"OMP_NUM_THREADS=1 per rank, {glibc}\n")  # fmt: skip
    print("| batch per rank | mode | base RSS MiB (r0 / r1) | training peak RSS MiB (r0 / r1) | peak at exit MiB "
          "(r0 / r1) | bytes/param (max rank) | vs ddp | weights + AdamW state, bytes/param | tok/s | vs ddp "
          "| last loss |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def per_param(r: dict) -> float:
        return max(x["train_peak"] - x["base"] for x in r["ranks"]) / n_params

    for r in results:
        ref = next(x for x in results if (x["batch"], x["seq"]) == (r["batch"], r["seq"]))  # the first mode
        base, peak, exit_peak = ([x[k] / mib for x in r["ranks"]] for k in ("base", "train_peak", "exit_peak"))
        print(f"| {r['batch']} x {r['seq']} | {r['mode']} | {base[0]:.0f} / {base[1]:.0f} | "
              f"{peak[0]:.0f} / {peak[1]:.0f} | "
              f"{exit_peak[0]:.0f} / {exit_peak[1]:.0f} | {per_param(r):.1f} | {per_param(r) / per_param(ref):.2f}x | "
              f"{max(x.get('state', 0) for x in r['ranks']) / n_params:.1f} | "
              f"{r['tok_per_s']:.0f} | {r['tok_per_s'] / ref['tok_per_s']:.2f}x | {r['loss']:.4f} |")  # fmt: skip
    print(
        "\nUnsharded AdamW training holds 16 bytes a parameter in fp32 state (weights 4, gradients 4, "
        "two moments 8);\nFSDP over 2 ranks holds 8 of them per rank, plus one gathered block at a time."
    )
    if args.json:
        args.json.write_text(json.dumps({"n_params": n_params, "args": vars(args) | {"json": str(args.json)},
                                         "torch": torch.__version__, "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

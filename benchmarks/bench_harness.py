"""lm-evaluation-harness on the same weights: modernlm's harness model vs the harness's own `HFLM`.

SmolLM2-135M-Instruct (the .gguf): ours converted to a ModernDecoderLM as it loads, HFLM around
transformers' LlamaForCausalLM of the same file, both float32 on the CPU, the same batch size.
Runs the offline SST-2 task (GLUE's prompt, 0-shot, all 872 validation sentences unless --limit)
through `lm_eval.simple_evaluate` with each and prints seconds, accuracy, and how far apart the
per-request log-likelihoods are. Target: ours at >= 1.0x HFLM's speed.

    python benchmarks/bench_harness.py [--limit N] [--batch-size 8] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smol_gguf() -> Path:
    from modernlm.commands.eval_table import default_baseline

    return Path(default_baseline())


def run(model, manager, limit: int | None) -> tuple[float, dict]:
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    out = simple_evaluate(model=model, tasks=["sst2_local"], num_fewshot=0, limit=limit, task_manager=manager,
                          log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    seconds = time.perf_counter() - t0
    # the per-request answers, copied now: a later run may reuse the same request objects
    out["answers"] = [[(float(r[0][0]), bool(r[0][1])) for r in s["resps"]] for s in out["samples"]["sst2_local"]]
    return seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N sentences (default: all 872)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = ap.parse_args()

    import transformers
    from lm_eval.models.huggingface import HFLM

    from modernlm import load
    from modernlm.eval.tasks.lm import ModernLMEval
    from modernlm.eval.tasks.run import prepare_tasks

    gguf = smol_gguf()
    manager = prepare_tasks(["sst2_local"], args.data_dir)
    ours = ModernLMEval(load(gguf, backend="modernlm", progress=False), batch_size=args.batch_size)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = HFLM(pretrained=hf_model.eval(), tokenizer=hf_tok, batch_size=args.batch_size)

    rows = {}
    for name, model in (("HFLM (transformers)", ref), ("modernlm", ours)):
        rows[name] = run(model, manager, args.limit)
    a, b = (out["answers"] for _, out in rows.values())
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    diffs = [abs(x[0] - y[0]) for x, y in pairs]
    greedy_same = all(x[1] == y[1] for x, y in pairs)

    n = len(a)
    print(f"SmolLM2-135M-Instruct ({gguf.name}), sst2_local 0-shot, {n} sentences, batch size {args.batch_size}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | seconds | sentences/s | accuracy |")
    print("|---|---:|---:|---:|")
    for name, (secs, out) in rows.items():
        print(f"| {name} | {secs:.1f} | {n / secs:.1f} | {out['results']['sst2_local']['acc,none']:.4f} |")
    (t_ref, _), (t_ours, _) = rows.values()
    verdict = "PASS" if t_ref >= t_ours else "FAIL"
    print(f"\nmodernlm speed / HFLM speed = {t_ref / t_ours:.2f}x (target >= 1.0x: {verdict})")
    print(f"per-request log-likelihoods: max |ours - HFLM| = {max(diffs):.2e} over {len(diffs)} requests; "
          f"greedy flags {'all equal' if greedy_same else 'DIFFER'}")


if __name__ == "__main__":
    main()

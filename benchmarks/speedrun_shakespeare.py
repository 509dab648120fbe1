"""CPU speedrun: TinyShakespeare at character level, our recipe against nanoGPT's, in one run.

    python benchmarks/speedrun_shakespeare.py            # ours, then the peer (about 6 minutes)
    python benchmarks/speedrun_shakespeare.py --no-peer  # ours only

Ours: `modernlm pretrain -c configs/pretrain/shakespeare-cpu.yaml` (the byte tokenizer, a
wall-clock budget), timed end to end as a user runs it: process start-up, training, and the final
validation over the whole split are all inside the wall time. Data preparation (once, ~2 s, like
nanoGPT's prepare.py) is timed separately.

The peer: nanoGPT's README recipe for a CPU (`python train.py config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`): the GPT-2
architecture (transformers' GPT2LMHeadModel: learned positions, LayerNorm, GELU, biases) with
nanoGPT's hyperparameters (AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1, 100 warmup steps,
cosine to 1e-4 at step 2000, clipping 1.0), run by our Trainer on the same data, evaluating 20
batches every 250 steps as nanoGPT does (and the whole split at the end, as ours does).

Both are scored the same way on the full validation split (the last 10% of the text, 111,540
characters): every character once (but the first), in consecutive windows of the model's trained
context (modernlm.perplexity.sliding_window_nll with context = L + 1 and stride = L: each window
predicts L characters from the ones before them in the window). On ASCII text a byte
is a character, so these are nats per character, comparable with nanoGPT's reported losses.
Writes OUT/speedrun.json and OUT/speedrun.png (validation loss against wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TARGET_LOSS, TARGET_SECONDS = 1.70, 150.0


def prepare(data_dir: Path) -> float:
    """Byte-tokenize TinyShakespeare with nanoGPT's 90/10 split, once; returns the seconds taken."""
    if (data_dir / "meta.json").is_file():
        return 0.0
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "modernlm", "prepare", "tokenizer=byte", f"out={data_dir}",
            "val_fraction=0.1", "val_split=tail", "progress=false",
            f"corpus.sources=[{{path: {DATA_TEXT}, documents: file}}]",
        ],
        check=True, cwd=REPO,
    )  # fmt: skip
    return time.perf_counter() - start


def run_ours(config: str, out: Path, data_dir: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable, "-m", "modernlm", "pretrain", "-c", config, f"run.out_dir={out}", "run.name=ours",
        f"data.path={data_dir}", "train.resume=never", "train.progress=false", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "run_dir": out / "ours"}


def run_peer(out: Path, data_dir: Path, seed: int = 1337) -> dict:
    """nanoGPT's CPU recipe (see the module docstring) through our Trainer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modernlm.data.shards import TokenStream, TrainWindows, ValBatches
    from modernlm.runtime import Runtime
    from modernlm.train.optim import OptimConfig
    from modernlm.train.trainer import Trainer, TrainingConfig

    start = time.perf_counter()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=260, n_positions=64, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)

    def loss_fn(m, batch):
        x, y = batch
        logits = m(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        return loss, y.numel(), {}

    train = TrainWindows(TokenStream(data_dir, "train"), 64, 12, seed=seed)
    val = ValBatches(TokenStream(data_dir, "val"), 64, 12, 20)
    trainer = Trainer(
        model, loss_fn, train,
        TrainingConfig(
            num_steps=2000, batch_size=12, log_every=50, eval_every=250, eval_batches=20, save_every=0,
            save_best=False, progress=False, resume="never",
        ),
        OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, betas=(0.9, 0.99)),
        Runtime(device=torch.device("cpu"), dtype=torch.float32, tensorboard=False),
        out / "nanogpt",
        val_batches=val,
        final_val_batches=ValBatches(TokenStream(data_dir, "val"), 64, 12, 0),  # the whole split, as ours
        save_model_fn=lambda m, path, tokenizer: m.save_pretrained(path),  # an HF model
    )  # fmt: skip
    trainer.train()
    return {"wall_s": time.perf_counter() - start, "run_dir": out / "nanogpt", "model": model}


def full_val_loss(logits_fn, data_dir: Path, seq_len: int) -> tuple[float, int]:
    """Mean NLL over the whole val split: windows of seq_len + 1 tokens every seq_len tokens, so
    each window predicts seq_len tokens and every token but the first is scored exactly once."""
    from modernlm.data.shards import TokenStream
    from modernlm.perplexity import sliding_window_nll

    val = TokenStream(data_dir, "val")
    ids = val.read(0, len(val)).astype("int64")
    result = sliding_window_nll(logits_fn, ids, seq_len + 1, seq_len, batch_size=16)
    return result.loss, result.tokens


def val_curve(run_dir: Path) -> list[tuple[float, float]]:
    from modernlm.train.tracking import read_metrics

    return [(r["time_s"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r and "time_s" in r]


def plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        if not points:
            continue
        # The trainer's periodic evaluations score a sample (the first batches of val); the last
        # one scores the whole split: draw it apart, as it is the number the target is about.
        (line,) = ax.plot(*zip(*points[:-1], strict=True), marker="o", markersize=4, label=f"{label} (val sample)")
        ax.plot(
            *points[-1], marker="*", markersize=14, color=line.get_color(), linestyle="", label=f"{label} (whole val)"
        )
    ax.axhline(TARGET_LOSS, color="gray", linestyle="--", linewidth=1, label=f"target {TARGET_LOSS}")
    ax.axvline(TARGET_SECONDS, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("wall time of the training loop (s)")
    ax.set_ylabel("validation loss (nats / character)")
    ax.set_ylim(1.3, 3.0)
    ax.set_title("TinyShakespeare, character level, 2-core CPU")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain/shakespeare-cpu.yaml")
    parser.add_argument("--out", default="runs/speedrun", help="output directory (under the repo)")
    parser.add_argument("--data", default="data/shakespeare-byte", help="prepared data directory")
    parser.add_argument("--no-peer", action="store_true", help="skip nanoGPT's recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for our recipe")
    args = parser.parse_args()
    out, data_dir = REPO / args.out, REPO / args.data
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from modernlm.checkpoint import latest_checkpoint, load_model
    from modernlm.tokenizer import load_tokenizer

    prep_s = prepare(data_dir)
    ours = run_ours(args.config, out, data_dir, args.overrides)
    summary = json.loads((ours["run_dir"] / "summary.json").read_text())
    final = latest_checkpoint(ours["run_dir"])
    model = load_model(final)
    context = model.config.max_seq_len
    with torch.no_grad():
        loss, scored = full_val_loss(lambda x: model(x).logits, data_dir, context)
    rows = [
        {
            "recipe": "modernlm shakespeare-cpu",
            "params": model.num_params(),
            "context": context,
            "tokens_seen": summary["tokens_seen"],
            "steps": summary["steps"],
            "wall_s": ours["wall_s"],
            "trainer_val_loss": summary["final_val_loss"],
            "full_val_loss": loss,
            "scored": scored,
        }
    ]
    curves = {"modernlm shakespeare-cpu": val_curve(ours["run_dir"])}

    if not args.no_peer:
        peer = run_peer(out, data_dir)
        peer_model = peer["model"].eval()
        with torch.no_grad():
            p_loss, p_scored = full_val_loss(lambda x: peer_model(input_ids=x).logits, data_dir, 64)
        p_summary = json.loads((peer["run_dir"] / "summary.json").read_text())
        rows.append(
            {
                "recipe": "nanoGPT CPU recipe (GPT-2 arch)",
                "params": sum(p.numel() for p in peer_model.parameters()),
                "context": 64,
                "tokens_seen": p_summary["tokens_seen"],
                "steps": p_summary["steps"],
                "wall_s": peer["wall_s"],
                "trainer_val_loss": p_summary["final_val_loss"],
                "full_val_loss": p_loss,
                "scored": p_scored,
            }
        )
        curves["nanoGPT CPU recipe"] = val_curve(peer["run_dir"])

    tokenizer = load_tokenizer(final)
    from modernlm.generation import generate_text

    sample = generate_text(model, tokenizer, "ROMEO:", max_new_tokens=200, temperature=0.8, seed=0)

    print(f"\ndata preparation: {prep_s:.1f} s (once; not in the wall times)")
    print(f"{'recipe':<34} {'params':>8} {'ctx':>4} {'tokens':>10} {'steps':>6} {'wall s':>7} {'val loss':>9}")
    for r in rows:
        print(
            f"{r['recipe']:<34} {r['params'] / 1e6:>7.2f}M {r['context']:>4} {r['tokens_seen']:>10,} "
            f"{r['steps']:>6} {r['wall_s']:>7.1f} {r['full_val_loss']:>9.4f}"
        )
    ok = rows[0]["wall_s"] <= TARGET_SECONDS and rows[0]["full_val_loss"] <= TARGET_LOSS
    verdict = "meets" if ok else "MISSES"
    print(f"target: val loss <= {TARGET_LOSS} within {TARGET_SECONDS:.0f} s wall -> ours {verdict} it")
    print(f"\nsample (temperature 0.8):\nROMEO:{sample}\n")
    (out / "speedrun.json").write_text(
        json.dumps({"rows": rows, "prepare_s": prep_s, "sample": sample, "meets_target": ok}, indent=2, default=str)
    )
    plot(curves, out / "speedrun.png")
    print(f"-> {out / 'speedrun.json'}, {out / 'speedrun.png'}")
    if not math.isfinite(rows[0]["full_val_loss"]):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Convert an HF Llama (model dir, hub id or .gguf file) to a modernlm checkpoint, or back.

    modernlm convert SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2   # or an HF dir / hub id
    modernlm convert runs/smollm2 hf/smollm2 --to hf                # dir for AutoModelForCausalLM

Weights map one to one; logits match transformers. MoE/sink models cannot go to HF. Needs [hf].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modernlm.errors import UserError

POSITIONALS = ["src", "dst"]
FLAGS = {"--to": "to"}
OUTPUTS = {"dst": "dir"}


@dataclass
class Config:
    src: str = ""  # to=modernlm: HF model dir, hub id or .gguf file; to=hf: modernlm checkpoint dir
    dst: str = ""  # output directory (must be empty or absent unless overwrite)
    to: Literal["modernlm", "hf"] = "modernlm"  # direction
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the written weights
    overwrite: bool = False  # allow writing into a non-empty dst


def main(cfg: Config) -> None:
    from modernlm.checkpoint import is_modernlm_checkpoint

    if not cfg.src or not cfg.dst:
        raise UserError("usage: modernlm convert SRC DST [--to hf]  (SRC and DST are required)")
    dst = Path(cfg.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not cfg.overwrite:
        raise UserError(f"{dst} exists and is not empty (pass overwrite=true to write into it)")
    if Path(cfg.src).expanduser().resolve() == dst.expanduser().resolve():
        raise UserError("src and dst must differ")
    if cfg.to == "modernlm" and is_modernlm_checkpoint(cfg.src):
        raise UserError(
            f"{cfg.src} is already a modernlm checkpoint; to convert it to Hugging Face format, "
            f"add --to hf (modernlm convert {cfg.src} {cfg.dst} --to hf)"
        )

    from modernlm.api import load

    if cfg.to == "hf":
        import torch

        from modernlm.checkpoint import load_model_config, resolve_source
        from modernlm.hf.convert import model_config_to_llama_config, save_hf

        src = resolve_source(cfg.src, "src")
        if src.kind != "modernlm":
            if src.path is not None and src.path.is_dir():
                load_model_config(src.path)  # a foreign or broken config.json: says which, naming the file
            raise UserError(
                f"src: {cfg.src} is a Hugging Face model, not a modernlm checkpoint; to convert it to one, "
                f"drop --to hf (modernlm convert {cfg.src} {cfg.dst})"
            )
        # a modernlm checkpoint: UserErrors name the broken file; no transformers needed yet
        lm = load(cfg.src, what="src")
        model, tokenizer = lm.model, lm.tokenizer
        model_config_to_llama_config(model.config)  # MoE / sink -> UserError before writing anything
        save_hf(model, tokenizer, dst, dtype=getattr(torch, cfg.dtype))
        what = "HF LlamaForCausalLM" + (" + tokenizer" if tokenizer else "")
    else:
        from modernlm.checkpoint import save_model

        lm = load(cfg.src, dtype=cfg.dtype, backend="modernlm", what="src")
        model, tokenizer = lm.model, lm.tokenizer
        save_model(model, dst, tokenizer)
        what = "modernlm checkpoint" + (" + tokenizer" if tokenizer else "")

    c = model.config
    heads = f"{c.n_head}/{c.n_kv_head} heads" if c.n_kv_head != c.n_head else f"{c.n_head} heads"
    print(
        f"converted {cfg.src} -> {dst} ({what}, {cfg.dtype}): "
        f"{model.num_params() / 1e6:.1f}M params, "
        f"{c.n_layer} layers, d_model {c.d_model}, {heads}, vocab {c.vocab_size}"
    )

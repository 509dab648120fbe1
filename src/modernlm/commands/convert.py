"""Convert an HF Llama (model dir, hub id or .gguf file) to a modernlm checkpoint, or back.

    modernlm convert SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2   # or an HF dir / hub id
    modernlm convert runs/smollm2 hf/smollm2 --to hf                # dir for AutoModelForCausalLM
    modernlm convert runs/sft sft.gguf --to gguf --type q8_0         # llama.cpp, Ollama, LM Studio

Weights map one to one; logits match transformers. MoE/sink models cannot go to HF or GGUF.
`--to gguf` also writes an Ollama Modelfile beside the file (sft.Modelfile). Needs [hf].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modernlm.errors import UserError

POSITIONALS = ["src", "dst"]
FLAGS = {"--to": "to", "--type": "type"}


@dataclass
class Config:
    src: str = ""  # to=modernlm: HF model dir, hub id or .gguf file; to=hf: modernlm checkpoint dir
    dst: str = ""  # output directory (must be empty or absent unless overwrite)
    to: Literal["modernlm", "hf", "gguf"] = "modernlm"  # direction; gguf: DST is the .gguf file
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the written weights (modernlm, hf)
    type: Literal["f32", "f16", "q8_0"] = "f32"  # to=gguf: the matrices' type (norms stay f32)
    overwrite: bool = False  # allow writing into a non-empty dst


def derived_outputs(cfg: Config) -> list[tuple[str, Path, str]]:
    """DST is a directory, or with --to gguf a file (checked writable before the model loads)."""
    if not cfg.dst:
        return []
    return [("dst", Path(cfg.dst), "file" if cfg.to == "gguf" else "dir")]


def main(cfg: Config) -> None:
    from modernlm.checkpoint import is_modernlm_checkpoint

    if not cfg.src or not cfg.dst:
        raise UserError("usage: modernlm convert SRC DST [--to hf|gguf]  (SRC and DST are required)")
    dst = Path(cfg.dst)
    if cfg.to == "gguf":
        return to_gguf(cfg, dst)
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


def to_gguf(cfg: Config, dst: Path) -> None:
    """A modernlm checkpoint (or anything `load` reads) -> DST.gguf + DST.Modelfile."""
    from modernlm.api import load
    from modernlm.checkpoint import load_model_config, resolve_source
    from modernlm.files import atomic_write
    from modernlm.hf.gguf_export import check_exportable, modelfile, write_gguf

    if dst.suffix != ".gguf":
        raise UserError(f"dst: {dst} should end in .gguf (llama.cpp and Ollama look for the suffix)")
    if dst.exists() and not cfg.overwrite:
        raise UserError(f"{dst} exists (pass overwrite=true to replace it)")
    src = resolve_source(cfg.src, "src")
    if src.kind == "modernlm" and src.path is not None:
        from modernlm.tokenizer import has_tokenizer, load_tokenizer

        # a model or tokenizer llama.cpp cannot run: one line before the weights load
        tok = load_tokenizer(src.path) if has_tokenizer(src.path) else None
        check_exportable(load_model_config(src.path), tok, cfg.src)
    lm = load(cfg.src, backend="modernlm", quantize="none", what="src")  # float weights: --type chooses
    write_gguf(lm.model, lm.tokenizer, dst, cfg.type)
    side = dst.with_suffix(".Modelfile")
    atomic_write(side, modelfile(lm.tokenizer, dst.name, lm.model.config.max_seq_len))
    c = lm.model.config
    print(
        f"converted {cfg.src} -> {dst} (GGUF {cfg.type}, llama architecture, {c.n_layer} layers, "
        f"vocab {lm.tokenizer.vocab_size}; {dst.stat().st_size / 2**20:.1f} MiB) and {side.name} for Ollama\n"
        f"  llama-server -m {dst} --jinja    |    ollama create NAME -f {side}"
    )

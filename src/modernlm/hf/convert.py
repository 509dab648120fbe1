"""Hugging Face interop: exact conversion between ModernDecoderLM and transformers' Llama.

A dense ModernDecoderLM *is* a Llama (same pre-norm block, RMSNorm, SwiGLU, GQA, and RoPE in HF's
"rotate half" layout), so the weights map with no permutation: our fused projections are HF's
stacked by rows (wqkv = [q; k; v], w_gate_up = [gate; up]). GGUF files come in through transformers'
GGUF loader, in the same layout. What has no Llama equivalent (MoE, the sink token; rope scaling,
biases, other activations on the HF side) is a `UserError`.

`load_transformers` is the one call of `from_pretrained`, `load_hf_tokenizer` the one of
AutoTokenizer. `transformers` is imported only inside the functions that need it (`modernlm[hf]`).

Design notes (the weight-name table): docs/design.md#hfconvertpy
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modernlm.checkpoint import build_model
from modernlm.errors import UserError
from modernlm.files import atomic_files
from modernlm.model import ModelConfig
from modernlm.runtime import DTYPES
from modernlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

    from modernlm.checkpoint import Source
    from modernlm.model import ModelConfig, ModernDecoderLM
    from modernlm.tokenizer import Tokenizer


# (our name, HF name) with {i} for the layer index; a per-layer pattern serves both directions.
_LAYER_NAMES = [
    ("attn.wq", "self_attn.q_proj"),
    ("attn.wk", "self_attn.k_proj"),
    ("attn.wv", "self_attn.v_proj"),
    ("attn.wo", "self_attn.o_proj"),
    ("ffn.w_gate", "mlp.gate_proj"),
    ("ffn.w_up", "mlp.up_proj"),
    ("ffn.w_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
]
_TOP_NAMES = [("tok_emb", "model.embed_tokens"), ("norm", "model.norm"), ("lm_head", "lm_head")]
_OURS_TO_HF = {ours: hf for ours, hf in _TOP_NAMES} | {
    f"layers.{{i}}.{o}": f"model.layers.{{i}}.{h}" for o, h in _LAYER_NAMES
}
_HF_TO_OURS = {hf: ours for ours, hf in _OURS_TO_HF.items()}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _rope_theta(hf_config: Any) -> float:
    """RoPE base of an HF config; only the default (unscaled) RoPE is supported.

    transformers 5.x keeps it in `rope_parameters` {"rope_type", "rope_theta"}; 4.x has a
    `rope_theta` attribute and `rope_scaling` (None, or {"type"/"rope_type": ...}).
    """
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UserError(
            f"rope scaling {rope_type!r} is not supported (modernlm implements plain RoPE); "
            "models such as Llama 3.1+ with 'llama3' scaling cannot be converted"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def llama_config_to_model_config(hf_config: Any) -> ModelConfig:
    """An HF LlamaConfig -> the ModelConfig that computes the same function."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "llama":
        archs = ", ".join(getattr(hf_config, "architectures", None) or []) or "?"
        raise UserError(f"only Llama-architecture models can be converted; this one is {model_type!r} ({archs})")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise UserError("attention_bias / mlp_bias are not supported: modernlm's linear layers have no bias")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"hidden_act {act!r} is not supported: modernlm's FFN is SwiGLU (silu)")
    n_head = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_head
    try:
        return ModelConfig(
            vocab_size=hf_config.vocab_size,
            d_model=hf_config.hidden_size,
            n_layer=hf_config.num_hidden_layers,
            n_head=n_head,
            n_kv_head=getattr(hf_config, "num_key_value_heads", None) or n_head,
            head_dim=head_dim,
            d_ff=hf_config.intermediate_size,
            # The context the model was trained for; our RoPE tables grow on demand past it.
            max_seq_len=hf_config.max_position_embeddings,
            rope_theta=_rope_theta(hf_config),
            norm_eps=hf_config.rms_norm_eps,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attn_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
            init_std=getattr(hf_config, "initializer_range", 0.02),
        )
    except ValueError as e:
        raise UserError(f"HF config cannot be mapped: {e}") from None


def check_llama(cfg: ModelConfig, to: str) -> None:
    """UserError when `cfg` has what a Llama has not (`to` names the target: "HF", "GGUF")."""
    if cfg.n_expert:
        raise UserError(f"MoE models (n_expert > 0) have no Llama equivalent: cannot convert to {to}")
    if cfg.attn_sink:
        raise UserError(
            f"models with a learned sink token (attn_sink) have no Llama equivalent: cannot convert to {to}"
        )


def model_config_to_llama_config(cfg: ModelConfig, **extra: Any) -> LlamaConfig:
    """Our ModelConfig -> an equivalent `transformers.LlamaConfig` (extra kwargs pass through,
    e.g. bos_token_id). Residual `dropout` has no Llama field and is dropped (inference-neutral)."""
    from transformers import LlamaConfig

    check_llama(cfg, "HF")
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=cfg.attn_dropout,
        initializer_range=cfg.init_std,
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kwargs["rope_theta"] = cfg.rope_theta
    return LlamaConfig(**(kwargs | extra))


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------


def _rename(name: str, table: dict[str, str]) -> str | None:
    if name.removesuffix(".weight") in table:
        return table[name.removesuffix(".weight")] + ".weight"
    # layer parameters: replace the index by {i}, look up, put it back
    m = re.fullmatch(r"((?:model\.)?layers\.)(\d+)(\..+)\.weight", name)
    if m and (target := table.get(f"{m[1]}{{i}}{m[3]}")):
        return target.format(i=m[2]) + ".weight"
    return None


def _unfuse(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """wqkv -> wq, wk, wv and w_gate_up -> w_gate, w_up (row blocks, as views)."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {}
    for name, t in state.items():
        if name.endswith("attn.wqkv.weight"):
            prefix = name.removesuffix("wqkv.weight")
            for part, w in zip(("wq", "wk", "wv"), t.split([q, kv, kv]), strict=False):
                out[f"{prefix}{part}.weight"] = w
        elif name.endswith("ffn.w_gate_up.weight"):
            prefix = name.removesuffix("w_gate_up.weight")
            out[f"{prefix}w_gate.weight"], out[f"{prefix}w_up.weight"] = t.chunk(2)
        else:
            out[name] = t
    return out


def _fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `_unfuse`: stack the per-projection matrices by rows."""
    out = dict(state)
    for name in [n for n in state if n.endswith("attn.wq.weight")]:
        prefix = name.removesuffix("wq.weight")
        parts = [out.pop(f"{prefix}{p}.weight", None) for p in ("wq", "wk", "wv")]
        if any(p is None for p in parts):
            raise UserError(f"HF weights: {prefix} is missing one of q_proj, k_proj, v_proj")
        out[f"{prefix}wqkv.weight"] = torch.cat(parts)
    for name in [n for n in state if n.endswith("ffn.w_gate.weight")]:
        prefix = name.removesuffix("w_gate.weight")
        up = out.pop(f"{prefix}w_up.weight", None)
        if up is None:
            raise UserError(f"HF weights: {prefix} has gate_proj but no up_proj")
        out[f"{prefix}w_gate_up.weight"] = torch.cat([out.pop(name), up])
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names -> LlamaForCausalLM's. Tensors are views of ours, not copies."""
    out = {}
    for name, t in _unfuse(state, cfg).items():
        target = _rename(name, _OURS_TO_HF)
        if target is None:
            raise UserError(f"parameter {name!r} has no Llama equivalent (MoE or sink models cannot go to HF)")
        out[target] = t
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def state_dict_from_hf(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's parameter names -> ours (q/k/v and gate/up stacked into new tensors)."""
    out = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; we recompute it
            continue
        target = _rename(name, _HF_TO_OURS)
        if target is None:
            raise UserError(f"HF parameter {name!r} has no modernlm equivalent")
        out[target] = t
    if tie_embeddings:
        out.pop("lm_head.weight", None)
    return _fuse(out)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def from_hf(hf_model: PreTrainedModel, dtype: torch.dtype | None = None) -> ModernDecoderLM:
    """An HF LlamaForCausalLM (in memory) -> a ModernDecoderLM with the same weights.

    `dtype` casts the weights (default: keep the HF model's dtype).
    """
    cfg = llama_config_to_model_config(hf_model.config)
    state = state_dict_from_hf(hf_model.state_dict(), cfg.tie_embeddings)
    # clone so our model owns its memory (the HF model may be freed or keep training)
    state = {k: v.detach().to(dtype or v.dtype, copy=True) for k, v in state.items()}
    return build_model(cfg, state, "the HF model")


def to_hf(
    model: ModernDecoderLM,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    **config_extra: Any,
) -> LlamaForCausalLM:
    """A ModernDecoderLM -> transformers' LlamaForCausalLM computing the same logits."""
    from transformers import LlamaForCausalLM

    cfg = model.config
    hf_config = model_config_to_llama_config(cfg, **config_extra)
    hf_config._attn_implementation = attn_implementation
    state = state_dict_to_hf(dict(model.named_parameters()), cfg)
    dtype = dtype or next(model.parameters()).dtype
    hf = LlamaForCausalLM(hf_config).to(dtype)
    with torch.no_grad():
        hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    hf.eval()
    return hf


def save_hf(
    model: ModernDecoderLM,
    tokenizer: Tokenizer | None,
    dst: str | Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Write an HF model directory (config.json, model.safetensors, tokenizer files) that
    `AutoModelForCausalLM.from_pretrained(dst)` loads as a LlamaForCausalLM."""
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    hf = to_hf(model, dtype=dtype, **ids)
    hf.config.architectures = ["LlamaForCausalLM"]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)

    with atomic_files(dst) as staging:
        hf.save_pretrained(staging)  # safetensors
    if tokenizer is not None:
        tokenizer.save(dst)


def from_pretrained_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # `dtype=` replaced `torch_dtype=` in 4.56
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def hf_tokenizer_to_ours(hf_tok: Any) -> Tokenizer:
    """An HF fast tokenizer -> our Tokenizer (same backend, special tokens, chat template and bos
    rule: `add_bos` is whether transformers puts the bos token before a text, as Llama's do and
    SmolLM2's and GPT-2's do not)."""
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {type(hf_tok).__name__} is not a fast (tokenizers-backed) tokenizer")
    template = getattr(hf_tok, "chat_template", None)
    plain = hf_tok("a", add_special_tokens=False)["input_ids"]
    special = hf_tok("a")["input_ids"]
    bos = hf_tok.bos_token_id
    return Tokenizer(
        backend,
        bos_token=hf_tok.bos_token,
        eos_token=hf_tok.eos_token,
        pad_token=hf_tok.pad_token,
        chat_template=template if isinstance(template, str) else None,
        add_bos=bos is not None and special[:1] == [bos] and plain[:1] != [bos],
    )


def load_hf_tokenizer(source: Source | str) -> Any:
    """transformers' AutoTokenizer of a model source (`resolve_source`), or of a tokenizer source: a
    directory of tokenizer files (no config.json needed), a .gguf file or a hub id. Raises what
    transformers raises: whether a missing tokenizer is an error is the caller's to say."""
    from transformers import AutoTokenizer

    if isinstance(source, str):
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else source)
    return AutoTokenizer.from_pretrained(source.where, **source.kwargs)


AUTO_CLASSES = {  # task type -> transformers' Auto class
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}


def load_transformers(
    source: Source,
    task: str = "causal",
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    num_labels: int = 2,
    llama_only: bool = False,
    progress: bool = True,
    field: str = "",
) -> PreTrainedModel:
    """transformers' own model of an HF source (`resolve_source`: directory, hub id or .gguf), in
    eval mode on `device`: the one place modernlm calls `from_pretrained`.

    task: causal (any causal LM transformers knows: GPT-2, Qwen, Llama, ...), seq2seq (T5) or
    classification (a new head of `num_labels` outputs when the checkpoint has none).
    llama_only: refuse a non-Llama architecture from its config, before any weights are read
    (what `from_hf` can convert). dtype: "float32", "bfloat16" or "float16" (GGUF weights are
    de-quantized to it). progress=False silences transformers' loading bars for this call.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    at = f"{field}: " if field else ""
    what = f"{source.where} (no such local path, so tried as a Hugging Face Hub id)" if source.hub else str(source.path)
    bars = hf_logging.is_progress_bar_enabled()
    quiet = contextlib.ExitStack()
    if not progress:
        hf_logging.disable_progress_bar()
        if "gguf_file" in source.kwargs:
            quiet.enter_context(_no_gguf_bar())
    try:
        config = transformers.AutoConfig.from_pretrained(source.where, **source.kwargs)
        if llama_only:
            llama_config_to_model_config(config)
        if task == "classification":
            config.num_labels = num_labels
        auto = getattr(transformers, AUTO_CLASSES[task])
        model = auto.from_pretrained(
            source.where, config=config, **source.kwargs, **from_pretrained_kwargs(DTYPES[dtype])
        )
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as e:
        # no such repo / no network, an architecture without this head (e.g. a seq2seq class for
        # GPT-2), an unsupported gguf architecture, a head of another size, corrupt weights, a
        # truncated .gguf (struct.error)
        kind = "" if task == "causal" else f" as a {task} model"
        detail = "the file ends early (truncated?)" if isinstance(e, struct.error) else _first_line(e)
        raise UserError(f"{at}cannot load {what}{kind}: {detail}") from None
    finally:
        quiet.close()
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


@contextlib.contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """transformers' .gguf reader draws its tensors' tqdm bar itself, where disable_progress_bar()
    does not reach: that module's tqdm, switched off while the file loads."""
    import transformers.modeling_gguf_pytorch_utils as reader

    bar = getattr(reader, "tqdm", None)
    if bar is None:  # another transformers: nothing to switch off
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar

"""LoRA finetuning through PEFT, for transformers models and our ModernDecoderLM.

LoRA (Hu et al. 2021) freezes a pretrained weight W and learns a low-rank update: a targeted
linear layer computes W x + (alpha / r) B A x, with A (r x in) random and B (out x r) zero at the
start, so the adapted model begins exactly as the base model. Only A and B train (plus, for
classification, the new head, kept by PEFT's `modules_to_save`), well under 1% of the parameters.
The pieces `modernlm finetune` is built from: `apply_lora` (default targets per architecture,
`default_targets`; GPT-2's Conv1D gets fan_in_fan_out), `load_base_model` (HF directory, hub id,
.gguf or modernlm checkpoint, by task type; a tokenizer without pad pads with eos), the trainer's
`task_loss_fn`, and adapter directories: `save_adapter` / `load_adapter` / `load_finetuned`
(PEFT's files + the tokenizer + finetune.json, `adapter_info`) and `save_merged` (B A folded into W).
transformers and peft are imported inside the functions that need them. T5 is refused in float16:
its feed-forward activations overflow fp16's range (inf / NaN losses); bf16 and fp32 are fine.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from modernlm.chat import IGNORE_INDEX
from modernlm.checkpoint import load_model, resolve_source, save_model
from modernlm.errors import UserError
from modernlm.files import atomic_files, atomic_write, atomic_write_json
from modernlm.hf.convert import load_hf_tokenizer, load_transformers
from modernlm.model import ModernDecoderLM
from modernlm.runtime import DTYPES
from modernlm.tokenizer import has_tokenizer, load_tokenizer
from modernlm.train.losses import next_token_loss

if TYPE_CHECKING:
    from peft import PeftModel

TASK_TYPES = ("classification", "seq2seq", "causal")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names, so PeftModel.from_pretrained reads our dirs
ADAPTER_CONFIG = "adapter_config.json"
INFO_FILE = "finetune.json"  # base model, task type, labels: what load_finetuned needs
T5_TYPES = ("t5", "mt5", "umt5", "longt5")  # models that diverge in float16


@dataclass
class LoraSettings:
    r: int = 8  # rank of the update B A (>= 1)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input (training only)
    target_modules: list[str] = field(default_factory=list)  # layer names (suffix match); [] = per architecture
    mlp: bool = False  # with the default targets, adapt the MLP projections too (not only attention)
    modules_to_save: list[str] = field(default_factory=list)  # trained in full, saved with the adapter;
    # [] = the classification head (`score` / `classifier`) for classification, nothing otherwise

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1 (the LoRA rank), got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# ---------------------------------------------------------------------------------------------
# Which layers to adapt


def _is_modernlm(model: nn.Module) -> bool:
    return isinstance(model, ModernDecoderLM)


def _model_type(model: nn.Module) -> str:
    if _is_modernlm(model):
        return "modernlm"
    return str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)


def _matches(name: str, key: str) -> bool:
    """PEFT's rule for a list of target names: the module name equals the key or ends in '.key'."""
    return name == key or name.endswith("." + key)


def _has_matrix(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 2 and not isinstance(module, nn.Embedding)


def _present(model: nn.Module, keys: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    return [k for k in keys if any(_matches(n, k) for n in names)]


# (attention, MLP) target names per architecture family; the names are PEFT suffix matches.
_FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "modernlm": (["wqkv", "wo"], ["w_gate_up", "w_down"]),
    "gpt2": (["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    "t5": (["q", "v"], ["wi", "wi_0", "wi_1", "DenseReluDense.wo"]),
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
}


def default_targets(model: nn.Module, mlp: bool = False) -> list[str]:
    """The layers LoRA adapts when target_modules is [] (see the module docstring).

    Llama-style names serve every model that has q_proj / v_proj / o_proj (Llama, Mistral, Qwen2,
    Gemma, SmolLM2, ...); other architectures fall back to PEFT's own table (attention only).
    """
    model_type = _model_type(model)
    family = None
    if model_type in ("modernlm", "gpt2"):
        family = model_type
    elif model_type in T5_TYPES:
        family = "t5"
    elif len(_present(model, ["q_proj", "v_proj", "o_proj"])) == 3:
        family = "llama"
    if family is not None:
        attention, mlp_names = _FAMILIES[family]
        return _present(model, attention + (mlp_names if mlp else []))
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = PEFT_TARGETS.get(model_type)
    if not isinstance(targets, list):
        raise UserError(
            f"lora.target_modules: no default LoRA targets for model type {model_type!r}; "
            "name the linear layers to adapt, e.g. lora.target_modules=[q_proj,v_proj]"
        )
    if mlp:
        print(f"note: no default MLP targets for {model_type!r}; adapting attention only", file=sys.stderr)
    return _present(model, list(targets))


def classification_head(model: nn.Module) -> list[str]:
    """Names of the sequence-classification head modules (`score` in GPT-2 / Llama, `classifier` in BERT-likes)."""
    return [n for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)]


def apply_lora(model: nn.Module, settings: LoraSettings, task_type: str) -> PeftModel:
    """Freeze `model` and add LoRA adapters (PEFT's get_peft_model); returns the PeftModel.

    task_type: classification | seq2seq | causal (PEFT's SEQ_CLS / SEQ_2_SEQ_LM / CAUSAL_LM for
    transformers models; a ModernDecoderLM becomes a plain PeftModel that calls our forward).
    Afterwards only the adapter matrices and `modules_to_save` have requires_grad=True.
    """
    import peft

    if task_type not in TASK_TYPES:
        raise UserError(f"task_type: unknown {task_type!r} (expected one of {', '.join(TASK_TYPES)})")
    ours = _is_modernlm(model)
    if ours and task_type != "causal":
        raise UserError(
            f"task_type: modernlm checkpoints finetune as causal LMs, not {task_type}; use data.task_type=causal "
            "(SST-2 labels are then scored as words after 'Sentiment:')"
        )
    targets = list(settings.target_modules) or default_targets(model, settings.mlp)
    missing = [t for t in targets if not _present(model, [t])]
    if missing or not targets:
        # layers LoRA can adapt: leaf modules with a weight matrix (nn.Linear, GPT-2's Conv1D, ...)
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children()) and _has_matrix(m)}
        )
        close = difflib.get_close_matches(missing[0], leaves, n=1) if missing else []
        hint = f"; did you mean '{close[0]}'?" if close else f"; linear layers here: {', '.join(leaves[:12])}"
        raise UserError(f"lora.target_modules: no layer named {missing or targets} in {_model_type(model)}{hint}")
    modules_to_save = list(settings.modules_to_save)
    if not modules_to_save and task_type == "classification":
        modules_to_save = classification_head(model)
        if not modules_to_save:
            raise UserError("lora.modules_to_save: the model has no `score` or `classifier` head; name its head module")
    # GPT-2's Conv1D stores W as (in, out): the update must be transposed too. PEFT would fix a
    # wrong setting with a warning; set it from the layers themselves so it is never wrong.
    targeted = [m for n, m in model.named_modules() if any(_matches(n, t) for t in targets)]
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in targeted)
    peft_task = None
    if not ours:
        peft_task = {
            "classification": peft.TaskType.SEQ_CLS,
            "seq2seq": peft.TaskType.SEQ_2_SEQ_LM,
            "causal": peft.TaskType.CAUSAL_LM,
        }[task_type]
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type=peft_task,
    )
    with _quiet_peft():
        return peft.get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """transformers 5 deprecates an attribute PEFT still reads: a warning nobody here can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# Base models


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _mismatch(e: Exception) -> str:
    """What a failed load_state_dict says differs: torch's first line is only "Error(s) in loading
    state_dict for ...:", the first "size mismatch for <name>: ... shape ..." line after it says what."""
    lines = [line.strip() for line in str(e).splitlines()]
    return next((line.rstrip(".") for line in lines if line.startswith("size mismatch")), _first_line(e))


def inspect_source(source: str) -> tuple[str, str]:
    """(kind, model_type) of a model source (`checkpoint.resolve_source`, the rule `modernlm.load`
    follows) without loading weights: ("modernlm", "modernlm") for our checkpoint or run
    directories, ("hf", config.model_type) otherwise."""
    src = resolve_source(source, "model.source")
    if src.kind == "modernlm":
        return "modernlm", "modernlm"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src.where, **src.kwargs)
    except (OSError, ValueError, KeyError) as e:
        what = f"{source} (no such local path, so tried as a Hugging Face Hub id)" if src.hub else source
        raise UserError(f"model.source: cannot load {what}: {_first_line(e)}") from None
    return "hf", str(getattr(config, "model_type", ""))


def check_precision(model_type: str, *dtypes: str) -> None:
    """Refuse float16 (weights or autocast) for T5-family models: they diverge in fp16."""
    if model_type in T5_TYPES and any(str(d).removeprefix("torch.") == "float16" for d in dtypes):
        raise UserError(
            f"{model_type} diverges in float16 (its activations overflow fp16's range): "
            "use model.dtype=float32 or bfloat16 and run.dtype=float32 or bfloat16"
        )


def load_base_model(
    source: str,
    task_type: str,
    *,
    dtype: str = "float32",
    num_labels: int = 2,
    tokenizer: str = "",
    progress: bool = True,
) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, kind) for finetuning; kind is "hf" or "modernlm".

    `modernlm.load` loads causal LMs for inference; finetuning keeps this loader because it also
    loads seq2seq (T5) and sequence-classification models, and keeps transformers' own tokenizer
    (saved with the adapter). It shares load's rules: the source (`checkpoint.resolve_source`),
    `hf.convert.load_transformers` and `load_hf_tokenizer` for HF sources, `tokenizer.has_tokenizer`
    for our checkpoints. HF sources load with the Auto class of the task type (a causal LM
    checkpoint gets a new, randomly initialised classification head of `num_labels` outputs) and
    their HF tokenizer; `tokenizer` names another tokenizer source when the model has none.
    modernlm checkpoint and run directories load with our tokenizer (causal only). Weights are cast
    to `dtype`. progress=False silences transformers' loading bars.
    """
    if dtype not in DTYPES:
        raise UserError(f"model.dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if task_type not in TASK_TYPES:
        raise UserError(f"task_type: unknown {task_type!r} (expected one of {', '.join(TASK_TYPES)})")
    kind, model_type = inspect_source(source)
    check_precision(model_type, dtype)
    src = resolve_source(source, "model.source")
    if kind == "modernlm":
        return (*_load_modernlm(src.path, task_type, dtype, tokenizer), kind)
    return (*_load_hf(src, task_type, dtype, num_labels, tokenizer, progress), kind)


def _load_modernlm(ckpt: Path, task_type: str, dtype: str, tokenizer: str) -> tuple[nn.Module, Any]:
    if task_type != "causal":
        raise UserError(
            f"task_type: modernlm checkpoints finetune as causal LMs, not {task_type}; use data.task_type=causal"
        )
    if not tokenizer and not has_tokenizer(ckpt):
        raise UserError(f"model.tokenizer: checkpoint {ckpt} has no tokenizer; name one (model.tokenizer=DIR)")
    return load_model(ckpt).to(DTYPES[dtype]), load_tokenizer(tokenizer or ckpt)


def _load_hf(
    src: Any, task_type: str, dtype: str, num_labels: int, tokenizer: str, progress: bool
) -> tuple[nn.Module, Any]:
    if task_type == "classification" and num_labels < 2:
        raise UserError(f"model.num_labels: a classifier needs at least 2 labels, got {num_labels}")
    model = load_transformers(src, task_type, dtype=dtype, num_labels=num_labels, field="model.source",
                              progress=progress)  # fmt: skip
    try:  # a directory of tokenizer files (no config.json needed), a .gguf or a hub id
        tok = load_hf_tokenizer(tokenizer or src)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"model.tokenizer: no usable tokenizer in {tokenizer or src.where} ({_first_line(e)}); "
            "name one with model.tokenizer=DIR"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"model.tokenizer: {tokenizer or src.where} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token  # GPT-2 has no pad token: pad with eos, as is customary
    # Sequence classification pools the last token that is not pad_token_id: model and batches must agree.
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# ---------------------------------------------------------------------------------------------
# Saving, loading, merging


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):  # transformers
        with atomic_files(path) as staging:
            tokenizer.save_pretrained(str(staging))
    else:  # modernlm.tokenizer.Tokenizer
        tokenizer.save(path)


def save_adapter(model: PeftModel, path: str | Path, tokenizer: Any = None, info: dict[str, Any] | None = None) -> Path:
    """Write the adapter (LoRA matrices + modules_to_save such as the head), its config, the
    tokenizer and `info` (finetune.json) into directory `path`. The trainer's save_model_fn."""
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: we never adapt or resize embeddings (and "auto" would read the
    # base's config.json, or ask the hub, to find out).
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path / ADAPTER_WEIGHTS, save(state, metadata={"format": "pt"}))
    config = model.peft_config["default"]
    if info and info.get("base"):
        config.base_model_name_or_path = str(info["base"])
    with atomic_files(path) as staging:
        config.save_pretrained(str(staging))
    _save_tokenizer(tokenizer, path)
    if info is not None:
        atomic_write_json(path / INFO_FILE, info)
    return path


def _check_adapter_dir(path: Path) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise UserError(f"adapter {path}: missing {name} (not an adapter directory)")


def load_adapter(base_model: nn.Module, path: str | Path, trainable: bool = False) -> PeftModel:
    """The base model with the adapter of directory `path` (PeftModel.from_pretrained), head included."""
    from peft import PeftModel

    path = Path(path)
    _check_adapter_dir(path)
    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"adapter {path}: does not fit this base model ({_mismatch(e)})") from None


def load_adapter_weights(model: PeftModel, path: str | Path) -> None:
    """Copy the adapter weights of directory `path` into `model`, which already has the same
    adapter (resuming a run: the trainer's load_model_fn). Every adapter tensor must be there."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(path)
    _check_adapter_dir(path)
    state = load_file(str(path / ADAPTER_WEIGHTS))
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    if set(state) != expected:
        extra, lacking = sorted(set(state) - expected), sorted(expected - set(state))
        raise UserError(
            f"adapter {path / ADAPTER_WEIGHTS}: does not match this run's adapter "
            f"(unexpected {extra[:3]}, missing {lacking[:3]}); use the same model and lora settings"
        )
    try:
        set_peft_model_state_dict(model, state)
    except RuntimeError as e:  # shape mismatch: another rank or base model
        raise UserError(
            f"adapter {path / ADAPTER_WEIGHTS}: does not fit this run's adapter ({_mismatch(e)}); resume with the "
            "model and lora settings it was trained with, or start afresh (another run.name, or train.resume=never)"
        ) from None


def adapter_info(
    source: str, kind: str, model_type: str, task: Any, num_labels: int, dtype: str, pad_id: int | None
) -> dict[str, Any]:
    """finetune.json of an adapter directory: what `load_finetuned` rebuilds the model from.
    task: the training split's `data.tasks.TaskDatasetConfig` (its type, name, labels, prompt)."""
    path = Path(source).expanduser()
    return {
        "base": str(path.resolve()) if path.exists() else source,  # absolute: load_finetuned works from any directory
        "kind": kind,
        "model_type": model_type,
        "task_type": task.task_type,
        "task": task.name,
        "num_labels": num_labels,
        "label_words": list(task.label_words),
        "dtype": dtype,
        "pad_token_id": pad_id,
        "prompt_template": task.prompt_template,
        "add_bos": task.add_bos,
    }


def read_info(path: str | Path) -> dict[str, Any]:
    file = Path(path) / INFO_FILE
    if not file.is_file():
        raise UserError(f"adapter {Path(path)}: missing {INFO_FILE} (written by modernlm finetune)")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or "base" not in info or "task_type" not in info:
        raise UserError(f"{file}: expected an object with 'base' and 'task_type'")
    return info


def load_finetuned(path: str | Path, base: str = "") -> tuple[PeftModel, Any, dict[str, Any]]:
    """(model with adapter, tokenizer, info) from an adapter directory written by `modernlm finetune`.

    The base model is the one recorded in finetune.json (`base` overrides it, e.g. after moving
    it); the tokenizer is the adapter directory's copy. The model is in eval mode.
    """
    path = Path(path)
    _check_adapter_dir(path)
    info = read_info(path)
    model, tokenizer, _ = load_base_model(
        base or info["base"],
        info["task_type"],
        dtype=info.get("dtype", "float32"),
        num_labels=int(info.get("num_labels") or 2),
        tokenizer=str(path),
    )
    peft_model = load_adapter(model, path)
    peft_model.eval()
    return peft_model, tokenizer, info


def merge_adapter(model: PeftModel) -> nn.Module:
    """Fold the adapters into the base weights (W + alpha/r B A) and return the plain base model,
    with the trained head in place of the original. Modifies the base model in place."""
    return model.merge_and_unload()


def save_merged(model: PeftModel, tokenizer: Any, kind: str, path: str | Path) -> None:
    """The adapter folded into a copy of the weights (`model` keeps its adapter), saved as a plain
    model of the base's kind: a modernlm checkpoint, or an HF model directory."""
    merged = merge_adapter(copy.deepcopy(model))
    if kind == "modernlm":
        save_model(merged, path, tokenizer)
    else:
        with atomic_files(path) as staging:
            merged.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))


def base_of(model: nn.Module) -> nn.Module:
    """The underlying model of a PeftModel, its LoRA layers still in place (adapters active): a
    real ModernDecoderLM / transformers model for code that expects one (evaluation, generation)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------------------------------
# Losses (the trainer's contract: (model, batch) -> (loss_sum, n_targets, metrics))


def causal_logits(model: nn.Module, batch: dict[str, Tensor], ours: bool) -> Tensor:
    if ours:  # our forward takes the ids; right padding needs no mask under causal attention
        return model(batch["input_ids"]).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def task_loss_fn(task_type: str, ours: bool = False) -> Callable[[nn.Module, Any], tuple[Tensor, Any, dict[str, Any]]]:
    """The loss_fn for `tasks.collate` batches of a task type.

    causal: next-token CE summed over the labelled (answer) tokens; labels are aligned with
        input_ids (-100 over the prompt), so position t predicts labels[t + 1].
    seq2seq: CE of the decoder's logits against the labels (the decoder reads the labels shifted
        right, as transformers builds them), summed over the label tokens.
    classification: CE of the head's logits summed over the batch; n = the batch size.
    """

    def causal(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
        logits = causal_logits(model, batch, ours)
        loss_sum, n = next_token_loss(logits[:, :-1], batch["labels"][:, 1:])
        return loss_sum, n, {}

    def seq2seq(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
        labels = batch["labels"]
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        decoder_input_ids = inner.prepare_decoder_input_ids_from_labels(labels=labels)  # start + labels[:-1]
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        ).logits
        loss_sum, n = next_token_loss(logits, labels)
        return loss_sum, n, {}

    def classification(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int, dict[str, Any]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        acc = (logits.argmax(-1) == labels).float().mean().detach()
        return loss_sum, labels.numel(), {"batch_acc": acc}

    fns = {"causal": causal, "seq2seq": seq2seq, "classification": classification}
    if task_type not in fns:
        raise UserError(f"task_type: unknown {task_type!r} (expected one of {', '.join(TASK_TYPES)})")
    return fns[task_type]


def task_batch_counts(task_type: str) -> Callable[[dict[str, Tensor]], tuple[int, int]]:
    """The trainer's batch_counts for `tasks.collate` batches: (input tokens, examples). Input
    tokens are the attention mask's; seq2seq adds the decoder's (one per label token)."""

    def counts(batch: dict[str, Tensor]) -> tuple[int, int]:
        n = int(batch["attention_mask"].sum())
        if task_type == "seq2seq":
            n += int((batch["labels"] != IGNORE_INDEX).sum())
        return n, batch["input_ids"].size(0)

    return counts


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "INFO_FILE",
    "TASK_TYPES",
    "LoraSettings",
    "adapter_info",
    "apply_lora",
    "base_of",
    "causal_logits",
    "check_precision",
    "classification_head",
    "default_targets",
    "inspect_source",
    "load_adapter",
    "load_adapter_weights",
    "load_base_model",
    "load_finetuned",
    "merge_adapter",
    "read_info",
    "save_adapter",
    "save_merged",
    "task_batch_counts",
    "task_loss_fn",
    "trainable_parameters",
]

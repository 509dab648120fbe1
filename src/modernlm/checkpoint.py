"""Model checkpoints: a directory with `config.json` + `model.safetensors` (+ tokenizer files).

Loading never unpickles anything: weights come from safetensors, the config from JSON. Every
problem with a checkpoint directory (missing file, corrupt file, wrong shapes, unknown config key)
is a `UserError` that names the file. Files are written with `modernlm.files` (a temporary name,
fsync, rename), so a kill mid-save leaves the previous file intact.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from modernlm.config import from_dict, to_dict
from modernlm.errors import UserError
from modernlm.files import OLD_MARK, TMP_MARK, atomic_write, clean_leftovers, replace_dir, tmp_path
from modernlm.model import ModelConfig, ModernDecoderLM
from modernlm.quant import check_quantize, prepare

if TYPE_CHECKING:
    from modernlm.model import ModelConfig, ModernDecoderLM
    from modernlm.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "modernlm"


def save_model(
    model: ModernDecoderLM, path: str | Path, tokenizer: Tokenizer | None = None
) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        # the same tensor as tok_emb.weight; safetensors forbids aliases
        state.pop("lm_head.weight", None)
    atomic_write(path / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    config = {"model_type": MODEL_TYPE, **to_dict(model.config)}
    atomic_write(path / CONFIG_FILE, json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}")
    if not file.is_file():
        raise UserError(f"checkpoint {path}: missing {CONFIG_FILE}")
    try:
        data: dict[str, Any] = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {file}: expected a JSON object")
    model_type = data.pop("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        hint = (
            " (a Hugging Face model: convert it first with `modernlm convert`)"
            if "architectures" in data
            else ""
        )
        raise UserError(
            f"checkpoint {file}: model_type is {model_type!r}, not {MODEL_TYPE!r}{hint}"
        )
    try:
        return from_dict(ModelConfig, data)
    except UserError as e:
        # from_dict's messages name the key ("unknown key 'n_layers'; did you mean 'n_layer'?")
        raise UserError(f"checkpoint {file}: {str(e).removeprefix('ModelConfig: ')}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise UserError(f"checkpoint {Path(path)}: missing {WEIGHTS_FILE}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {file}: cannot read safetensors ({e})") from None


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    quantize: str = "none",
    dtype: torch.dtype | None = None,
) -> ModernDecoderLM:
    """Build the model from config.json and fill it from model.safetensors, strictly; in `dtype`
    (None: the file's), and with quantize="int8" / "int4" prepared as `quant.prepare` prepares it.
    A quantized model is read from the file a few rows at a time, never whole in float (SmolLM2:
    a peak of the 8-bit model plus ~10 MB, not plus the 0.5 GB of float32 weights)."""
    cfg = load_model_config(path)
    if check_quantize(quantize) != "none":
        return _load_quantized(cfg, Path(path) / WEIGHTS_FILE, quantize, dtype).to(device)
    model = build_model(cfg, load_state_dict(path), Path(path) / WEIGHTS_FILE)
    return (model if dtype is None else model.to(dtype)).to(device)


class StoredTensors:
    """The tensors of a safetensors file, read on demand with plain reads into memory of our own.

    Not through a map of the file (safetensors' own reader): every page read through a map counts
    as the process's memory while the map lives, so quantizing a float32 checkpoint read that way
    holds all of its float weights resident until the end. The format is safetensors' documented
    one: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets),
    then the data."""

    DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, file: Path):
        self.file = file
        if not file.is_file():
            raise UserError(f"checkpoint {file.parent}: missing {file.name}")
        try:
            self.f = open(file, "rb")  # noqa: SIM115 (closed by __exit__)
            size = self.f.seek(0, 2)
            self.f.seek(0)
            n = int.from_bytes(self.f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(self.f.read(n))
            header.pop("__metadata__", None)
            self.entries = {}
            for name, e in header.items():
                dtype, shape, (begin, end) = self.DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - 8 - n:
                    raise ValueError(f"tensor {name}: data_offsets {[begin, end]} do not hold "
                                     f"{e['dtype']} {list(shape)}")
                self.entries[name] = (dtype, shape, 8 + n + begin)
        except (OSError, ValueError, KeyError, TypeError) as e:  # KeyError: a dtype we do not read
            raise UserError(f"checkpoint {file}: cannot read safetensors ({type(e).__name__}: {e})") from None

    def __enter__(self) -> StoredTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def shapes(self) -> dict[str, torch.Tensor]:
        """name -> a meta tensor of the stored shape (what check_state_dict compares)."""
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, _) in self.entries.items()}

    def read(self, name: str, i: int = 0, j: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its rows i..j-1 (along the first dimension)."""
        dtype, shape, start = self.entries[name]
        rows = (shape[0] if j is None else j) - i if shape else 1  # a scalar: one "row" of one
        row = math.prod(shape[1:]) * dtype.itemsize
        buf = torch.empty(rows * row, dtype=torch.uint8)
        self.f.seek(start + i * row)
        if self.f.readinto(buf.numpy()) != buf.numel():
            raise UserError(f"checkpoint {self.file}: the file ends inside tensor {name}")
        return buf.view(dtype).view(rows, *shape[1:]) if shape else buf.view(dtype).view(())


def _load_quantized(cfg: ModelConfig, file: Path, quantize: str, dtype: torch.dtype | None) -> ModernDecoderLM:
    """load_model's quantized path: the model built on meta, each projection quantized from rows
    read off the file (`quant.prepare` with a file reader), then the float tensors left (the norms)
    read whole."""
    with torch.device("meta"):
        model = ModernDecoderLM(cfg)
    names = {id(m): name for name, m in model.named_modules()}
    with StoredTensors(file) as stored:
        check_state_dict(model, stored.shapes(), file)
        model.to(dtype or stored.entries["tok_emb.weight"][0])  # on meta: only the dtype it will have

        def rows_of(layer: torch.nn.Module) -> Callable[[int, int], torch.Tensor]:
            # a tied LM head is stored once, as the embedding
            key = "tok_emb.weight" if layer is model.lm_head and cfg.tie_embeddings else f"{names[id(layer)]}.weight"
            return lambda i, j: stored.read(key, i, j).to(dtype or stored.entries[key][0])

        prepare(model, quantize, rows_of)
        left = [k for k, t in model.state_dict().items() if t.is_meta and k in stored.entries]
        rest = {k: stored.read(k).to(dtype or stored.entries[k][0]) for k in left}
        model.load_state_dict(rest, strict=False, assign=True)
    if cfg.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):  # a head left in floats (K % 32 != 0)
        model.lm_head.weight = model.tok_emb.weight
    model.rope = type(model.rope).for_config(cfg)  # buffers made on meta: computed for real
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"load_model left tensors on the meta device: {meta}")
    return model.eval()


def build_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], source: str | Path
) -> ModernDecoderLM:
    """A ModernDecoderLM holding exactly the tensors of `state` (no init, no copy).

    Shared by `load_model` and the HF converter (hf/convert.py); `source` names the file in errors.
    """
    # Built on meta so no time goes into a random init that load_state_dict would overwrite.
    with torch.device("meta"):
        model = ModernDecoderLM(cfg)
    state = dict(state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    check_state_dict(model, state, Path(source))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    # buffers (RoPE tables) were built on meta: rebuild them for real
    model.rope = type(model.rope).for_config(cfg)
    return model


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Fail with one clear message on missing, unexpected or mis-shaped tensors."""
    expected = {k: v for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file has {tuple(state[k].shape)}, config needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:5]))
    if problems:
        raise UserError(f"checkpoint {file} does not match its config.json: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Training checkpoints: run_dir/checkpoints/step_0000500/ = the model files above + train_state.pt
# --------------------------------------------------------------------------------------------
#
# A checkpoint directory (a training step, or best/ with its best.json) is written complete under
# the temporary name `.<name>.tmp-<pid>` and then put in place with `files.replace_dir`, which
# exchanges it atomically with a directory already there (a re-saved step, best/). The `latest`
# pointer file is replaced atomically afterwards. A SIGKILL at any moment therefore leaves either
# the previous checkpoint or the new one complete and findable: a `step_*` or `best` name only ever
# refers to a finished directory (best.json included), `latest_checkpoint` falls back to the
# highest `step_*` directory when the pointer is missing or stale, and `clean_leftovers` (run when
# training starts) removes what a killed save left behind.

CHECKPOINTS_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"
BEST_DIR = "best"
BEST_INFO_FILE = "best.json"
STEP_PREFIX = "step_"


def step_dir(run_dir: str | Path, step: int) -> Path:
    """run_dir/checkpoints/step_0000500: the one place the step checkpoint's name is made."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{STEP_PREFIX}{step:07d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a step checkpoint directory (step_0000500 -> 500)."""
    return int(Path(path).name.removeprefix(STEP_PREFIX))


def _write_checkpoint_dir(
    final: Path,
    model: ModernDecoderLM,
    tokenizer: Tokenizer | None,
    state: dict[str, Any] | None,
    save_fn: Any = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Write the whole directory under its temporary name (model files, train_state.pt, the
    `extra` text files), then put it in place of `final` (atomically replacing an older one)."""
    tmp = tmp_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (save_fn or save_model)(model, tmp, tokenizer)
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write(tmp / TRAIN_STATE_FILE, buf.getvalue())
        for name, text in (extra or {}).items():
            atomic_write(tmp / name, text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    model: ModernDecoderLM,
    state: dict[str, Any],
    tokenizer: Tokenizer | None = None,
    keep_last: int = 3,
    save_fn: Any = None,
) -> Path:
    """Write run_dir/checkpoints/step_{step:07d}/, point `latest` at it, keep the last `keep_last`.

    `save_fn(model, dir, tokenizer)` writes the model files (default `save_model`).

    `state` (optimizer, step, RNG, data position, ...) must hold only tensors and plain Python
    types, so `load_training_state` can read it with torch.load(weights_only=True).
    """
    final = step_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _write_checkpoint_dir(final, model, tokenizer, state, save_fn)
    atomic_write(root / LATEST_FILE, final.name + "\n")
    steps = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if _is_step_dir(p))
    for old in steps[: max(len(steps) - max(keep_last, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    clean_leftovers(root)  # from a run killed mid-save
    return final


def save_best_checkpoint(
    run_dir: str | Path,
    model: ModernDecoderLM,
    info: dict[str, Any],
    tokenizer: Tokenizer | None = None,
    save_fn: Any = None,
) -> Path:
    """Replace run_dir/checkpoints/best/ (model files + best.json with the step and val loss).

    best.json is written into the new directory before it replaces the old one: best/ and its
    best.json always describe the same model."""
    final = Path(run_dir) / CHECKPOINTS_DIR / BEST_DIR
    final.parent.mkdir(parents=True, exist_ok=True)
    _write_checkpoint_dir(final, model, tokenizer, None, save_fn, extra={BEST_INFO_FILE: json.dumps(info, indent=2)})
    return final


def _is_step_dir(p: Path) -> bool:
    """A finished step checkpoint's name (never a temporary or set-aside directory)."""
    return _is_step_name(p.name) and TMP_MARK not in p.name and OLD_MARK not in p.name and p.is_dir()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint of a run directory, or None.

    Complete = renamed into place with its train_state.pt. The `latest` pointer is for people and
    other tools; the directory scan is the truth (a kill between rename and pointer update)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    done = [p for p in root.glob(f"{STEP_PREFIX}*") if _is_step_dir(p) and (p / TRAIN_STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name) if done else None


def _is_step_name(name: str) -> bool:
    # a half-written checkpoint is a hidden .step_*.tmp-<pid> directory, never step_<digits>
    return name.startswith(STEP_PREFIX) and name.removeprefix(STEP_PREFIX).isdigit()


def _is_complete(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def run_checkpoints(run_dir: str | Path, best: bool = True) -> list[Path]:
    """A run directory's complete checkpoints (config.json and weights): its `step_*` in step order,
    then `best/` (with its best.json) when `best` and present."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    steps = [p for p in root.glob(f"{STEP_PREFIX}*") if _is_step_name(p.name) and _is_complete(p)]
    dirs = sorted(steps, key=checkpoint_step)
    if best and _is_complete(root / BEST_DIR) and (root / BEST_DIR / BEST_INFO_FILE).is_file():
        dirs.append(root / BEST_DIR)
    return dirs


def checkpoint_dirs(path: str | Path) -> list[Path]:
    """The checkpoint directories `path` stands for, in order: a run directory (it holds
    `checkpoints/`) its `run_checkpoints`; anything else itself (loading it will say what is wrong
    with it, e.g. no config.json; a local path that does not exist says so now: as a Path,
    `./typo` would read as the hub id `typo`)."""
    given, path = path, Path(path)
    if not (path / CHECKPOINTS_DIR).is_dir():
        resolve_source(given)
        return [path]
    dirs = run_checkpoints(path)
    if not dirs:
        raise UserError(f"run directory {path}: no checkpoints in {path / CHECKPOINTS_DIR}")
    return dirs


def saved_step(path: str | Path) -> int | None:
    """The training step of a checkpoint: from a `step_N` name, or from best/best.json; None when
    neither tells."""
    path = Path(path)
    if _is_step_name(path.name):
        return checkpoint_step(path)
    info = path / BEST_INFO_FILE  # written by the trainer next to the best model
    if info.is_file():
        try:
            step = json.loads(info.read_text()).get("step")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return step if isinstance(step, int) else None
    return None




def is_modernlm_checkpoint(path: str | Path) -> bool:
    """A directory whose config.json says model_type "modernlm" (what `save_model` writes; a
    config.json without model_type counts too, as `load_model_config` reads it)."""
    file = Path(path).expanduser() / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and data.get("model_type", MODEL_TYPE) == MODEL_TYPE


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A modernlm checkpoint directory for `path`: itself, or for a run directory its
    checkpoints/best (else its latest step_*). None when `path` is neither."""
    path = Path(path).expanduser()
    if is_modernlm_checkpoint(path):
        return path
    root = path / CHECKPOINTS_DIR
    if root.is_dir():
        if is_modernlm_checkpoint(root / BEST_DIR):
            return root / BEST_DIR
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
    return None


def checkpoint_label(path: str | Path, outside_a_run: str = "name") -> str:
    """runs/tiny/checkpoints/step_0000600 -> "tiny/step_0000600"; a directory outside a run: its
    name (outside_a_run="name") or the path as given ("path", for tables of many sources)."""
    path = Path(path)
    if path.parent.name == CHECKPOINTS_DIR and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.name}"
    return str(path) if outside_a_run == "path" else path.name


class Source(NamedTuple):
    """What a model source string names (`resolve_source`)."""

    kind: str  # "modernlm" (our checkpoint) or "hf" (for transformers)
    path: Path | None  # the modernlm checkpoint directory; for hf the local path, None for a hub id
    where: str  # hf: what `from_pretrained` takes (a directory or a hub id)
    kwargs: dict[str, Any]  # hf: its extra arguments ({"gguf_file": name} for a .gguf)
    hub: bool  # hf: a hub id (downloaded, or found in the HF cache)


def _looks_local(src: str) -> bool:
    # A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper, or under a folder
    # that is here, as runs/NAME) is a local path.
    return (src.startswith(("/", ".", "~")) or src.count("/") > 1 or "\\" in src or src.endswith(".gguf")
            or ("/" in src and Path(src.split("/")[0]).is_dir()))  # fmt: skip


def resolve_source(source: str | Path, field: str = "") -> Source:
    """The one rule for a model source: a modernlm checkpoint directory, a run directory (its
    checkpoints/best, else its latest step_*), an HF model directory, a `.gguf` file or a hub id.
    Nothing is loaded; every error is a one-line UserError that names `field` (e.g. "model")."""
    at = f"{field}: " if field else ""
    src = str(source)
    if not src:
        raise UserError(f"{at}give a model (a modernlm checkpoint or run directory, an HF directory, hub id or .gguf)")
    path = Path(src).expanduser()
    if path.is_dir():
        ckpt = resolve_checkpoint(path)
        if ckpt is not None:
            return Source("modernlm", ckpt, str(ckpt), {}, False)
        if (path / CHECKPOINTS_DIR).is_dir():
            raise UserError(f"{at}{src}: a run directory without a complete checkpoint")
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"{at}{path}: missing {CONFIG_FILE} (not a modernlm checkpoint, run or HF model directory)")
        return Source("hf", path, str(path), {}, False)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{at}{path}: expected a model directory, a hub id or a .gguf file")
        return Source("hf", path, str(path.parent), {"gguf_file": path.name}, False)
    if _looks_local(src):
        raise UserError(f"{at}{src}: no such file or directory")
    return Source("hf", None, src, {}, True)


def load_training_state(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read train_state.pt of a checkpoint directory with torch.load(weights_only=True)."""
    file = Path(path) / TRAIN_STATE_FILE
    if not file.is_file():
        raise UserError(
            f"checkpoint {Path(path)}: missing {TRAIN_STATE_FILE} (not a training checkpoint)"
        )
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: the user can pick another checkpoint
        raise UserError(f"checkpoint {file}: cannot read training state ({e})") from None


def load_weights_into(model: ModernDecoderLM, path: str | Path) -> None:
    """Copy a checkpoint's weights into an existing model (keeps tying, device and dtype)."""
    state = load_state_dict(path)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    check_state_dict(model, state, Path(path) / WEIGHTS_FILE)
    model.load_state_dict(state, strict=False)


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """'field: a -> b' for every model config field that differs."""
    da, db = to_dict(a), to_dict(b)
    return [
        f"{k}: {da.get(k)!r} -> {db.get(k)!r}"
        for k in sorted(set(da) | set(db))
        if da.get(k) != db.get(k)
    ]

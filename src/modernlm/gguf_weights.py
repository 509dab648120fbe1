"""A .gguf file's weights as they are: Q8_0 / Q4_0 / Q4_1 blocks into quant.QLinear, without float32.

    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "auto")  # Q4_1 layers, its Q8_0 head
    # None: not a file this reads (another architecture, rope scaling, biases...): transformers' path

quant.py's formats are GGUF's own, so a block of the file becomes a QLinear's buffers by copying bytes:

| file type        | bytes per block of 32            | QLinear                                  |
|------------------|----------------------------------|------------------------------------------|
| Q8_0             | fp16 d, 32 x int8 q              | "q8": q, scales = d                      |
| Q4_1             | fp16 d, fp16 m, 16 bytes         | "q4": the 16 bytes, scales = d, mins = m |
| Q4_0             | fp16 d, 16 bytes (w = d (q - 8)) | "q4" with mins = -8 d (the same values)  |
| F32, F16, others | (gguf's `dequantize`)            | float, or quantized by quant.py          |

`quantize` says which form each weight ends in: "auto" the file's own (Q8_0 -> q8, Q4_0 / Q4_1 -> q4,
F32 / F16 -> float; another quant type -> q4 at <= 5 bits per weight, else q8), "int8" q8 everywhere,
"int4" q4 for the projections and q8 for the LM head and embedding (quant.prepare's rule). A weight in
another form is dequantized and quantized again; q/k/v (and gate/up) of one layer are fused in the
most precise of their forms. The model is built on the meta device: no float32 copy of a quantized
matrix is ever made, except one layer's at a time where a form changes.

llama.cpp's converter stores the rows of attn_q / attn_k permuted (its `permute`: each head's two
rotary halves interleaved); the rows are put back as transformers' GGUF loader puts them, which is
exact on blocks (a block runs along the input dimension, inside one row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from torch import Tensor, nn

from modernlm.model import ModelConfig, ModernDecoderLM, RotaryEmbedding
from modernlm.quant import QK, QEmbedding, QLinear, check_quantize
from modernlm.runtime import release_freed_memory, short_lived_buffers
from modernlm.tokenizer import Tokenizer, byte_symbols

FORMS = ("q4", "q8", "float")  # least to most precise: a fused weight takes the most precise of its parts'
FLOAT_TYPES = ("F32", "F16", "BF16")
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class Weight:
    """One matrix in one form: float (w,), q8 (q, scales) or q4 (q, scales, mins): QLinear's buffers."""

    form: str
    parts: tuple[Tensor, ...]

    def rows(self, index: Tensor) -> Weight:
        return Weight(self.form, tuple(p[index] for p in self.parts))

    def to_float(self) -> Tensor:
        return self.parts[0] if self.form == "float" else QLinear(self.form, *self.parts).dequantize()

    def to(self, form: str) -> Weight:
        if form == self.form:
            return self
        w = self.to_float()
        if form == "float":
            return Weight(form, (w,))
        layer = QLinear.from_float(w, form)
        return Weight(form, tuple(b for b in layer.parts() if b is not None))

    def module(self) -> nn.Module:
        if self.form != "float":
            return QLinear(self.form, *self.parts)
        w = self.parts[0]
        layer = nn.Linear(w.size(1), w.size(0), bias=False, device="meta")
        layer.weight = nn.Parameter(w)
        return layer


@dataclass(frozen=True)
class Entry:
    """What load_gguf keeps of one of the reader's tensors: where its bytes are and how to read them."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # gguf's order: the fastest-moving dimension first
    data_offset: int
    n_bytes: int
    dtype: np.dtype  # the reader's view of the bytes: its element type and shape
    data_shape: tuple[int, ...]

    @staticmethod
    def of(t: Any) -> Entry:
        return Entry(t.name, t.tensor_type, tuple(int(x) for x in t.shape), int(t.data_offset), int(t.n_bytes),
                     t.data.dtype, tuple(t.data.shape))  # fmt: skip


class OwnTableEmbedding(QEmbedding):
    """An untied embedding's quantized table: QEmbedding holds its table outside the module tree (a
    tied one is the LM head's); this one's is its own, so it is saved and moved with the model."""

    def __init__(self, table: QLinear):
        super().__init__(table)
        self.own = table


def load_gguf(
    path: str | Path, quantize: str, *, device: str | torch.device | None = None
) -> tuple[ModernDecoderLM, Tokenizer | None] | None:
    """A llama .gguf as a ModernDecoderLM in eval mode, its weights in the forms `quantize` ("auto",
    "int8", "int4"; see the module docstring) says, and the file's tokenizer where it is byte-level
    BPE with GPT-2's split (None: another kind, which transformers builds); None for a file the model
    cannot represent (another architecture, rope scaling, biases, MoE, unexpected tensors or shapes)."""
    from gguf import GGUFReader  # the `hf` extra: only a .gguf source needs it

    check_quantize(quantize, auto=True)
    if quantize == "none":
        return None  # float32 weights: transformers' path
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError, KeyError):  # not a file we can read: transformers' path says why
        return None
    tensors = {t.name: Entry.of(t) for t in reader.tensors}
    cfg = _config(reader, tensors)
    if cfg is None or not _shapes_match(cfg, tensors):
        return None
    tokenizer = _tokenizer(reader)  # from this parse: transformers' would import it and parse again
    del reader  # its metadata (~100k small arrays for the tokenizer, ~150 MB) is done with: give the
    release_freed_memory()  # memory back before the weights come on top (SmolLM2: 70 MB lower peak)
    with torch.device("meta"):
        model = ModernDecoderLM(cfg)
    try:
        with open(path, "rb") as f, short_lived_buffers():  # a changed form's float copies handed back at once
            _put_weights(model, cfg, tensors, quantize, f)
    except NotImplementedError:  # a tensor type gguf cannot dequantize (nor, then, transformers)
        return None
    model.rope = RotaryEmbedding.for_config(cfg)  # buffers made on meta: computed for real
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_gguf left tensors on the meta device: {left}")
    return model.to(device or "cpu").eval(), tokenizer


# ---- the tokenizer ---------------------------------------------------------------------------

# `tokenizer.ggml.pre` names that transformers' GGUF loader splits with GPT-2's own regex (it lists
# only the others): ours ("gpt-2", hf/gguf_export.py) and SmolLM2's. Any other goes through transformers.
GPT2_SPLIT = ("gpt-2", "smollm", "default")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)


def gguf_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a .gguf file as `_tokenizer` builds it (None: a kind transformers builds)."""
    from gguf import GGUFReader

    try:
        return _tokenizer(GGUFReader(str(path)))
    except (OSError, ValueError, KeyError):  # not a file we can read: transformers' path says why
        return None


def _tokenizer(reader: Any) -> Tokenizer | None:
    """The file's byte-level BPE ("gpt2") tokenizer, built as transformers' GGUF loader builds it
    (tests/test_gguf_weights.py compares the two on WikiText-2) but as llama.cpp reads two things it
    drops: control tokens outside GPT-2's alphabet, and "smollm"'s split of each \\p{N} character
    (tests/test_gguf_llama_cpp.py); or None for another kind."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or _field(reader, "tokenizer.ggml.pre") not in GPT2_SPLIT:
        return None
    if _field(reader, "tokenizer.ggml.add_eos_token", False):
        return None  # not a file we know (ours and SmolLM2's say false): transformers' rule
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [0] * len(tokens)
    spelling = byte_symbols()  # byte k -> its character
    alphabet = set(spelling)
    kinds = list(zip(tokens, types, strict=False))
    # a control or user-defined token (<|im_start|>, "<|end of turn|>", <think>) is its own text, as
    # llama.cpp reads it; another token in characters outside the alphabet is stored as its text:
    # BPE's vocabulary spells each of its UTF-8 bytes
    whole = {CONTROL, USER_DEFINED}
    vocab = {t if k in whole or set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, (t, k) in enumerate(kinds)}  # fmt: skip
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False))  # fmt: skip
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if _field(reader, "tokenizer.ggml.pre") == "smollm":  # as llama.cpp splits it: each \p{N} alone, then GPT-2's
        digits = pre_tokenizers.Split(Regex(r"\p{N}"), "isolated")  # (transformers' loader leaves this out)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, backend.pre_tokenizer])
    backend.decoder = decoders.ByteLevel()
    # control tokens stay whole and are special (transformers' loader drops those outside the
    # alphabet, a space or CJK in them: llama.cpp keeps them); user-defined ones stay whole as text
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in kinds if k == CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in kinds if k == USER_DEFINED])
    ids = {name: _field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding")}
    names = {f"{k[:3]}_token": tokens[i] if i is not None and 0 <= i < len(tokens) else None for k, i in ids.items()}
    bos = names["bos_token"] if _field(reader, "tokenizer.ggml.add_bos_token", False) else None
    if bos is None:  # transformers' post-processor, though `Tokenizer.encode` puts bos itself
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    else:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                               special_tokens=[(bos, ids["bos"])])  # fmt: skip
    template = _field(reader, "tokenizer.chat_template")
    return Tokenizer(backend, **names, chat_template=template if isinstance(template, str) else None,
                     add_bos=bos is not None)  # fmt: skip


# ---- the config ------------------------------------------------------------------------------


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config(reader: Any, tensors: dict[str, Entry]) -> ModelConfig | None:
    """The ModelConfig of the file's llama.* metadata (defaults: LlamaConfig's, as transformers reads
    it), or None when the model cannot compute what the file describes."""
    if _field(reader, "general.architecture") != "llama":
        return None
    if "mistral" in str(_field(reader, "general.name", "")).lower():
        return None  # transformers reads these as Mistral (sliding window): not ours to convert
    if _field(reader, "llama.expert_count", 0) or _field(reader, "llama.rope.scaling.type", "none") != "none":
        return None
    n_layer = _field(reader, "llama.block_count")
    if n_layer is None or "token_embd.weight" not in tensors:
        return None
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{name}.weight" for i in range(n_layer) for name in LAYER_TENSORS}
    if not set(tensors) <= expected:  # biases, rope_freqs (llama3 scaling), experts, ...
        return None
    d_model, n_head = _field(reader, "llama.embedding_length"), _field(reader, "llama.attention.head_count")
    if d_model is None or n_head is None or _field(reader, "llama.feed_forward_length") is None:
        return None
    head_dim = _field(reader, "llama.attention.key_length", d_model // n_head)
    if _field(reader, "llama.attention.value_length", head_dim) != head_dim:
        return None
    if _field(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        return None  # partial rotary
    try:
        return ModelConfig(
            vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml shapes are (K, N)
            d_model=d_model,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=_field(reader, "llama.attention.head_count_kv", n_head),
            head_dim=head_dim,
            d_ff=_field(reader, "llama.feed_forward_length"),
            max_seq_len=_field(reader, "llama.context_length", 2048),
            rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_embeddings="output.weight" not in tensors,
        )
    except ValueError:
        return None


def _shapes_match(cfg: ModelConfig, tensors: dict[str, Entry]) -> bool:
    """Every tensor the model needs is in the file, (N, K) as the model needs it; the norms in floats."""
    C, F, q, kv = cfg.d_model, cfg.d_ff, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    need = {"token_embd.weight": (cfg.vocab_size, C), "output_norm.weight": (C,)}
    if not cfg.tie_embeddings:
        need["output.weight"] = (cfg.vocab_size, C)
    per_layer = {
        "attn_norm": (C,), "ffn_norm": (C,), "attn_q": (q, C), "attn_k": (kv, C), "attn_v": (kv, C),
        "attn_output": (C, q), "ffn_gate": (F, C), "ffn_up": (F, C), "ffn_down": (C, F),
    }  # fmt: skip
    for i in range(cfg.n_layer):
        need |= {f"blk.{i}.{name}.weight": shape for name, shape in per_layer.items()}
    if not all(n in tensors and _shape(tensors[n]) == shape for n, shape in need.items()):
        return False
    return all(tensors[n].tensor_type.name in FLOAT_TYPES for n, shape in need.items() if len(shape) == 1)


def _shape(t: Entry) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(t.shape))


# ---- the weights -----------------------------------------------------------------------------


def _native(t: Entry) -> str:
    """The form a tensor of this type keeps under "auto" (see the module docstring)."""
    from gguf import GGML_QUANT_SIZES

    name = t.tensor_type.name
    if name in FLOAT_TYPES:
        return "float"
    if name in ("Q4_0", "Q4_1"):
        return "q4"
    block, size = GGML_QUANT_SIZES[t.tensor_type]
    return "q4" if 8 * size / block <= 5 else "q8"


def _data(t: Entry, f: Any) -> np.ndarray:
    """t's data as gguf's reader shapes and types it, read from the open file `f` into memory of our
    own: the reader's view maps the file, and every page read through a map counts as the process's
    memory until the map is gone (143 MB more at the peak for an 8-bit SmolLM2)."""
    f.seek(t.data_offset)
    buf = np.fromfile(f, dtype=np.uint8, count=t.n_bytes)
    if buf.size != t.n_bytes:
        raise OSError(f"the .gguf ends inside tensor {t.name}")
    return buf.view(t.dtype).reshape(t.data_shape)


def _read(t: Entry, f: Any) -> Weight:
    """A tensor of the file: Q8_0 / Q4_0 / Q4_1 as their blocks, any other type through gguf's
    dequantize, as float32."""
    from gguf.quants import dequantize

    shape = _shape(t)
    name = t.tensor_type.name
    data = _data(t, f)
    if name in ("Q8_0", "Q4_0", "Q4_1"):
        n, k = shape
        size = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}[name]
        blocks = data.reshape(n, k // QK, size)
        d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32))
        if name == "Q8_0":
            q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k))
            return Weight("q8", (q, d))
        if name == "Q4_1":
            m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32))
        else:
            m = -8 * d  # d (q - 8) = d q - 8 d, exactly (d q has at most 15 significant bits)
        q = torch.from_numpy(np.ascontiguousarray(blocks[..., size - QK // 2 :]).reshape(n, k // 2))
        return Weight("q4", (q, d, m))
    w = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
    return Weight("float", (torch.from_numpy(w.reshape(shape)),))


def unpermute_rows(n_rows: int, n_head: int) -> Tensor:
    """Row order that undoes llama.cpp's q/k permutation for `n_head` heads (transformers' GGUF
    loader's reverse: row (head, i, half) of the file is row (head, half, i) of the model)."""
    return torch.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


def _target(native: str, quantize: str, head: bool, in_features: int) -> str:
    if in_features % QK:
        return "float"  # no whole blocks (never so in a quantized file)
    if quantize == "auto":
        return native
    return "q8" if quantize == "int8" or head else "q4"


def _fused(tensors: list[Entry], quantize: str, rows: list[Tensor | None], f: Any) -> nn.Module:
    """One layer from several of the file's matrices stacked by rows, each put in row order `rows`
    first, all in one form."""
    form = max((_target(_native(t), quantize, False, _shape(t)[1]) for t in tensors), key=FORMS.index)
    weights = []
    for t, order in zip(tensors, rows, strict=True):
        w = _read(t, f)
        weights.append((w if order is None else w.rows(order)).to(form))
    return Weight(form, tuple(torch.cat(p) for p in zip(*(w.parts for w in weights), strict=True))).module()


@torch.no_grad()
def _put_weights(model: ModernDecoderLM, cfg: ModelConfig, tensors: dict[str, Entry], quantize: str, f: Any) -> None:
    def norm(name: str) -> nn.Parameter:
        return nn.Parameter(_read(tensors[name], f).parts[0])

    q_rows = unpermute_rows(cfg.n_head * cfg.head_dim, cfg.n_head)
    k_rows = unpermute_rows(cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head)
    for i, block in enumerate(model.layers):
        t = {name: tensors[f"blk.{i}.{name}.weight"] for name in LAYER_TENSORS}
        block.attn_norm.weight = norm(f"blk.{i}.attn_norm.weight")
        block.ffn_norm.weight = norm(f"blk.{i}.ffn_norm.weight")
        block.attn.wqkv = _fused([t["attn_q"], t["attn_k"], t["attn_v"]], quantize, [q_rows, k_rows, None], f)
        block.attn.wo = _fused([t["attn_output"]], quantize, [None], f)
        block.ffn.w_gate_up = _fused([t["ffn_gate"], t["ffn_up"]], quantize, [None, None], f)
        block.ffn.w_down = _fused([t["ffn_down"]], quantize, [None], f)
    model.norm.weight = norm("output_norm.weight")

    emb_t = tensors["token_embd.weight"]
    emb = _read(emb_t, f).to(_target(_native(emb_t), quantize, True, cfg.d_model))
    if cfg.tie_embeddings:
        model.lm_head = emb.module()
        if emb.form == "float":
            model.tok_emb.weight = model.lm_head.weight
        else:
            model.tok_emb = QEmbedding(model.lm_head)
        return
    head_t = tensors["output.weight"]
    model.lm_head = _read(head_t, f).to(_target(_native(head_t), quantize, True, cfg.d_model)).module()
    if emb.form == "float":
        model.tok_emb.weight = nn.Parameter(emb.parts[0])
    else:
        model.tok_emb = OwnTableEmbedding(emb.module())

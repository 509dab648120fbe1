"""int8 and int4 weights for decoding, and the fast float32 path: `prepare(model, quantize)`.

    model = prepare(model, "int8")   # every projection and the LM head in 8 bits

Decoding a small model reads every weight once per token, so its speed is the bytes it reads:
8-bit weights are about a quarter of float32's bytes, 4-bit about a sixth. The formats are GGUF's, so a
.gguf file's Q8_0 / Q4_0 / Q4_1 weights load as they are (`gguf_weights.py`), never expanded:

| quantize | projections                        | LM head / embedding | bytes per weight   |
|----------|------------------------------------|---------------------|--------------------|
| none     | float32 (FastLinear)               | float32             | 4                  |
| int8     | Q8_0: int8, one scale per 32       | Q8_0                | 1.0625 + scales    |
| int4     | Q4_1: 4 bits, scale and min per 32 | Q8_0 (*)            | 0.5 + scales, mins |

(*) The head stays at 8 bits in int4, as llama.cpp's 4-bit files keep theirs: 4-bit logits cost
more quality than they save time. Scales and mins are float32 here (4 bytes per 32 weights each).

Q8_0: w = d * q, q in -127..127, d = max|w| / 127 per block of 32 input features.
Q4_1: w = d * q + m, q in 0..15, m = min(w), d = (max(w) - min(w)) / 15 per block of 32.

An 8-bit layer rounds its input to Q8_0 too (`round_q8`, per row and block of 32, as llama.cpp does)
and multiplies bytes by bytes into int32 sums: ~4x the float32 multiply-adds per instruction, for
every row count, a prefill's too. A 4-bit layer keeps float32 activations. The matmuls run in
modernlm/kernels (CPU); elsewhere (a GPU, autograd) a layer dequantizes its weight and calls F.linear
(on round_q8(x) for 8 bits: the same function of x): right, not fast. Quality is measured, not
assumed: docs/model.md#quantized-decoding has WikiText-2 perplexity at each setting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modernlm import kernels
from modernlm.errors import UserError
from modernlm.runtime import short_lived_buffers

QUANTIZE = ("none", "int8", "int4")
QK = 32  # weights per block
RowReader = Callable[[int, int], Tensor]  # (i, j) -> rows i..j-1 of a weight, as floats


def check_quantize(value: str, field: str = "quantize", auto: bool = False) -> str:
    """`value` if it names a setting ("auto" too where `auto`: a .gguf's own form), else a UserError."""
    allowed = (*QUANTIZE, "auto") if auto else QUANTIZE
    if value not in allowed:
        raise UserError(f"{field} must be one of {list(allowed)}, got {value!r}")
    return value


# ---- formats --------------------------------------------------------------------------------


def _round_away(x: Tensor) -> Tensor:
    """C's roundf: halves away from zero (torch.round takes them to even), as GGUF's reference does."""
    return x.sign() * (x.abs() + 0.5).floor()


def quantize_q8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> q (N, K) int8, scales (N, K/32) float32 (GGUF's Q8_0 rounding)."""
    blocks = w.float().reshape(w.size(0), -1, QK)
    d = blocks.abs().amax(-1) / 127  # (N, QB)
    inv = torch.where(d > 0, 1 / d, 0)  # the reference multiplies by 1/d
    q = _round_away(blocks * inv[..., None]).to(torch.int8)
    return q.reshape(w.shape), d.contiguous()


def dequantize_q8(q: Tensor, scales: Tensor, out: Tensor | None = None) -> Tensor:
    """The float32 weight (N, K); written into `out` (a flat buffer of at least N * K) if given."""
    N, QB = scales.shape
    w = out[: N * QB * QK].view(N, QB, QK) if out is not None else None
    return torch.mul(q.view(N, QB, QK), scales[..., None], out=w).view(N, QB * QK)


def round_q8(x: Tensor) -> Tensor:
    """x as the 8-bit layers see it: rounded to Q8_0 along its last dimension, llama.cpp's way on
    x86 (per block of 32, d = max|x| / 127 kept at float16, q = x / d rounded half to even); d * q."""
    blocks = x.float().reshape(*x.shape[:-1], -1, QK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, 0))
    return (q * d.half().float()).reshape(x.shape).to(x.dtype)


def pack_q8(q: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q8_0 (q (N, K) int8, scales (N, K/32)) in the order the 8-bit kernel reads: 16 output features
    side by side, 4 input features each, so that one 64-byte load feeds 16 outputs. Returns
    qp (G, K/4, 64) uint8 holding q + 128, and sp (G, K/32, 16) float32, with G = ceil(N / 16) (rows
    past N are zero). `unpack_q8` is the inverse."""
    N, K = q.shape
    G = -(-N // 16)
    if G * 16 != N:
        q = torch.cat([q, q.new_zeros(G * 16 - N, K)])
        scales = torch.cat([scales, scales.new_zeros(G * 16 - N, scales.size(1))])
    qp = (q.view(torch.uint8) ^ 128).view(G, 16, K // 4, 4).transpose(1, 2).reshape(G, K // 4, 64)
    sp = scales.float().view(G, 16, K // QK).transpose(1, 2).contiguous()
    return qp, sp


def unpack_q8(qp: Tensor, sp: Tensor, rows: Tensor | int) -> tuple[Tensor, Tensor]:
    """The Q8_0 (q, scales) of `rows` (an index tensor, or N for rows 0 .. N-1) from `pack_q8`'s form."""
    G, K4, _ = qp.shape
    rows = torch.arange(rows, device=qp.device) if isinstance(rows, int) else rows.reshape(-1)
    g, lane = rows // 16, rows % 16
    q = (qp.view(G, K4, 16, 4)[g, :, lane] ^ 128).view(torch.int8)  # (rows, K/4, 4): indexed dims first
    return q.reshape(len(rows), 4 * K4), sp[g, :, lane]


def quantize_q4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) float -> q (N, K/2) uint8 packed, scales and mins (N, K/32) float32 (GGUF's Q4_1:
    byte j of a block holds weight j in its low nibble and weight j + 16 in its high one)."""
    blocks = w.float().reshape(w.size(0), -1, QK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, 0)
    q = ((blocks - lo[..., None]) * inv[..., None] + 0.5).floor().clamp(0, 15).to(torch.uint8)  # as the reference
    packed = q[..., :16] | (q[..., 16:] << 4)  # (N, QB, 16)
    return packed.reshape(w.size(0), -1), d.contiguous(), lo.contiguous()


def dequantize_q4(q: Tensor, scales: Tensor, mins: Tensor, out: Tensor | None = None) -> Tensor:
    """The float32 weight (N, K); written into `out` (a flat buffer of at least N * K) if given."""
    N, QB = scales.shape
    w = out[: N * QB * QK].view(N, QB, QK) if out is not None else q.new_empty(N, QB, QK, dtype=torch.float32)
    b = q.view(N, QB, 16)
    torch.mul(b & 15, scales[..., None], out=w[..., :16])  # low nibbles: weights 0..15 of each block
    torch.mul(b >> 4, scales[..., None], out=w[..., 16:])  # high nibbles: weights 16..31
    return w.add_(mins[..., None]).view(N, QB * QK)


# ---- layers ---------------------------------------------------------------------------------


class FastLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose few-row products at inference run in the
    float32 kernel: a decode step's matmul streams its weight once instead of calling a GEMM."""

    def step_parts(self) -> tuple[int, list[Tensor]] | None:
        """(kind, tensors) as kernels.decode_layers reads this layer in a fused decode step."""
        p = self._parameters  # not self.weight: nn.Module's lookup costs more than the rest of a step's listing
        return (kernels.F32, [p["weight"]]) if p["bias"] is None and self.in_features % 16 == 0 else None

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() <= 16 * x.size(-1) and self.bias is None and kernels.usable(x) and self.in_features % 16 == 0:
            y = kernels.linear_f32(x.reshape(-1, x.size(-1)).contiguous(), self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


class QLinear(nn.Module):
    """A bias-free linear layer with Q8_0 ("q8") or Q4_1 ("q4") weights; buffers, not parameters
    (nothing here trains). q8 weights are held in `pack_q8`'s order, the 8-bit kernel's; `parts()`
    gives GGUF's (q, scales[, mins]) back, `dequantize()` the float32 weight."""

    def __init__(self, kind: str, q: Tensor, scales: Tensor, mins: Tensor | None = None):
        super().__init__()
        self.kind = kind
        self.out_features = q.size(0)
        self.in_features = q.size(1) * (2 if kind == "q4" else 1)
        if kind == "q8":
            q, scales = pack_q8(q, scales)
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("mins", mins.float().contiguous() if mins is not None else None)

    @classmethod
    def from_float(cls, w: Tensor, kind: str, rows: int = 1024) -> QLinear:
        """The weight w (N, K) quantized, `rows` rows at a time (see from_rows)."""
        return cls.from_rows(lambda i, j: w[i:j], w.size(0), kind, rows)

    @classmethod
    def from_rows(cls, read: RowReader, n_rows: int, kind: str, rows: int = 1024) -> QLinear:
        """The weight whose rows i..j-1 are read(i, j), quantized `rows` rows at a time (each row is
        quantized on its own): a whole embedding's float temporaries (SmolLM2's 49152 x 576) would
        be ~0.4 GB at the load's peak, and a checkpoint streamed from disk is never all in memory."""
        quantize = quantize_q8 if kind == "q8" else quantize_q4
        parts = [quantize(read(i, min(i + rows, n_rows))) for i in range(0, n_rows, rows)]
        return cls(kind, *(torch.cat(p) for p in zip(*parts, strict=True)))

    def parts(self, rows: Tensor | None = None) -> tuple[Tensor, ...]:
        """GGUF's (q, scales) for q8, (q, scales, mins) for q4: of every row, or of `rows` (indices)."""
        if self.kind == "q8":
            return unpack_q8(self.q, self.scales, self.out_features if rows is None else rows)
        if rows is None:
            return self.q, self.scales, self.mins
        return self.q[rows], self.scales[rows], self.mins[rows]

    def dequantize(self, out: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """The float32 weight (N, K), or its `rows`; written into `out` (a flat buffer) if given."""
        if self.kind == "q8":
            return dequantize_q8(*self.parts(rows), out)
        return dequantize_q4(*self.parts(rows), out)

    def step_parts(self) -> tuple[int, list[Tensor]]:
        """(kind, tensors) as kernels.decode_layers reads this layer in a fused decode step."""
        b = self._buffers  # not self.q: nn.Module's lookup costs more than the rest of a step's listing
        if self.kind == "q8":
            return kernels.Q8, [b["q"], b["scales"]]
        return kernels.Q4, [b["q"], b["scales"], b["mins"]]

    def forward(self, x: Tensor) -> Tensor:
        if kernels.usable(x) and (self.kind == "q8" or x.numel() <= 64 * x.size(-1)):
            flat = x.reshape(-1, x.size(-1)).contiguous()
            if self.kind == "q8":
                # any number of rows, a prefill's too: 8-bit products outrun a float32 GEMM (~2x here)
                y = kernels.linear_q8(flat, self.q, self.scales)[:, : self.out_features]
            else:
                y = kernels.linear_q4(flat, self.q, self.scales, self.mins)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.kind == "q8":  # no kernel here (a GPU, autograd, MODERNLM_KERNELS=0): the same function
            return F.linear(round_q8(x), self.dequantize().to(x.dtype))
        # many rows (a q4 prefill): the weight dequantized into a buffer every layer reuses (fresh
        # memory for each would cost a page fault per 4 KiB), then a GEMM at the machine's matmul rate
        if x.dtype != torch.float32 or torch.is_grad_enabled():  # autograd keeps the weight: no shared buffer
            return F.linear(x, self.dequantize().to(x.dtype))
        return F.linear(x, self.dequantize(out=_scratch(self.out_features * self.in_features, x.device)))

    def _apply(self, fn, recurse: bool = True):
        # model.to(bfloat16), .half(): the blocks keep their dtypes (8-bit codes, float32 scales: the
        # kernels' and GGUF's layout; forward casts the weight to the activations' dtype); a move to
        # another device moves them
        device = fn(torch.empty(0, device=self.q.device)).device
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kind={self.kind}"


_local = threading.local()  # per thread: a model may decode on one thread while another scores


def _scratch(n: int, device: torch.device) -> Tensor:
    """A float32 buffer of at least n elements, this thread's, kept for the next layer."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n or buf.device != device:
        buf = _local.buf = torch.empty(n, device=device)
    return buf


class QEmbedding(nn.Module):
    """Token embedding read from a QLinear's weight (tied embeddings: the LM head's matrix), its
    rows given in `dtype`, the model's (a bfloat16 model's layers left in floats take bfloat16)."""

    def __init__(self, table: QLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table = [table]  # a list: not a submodule, so its buffers are not saved twice
        self.dtype = dtype

    @property
    def weight(self) -> Tensor:  # the rows as floats, for code that reads the matrix
        return self.table[0].dequantize()

    def _apply(self, fn, recurse: bool = True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # model.to(bfloat16): rows in bfloat16
        return super()._apply(fn, recurse)

    def forward(self, idx: Tensor) -> Tensor:
        rows = self.table[0].dequantize(rows=idx.reshape(-1)).to(self.dtype)
        return rows.view(*idx.shape, self.table[0].in_features)


# ---- the model --------------------------------------------------------------------------------


def _projections(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every nn.Linear in the blocks (attention, FFN, experts)."""
    out = []
    for parent in model.layers.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, name, child))
    return out


def quantized_weights(model: nn.Module) -> int:
    """How many weights the model's QLinear layers hold (they are buffers, not parameters)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QLinear))


def quantize_of(model: nn.Module) -> str:
    """The setting a model was prepared with: "int8", "int4" or "none"."""
    kinds = {m.kind for m in model.layers.modules() if isinstance(m, QLinear)}
    return "int4" if "q4" in kinds else "int8" if kinds else "none"


def _own_rows(layer: nn.Linear) -> RowReader:
    return lambda i, j: layer.weight[i:j]


@torch.no_grad()
def prepare(model: nn.Module, quantize: str = "none",
            rows_of: Callable[[nn.Linear], RowReader] = _own_rows) -> nn.Module:  # fmt: skip
    """Make a ModernDecoderLM ready to decode fast, in place: with quantize="none" its linear layers
    become FastLinear (same weights); "int8" / "int4" replace them with QLinear (see the table
    above). For inference only: a quantized model has no trainable projections. Returns the model.
    rows_of(layer) reads a layer's weight rows; by default its own (checkpoint.load_model gives one
    that reads the file, for a model built on meta that never holds its float weights)."""
    check_quantize(quantize)
    kind = {"int8": "q8", "int4": "q4"}.get(quantize)
    if kind is None:
        for _, _, layer in _projections(model):
            if type(layer) is nn.Linear:
                layer.__class__ = FastLinear  # same module, same parameters: only forward differs
        if type(model.lm_head) is nn.Linear:
            model.lm_head.__class__ = FastLinear
        return model
    with short_lived_buffers():  # the float rows' chunks: each handed back as soon as it is done
        _quantize(model, kind, rows_of)
    return model


def _quantize(model: nn.Module, kind: str, rows_of: Callable[[nn.Linear], RowReader]) -> None:
    for parent, name, layer in _projections(model):
        if layer.in_features % QK == 0:
            setattr(parent, name, QLinear.from_rows(rows_of(layer), layer.out_features, kind))
    head = model.lm_head
    if isinstance(head, nn.Linear) and head.in_features % QK == 0:
        # the head in 8 bits for both settings: 4-bit logits cost more quality than they save time
        q = QLinear.from_rows(rows_of(head), head.out_features, "q8")
        model.lm_head = q
        if model.config.tie_embeddings:
            model.tok_emb = QEmbedding(q, model.tok_emb.weight.dtype)
    # the float tensors left (the norms) into memory of their own: a loaded checkpoint's tensors all
    # share one map of its file, which, while any of them lives, keeps every page the quantizer
    # read resident (SmolLM2: 0.5 GB); short_lived_buffers hands the freed copies back on exit
    for p in model.parameters():
        p.data = p.data.clone()

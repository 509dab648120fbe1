"""ModernDecoderLM: a Llama-style decoder-only transformer, read top to bottom.

Token embedding -> n_layer pre-norm blocks [RMSNorm -> causal self-attention with RoPE and GQA ->
residual; RMSNorm -> SwiGLU (or top-k routed SwiGLU experts) -> residual] -> final RMSNorm -> LM
head. Each option (GQA, MoE, the attention sink) is one visible `if` in the forward that uses it.
With `tie_embeddings`, no MoE and no sinks, the weights map one to one onto HF's LlamaForCausalLM
(see hf/convert.py), and the logits agree to float32 rounding.

Shape glossary: B batch, T new tokens, S key/value length (cache + new), C d_model, H query heads,
K kv heads, D head dim, F ffn hidden, V vocab, E experts, N tokens (B*T).

Design notes: docs/design.md#modelpy
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modernlm import kernels


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # tokens; pad to a multiple of 64 for speed
    d_model: int = 256  # C: residual stream width
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # H: query heads
    n_kv_head: int = 0  # K: key/value heads (GQA); 0 = n_head (MHA), 1 = MQA
    head_dim: int = 0  # D: per-head width; 0 = d_model // n_head
    d_ff: int = 0  # F: SwiGLU hidden width; 0 = 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256  # trained context length (tokens)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    dropout: float = 0.0  # residual dropout (embedding, attention output, FFN output)
    attn_dropout: float = 0.0  # dropout on attention probabilities (training only)
    init_std: float = 0.02  # std of the normal init; residual projections get / sqrt(2 n_layer)
    # MoE: 0 experts = dense model
    n_expert: int = 0  # E: experts per MoE layer
    n_expert_per_token: int = 2  # top-k experts each token is sent to
    moe_layers: list[int] | None = None  # which blocks use MoE; None = all of them
    moe_d_ff: int = 0  # hidden width of each expert; 0 = d_ff
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer's alpha)
    # Attention sink
    attn_sink: bool = False  # prepend a learned sink token to every sequence (StreamingLLM)

    def __post_init__(self) -> None:
        # Derive, then validate. Messages name the field: the config loader shows them to the user.
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.d_model // self.n_head
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.moe_d_ff == 0:
            self.moe_d_ff = self.d_ff
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.n_expert:
            if not 1 <= self.n_expert_per_token <= self.n_expert:
                raise ValueError(
                    f"n_expert_per_token ({self.n_expert_per_token}) must be in 1..n_expert ({self.n_expert})"
                )
            bad = [i for i in self.moe_layers or [] if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"moe_layers {bad} out of range for n_layer={self.n_layer}")

    def is_moe_layer(self, i: int) -> bool:
        return self.n_expert > 0 and (self.moe_layers is None or i in self.moe_layers)


class LMOutput(NamedTuple):
    logits: Tensor | None  # (B, T, V), or (B, 1, V) with last_only; None with head=False
    aux_loss: Tensor | None  # MoE load-balancing loss, already weighted by moe_aux_loss_coef
    hidden: Tensor | None = None  # (B, T, C) final-norm states, with return_hidden (value heads)


# --------------------------------------------------------------------------------------------
# Leaf pieces: RMSNorm and rotary position embeddings
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Llama's reference (matters under bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Written out: measured ~4% faster per decode step on CPU than F.rms_norm at our sizes.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight).type_as(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE in the "rotate half" layout HF Llama uses (no weight permutation).

    The tables are float32 buffers, not parameters, and are not saved in checkpoints. They grow on
    demand when generation runs past the trained context without a rolling cache.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Under torch.device("meta") (a model about to be loaded) the tables are computed on the CPU:
        # on meta, pow and cos run torch's Python decompositions, whose import costs a process ~70 MB.
        device = "cpu" if torch.get_default_device().type == "meta" else None
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_seq_len)

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> RotaryEmbedding:
        # one more position when the sink token sits in front of every sequence
        return cls(cfg.head_dim, cfg.max_seq_len + int(cfg.attn_sink), cfg.rope_theta)

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (L, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def reserve(self, length: int) -> None:
        """Tables for positions 0 .. length-1 at least (grown by doubling: rarely rebuilt)."""
        if length > self.cos.size(0):
            self._build(max(length, 2 * self.cos.size(0)))

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin for positions start .. start+length-1, each (length, D)."""
        self.reserve(start + length)
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: Tensor, need: int | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin for each row's own positions (B, T): each (B, 1, T, D), broadcast over heads.
        `need`: positions.max() + 1 when the caller knows it (reading it from the tensor would stop
        a compiled step to sync)."""
        self.reserve(int(positions.max()) + 1 if need is None else need)
        return self.cos[positions][:, None], self.sin[positions][:, None]


def dropout_layer(p: float) -> nn.Module:
    # Identity when off: a Dropout(0) still costs a dispatch per call, which shows in decoding.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, D) by the angles of its positions; cos/sin are (T, D) float32."""
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated per-layer keys and values, (B, K, capacity, D) each.

    Plain mode (window=0): slots are absolute positions; keys are stored after RoPE.
    Rolling mode (window>0, StreamingLLM): the cache keeps the first `sink_size` slots plus the
    most recent `window`; keys are stored *before* RoPE and rotated by their slot inside the cache
    on every step, so positions stay below `capacity` and generation can run for any length in
    constant memory. Room beyond sink_size + window bounds how many tokens one forward may add
    (`ModernDecoderLM.new_cache` sizes it from `chunk`).

    `valid` (B, capacity) marks real tokens when a batch is left-padded; None when no padding.
    """

    fused = True  # decode steps in one kernel call where it runs them (ModernDecoderLM._fused_step)

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        capacity: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        window: int = 0,
        sink_size: int = 4,
    ):
        self.window, self.sink_size = window, sink_size
        if window and capacity <= sink_size + window:
            raise ValueError(f"KVCache: capacity {capacity} leaves no room beyond sink_size + window")
        shape = (batch_size, cfg.n_kv_head, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.capacity = capacity
        self.length = 0  # filled slots
        self.seen = 0  # tokens ever added (equals length in plain mode)
        self.valid: Tensor | None = None

    @property
    def rolling(self) -> bool:
        return self.window > 0

    def check_room(self, t: int) -> None:
        if t > self.capacity - self.length:
            raise ValueError(f"KVCache: cannot add {t} tokens (room for {self.capacity - self.length})")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, K, T, D) at the next slots; return all keys/values (B, K, S, D)."""
        t = k.size(2)
        self.k[layer][:, :, self.length : self.length + t] = k
        self.v[layer][:, :, self.length : self.length + t] = v
        s = self.length + t
        return self.k[layer][:, :, :s], self.v[layer][:, :, :s]

    def set_valid(self, mask: Tensor) -> None:
        """Record which of the next T slots hold real tokens (mask: (B, T) bool)."""
        if self.valid is None:
            b = mask.size(0)
            self.valid = torch.ones(b, self.capacity, dtype=torch.bool, device=mask.device)
        self.valid[:, self.length : self.length + mask.size(1)] = mask

    def advance(self, t: int) -> None:
        """Commit the t tokens just written; in rolling mode evict the oldest non-sink slots."""
        self.length += t
        self.seen += t
        if self.rolling and self.length > self.sink_size + self.window:
            keep_from, dst = self.length - self.window, self.sink_size
            for buf in (*self.k, *self.v):
                buf[:, :, dst : dst + self.window] = buf[:, :, keep_from : self.length].clone()
            if self.valid is not None:
                self.valid[:, dst : dst + self.window] = self.valid[:, keep_from : self.length].clone()
            self.length = self.sink_size + self.window

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (*self.k, *self.v))


def attention_kernel_fits(n_head: int, n_kv_head: int, head_dim: int, pool_dtype: torch.dtype) -> bool:
    """Whether modernlm/kernels' attention takes these heads and this pool: up to 8 query heads per
    kv head, head_dim a multiple of 16 up to 128, a float32 or float16 pool."""
    heads_fit = n_head // n_kv_head <= 8 and head_dim % 16 == 0 and head_dim <= 128
    return heads_fit and pool_dtype in (torch.float32, torch.float16)


class PagedCache:
    """A KV cache in fixed-size blocks that many sequences share: continuous batching (`modernlm serve`).

    The pool holds `num_blocks` blocks of `block_size` slots, per layer k[l] and v[l] each
    (num_blocks, K, block_size, D), keys after RoPE. A sequence owns a list of blocks, its block
    table: its token at position p sits in slot p % block_size of block table[p // block_size]. So
    memory follows what sequences hold, and a block can hold the same prefix for several sequences.
    Who owns which block, and when one is shared or freed, is the caller's (serve/blocks.py); this
    class only reads and writes.

    `select(tables, lengths)` sets the rows of the next forward: row r continues at position
    lengths[r], and its table already has room for what the forward adds. Attention gathers each
    row's blocks into one contiguous (rows, K, S, D) tensor, S the widest table's slots, each row
    masked to its own positions (`ModernDecoderLM.forward`): one `index_select` per layer, a copy of
    the keys and values the step reads anyway.

    `dtype` is the pool's: the model's, or float16 under a float32 model (half the memory, as
    llama.cpp's default cache): keys and values are rounded to it as they are written and read
    back as the model's.
    """

    rolling = False
    valid = None
    fused = True  # decode steps in one kernel call where it runs them (ModernDecoderLM._fused_step)
    keeps_scratch = True  # the gathered keys and values go to one buffer kept for every step

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, *, device, dtype: torch.dtype):
        shape = (num_blocks, cfg.n_kv_head, block_size, cfg.head_dim)
        # empty, not zeros: a block's memory is touched (resident) only once a sequence writes it
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.rows, self.seen = 0, 1
        self._scratch: Tensor | None = None  # (2, rows * K * blocks, block_size * D): the gathered keys, values

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over every layer, keys and values."""
        return 2 * cfg.n_layer * cfg.n_kv_head * block_size * cfg.head_dim * dtype.itemsize

    def clear(self, blocks: list[int]) -> None:
        """Zero blocks that a forward will leave partly written: the slots past a row's length
        still enter attention's matmul (with weight 0), and 0 * a NaN left in memory is NaN."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.k[0].device)
        for buf in (*self.k, *self.v):
            buf.index_fill_(0, index, 0)

    def select(self, tables: list[list[int]], lengths: list[int]) -> None:
        """The rows of the next forward: their block tables and how many slots each has filled."""
        # at least 2 wide: torch.compile specialises a size of 1, and a compiled decode step would
        # then be built twice, for tables of one block and of more
        width = max(2, *(len(t) for t in tables))
        device = self.k[0].device
        # short tables padded with their first block: slots past a row's length are masked anyway
        table = torch.tensor([t + t[:1] * (width - len(t)) for t in tables], device=device)  # (rows, width)
        self.table, self.rows = table, len(tables)
        self.lengths = torch.tensor(lengths, device=device)
        # as Python ints, so a (compiled) forward checks room and sizes RoPE without reading tensors
        self.room = min(len(t) * self.block_size - n for t, n in zip(tables, lengths, strict=True))
        self.end = max(lengths)
        self.seen = int(min(lengths) > 0)  # 0: fresh rows (the model then adds its sink token)
        self.gather = self.gather_index(table)

    def gather_index(self, table: Tensor) -> Tensor:
        """Row r, kv head h, block j of the gathered keys is pool row table[r, j] * K + h of the
        pool viewed as (num_blocks * K, block_size * D): one index_select, a contiguous result."""
        K = self.k[0].size(1)
        return (table[:, None, :] * K + torch.arange(K, device=table.device)[None, :, None]).flatten()

    def check_room(self, t: int) -> None:
        if t > self.room:
            raise ValueError(f"PagedCache: a row has no block for {t} more tokens; allocate first")

    def positions(self, t: int) -> Tensor:
        """(rows, t) positions of the next t tokens of each row."""
        return self.lengths[:, None] + torch.arange(t, device=self.lengths.device)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write k, v (rows, K, T, D) at each row's next slots."""
        pos = self.positions(k.size(2))  # (rows, T)
        block, slot = self.table.gather(1, pos // self.block_size), pos % self.block_size
        # advanced indices on dims 0 and 2: the indexed view is (rows, T, K, D)
        self.k[layer][block, :, slot] = k.transpose(1, 2).to(self.k[layer].dtype)  # a 16-bit cache rounds here
        self.v[layer][block, :, slot] = v.transpose(1, 2).to(self.v[layer].dtype)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (rows, K, T, D) at each row's next slots; return every row's keys/values
        (rows, K, S, D), S = the widest table's slots."""
        self.write(layer, k, v)
        rows, K, _, D = k.shape
        S = self.table.size(1) * self.block_size
        flat = (self.num_blocks * K, self.block_size * D)
        n, out = self.gather.numel(), (None, None)
        if self.keeps_scratch:
            if self._scratch is None or self._scratch.size(1) < n:
                # one buffer pair for every layer and step: fresh memory each time costs page faults
                # that made the gather several times slower than the copy itself
                self._scratch = torch.empty(2, n, flat[1], device=k.device, dtype=self.k[layer].dtype)
            out = self._scratch[0, :n], self._scratch[1, :n]
        keys = torch.index_select(self.k[layer].view(flat), 0, self.gather, out=out[0])
        values = torch.index_select(self.v[layer].view(flat), 0, self.gather, out=out[1])
        return keys.view(rows, K, S, D).to(k.dtype), values.view(rows, K, S, D).to(v.dtype)

    def attends_in_place(self, q: Tensor) -> bool:
        """Whether a decode step's queries q (rows, H, 1, D) can read the blocks where they are
        (modernlm/kernels: CPU float32 queries over a float32 or float16 pool, up to 8 query heads
        per kv head, head_dim <= 128): no gather copy, no mask."""
        fits = q.size(2) == 1 and attention_kernel_fits(q.size(1), self.k[0].size(1), q.size(-1), self.k[0].dtype)
        return fits and kernels.usable(q)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """A decode step's attention read in place: write k, v (rows, K, 1, D), then each row's
        queries q (rows, H, 1, D) attend to its positions 0 .. length. Returns (rows, H, D)."""
        self.write(layer, k, v)
        scale = 1.0 / math.sqrt(q.size(-1))
        return kernels.paged_attention(q[:, :, 0].contiguous(), self.k[layer], self.v[layer], self.table,
                                       self.lengths + 1, scale)  # fmt: skip

    def advance(self, t: int) -> None:
        self.lengths += t
        self.room, self.end = self.room - t, self.end + t


# --------------------------------------------------------------------------------------------
# Attention, SwiGLU, MoE, Block
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k and v come from one matmul (fewer, larger kernels; HF's q/k/v_proj are its rows)
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = dropout_layer(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | PagedCache | None = None,
        mask: Tensor | None = None,
        key_rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * K, D).transpose(1, 2)  # (B, H+2K, T, D)
        if cache is not None and cache.rolling:
            # StreamingLLM: cache raw keys, then rotate every cached key by its slot in the cache.
            q, k, v = qkv.split([H, K, K], dim=1)
            q = apply_rope(q, *rope)  # (B, H, T, D)
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D), not yet rotated
            k = apply_rope(k, *key_rope)
        else:
            q, k = apply_rope(qkv[:, : H + K], *rope).split([H, K], dim=1)  # one rotation for both
            v = qkv[:, H + K :]  # (B, K, T, D)
            if isinstance(cache, PagedCache) and cache.attends_in_place(q):
                # a decode step over the paged cache: the kernel reads each row's blocks in place
                y = cache.attend(self.layer_idx, q, k, v)  # (B, H, D)
                return self.resid_dropout(self.wo(y.reshape(B, 1, H * D)))
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)

        dropout = self.attn_dropout if self.training else 0.0
        if self.n_kv_head != self.n_head and T == 1:
            # GQA, one new token (a decode step): each K/V head's G query heads become G queries of
            # that head, so the cache is read as it is instead of copied G times (at batch 16 that
            # copy cost more than the matmuls). One token's queries share one mask, no causal order.
            G = self.n_head // self.n_kv_head
            y = F.scaled_dot_product_attention(q.reshape(B, K, G, D), k, v, attn_mask=mask, dropout_p=dropout)
            y = y.reshape(B, self.n_head * self.head_dim)[:, None]  # (B, 1, H*D): head h = kv head h // G
            return self.resid_dropout(self.wo(y))
        if self.n_kv_head != self.n_head:
            # GQA: each K/V head serves n_head // n_kv_head query heads. SDPA's enable_gqa would
            # skip this copy but is not supported by every backend (and not by older torch).
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)

        if mask is None:
            # Causal among the T new tokens, full view of the cache: is_causal covers T == S
            # (no cache) and T == 1 (one decode step sees everything).
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.resid_dropout(self.wo(y))


class SwiGLU(nn.Module):
    """w_down(silu(W_gate x) * W_up x): the Llama feed-forward."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)  # [gate; up] in one matmul
        self.w_down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = dropout_layer(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # (..., F) each
        return self.dropout(self.w_down(F.silu(gate) * up))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral-style routing, Switch-Transformer balancing loss).

    Routing: p = softmax(router(x)) over E experts; each token goes to its top-k experts and their
    weights are renormalised to sum to 1 (Mixtral). Load balancing (Switch Transformer eq. 4,
    generalised to top-k as HF's Mixtral does):
        aux = E * sum_e f_e * P_e
    f_e = fraction of the N*k token->expert assignments that went to expert e,
    P_e = mean router probability of expert e over the N tokens. aux is 1 when routing is uniform
    and grows as it collapses. We follow this formulation because it is the one whose balanced
    value does not depend on E or k, and it is what Mixtral/OLMoE checkpoints were trained with.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_expert, self.top_k = cfg.n_expert, cfg.n_expert_per_token
        self.router = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.moe_d_ff) for _ in range(cfg.n_expert))
        self.dropout = dropout_layer(cfg.dropout)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, C) -> probs (N, E), top-k weights (N, k), top-k expert ids (N, k)."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        probs, weights, experts = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts == e)  # which tokens chose e, in which top-k slot
            y = expert(x[token]) * weights[token, slot, None].to(x.dtype)  # (N_e, C)
            out.index_add_(0, token, y)
        # load balancing: fraction of assignments per expert times mean probability per expert
        counts = torch.bincount(experts.flatten(), minlength=self.n_expert).float()  # (E,)
        f = counts / experts.numel()
        aux = self.n_expert * (f * probs.mean(dim=0)).sum()
        return self.dropout(out.view(B, T, C)), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoE(cfg) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff, cfg.dropout)

    def forward(self, x: Tensor, rope, cache=None, mask=None, key_rope=None) -> tuple[Tensor, Tensor | None]:
        x = x + self.attn(self.attn_norm(x), rope, cache, mask, key_rope)
        if self.is_moe:
            h, aux = self.ffn(self.ffn_norm(x))
            return x + h, aux
        return x + self.ffn(self.ffn_norm(x)), None


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ModernDecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Built on meta (a model about to be loaded): no init (see init_weights), not even the embedding's own
        meta = torch.empty(cfg.vocab_size, cfg.d_model) if torch.get_default_device().type == "meta" else None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=meta)
        self.emb_dropout = dropout_layer(cfg.dropout)
        self.sink = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.attn_sink else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rope = RotaryEmbedding.for_config(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every init rule, in one place (GPT-2 / nanoGPT scheme).

        | parameter                         | init                                   |
        |-----------------------------------|----------------------------------------|
        | embedding, wqkv, w_gate_up, router | normal(0, init_std)                   |
        | attention wo, FFN w_down          | normal(0, init_std / sqrt(2 n_layer))  |
        | untied LM head                    | normal(0, init_std)                    |
        | RMSNorm weights                   | 1                                      |
        | sink token                        | normal(0, init_std)                    |

        The residual projections are scaled down so the residual stream's variance does not grow
        with depth. NOTE: call this again after materialising a model built on the meta device;
        the RoPE tables are buffers and must be rebuilt too (`RotaryEmbedding.for_config`).
        """
        if self.tok_emb.weight.is_meta:
            # nothing to fill (a model about to be loaded); and on meta, normal_ runs torch's Python
            # decompositions, whose import costs a process ~70 MB
            return
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        idx: Tensor,
        *,
        cache: KVCache | PagedCache | None = None,
        pad_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        head: bool = True,
    ) -> LMOutput:
        """idx (B, T) token ids -> LMOutput(logits (B, T, V), aux_loss, hidden).

        cache: continue from (and append to) a KVCache; positions continue from the cache. A
            PagedCache (continuous batching) continues each row from its own position.
        pad_mask: (B, T) bool, False at padding (left-padded batched prompts); padding is never
            attended to. Without padding, attention runs SDPA's causal fast path.
        segment_ids: (B, T) ints for packed rows: a token attends only to earlier tokens of its own
            segment. RoPE scores depend only on relative positions, so each packed example gets the
            logits it would get alone. Training only (no cache, no pad_mask).
        last_only: compute logits for the last position only (generation).
        return_hidden: also return the final-norm hidden states (for value / verifier heads).
        head: False skips the LM head (logits None; with return_hidden, the caller applies
            `lm_head` at the few positions it scores: a 49k-token vocabulary costs more than the rest).
        """
        cfg = self.config
        B, T = idx.shape
        if segment_ids is not None and (cache is not None or pad_mask is not None):
            raise ValueError("segment_ids (packed rows) cannot be combined with a cache or pad_mask")
        x = self.tok_emb(idx)  # (B, T, C)
        add_sink = self.sink is not None and (cache is None or cache.seen == 0)
        if add_sink:
            # StreamingLLM sink token: a learned vector at position 0 that every query can attend
            # to, so attention has somewhere to put probability mass it does not want to spend.
            x = torch.cat([self.sink.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1+T, C)
            if pad_mask is not None:
                # Left padding goes before the sink ([pad pad sink a b], not [sink pad pad a b]) so
                # the sink keeps the same distance to the first token as in an unpadded row.
                n_pad = (~pad_mask).sum(dim=1, keepdim=True)  # (B, 1)
                t = torch.arange(T + 1, device=x.device)[None]  # (1, 1+T)
                order = torch.where(t < n_pad, t + 1, torch.where(t == n_pad, 0, t))  # (B, 1+T)
                x = x.gather(1, order[..., None].expand(-1, -1, x.size(-1)))
                pad_mask = t >= n_pad
            if segment_ids is not None:
                # the sink belongs to every segment
                segment_ids = F.pad(segment_ids, (1, 0), value=-1)  # (B, 1+T)
            T += 1
        x = self.emb_dropout(x)
        if T == 1 and cache is not None and pad_mask is None and (fused := self._fused_step(x, cache)) is not None:
            # a decode step on the CPU: every layer in one call of modernlm/kernels
            x, aux_total = fused, None
        else:
            x, aux_total = self._layers(x, cache, pad_mask, segment_ids)

        if add_sink:
            x = x[:, 1:]  # the sink position predicts nothing
        if last_only:
            x = x[:, -1:]
        h = self.norm(x)  # (B, T, C)
        logits = self.lm_head(h) if head else None  # (B, T, V)
        if aux_total is not None:
            aux_total = cfg.moe_aux_loss_coef * aux_total
        return LMOutput(logits, aux_total, h if return_hidden else None)

    def _layers(
        self, x: Tensor, cache, pad_mask: Tensor | None, segment_ids: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C) through every block (positions, masks and caches as `forward` says); the
        blocks' summed MoE aux loss (None without MoE)."""
        B, T, _ = x.shape
        start = 0
        key_rope = None
        if isinstance(cache, PagedCache):
            # Continuous batching: each row continues at its own position, attending to its own keys.
            if B != cache.rows:
                raise ValueError(f"PagedCache has {cache.rows} rows selected, idx has {B}")
            cache.check_room(T)
            pos = cache.positions(T)  # (B, T)
            rope = self.rope.at(pos, need=cache.end + T)
            k_pos = torch.arange(cache.table.size(1) * cache.block_size, device=x.device)  # (S,)
            mask = (k_pos <= pos[..., None])[:, None]  # (B, 1, T, S): its own past, not other rows' slots
            if cache.valid is not None:
                # a left-padded batch's plain cache read as a paged one (steps.py): never its padding
                mask = mask & cache.valid[:, None, None, :]
        else:
            if cache is not None:
                cache.check_room(T)
                start = cache.length
                if pad_mask is not None:
                    cache.set_valid(pad_mask)
                if cache.rolling:
                    key_rope = self.rope(0, start + T)  # rotate cached keys by slot
            rope = self.rope(start, T)
            mask = self._attention_mask(T, start, cache, pad_mask, x.device)
        if segment_ids is not None:
            # Block-diagonal causal mask: same segment (or the sink, segment -1) and not in the future.
            same = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) | (
                segment_ids[:, None, None, :] == -1
            )  # (B, 1, T, T)
            mask = same & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()

        aux_total = None
        for layer in self.layers:
            x, aux = layer(x, rope, cache, mask, key_rope)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.advance(T)
        return x, aux_total

    def fuses_steps(self, cache: KVCache | PagedCache) -> bool:
        """Whether decode steps over `cache` run fused (`_fused_step`): a CPU float32 model of Llama
        blocks (no MoE) whose attention the kernel takes, the kernels built, `cache.fused` on, and
        a paged cache or a plain KVCache without padding (not a rolling one)."""
        return self._step_weights(cache) is not None

    def _step_weights(self, cache: KVCache | PagedCache) -> tuple[list[Tensor], list[int]] | None:
        cfg, p = self.config, self.norm.weight
        fits = (cache.fused and not cache.rolling and cache.valid is None and p.device.type == "cpu"
                and p.dtype == torch.float32
                and attention_kernel_fits(cfg.n_head, cfg.n_kv_head, cfg.head_dim, cache.k[0].dtype))  # fmt: skip
        if not (fits and kernels.available()) or (self.training and (cfg.dropout > 0 or cfg.attn_dropout > 0)):
            return None
        # The blocks' weights in the order decode_layers reads them, built anew at every step (so
        # always the layers there are now): a layer takes part through its `step_parts()` (quant's
        # FastLinear and QLinear); modules are read through their dicts, not nn.Module's slower
        # attribute lookup, as this runs every step.
        weights, layout = [], []
        for block in self.layers._modules.values():
            mods = block._modules
            a, f = mods["attn"]._modules, mods["ffn"]._modules
            if block.is_moe:
                return None
            halves = ((mods["attn_norm"], (a["wqkv"], a["wo"])), (mods["ffn_norm"], (f["w_gate_up"], f["w_down"])))
            for norm, linears in halves:
                weights.append(norm._parameters["weight"])
                for layer in linears:
                    parts = layer.step_parts() if hasattr(layer, "step_parts") else None
                    if parts is None:
                        return None
                    weights += parts[1]
                    layout += (parts[0], layer.out_features)
        return weights, layout

    def _fused_step(self, x: Tensor, cache: KVCache | PagedCache) -> Tensor | None:
        """x (B, 1, C) through every block in one call of the CPU kernels (a decode step), or None
        where they do not run it (then `_layers` does, op by op). The same operations in the same
        order: only PyTorch's cost per op is gone (~10 ops a layer). A plain KVCache is a paged one
        of one block per row, as long as its capacity."""
        # (cache.fused first: a compiled step, whose view is never fused, must not load the kernels mid-graph)
        step = self._step_weights(cache) if cache.fused and kernels.usable(x) else None
        if step is None:
            return None
        B, D = x.size(0), self.config.head_dim
        if isinstance(cache, PagedCache):
            if B != cache.rows:
                raise ValueError(f"PagedCache has {cache.rows} rows selected, idx has {B}")
            table, lengths, end = cache.table, cache.lengths, cache.end
        else:
            table = torch.arange(B)[:, None]  # row b's block is b
            lengths, end = torch.full((B,), cache.length), cache.length
        cache.check_room(1)
        cos, sin = self.rope.at(lengths[:, None], need=end + 1)  # (B, 1, 1, D) each
        cos, sin = cos.reshape(B, D).contiguous(), sin.reshape(B, D).contiguous()
        y = kernels.decode_layers(x[:, 0].contiguous(), *step, cos, sin, cache.k, cache.v, table, lengths,
                                  self.config.n_head, self.config.norm_eps)  # fmt: skip
        cache.advance(1)
        return y[:, None]

    @staticmethod
    def _attention_mask(T: int, start: int, cache: KVCache | None, pad_mask: Tensor | None, device) -> Tensor | None:
        """None when SDPA's is_causal is exact (see Attention); else a (B or 1, 1, T, S) bool mask."""
        valid = cache.valid if cache is not None else None
        if valid is None and pad_mask is None and (start == 0 or T == 1):
            return None
        S = start + T
        q_pos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S) causal with offset
        keys = valid[:, :S] if valid is not None else pad_mask
        if keys is not None:
            # A padded query may see no real key at all; let it see itself so softmax stays finite.
            mask = mask & keys[:, None, None, :] | (k_pos == q_pos)[None, None]  # (B, 1, T, S)
        return mask

    # ---- helpers ---------------------------------------------------------------------------

    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """Parameter count. `exclude_embedding` drops the embedding (kept if tied, as the head);
        `active` counts only the top-k experts of each MoE layer (what one token uses)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.config.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        if active:
            for layer in self.layers:
                if layer.is_moe:
                    per_expert = sum(p.numel() for p in layer.ffn.experts[0].parameters())
                    n -= per_expert * (layer.ffn.n_expert - layer.ffn.top_k)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 * active non-embedding parameters (plus the LM head) + 12 * L * H * D * T for attention."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        n = self.num_params(active=True) - self.tok_emb.weight.numel()
        n += self.lm_head.weight.numel() if cfg.tie_embeddings else 0
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def new_cache(
        self, batch_size: int, capacity: int = 0, *, window: int = 0, sink_size: int = 4, chunk: int = 1, **kwargs
    ) -> KVCache:
        """A cache for `capacity` tokens, or with `window`, a rolling one that takes up to `chunk`
        tokens per forward. Room for the learned sink token is added when the model has one."""
        p = next(self.parameters())
        kwargs.setdefault("dtype", p.dtype)
        if window:
            capacity = sink_size + window + chunk
        capacity += int(self.config.attn_sink)
        return KVCache(
            self.config, batch_size, capacity, device=p.device, window=window, sink_size=sink_size, **kwargs
        )

"""A modernlm model as a llama.cpp .gguf: llama.cpp, Ollama, LM Studio and transformers run it.

    write_gguf(model, tokenizer, "sft.gguf", "q8_0")   # `modernlm convert runs/sft sft.gguf --to gguf`
    modelfile(tokenizer, "sft.gguf", context=1024)    # the Ollama Modelfile written beside it

The file is what llama.cpp's own converter writes for a Llama (gguf_weights.py reads it back):

- metadata: the `llama.*` keys of the config; the tokenizer (`tokenizer.ggml.*`: the byte-level
  vocabulary, the merges, token types, bos / eos / pad / eot ids, `add_bos_token`) and the chat
  template, so `llama-server --jinja` and Ollama render ChatML as `modernlm chat` does;
- tensors under the ggml project's names (gguf's own HF -> GGUF table), q and k with their rows in
  llama.cpp's rotary order (gguf_weights.unpermute_rows undoes it; here its inverse), norms always
  float32, the matrices in f32, f16 or Q8_0 (gguf's quantizer: llama.cpp's rounding);
- `add_bos_token` follows the tokenizer, except for a chat model (SFT made `<|im_end|>` its eos):
  llama.cpp adds the bos to chat prompts too, and ours carry none (`LM.chat_prompt_ids`), so a chat
  model's file says false and its chats in llama.cpp get the tokens `modernlm chat` gives the model;
- the vocabulary is the tokenizer's: the rows of the embedding and head past it (the model's
  vocabulary is padded to a multiple of 64) are left out, so llama.cpp never picks an id that has no
  text, as modernlm's generation never does (it masks them).

llama.cpp does not run the tokenizer's JSON: it knows a fixed list of pre-tokenizers by name
(`tokenizer.ggml.pre`). `modernlm tokenizer train` makes GPT-2's byte-level BPE (GPT-2's split
regex, no normalizer), which llama.cpp implements as "gpt-2"; a tokenizer with another split is a
UserError rather than a file that tokenizes differently (tests/test_gguf_export.py compares the ids
llama.cpp produces with ours).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modernlm.chat import CHATML_TEMPLATE, IM_END
from modernlm.errors import UserError
from modernlm.files import atomic_path
from modernlm.gguf_weights import unpermute_rows
from modernlm.hf.convert import check_llama, state_dict_to_hf
from modernlm.model import ModelConfig, ModernDecoderLM
from modernlm.tokenizer import Tokenizer

TYPES = ("f32", "f16", "q8_0")  # --type: the matrices' type (norms stay float32)
BLOCK = 32  # Q8_0 quantizes blocks of 32 along a row; a row of another length is written in f16

# The pre-tokenizers llama.cpp implements that a `tokenizers` tokenizer can equal, by the JSON of its
# pre_tokenizer (no normalizer). GPT-2's: `modernlm tokenizer train`'s, GPT-2's own files'. SmolLM2's
# ("smollm"): each \p{N} character alone first (its Digits(individual_digits), or the Split that a
# .gguf's "smollm" loads as, gguf_weights), then GPT-2's.
_GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_DIGITS = ({"type": "Digits", "individual_digits": True},
           {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated", "invert": False})  # fmt: skip


def _is(pre: dict[str, Any], spec: dict[str, Any]) -> bool:
    return all(pre.get(k) == v for k, v in spec.items())


def llama_cpp_pre(pre: dict[str, Any]) -> str | None:
    """llama.cpp's name for a tokenizer.json's pre_tokenizer, or None when it has none equal to it."""
    if _is(pre, _GPT2_SPLIT):
        return "gpt-2"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if parts and len(parts) == 2 and any(_is(parts[0], d) for d in _DIGITS) and _is(parts[1], _GPT2_SPLIT):
        return "smollm"
    return None


def check_exportable(cfg: ModelConfig, tokenizer: Tokenizer | None, what: str) -> None:
    """UserError naming what llama.cpp's Llama cannot run: cheap, before any weight is written."""
    check_llama(cfg, "GGUF")
    if tokenizer is None:
        raise UserError(f"{what}: has no tokenizer; a .gguf carries one (train or pass one with the model)")
    _pre_tokenizer(tokenizer, what)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{what}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")


def write_gguf(
    model: ModernDecoderLM, tokenizer: Tokenizer, path: str | Path, type: str = "f32", name: str = ""
) -> None:
    """Write `model` + `tokenizer` to `path` (atomically) as a llama.cpp Llama .gguf of `type`."""

    if type not in TYPES:
        raise UserError(f"type: {type!r} is not one of {', '.join(TYPES)}")
    cfg = model.config
    check_exportable(cfg, tokenizer, name or str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = _Writer(tmp, "llama")
        try:
            _metadata(writer, cfg, tokenizer.vocab_size, name or path.stem, type)
            _tokenizer(writer, tokenizer)
            for tensor_name, array, raw_type in _tensors(model, tokenizer.vocab_size, type):
                writer.add_tensor(tensor_name, array, raw_dtype=raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def _writer_class() -> type:
    import gguf

    class Writer(gguf.GGUFWriter):
        """gguf's writer, but writing an empty array (the format has them; the writer refuses them),
        for the byte tokenizer's merges: it has none, and llama.cpp requires the key."""

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _Writer(path: Path, arch: str) -> Any:  # noqa: N802 (a class, made when gguf is imported)
    return _writer_class()(path, arch)


# ---- metadata --------------------------------------------------------------------------------


def _metadata(writer: Any, cfg: ModelConfig, n_vocab: int, name: str, type: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type])  # fmt: skip
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)  # all of each head rotates (no partial rotary)
    if cfg.head_dim * cfg.n_head != cfg.d_model:  # llama.cpp's default is d_model / n_head
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _pre_tokenizer(tokenizer: Tokenizer, what: str) -> str:
    """The name llama.cpp knows for this tokenizer's splitting, or a UserError saying why none."""
    data = json.loads(tokenizer.backend.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{what}: only byte-level BPE tokenizers go to GGUF (this one is {model.get('type')})")
    if data.get("normalizer") is not None or model.get("ignore_merges"):
        raise UserError(f"{what}: the tokenizer normalizes text or ignores merges: llama.cpp's 'gpt-2' would not")
    name = llama_cpp_pre(pre)
    if name is not None:
        return name
    raise UserError(
        f"{what}: llama.cpp has no pre-tokenizer equal to this one ({json.dumps(pre)[:120]}); "
        "train one with `modernlm tokenizer train` (GPT-2's split, which llama.cpp runs as 'gpt-2')"
    )


def _tokenizer(writer: Any, tokenizer: Tokenizer) -> None:
    import gguf

    backend = tokenizer.backend
    data = json.loads(backend.to_str())
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:  # the byte-level string, as llama.cpp's BPE vocabulary stores it
            tokens.append(backend.id_to_token(i))
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges") or []]

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, "tokenizer"))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    # llama.cpp requires the key even when empty (the byte tokenizer has no merges); gguf drops an
    # empty list given through add_token_merges, so its type is said here (and _Writer writes it)
    array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, array, sub_type=string)
    for token_id, add in ((tokenizer.bos_id, writer.add_bos_token_id), (tokenizer.eos_id, writer.add_eos_token_id),
                          (tokenizer.pad_id, writer.add_pad_token_id)):  # fmt: skip
        if token_id is not None:
            add(token_id)
    if (im_end := tokenizer.token_to_id(IM_END)) is not None:
        writer.add_eot_token_id(im_end)  # a ChatML turn ends generation, as in `modernlm chat`
    writer.add_add_bos_token(add_bos_of(tokenizer))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def add_bos_of(tokenizer: Tokenizer) -> bool:
    """The file's `add_bos_token` (see the module docstring): false for a chat model."""
    return tokenizer.add_bos and tokenizer.eos_token != IM_END


# ---- tensors ---------------------------------------------------------------------------------


def _tensors(model: ModernDecoderLM, n_vocab: int, type: str) -> Any:
    """(GGUF name, array, raw type or None) for each tensor, in the model's order; the embedding and
    head cut to the tokenizer's `n_vocab` rows."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    state = state_dict_to_hf({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # llama.cpp uses token_embd when there is no output.weight
    q_rows = unpermute_rows(cfg.n_head * cfg.head_dim, cfg.n_head).argsort()  # the inverse: to the file's order
    k_rows = unpermute_rows(cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head).argsort()
    for hf_name, w in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"parameter {hf_name!r} has no GGUF name")
        w = w.to(torch.float32)
        if name.endswith("attn_q.weight"):
            w = w[q_rows]
        elif name.endswith("attn_k.weight"):
            w = w[k_rows]
        elif name in ("token_embd.weight", "output.weight"):
            w = w[:n_vocab]
        array = np.ascontiguousarray(w.numpy())
        if array.ndim == 1 or type == "f32":
            yield name, array, None
        elif type == "q8_0" and array.shape[1] % BLOCK == 0:
            yield name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        else:
            yield name, array.astype(np.float16), None


# ---- Ollama ----------------------------------------------------------------------------------

_CHATML_OLLAMA = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile(tokenizer: Tokenizer, gguf_name: str, context: int) -> str:
    """An Ollama Modelfile for the .gguf named `gguf_name` in the same directory: its ChatML template
    (Ollama's Go template for what CHATML_TEMPLATE renders), stop tokens and context length. A model
    with another chat template gets none here: Ollama reads the one in the file."""
    lines = [
        f"# ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile, then: ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    if tokenizer.chat_template == CHATML_TEMPLATE:
        lines.append(f'TEMPLATE """{_CHATML_OLLAMA}"""')
    for stop in dict.fromkeys(t for t in (IM_END, tokenizer.eos_token) if t and tokenizer.token_to_id(t) is not None):
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"

"""Tokenizers: one small interface over the `tokenizers` library (no transformers needed).

`load_tokenizer(path)` accepts a directory holding `tokenizer.json` (ours, or any HF tokenizer
directory), a `tokenizer.json` file, a directory with GPT-2 style `vocab.json` + `merges.txt`, or
the name `byte`: the byte-level tokenizer (id = byte value, 0..255, then the special tokens), which
needs no training. On ASCII text one byte is one character, so its losses compare directly with
character-level results (nanoGPT's shakespeare_char), and it round-trips any bytes, invalid UTF-8
included (`encode_bytes` / `decode_bytes`).
`Tokenizer.save(dir)` writes `tokenizer.json` + `tokenizer_config.json`, which both modernlm and
`transformers.AutoTokenizer` load.

Special tokens follow each tokenizer's own rule: `add_bos` says whether a prompt starts with the
bos token. Ours do (modernlm's convention, the default); a tokenizer taken from Hugging Face keeps
what transformers does with it (`hf.convert.hf_tokenizer_to_ours`), and `save` records a False as
`add_bos_token: false`, so a converted SmolLM2 still prompts without `<|im_start|>`.
`encode(text, split_special_tokens=True)` (transformers' name) reads special-token strings in
`text` as ordinary text: what a chat message's content is (`chat.render_with_specials`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from modernlm.chat import CHATML_TEMPLATE
from modernlm.errors import UserError
from modernlm.files import atomic_write

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
BYTE_TOKENIZER = "byte"  # the name load_tokenizer takes for the byte tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens a language model needs."""

    def __init__(
        self,
        backend: Any,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos: bool = True,
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos = add_bos and bos_token is not None  # prompts start with bos (see the module docstring)
        # (vocabulary size, value) caches of `special_tokens` and of the backend copy that reads
        # them as text; the size tells when tokens were added since (`prepare_chat_model` adds some)
        self._specials: tuple[int, dict[str, int]] | None = None
        self._as_text: tuple[int, Any] | None = None
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and backend.token_to_id(tok) is None:
                raise UserError(f"tokenizer: {name} {tok!r} is not in the vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        if self.pad_token is not None:
            return self.backend.token_to_id(self.pad_token)
        return self.eos_id

    @property
    def special_tokens(self) -> dict[str, int]:
        """The special tokens (the strings `encode` reads as one control token) and their ids."""
        size = self.vocab_size
        if self._specials is None or self._specials[0] != size:
            added = self.backend.get_added_tokens_decoder()
            self._specials = (size, {t.content: i for i, t in added.items() if t.special})
        return self._specials[1]

    def has_special_text(self, text: str) -> bool:
        """Whether `text` holds the string of a special token."""
        return any(t in text for t in self.special_tokens)

    def _text_backend(self) -> Any:
        """A copy of the backend that encodes special-token strings as text. A copy, not the
        `encode_special_tokens` switch flipped per call: the server encodes from several threads."""
        size = self.vocab_size
        if self._as_text is None or self._as_text[0] != size:
            from tokenizers import Tokenizer as Backend

            copy = Backend.from_str(self.backend.to_str())
            copy.encode_special_tokens = True
            self._as_text = (size, copy)
        return self._as_text[1]

    def encode(self, text: str, add_bos: bool = False, *, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (bos first with `add_bos`). Special-token strings in it become their
        special tokens, or with split_special_tokens=True ordinary text (as transformers' option)."""
        text_only = split_special_tokens and self.has_special_text(text)  # else the ids are the same
        ids = (self._text_backend() if text_only else self.backend).encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        backend = self.backend
        if self.add_bos:
            # transformers' PreTrainedTokenizerFast reads no add_bos_token: only a post-processor
            # puts bos first (ours never runs it: `encode` adds bos itself)
            from tokenizers import Tokenizer as Backend
            from tokenizers import processors

            backend, bos = Backend.from_str(backend.to_str()), self.bos_token
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)])
        atomic_write(path / TOKENIZER_FILE, backend.to_str(pretty=True))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if not self.add_bos and self.bos_token is not None:
            config["add_bos_token"] = False  # transformers' name; True (ours) is the default
        atomic_write(path / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


class ByteTokenizer(Tokenizer):
    """The byte tokenizer: ids 0..255 are the byte values, special tokens follow. A plain
    `tokenizers` BPE with no merges underneath, so it saves, loads and works in `prepare` like any
    other; `encode_bytes` / `decode_bytes` add an exact round trip for arbitrary bytes."""

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes of `ids`; special tokens become their UTF-8 text."""
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            else:
                token = self.backend.id_to_token(i)
                if token is None:
                    raise ValueError(f"token id {i} is not in the vocabulary")
                out += token.encode("utf-8")
        return bytes(out)


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what the ByteLevel pre-tokenizer
    emits), in byte order: symbol k stands for byte k."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


@lru_cache(maxsize=8)
def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2 byte-level symbols -> byte values, when `tokenizer` is byte-level (else None)."""
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
    return {s: b for b, s in enumerate(byte_symbols())} if "ByteLevel" in kinds else None


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes a token stands for (a byte-level token may be part of a character)."""
    piece = tokenizer.backend.id_to_token(token_id) or ""
    table = _byte_decoder(tokenizer)
    if table is not None and piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    return tokenizer.decode([token_id]).encode("utf-8")


def byte_tokenizer(
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    bos_token: str | None = "<|endoftext|>",
    eos_token: str | None = "<|endoftext|>",
    pad_token: str | None = "<|pad|>",
    chat_template: str | None = "chatml",
) -> ByteTokenizer:
    """The byte tokenizer (see ByteTokenizer): 256 + len(special_tokens) ids."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab={sym: b for b, sym in enumerate(byte_symbols())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    named = [t for t in (bos_token, eos_token, pad_token) if t]
    backend.add_special_tokens(list(dict.fromkeys([*special_tokens, *named])))
    template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template or None
    return ByteTokenizer(backend, bos_token, eos_token, pad_token, chat_template=template)


def _is_byte_vocab(backend: Any) -> bool:
    """True for a BPE with no merges whose ids 0..255 are the byte symbols (byte_tokenizer's)."""
    if backend.get_vocab_size(with_added_tokens=False) != 256:
        return False
    model = json.loads(backend.to_str()).get("model", {})
    symbols = byte_symbols()
    return (
        model.get("type") == "BPE"
        and not model.get("merges")
        and all(backend.token_to_id(sym) == b for b, sym in enumerate(symbols))
    )


def _special(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value


def valid_unicode(text: str) -> str:
    """`text` with each byte that was not UTF-8 (read by Python as a lone surrogate, from stdin or
    argv) as U+FFFD, as Ollama does: tokenizers take valid Unicode only."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that no byte made: one U+FFFD per code unit byte
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def has_tokenizer(path: str | Path) -> bool:
    """Whether directory `path` holds tokenizer files `load_tokenizer` reads (tokenizer.json, or
    GPT-2's vocab.json + merges.txt): the one rule for "this checkpoint has a tokenizer"."""
    path = Path(path)
    return (path / TOKENIZER_FILE).is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer directory or tokenizer.json file (see module docstring)."""
    from tokenizers import Tokenizer as Backend

    if str(path) == BYTE_TOKENIZER and not Path(path).exists():
        return byte_tokenizer()
    path = Path(path)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        file = path / TOKENIZER_FILE
    elif path.is_file() and path.suffix == ".json":
        file, path = path, path.parent
    elif path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _load_gpt2_files(path)
    else:
        raise UserError(
            f"no tokenizer at {path}: expected a directory with tokenizer.json "
            "(or vocab.json + merges.txt), a tokenizer.json file, or 'byte' (the byte tokenizer)"
        )
    try:
        backend = Backend.from_file(str(file))
    except Exception as e:
        raise UserError(f"cannot read tokenizer {file}: {e}") from None
    config: dict[str, Any] = {}
    config_file = path / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"cannot parse {config_file}: {e}") from None
    cls = ByteTokenizer if _is_byte_vocab(backend) else Tokenizer
    return cls(
        backend,
        bos_token=_special(config.get("bos_token")),
        eos_token=_special(config.get("eos_token")),
        pad_token=_special(config.get("pad_token")),
        chat_template=config.get("chat_template"),
        add_bos=config.get("add_bos_token", True) is not False,
    )


def _load_gpt2_files(path: Path) -> Tokenizer:
    """GPT-2's byte-level BPE from vocab.json + merges.txt; <|endoftext|> is bos, eos and pad."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
    except Exception as e:
        raise UserError(f"cannot read GPT-2 tokenizer files in {path}: {e}") from None
    backend = Backend(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    if backend.token_to_id(eot) is not None:
        backend.add_special_tokens([eot])
        return Tokenizer(backend, bos_token=eot, eos_token=eot)
    return Tokenizer(backend)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    bos_token: str | None = "<|endoftext|>",
    eos_token: str | None = "<|endoftext|>",
    pad_token: str | None = "<|pad|>",
    min_frequency: int = 2,
    chat_template: str | None = "chatml",
    show_progress: bool = False,
) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE on `texts`.

    The 256 byte symbols are in the initial alphabet, so any text encodes and decodes back exactly.
    Special tokens (bos/eos/pad are added to them if missing) get the first ids, in order, and are
    never split. `chat_template="chatml"` stores `CHATML_TEMPLATE`; None stores none.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    named = [t for t in (bos_token, eos_token, pad_token) if t]
    specials = list(dict.fromkeys([*special_tokens, *named]))
    if vocab_size < 256 + len(specials):
        raise UserError(
            f"vocab_size {vocab_size} is too small: the 256 bytes and {len(specials)} special "
            f"tokens need {256 + len(specials)}"
        )
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template or None
    return Tokenizer(backend, bos_token, eos_token, pad_token, chat_template=template)

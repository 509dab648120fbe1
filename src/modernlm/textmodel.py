"""What evaluation needs from a model, ours or transformers': `TaskModel` and `TaskTokenizer`.

`TaskModel` is one small interface over a model and its tokenizer: `logits` of a padded batch,
`generate` (prompts in, continuations out) and the prompt helpers. `wrap_modernlm` makes one over
our ModernDecoderLM (generating through `modernlm.generation`); `modernlm.hf.text.wrap_hf` over a
transformers model (causal, encoder-decoder or PEFT-wrapped), with the same text side
(`generation.TextStream`). `TaskTokenizer` is one interface over our Tokenizer and transformers'
tokenizers (duck-typed: nothing here imports transformers). Task scoring and evaluation
(`eval.prompting`), the facade's HF generation (`api`) and LoRA finetuning all go through these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from modernlm.errors import UserError
from modernlm.generation import Sampling, TextGeneration, TextStream
from modernlm.runtime import eval_mode


class TaskTokenizer:
    """One interface over our `Tokenizer` (encode/eos_id/pad_id) and transformers tokenizers.

    encode(text) never adds special tokens; bos/eos are added explicitly where a task needs them.
    pad_id falls back to eos_id (GPT-2 has no pad token).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        if hasattr(tokenizer, "eos_token_id") and callable(tokenizer):  # transformers
            self.eos_id = tokenizer.eos_token_id
            self.bos_id = tokenizer.bos_token_id
            pad = tokenizer.pad_token_id
            self._hf = True
        elif hasattr(tokenizer, "eos_id") and hasattr(tokenizer, "encode"):  # modernlm.tokenizer.Tokenizer
            self.eos_id, self.bos_id, pad = tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id
            self._hf = False
        else:
            raise TypeError(f"not a tokenizer: {type(tokenizer).__name__} (needs encode and eos_id / eos_token_id)")
        self.pad_id = pad if pad is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        if self._hf:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts at once (the Rust tokenizers batch them: ~2-3x faster than a loop)."""
        if not texts:
            return []
        if self._hf:
            return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if hasattr(self.tokenizer, "encode_batch"):
            return [list(ids) for ids in self.tokenizer.encode_batch(texts)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))



class TaskModel:
    """What evaluation needs from a model, ours or HF; see `wrap_modernlm` / `wrap_hf`.

    Attributes: `tokenizer` (a TaskTokenizer), `is_encoder_decoder`, `add_bos` (prepend the bos
    token to every prompt), `max_length` (the model's context in tokens, None = unbounded; longer
    prompts are cut from the left), `device`, `name`.
    """

    tokenizer: TaskTokenizer
    is_encoder_decoder: bool = False
    add_bos: bool = False
    max_length: int | None = None
    device: torch.device
    name: str = "model"
    decoder_start_id: int | None = None

    def logits(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor | None = None) -> Tensor:
        """[B, T, V] float logits. Decoder-only: of input_ids; encoder-decoder: of decoder_input_ids
        given the encoder's input_ids."""
        raise NotImplementedError

    def generate(self, prompts: list[str], sampling: Sampling | int | None = None, **settings: Any) -> list[str]:
        """The continuation of each prompt (not the prompt), ending before eos or the first stop
        string. `sampling` / `settings` as in `generation.Sampling.make` (max_new_tokens, stop,
        temperature, seed, ...)."""
        if not prompts:
            return []
        return self.complete(self.prompt_ids_batch(prompts), Sampling.make(sampling, **settings))

    def complete(self, rows: list[list[int]], sampling: Sampling) -> list[str]:
        """`generate` from prompt token ids."""
        raise NotImplementedError

    # Shared helpers ----------------------------------------------------------------------

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if self.add_bos:
            if self.tokenizer.bos_id is None:
                raise UserError("add_bos: the tokenizer has no bos token")
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    def prompt_ids_batch(self, texts: list[str]) -> list[list[int]]:
        rows = self.tokenizer.encode_batch(texts)
        if self.add_bos:
            if self.tokenizer.bos_id is None:
                raise UserError("add_bos: the tokenizer has no bos token")
            rows = [[self.tokenizer.bos_id, *r] for r in rows]
        return rows

    def check_room(self, max_new_tokens: int) -> None:
        """Refuse (as lm-eval's HFLM does) a budget that leaves no room for a prompt: cutting every
        prompt to its last token would generate from nothing, silently."""
        if self.max_length is not None and max_new_tokens >= self.max_length:
            raise UserError(
                f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's context "
                f"of {self.max_length} tokens (give fewer than {self.max_length})"
            )

    def fit_prompt(self, prompt: list[int], room_after: int) -> list[int]:
        """Cut a prompt from the left (keeping a leading bos) so it plus room_after tokens fit the context."""
        if self.max_length is None or len(prompt) + room_after <= self.max_length:
            return prompt
        keep = max(self.max_length - room_after, 1)
        if self.add_bos and keep > 1:
            return prompt[:1] + prompt[len(prompt) - keep + 1 :]
        return prompt[len(prompt) - keep :]

    def _streams(self, rows: list[list[int]], sampling: Sampling) -> list[TextStream]:
        """One `generation.TextStream` per row: the text side, shared with our generation."""
        eos = sampling.eos_ids or ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else [])
        return [TextStream(self.tokenizer.tokenizer, sampling.stop, context=r, eos=eos) for r in rows]


class ModernLMTaskModel(TaskModel):
    """Our ModernDecoderLM + our Tokenizer (see `wrap_modernlm`)."""

    def __init__(self, model: Any, tokenizer: Any, add_bos: bool = False, name: str = "modernlm"):
        self.model, self.tokenizer = model, TaskTokenizer(tokenizer)
        self.add_bos, self.name = add_bos, name
        self.is_encoder_decoder = False
        # RoPE extends past max_seq_len but quality falls off there: cut prompts to the trained context.
        self.max_length = int(model.config.max_seq_len)
        self.device = next(model.parameters()).device
        self.vocab_size = getattr(tokenizer, "vocab_size", None)

    def logits(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor | None = None) -> Tensor:
        if decoder_input_ids is not None:
            raise ValueError("a decoder-only model takes no decoder_input_ids")
        mask = attention_mask.to(self.device, torch.bool)
        # Right padding needs no mask (causal attention never looks ahead); only left padding
        # (real tokens at the end of every row) is passed on, which is what the model supports.
        pad_mask = mask if not mask.all() and bool(mask[:, -1].all()) else None
        with eval_mode(self.model), torch.inference_mode():
            return self.model(input_ids.to(self.device), pad_mask=pad_mask).logits.float()

    def complete(self, rows: list[list[int]], sampling: Sampling) -> list[str]:
        if not rows:
            return []
        self.check_room(sampling.max_new_tokens)
        rows = [self.fit_prompt(r, sampling.max_new_tokens) for r in rows]
        if any(not r for r in rows):
            raise UserError("a prompt encodes to no tokens; set add_bos")
        return [s.text for s in TextGeneration(self.model, self.tokenizer.tokenizer, rows, sampling).run()]


def wrap_modernlm(model: Any, tokenizer: Any, *, add_bos: bool = False, name: str = "modernlm") -> TaskModel:
    """A TaskModel over our ModernDecoderLM and our Tokenizer (add_bos: prepend bos to prompts)."""
    return ModernLMTaskModel(model, tokenizer, add_bos=add_bos, name=name)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Token lists -> (ids [B, T], attention_mask [B, T] long), padded on `side`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


__all__ = ["ModernLMTaskModel", "TaskModel", "TaskTokenizer", "pad_rows", "wrap_modernlm"]

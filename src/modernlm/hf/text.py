"""transformers' text side: `HFTaskModel` (a `TaskModel` over a transformers model) and chat templates.

`wrap_hf` gives a transformers causal LM, encoder-decoder (T5) or PEFT model the interface of
`modernlm.textmodel.TaskModel`: logits of a padded batch and `generate` through transformers' own
`generate`, with our sampling settings (`Sampling.transformers_kwargs`) and our text side
(`generation.TextStream`: stop strings, eos, decoding), so `load(hf_source).generate` gives the
same text as our models' path would. `render_chat_template` renders a Jinja chat template exactly
as `apply_chat_template(tokenize=False)` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from modernlm.errors import UserError
from modernlm.generation import Sampling, StopOnText
from modernlm.runtime import eval_mode
from modernlm.textmodel import TaskModel, TaskTokenizer, pad_rows


class HFTaskModel(TaskModel):
    """A transformers model (causal LM, encoder-decoder, or PEFT-wrapped) + tokenizer (see `wrap_hf`)."""

    def __init__(self, model: Any, tokenizer: Any, add_bos: bool = False, name: str = "hf"):
        self.model, self.tokenizer = model, TaskTokenizer(tokenizer)
        self.add_bos, self.name = add_bos, name
        config = model.config  # a PeftModel forwards attribute access to its base model
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # T5's relative positions have no hard limit; decoder-only models with absolute or RoPE
        # positions are cut to what they were built for.
        self.max_length = None if self.is_encoder_decoder or not limit else int(limit)
        start = getattr(config, "decoder_start_token_id", None)
        self.decoder_start_id = start if start is not None else self.tokenizer.pad_id
        self.device = next(model.parameters()).device

    def logits(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor | None = None) -> Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids")
            kwargs["decoder_input_ids"] = decoder_input_ids.to(self.device)
        elif not bool(attention_mask[:, 0].all()):
            # Left padding: positions count real tokens only, as HF generate computes them.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with eval_mode(self.model), torch.inference_mode():
            return self.model(**kwargs).logits.float()

    def complete(self, rows: list[list[int]], sampling: Sampling) -> list[str]:
        if not rows:
            return []
        tok = self.tokenizer
        if self.is_encoder_decoder:
            if tok.eos_id is not None:
                rows = [r + [tok.eos_id] for r in rows]  # T5's encoder inputs end with eos
            input_ids, attention_mask = pad_rows(rows, tok.pad_id, "right")
            start = 1  # outputs begin with the decoder start token
        else:
            self.check_room(sampling.max_new_tokens)
            rows = [self.fit_prompt(r, sampling.max_new_tokens) for r in rows]
            if any(not r for r in rows):
                raise UserError("a prompt encodes to no tokens; set add_bos")
            input_ids, attention_mask = pad_rows(rows, tok.pad_id, "left")
            start = input_ids.size(1)
        if sampling.max_new_tokens == 0:
            return [""] * len(rows)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), pad_token_id=tok.pad_id
        )
        if tok.eos_id is not None:
            kwargs["eos_token_id"] = tok.eos_id
        kwargs |= sampling.transformers_kwargs()  # the same settings as our generation
        contexts = [[] if self.is_encoder_decoder else r for r in rows]
        if sampling.stop:
            kwargs["stopping_criteria"] = [StopOnText(self._streams(contexts, sampling), start)]
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with rng, eval_mode(self.model), torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)  # inside fork_rng: the caller's global RNG is left as it was
            out = self.model.generate(**kwargs)
        streams = self._streams(contexts, sampling)
        return [s.feed(row).text for s, row in zip(streams, out[:, start:].tolist(), strict=True)]


def wrap_hf(model: Any, tokenizer: Any, *, add_bos: bool = False, name: str = "hf") -> TaskModel:
    """A TaskModel over a transformers causal LM, encoder-decoder (T5) or PEFT model and its tokenizer
    (an HF tokenizer or ours). Decoder-only models generate from left-padded batches; an
    encoder-decoder generates from the prompt (+ eos) as encoder input."""
    return HFTaskModel(model, tokenizer, add_bos=add_bos, name=name)


def render_chat_template(template: str, messages: list[dict[str, str]], **variables: Any) -> str:
    """A conversation rendered with a Jinja chat template exactly as transformers'
    `apply_chat_template(tokenize=False)` renders it (`variables`: add_generation_prompt and the
    special tokens, e.g. bos_token)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **variables)
    return rendered[0]


__all__ = ["HFTaskModel", "render_chat_template", "wrap_hf"]

"""Supervised finetuning on chats: chat tokens in tokenizer and model, SFT records, packing, loss.

The chat format itself (ChatML, message checks, `ChatEncoder`'s ids and reply-only labels) is
`modernlm.chat`. `prepare_chat_model` adds <|im_start|> / <|im_end|> to a pretrained tokenizer and
model and makes <|im_end|> the eos, so generation ends where a reply ends; the loss covers the
assistant contents and their <|im_end|>, nothing else.

SFT records come from `read_sft_records`: Alpaca (instruction / input / output), chats
({"messages": [{"role", "content"}, ...]}, TRL's conversational format), GSM8K (question ->
solution) and HH-RLHF (the prompt turns + the chosen reply). `SFTBatches` pads them per batch, or
with `pack=True` fills fixed-length rows with several examples whose attention stays inside each
example (`segment_ids`, see ModernDecoderLM.forward).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modernlm.chat import CHATML_TEMPLATE, IGNORE_INDEX, IM_END, IM_START, ChatEncoder, Message, check_messages
from modernlm.data import tasks
from modernlm.data.tasks import TaskBatches
from modernlm.errors import UserError
from modernlm.generation import Sampling, TextGeneration
from modernlm.train.losses import next_token_loss
from modernlm.train.tracking import add_section

# ---------------------------------------------------------------------------------------------
# Chat tokens in tokenizer and model


@torch.no_grad()
def resize_vocab(model: nn.Module, vocab_size: int, new_rows: Sequence[int] = ()) -> None:
    """Grow a ModernDecoderLM's vocabulary to `vocab_size` (a multiple of 64 is fastest).

    Rows listed in `new_rows` (new tokens, or padded rows that were never trained) start at the
    mean of the trained embeddings, as transformers' mean-resizing does: a random row would get an
    arbitrary logit, the mean keeps the new tokens' first predictions close to the average one.
    """
    emb = model.tok_emb.weight
    old = emb.size(0)
    trained = [i for i in range(old) if i not in set(new_rows)]
    mean = emb[trained].mean(dim=0)
    if vocab_size > old:
        weight = torch.cat([emb, mean.expand(vocab_size - old, -1)], dim=0)
        model.tok_emb = nn.Embedding.from_pretrained(weight.clone(), freeze=False)
        if model.config.tie_embeddings:
            model.lm_head = nn.Linear(emb.size(1), vocab_size, bias=False, device=emb.device, dtype=emb.dtype)
            model.lm_head.weight = model.tok_emb.weight
        else:
            head = model.lm_head.weight
            new_head = torch.cat([head, head[trained].mean(0).expand(vocab_size - old, -1)], dim=0)
            model.lm_head = nn.Linear(head.size(1), vocab_size, bias=False, device=head.device, dtype=head.dtype)
            model.lm_head.weight.copy_(new_head)
        model.config.vocab_size = vocab_size
    for i in new_rows:
        if i < old:
            model.tok_emb.weight[i] = mean
            if not model.config.tie_embeddings:
                model.lm_head.weight[i] = model.lm_head.weight[trained].mean(0)


def prepare_chat_model(model: nn.Module, tokenizer: Any) -> list[str]:
    """Make a pretrained model and its tokenizer chat-ready, in place; returns the tokens added.

    Adds <|im_start|> / <|im_end|> as special tokens when the tokenizer lacks them, grows the
    model's vocabulary when the new ids do not fit (to a multiple of 64) and starts their rows at
    the mean embedding; sets the ChatML template and makes <|im_end|> the eos token.
    """
    missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.backend.add_special_tokens(missing)
    new_ids = [tokenizer.token_to_id(t) for t in missing]
    need = tokenizer.vocab_size
    if need > model.config.vocab_size or new_ids:
        resize_vocab(model, max(model.config.vocab_size, 64 * -(-need // 64)), new_rows=new_ids)
    tokenizer.chat_template = tokenizer.chat_template or CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    return missing


# ---------------------------------------------------------------------------------------------
# SFT records


SFT_FORMATS = ("alpaca", "chat", "gsm8k", "hh_rlhf")


@dataclass
class SFTDataConfig:
    format: str = "alpaca"  # alpaca | chat ({"messages": [...]}) | gsm8k | hh_rlhf (prompt + chosen)
    path: str = ""  # local .json / .jsonl / .jsonl.gz
    hf_dataset: str = ""  # hub dataset instead, e.g. tatsu-lab/alpaca, HuggingFaceH4/no_robots
    hf_config: str = ""
    hf_data_dir: str = ""
    split: str = "train"
    system: str = ""  # a system message put before every conversation ("" = none)
    max_length: int = 512  # tokens per example; longer ones are cut from the right
    max_examples: int = 0  # keep at most N (0 = all), after a seeded shuffle when shuffle=true
    shuffle: bool = True  # shuffle before max_examples
    train_on_all_assistant: bool = True  # multi-turn: loss on every assistant turn (false: the last)
    pack: bool = False  # fill rows of max_length with several examples (attention kept per example)
    add_bos: bool = False  # prepend bos to every example

    def __post_init__(self) -> None:
        if self.format not in SFT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(SFT_FORMATS)}, got {self.format!r}")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0 (0 = all), got {self.max_examples}")


def alpaca_messages(record: dict[str, str]) -> list[Message]:
    """Alpaca's instruction (+ input, after a blank line) as the user turn, output as the reply."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def read_sft_records(cfg: SFTDataConfig) -> Iterator[tuple[str, list[Message]]]:
    """(where, messages) for every record of the configured source; bad records name file and line."""
    rows = tasks.source_rows(cfg.path, cfg.hf_dataset, cfg.hf_config, cfg.split, cfg.hf_data_dir)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if cfg.format == "alpaca":
        for where, rec in tasks.iter_alpaca(rows):
            yield where, system + alpaca_messages(rec)
    elif cfg.format == "gsm8k":
        for where, rec in tasks.iter_gsm8k(rows):
            msgs = [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["answer"]}]
            yield where, system + msgs
    elif cfg.format == "hh_rlhf":
        for where, rec in tasks.iter_hh_rlhf(rows):
            yield where, system + rec["prompt"] + [{"role": "assistant", "content": rec["chosen"]}]
    else:
        for where, row in rows:
            msgs = check_messages(row.get("messages"), where)
            if not any(m["role"] == "assistant" for m in msgs):
                raise UserError(f"{where}: a chat needs at least one assistant message to train on")
            yield where, (system if msgs[0]["role"] != "system" else []) + msgs


def load_sft_examples(cfg: SFTDataConfig, encoder: ChatEncoder, seed: int = 0) -> list[dict[str, Any]]:
    """Tokenized SFT examples {"input_ids", "labels", "source"}, cut to max_length; empty ones dropped."""
    records = list(read_sft_records(cfg))
    if cfg.shuffle:
        order = np.random.default_rng(seed).permutation(len(records))
        records = [records[i] for i in order]
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    out = []
    for where, msgs in records:
        ids, labels = encoder.encode(msgs, cfg.train_on_all_assistant)
        ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if any(t != IGNORE_INDEX for t in labels[1:]):  # something left to learn after the shift
            out.append({"input_ids": ids, "labels": labels, "source": where})
    if not out:
        raise UserError(f"data: no SFT examples with an assistant reply within max_length={cfg.max_length}")
    if len(out) < len(records):
        warnings.warn(f"{len(records) - len(out)} of {len(records)} SFT examples have no assistant reply within "
                      f"max_length={cfg.max_length}: left out", stacklevel=2)  # fmt: skip
    return out


@dataclass
class SFTEvalSettings:
    val_path: str = ""  # held-out file in data.format ("" = hold out val_fraction of the training records)
    val_fraction: float = 0.05  # share of records held out when there is no val_path
    max_examples: int = 200  # validation examples scored for val_loss (0 = all)
    generate: int = 16  # held-out prompts answered greedily at the end (eos_rate, samples.md); 0 = none
    max_new_tokens: int = 128  # reply budget for those answers

    def __post_init__(self) -> None:
        for name in ("max_examples", "generate", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def check_val_fraction(fraction: float) -> None:
    """eval.val_fraction (SFT's and DPO's): the share held out must leave records to train on."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"eval.val_fraction: must be in [0, 1), got {fraction}")


def hold_out(items: list[Any], fraction: float, lost: str) -> tuple[list[Any], list[Any]]:
    """(held out, training): the first eval.val_fraction of the (shuffled) items; a warning naming
    what is `lost` when a fraction above 0 holds out none of them."""
    n_val = round(len(items) * fraction)
    if n_val == 0 and fraction > 0:
        warnings.warn(f"eval.val_fraction={fraction:g} holds out none of {len(items)} examples: no validation "
                      f"({lost}); raise it or give eval.val_path", stacklevel=3)  # fmt: skip
    return items[:n_val], items[n_val:]


def load_sft_splits(
    data: SFTDataConfig, ev: SFTEvalSettings, encoder: ChatEncoder, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[list[Message]]]:
    """(training examples, validation examples, the held-out conversations to answer at the end).

    Validation is ev.val_path (in data's format, unshuffled), else the first ev.val_fraction of the
    shuffled training examples; at most ev.max_examples of it, and ev.generate conversations."""
    val_data = replace(data, path=ev.val_path, hf_dataset="", max_examples=0) if ev.val_path else None
    if val_data is None:
        check_val_fraction(ev.val_fraction)  # before reading any data
    examples = load_sft_examples(data, encoder, seed=seed)
    if val_data is not None:
        val_examples = load_sft_examples(replace(val_data, shuffle=False), encoder)
    else:
        val_examples, examples = hold_out(examples, ev.val_fraction, "no val_loss, best/ or eos_rate")
    if ev.max_examples:
        val_examples = val_examples[: ev.max_examples]
    held_out = {ex["source"] for ex in val_examples}
    conversations = [m for where, m in read_sft_records(val_data or data) if where in held_out]
    return examples, val_examples, conversations[: ev.generate]


def reply_tokens(examples: Sequence[dict[str, Any]]) -> int:
    """How many tokens the loss covers (the replies and their <|im_end|>)."""
    return sum(sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in examples)


# ---------------------------------------------------------------------------------------------
# Batches


def pack_examples(examples: Sequence[dict[str, Any]], length: int) -> list[dict[str, Any]]:
    """Greedy first-fit packing into rows of at most `length` tokens, each with its segment ids.

    Rows are filled in order (first fit over the open rows), so packing is deterministic; examples
    keep their own tokens and labels, and `segment_ids` tells the model where each one starts.
    """
    rows: list[dict[str, list[int]]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        r = next((i for i, free in enumerate(room) if n <= free), None)
        if r is None:
            rows.append({"input_ids": [], "labels": [], "segment_ids": []})
            room.append(length)
            r = len(rows) - 1
        row = rows[r]
        seg = row["segment_ids"][-1] + 1 if row["segment_ids"] else 0
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["segment_ids"] += [seg] * n
        room[r] -= n
    return rows


def collate_sft(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest row: input_ids (pad_id), labels (-100), segment_ids (-2) if present,
    and lengths (B,): each row's tokens before the padding (the pad id may be a real token too).

    Right padding needs no attention mask: a causal model never looks at later positions.
    """
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long)}
    out["labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    out["lengths"] = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long)
    packed = "segment_ids" in rows[0]
    if packed:
        out["segment_ids"] = torch.full((len(rows), width), -2, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        out["labels"][i, :n] = torch.tensor(r["labels"])
        if packed:
            out["segment_ids"][i, :n] = torch.tensor(r["segment_ids"])
    return out


class SFTBatches(TaskBatches):
    """Endless, seeded, rank-sharded, exactly resumable batches of SFT rows (tasks.TaskBatches).

    Without packing a row is one example. With packing the examples are shuffled once (seeded) and
    packed into rows of max_length; each epoch then visits the rows in a fresh order.
    """

    def __init__(
        self,
        examples: list[dict[str, Any]],
        batch_size: int,
        pad_id: int,
        *,
        pack: bool = False,
        max_length: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if pack:
            order = np.random.default_rng([seed, 1]).permutation(len(examples))
            examples = pack_examples([examples[i] for i in order], max_length)
        super().__init__(examples, batch_size, pad_id, seed, rank, world_size, shuffle=True)

    def __next__(self) -> dict[str, Tensor]:
        return collate_sft([self.examples[i] for i in self.next_indices()], self.pad_id)


def eval_sft_batches(examples: Sequence[dict[str, Any]], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    """One ordered pass over (unpacked) examples, collated."""
    return [collate_sft(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """loss_fn for the trainer: next-token loss on the labelled (assistant) tokens only."""
    out = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))
    loss_sum, n = next_token_loss(out.logits[:, :-1], batch["labels"][:, 1:])
    if out.aux_loss is not None:
        loss_sum = loss_sum + out.aux_loss.float() * n
    return loss_sum, n, {}


def sft_batch_counts(batch: dict[str, Tensor]) -> tuple[int, int]:
    """The trainer's batch_counts for `collate_sft` batches: (tokens before the padding, examples);
    a packed row holds as many examples as segments."""
    if "segment_ids" in batch:
        examples = int((batch["segment_ids"].max(dim=1).values + 1).clamp_min(0).sum())
    else:
        examples = batch["input_ids"].size(0)
    return int(batch["lengths"].sum()), examples


# ---------------------------------------------------------------------------------------------
# Loading a chat model, its frozen reference, and generating replies


def chat_ready(lm: Any, what: str = "init_from") -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, checkpoint) of a model loaded by `modernlm.load(..., backend="modernlm")`,
    made chat-ready (`prepare_chat_model`) and in train mode, as SFT, DPO and the verifier start."""
    if lm.tokenizer is None:
        raise UserError(f"{what}: {lm.checkpoint or lm.source} has no tokenizer; name one with tokenizer=DIR")
    prepare_chat_model(lm.model, lm.tokenizer)
    return lm.model.train(), lm.tokenizer, lm.checkpoint or lm.source


def chat_pad_id(encoder: ChatEncoder) -> int:
    """The pad id of chat batches: the tokenizer's, else <|im_end|> (padding follows a reply's end)."""
    pad = encoder.tokenizer.pad_id
    return pad if pad is not None else encoder.end_id


def check_max_length(max_length: int, model: nn.Module, checkpoint: Any) -> None:
    """data.max_length must fit the model's context."""
    if max_length > model.config.max_seq_len:
        raise UserError(
            f"data.max_length ({max_length}) is longer than the model's context "
            f"({model.config.max_seq_len}, {checkpoint})"
        )


def frozen_copy(model: nn.Module) -> nn.Module:
    """The model as it is now, in eval mode and without gradients: a reference (DPO, GRPO's KL)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def generate_replies(
    model: nn.Module,
    encoder: ChatEncoder,
    conversations: Sequence[Sequence[Message]],
    sampling: Any = None,
    *,
    batch_size: int = 32,
    **settings: Any,
) -> list[dict[str, Any]]:
    """The assistant's next reply to each conversation: [{"text", "stopped", "ids"}], in order.

    `sampling` (a `generation.Sampling`, or max_new_tokens) and `settings` (temperature, top_k,
    seed, ...) as in `Sampling.make`; the seed (default 0) + the batch's first index seeds each
    batch, so sampling is reproducible batch by batch. "stopped" says whether the reply ended with
    <|im_end|> (the chat EOS) within max_new_tokens. Batches are left-padded; the text keeps any
    special token the model wrote.
    """
    tok = encoder.tokenizer
    stops = [encoder.end_id] + ([tok.eos_id] if tok.eos_id not in (None, encoder.end_id) else [])
    if not isinstance(sampling, Sampling):
        settings.setdefault("seed", 0)
    s = Sampling.make(sampling, **settings, eos_token_id=stops)
    out: list[dict[str, Any]] = []
    for b in range(0, len(conversations), batch_size):
        prompts = [encoder.prompt(c) for c in conversations[b : b + batch_size]]
        room = model.config.max_seq_len - s.max_new_tokens
        prompts = [p[-room:] if room > 0 and len(p) > room else p for p in prompts]
        batch = replace(s, seed=None if s.seed is None else s.seed + b)
        for reply in TextGeneration(model, tok, prompts, batch, skip_special_tokens=False).run():
            out.append({"text": reply.text, "stopped": reply.finish == "eos", "ids": reply.ids})
    return out


def reply_report(
    model: nn.Module, encoder: ChatEncoder, conversations: list[list[Message]], max_new_tokens: int,
    samples: Path | None, step: int,
) -> dict[str, Any]:  # fmt: skip
    """Greedy replies to the held-out conversations (each cut before its last assistant turn):
    eos_rate and n_generated for eval.json; the replies are appended to `samples` (samples.md;
    None: not written). {} without conversations."""
    if not conversations:
        return {}
    prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
    replies = generate_replies(model, encoder, prompts, max_new_tokens)
    if samples is not None:
        append_reply_samples(samples, step, prompts, replies)
    return {"eos_rate": sum(r["stopped"] for r in replies) / len(replies), "n_generated": len(replies)}


def append_reply_samples(path: Path, step: int, prompts: list[list[Message]], replies: list[dict[str, Any]]) -> None:
    """Append the prompts' last user turns and the model's replies to samples.md (`add_section`: a
    rerun replaces its own section)."""
    lines = [f"## step {step}: replies to held-out prompts (greedy)\n"]
    for conv, reply in zip(prompts, replies, strict=True):
        user = next((m["content"] for m in reversed(conv) if m["role"] == "user"), "")
        end = "" if reply["stopped"] else " *(no <|im_end|> within the budget)*"
        lines.append(f"**user:** {user}\n\n**assistant:** {reply['text']}{end}\n")
    add_section(path, step, "\n".join(lines) + "\n")


__all__ = [
    "SFTBatches",
    "SFTDataConfig",
    "SFTEvalSettings",
    "alpaca_messages",
    "append_reply_samples",
    "chat_pad_id",
    "chat_ready",
    "check_max_length",
    "check_val_fraction",
    "collate_sft",
    "eval_sft_batches",
    "frozen_copy",
    "generate_replies",
    "load_sft_examples",
    "load_sft_splits",
    "pack_examples",
    "prepare_chat_model",
    "read_sft_records",
    "reply_report",
    "reply_tokens",
    "resize_vocab",
    "sft_batch_counts",
    "sft_loss",
]

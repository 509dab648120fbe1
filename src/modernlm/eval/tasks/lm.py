"""modernlm's models in lm-evaluation-harness: `ModernLMEval`, registered as the harness model "modernlm".

Any source `modernlm.load` takes answers the harness's requests (`loglikelihood`,
`loglikelihood_rolling`, `generate_until`, `apply_chat_template`) the way its HF model (`HFLM`)
does: the same context/continuation split, rolling windows and batching, so the numbers are
comparable and equal on the same weights (tests/test_harness.py).

    lm_eval's Python API:   simple_evaluate(model=ModernLMEval(load("runs/sft")), tasks=["sst2"])
    from the shell:         modernlm eval tasks MODEL tasks=sst2,gsm8k
                            python -m modernlm.eval.tasks --model modernlm --model_args pretrained=MODEL ...
Only this package imports lm_eval (the `harness` extra).

Design notes (each request type): docs/design.md#evaltaskslmpy
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from modernlm.api import LM as LoadedLM  # modernlm.load's model (not lm_eval's LM, the harness model's base)
from modernlm.api import load
from modernlm.chat import CHATML_TEMPLATE, Spans, encode_with_specials
from modernlm.errors import UserError
from modernlm.generation import Sampling
from modernlm.runtime import eval_mode


@register_model("modernlm")
class ModernLMEval(TemplateLM):
    """The harness's view of a `modernlm.load` model (see the module docstring).

    pretrained: an `api.LM` already loaded, or any source `modernlm.load` takes; device, dtype and
    backend go to `load`. batch_size: requests per forward (an int, as HFLM's). max_length: the
    context the harness may use (default: the model's). max_gen_toks: generate_until's default.
    compile: generate_until's decode steps through torch.compile (`Sampling.compile`; CUDA graphs
    on a GPU).
    """

    def __init__(
        self,
        pretrained: Any = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = "cpu",
        dtype: str | None = None,
        backend: str = "auto",
        compile: bool = False,
        **kwargs: Any,
    ):
        super().__init__()

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for cuda:0 by default; HFLM falls back the same way
        if pretrained is None:
            raise UserError("model_args: pretrained=MODEL is required (a checkpoint, HF directory, hub id or .gguf)")
        self.lm = (
            pretrained
            if isinstance(pretrained, LoadedLM)
            else load(str(pretrained), device=device or "cpu", dtype=dtype, backend=backend, progress=False)
        )
        if self.lm.tokenizer is None:
            raise UserError(f"{self.lm.source}: no tokenizer, so the harness has no text to work with")
        self.tokenizer = self.lm.tokenizer  # TemplateLM's chat_template() reads .chat_template
        self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 8
        context = self.lm.max_context
        if max_length and not 1 <= int(max_length) <= context:  # as `eval perplexity` refuses a longer context
            raise UserError(f"max_length: must be 1 to the model's context of {context} tokens, got {max_length}")
        self._max_length = int(max_length) if max_length else context
        self._max_gen_toks = int(max_gen_toks)
        self._compile = compile
        # apply_chat_template's prompts whose contents hold a special token's string (trailing
        # whitespace cut, as the harness cuts a context) -> where the template's special tokens are
        self._chats: dict[str, Spans] = {}

    def check_generation(self, tasks: dict[str, Any]) -> None:
        """A UserError when a generation task among `tasks` (the harness's Task objects by name)
        would generate more tokens than the context leaves for a prompt: found before any task runs,
        not when `generate_until`'s turn comes after the log-likelihood tasks."""
        for name, task in tasks.items():
            if task.get_config("output_type") != "generate_until":
                continue
            settings = dict(task.get_config("generation_kwargs") or {})
            max_gen_toks = normalize_gen_kwargs(settings, self._max_gen_toks)["max_gen_toks"]
            if max_gen_toks >= self.max_length:
                raise UserError(
                    f"max_gen_toks: {max_gen_toks} ({name}) leaves no room for a prompt in the model's "
                    f"context of {self.max_length} tokens"
                )

    # ---- what the harness asks of every model ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:  # conditions an empty context and the first rolling window
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As HFLM: the tokenizer's own rule for bos (`Tokenizer.add_bos`) unless told, and no second
        bos before a string that starts with one (a chat-templated prompt). A chat prompt keeps
        its contents as text (`api.LM.chat_prompt_ids`), also with a continuation after it."""
        add_bos = self.tokenizer.add_bos if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_bos = False
        spans = self._chat_spans(string)
        if spans is None:
            return self.tokenizer.encode(string, add_bos=bool(add_bos))
        head = [self.tokenizer.bos_id] if add_bos and self.tokenizer.bos_id is not None else []
        return head + encode_with_specials(self.tokenizer, string, spans)

    def _chat_spans(self, string: str) -> Spans | None:
        """The template's special tokens of the longest remembered chat prompt `string` starts
        with (the harness encodes a context alone and with its continuation), else None. Only
        prompts with special-token text in their contents are remembered: usually none."""
        if not self._chats:
            return None
        if (spans := self._chats.get(string.rstrip())) is not None:
            return spans
        keys = [k for k in self._chats if string.startswith(k)]
        return self._chats[max(keys, key=len)] if keys else None

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None or not self.lm.has_chat_template:
            return None

        return self.tokenizer.chat_template or CHATML_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise NotImplementedError("modernlm's chat prompts always open the assistant's turn")
        text, spans = self.lm.chat_prompt_specials(chat_history)
        if spans is not None:  # tok_encode will get this text back: keep its contents as text then
            self._chats[text.rstrip()] = spans
        return text

    # ---- scoring ------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (summed log-probability, greedy?), batched as
        HFLM batches them: longest first, one forward per context for one-token continuations."""
        order = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[-2] + r[-1][:-1],
        )
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for chunk in order.get_batched(n=self.batch_size_per_gpu):
            longest = max(len(cont) for _, _, cont in chunk)
            if longest > self.max_length:  # (a user's max_length: the model's context holds it)
                bar.close()  # (its line ends before the error's)
                raise UserError(f"max_length: {self.max_length} tokens cannot hold a continuation of {longest} "
                                "(raise it, or leave it null: the model's context)")  # fmt: skip
            if not all(cont for _, _, cont in chunk):
                raise ValueError("a continuation must have at least 1 token")
            # the input is context + continuation without its last token, cut to the window from the left
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs])  # right padding: causal, unseen
            spans = [(len(inp) - len(cont), len(inp)) for inp, (_, _, cont) in zip(inputs, chunk, strict=True)]
            for (key, ctx, cont), row in zip(chunk, self._logprobs(ids, spans), strict=True):
                row = row[None]  # (1, len(cont), V): the continuation's positions
                greedy = row.argmax(dim=-1)
                for key_, cont_, row_ in order.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont, logits=row):
                    target = torch.tensor(cont_)[None]  # (1, n)
                    is_greedy = bool((greedy[:, -target.size(1) :] == target).all())
                    logp = row_[:, -target.size(1) :].gather(2, target[..., None]).sum()
                    results.append((float(logp), is_greedy))
                    if key_ is not None:
                        self.cache_hook.add_partial("loglikelihood", key_, results[-1])
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    def _logprobs(self, ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """log_softmax (float32) over the vocabulary at positions [a, b) of each row of ids (B, T).
        Our models apply the LM head at those positions only (head=False: same numbers, a fraction
        of the work when a continuation is a few tokens of a long prompt); others score every one."""
        if self.lm.kind == "modernlm":
            model = self.lm.model
            with eval_mode(model), torch.no_grad():
                hidden = model(ids.to(self.lm.device), head=False, return_hidden=True).hidden  # (B, T, C)
                return [F.log_softmax(model.lm_head(hidden[i, a:b]).float(), dim=-1) for i, (a, b) in enumerate(spans)]
        logits = self.lm.logits_fn(ids)
        return [F.log_softmax(logits[i, a:b].float(), dim=-1) for i, (a, b) in enumerate(spans)]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods: the harness's disjoint rolling windows at max_length."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            # As HFLM: the tokenizer's own rule, so a tokenizer that adds bos has its bos scored too
            # (given the prefix token); SmolLM2's adds none.
            tokens = self.tok_encode(text)
            pairs = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for chunk in order.get_batched(n=self.batch_size_per_gpu):
            contexts, settings = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(dict(settings[0]), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise UserError(
                    f"max_gen_toks: {max_gen_toks} leaves no room for a prompt in the model's "
                    f"context of {self.max_length} tokens"
                )
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            sampling = Sampling(
                max_new_tokens=max_gen_toks,
                temperature=temperature,
                top_p=kwargs.get("top_p"),
                top_k=kwargs.get("top_k"),
                stop=until,
                compile=self._compile,
            )
            rows = [self.tok_encode(c)[-room:] for c in contexts]
            for context, text in zip(contexts, self.lm.complete(rows, sampling), strict=True):
                text = postprocess_generated_text(text, until, None)  # as HFLM: cut at any stop string
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, settings[0]), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)

"""Perplexity of a model on a text, with the method stated: token perplexity, bits per byte and
word perplexity, as JSON plus one summary line.

    modernlm eval perplexity runs/tiny ../shared/data/wikitext-2/wiki.test.raw
    modernlm eval perplexity gpt2 hf_dataset=Salesforce/wikitext hf_config=wikitext-2-raw-v1 stride=512
    modernlm eval perplexity SmolLM2-135M-Instruct.Q4_1.gguf wiki.test.raw context=1024 max_tokens=20000 --out ppl.json

MODEL is a modernlm checkpoint directory, a run directory (its best checkpoint, else the latest),
an HF model directory, a hub id or a .gguf file; HF models run on transformers' own model. The
method is the HF perplexity guide's sliding window: windows of `context` tokens every `stride`
tokens, each scoring only the tokens the previous one did not, so every token is scored at most
once with at least context - stride tokens of left context. As in the guide, a token that starts a
window has no context and is not scored (one per window when stride == context; the JSON's
unscored_tokens); bos=true prepends the bos token so the text's first token is scored. Token
perplexity depends on the tokenizer; bits per byte and word perplexity compare across tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

from modernlm.commands import check_scoring
from modernlm.errors import UserError
from modernlm.files import atomic_write

POSITIONALS = ["model", "data"]
FLAGS = {"--out": "out"}
OUTPUTS = {"out": "file"}


@dataclass
class Config:
    model: str = ""  # checkpoint dir, run dir, HF model dir, hub id or .gguf file
    data: str = ""  # UTF-8 text file to score ("" = the hub dataset below)
    hf_dataset: str = ""  # hub dataset instead of a file, e.g. Salesforce/wikitext
    hf_config: str = ""  # its config, e.g. wikitext-2-raw-v1
    split: str = "test"  # its split
    text_field: str = "text"  # its text column (rows joined with "\n\n", as the HF guide does)
    context: int = 0  # tokens per window; 0 = the model's maximum context
    stride: int = 0  # tokens between window starts; 0 = context (no overlap); smaller = more left context
    batch_size: int = 4  # windows per forward pass
    max_tokens: int = 0  # score only the first N tokens of the text (0 = all); keeps CPU runs short
    bos: bool = False  # prepend the bos token so the first text token is scored too
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "float32"  # float32, bfloat16 or float16 weights
    quantize: str = "none"  # none, int8, int4, auto (a .gguf's own blocks): the weights of docs/model.md's table
    progress: bool = True  # progress bar on stderr
    out: str = ""  # write the JSON report here ("" = print it to stdout)

    def __post_init__(self) -> None:
        check_scoring(self.batch_size, self.max_tokens)
        if self.data and self.hf_dataset:  # one text is scored: the file would win silently
            raise UserError(f"data: give a text file ({self.data}) or hf_dataset ({self.hf_dataset}), not both")


def main(cfg: Config) -> None:
    import json
    import sys
    from pathlib import Path

    from modernlm.api import load
    from modernlm.data.readers import load_text
    from modernlm.eval.sinks import nan_to_none
    from modernlm.perplexity import evaluate_text, summary_line
    from modernlm.quant import check_quantize

    if not cfg.model:
        raise UserError("model: give a model (modernlm eval perplexity MODEL DATA)")
    check_quantize(cfg.quantize, "quantize", auto=True)
    text, data = load_text(cfg.data, cfg.hf_dataset, cfg.hf_config, cfg.split, cfg.text_field)
    backend = "auto" if cfg.quantize == "none" else "modernlm"  # quantized weights are ours to run
    model = load(cfg.model, device=cfg.device, dtype=cfg.dtype, progress=cfg.progress, backend=backend,
                 quantize=cfg.quantize)
    report = evaluate_text(
        model, text, context=cfg.context, stride=cfg.stride, batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens, bos=cfg.bos, progress=cfg.progress,
    )  # fmt: skip
    report = {"data": data, **report}
    written = nan_to_none(report)  # JSON has no NaN: a non-finite score is null there
    if written != report:
        print("warning: the scores are not finite (nan or inf from the model); null in the JSON", file=sys.stderr)
    payload = json.dumps(written, indent=2, allow_nan=False)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, payload + "\n")
    else:
        print(payload)
    print(summary_line(report, data) + (f" -> {cfg.out}" if cfg.out else ""), flush=True)

"""Generate text from a modernlm checkpoint (a directory with config.json, model.safetensors and
tokenizer.json), streamed to stdout as it is produced.

    modernlm generate runs/tiny/checkpoints/step_000500 prompt="Once upon a time" max_new_tokens=100
    modernlm generate CKPT prompt="The" temperature=0            # greedy
    modernlm generate CKPT prompt="The" max_new_tokens=5000 window=128  # past the context
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modernlm.errors import UserError

POSITIONALS = ["checkpoint"]


@dataclass
class Config:
    checkpoint: str = ""  # modernlm checkpoint directory, holding the tokenizer files too
    prompt: str = ""  # text to continue ("" starts from the bos token)
    max_new_tokens: int = 200  # tokens to generate at most
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already seen; 1.0 = off
    stop: list[str] = field(default_factory=list)  # stop strings (cut before the first one)
    seed: int | None = None  # sampling seed; null = not reproducible
    window: int = 0  # > 0: rolling KV cache of sink_size + window tokens (constant memory)
    sink_size: int = 4  # first tokens the rolling cache always keeps (StreamingLLM attention sinks)
    compile: bool = False  # torch.compile the decode steps (~20 s once; faster per token)
    stream: bool = True  # print tokens as they come
    device: str = "cpu"  # cpu, cuda, cuda:1, mps


def main(cfg: Config) -> None:
    import torch

    from modernlm.checkpoint import load_model
    from modernlm.generation import generate_text, stream_text
    from modernlm.tokenizer import load_tokenizer

    if not cfg.checkpoint:
        raise UserError(
            "checkpoint: give a checkpoint directory (modernlm generate CHECKPOINT prompt=...)"
        )
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise UserError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {cfg.device!r} requested but CUDA is not available")
    model = load_model(cfg.checkpoint, device=device)
    tokenizer = load_tokenizer(cfg.checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"checkpoint {cfg.checkpoint}: tokenizer has {tokenizer.vocab_size} tokens, "
            f"the model only {model.config.vocab_size}"
        )
    options = dict(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, stop=cfg.stop, seed=cfg.seed,
        window=cfg.window, sink_size=cfg.sink_size, compile=cfg.compile,
    )  # fmt: skip
    if cfg.stream:
        for piece in stream_text(model, tokenizer, cfg.prompt, **options):
            print(piece, end="", flush=True)
        print()
    else:
        print(generate_text(model, tokenizer, cfg.prompt, **options))

"""The samples stage: samples.md, the same prompts put to every model of the pipeline, side by side.

Story prompts are continued by sampling (one seed for every model); held-out questions and
instructions are answered greedily, in ChatML by the chat models and with the results table's
plain prompt by the pretrained model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modernlm.align.sft import chat_ready, generate_replies
from modernlm.api import load
from modernlm.chat import ChatEncoder
from modernlm.eval.compare import markdown_table
from modernlm.files import atomic_write
from modernlm.generation import generate_text
from modernlm.pipeline.table import PipelineEvalSettings, eval_device, held_out_problems, plain_answers


@dataclass
class SamplesStage:
    story_prompts: list[str] = field(default_factory=lambda: ["Once upon a time,", "Mia had 4 apples."])
    questions: int = 3  # held-out problems each model answers (from eval.problems)
    instructions: list[str] = field(default_factory=lambda: ["Write a short story about a cat."])
    max_new_tokens: int = 80
    temperature: float = 0.8  # story continuations sample; answers are greedy
    top_k: int = 50
    seed: int = 0


def write_side_by_side_samples(out_dir: Path, dirs: dict[str, str], c: SamplesStage, e: PipelineEvalSettings) -> None:
    """out_dir/samples.md: every model's continuations and replies (models from `dirs`, each stage's
    directory by stage name; the questions and the plain prompt from the results table's settings `e`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = [p["question"] for p in held_out_problems(e.problems, c.questions)] if e.problems.given() else []
    models = {}
    device, _ = eval_device(e.device)
    base = load(dirs["pretrain"], device=device, what="pretrain")
    models["pretrain"] = (base.model, base.tokenizer, None)
    for name in ("sft", "dpo", "rl"):
        m, tok, _ = chat_ready(load(dirs[name], what=name), name)
        models[name] = (m.to(device).eval(), tok, ChatEncoder(tok))
    lines = [
        "# Samples\n",
        f"Story prompts: continuations sampled at temperature {c.temperature}, top-k {c.top_k}, seed {c.seed}, "
        f"{c.max_new_tokens} new tokens. Questions and instructions: greedy replies (the pretrained model gets "
        f"the plain prompt {e.plain_prompt!r}).\n",
    ]
    for prompt in c.story_prompts:
        rows = []
        for name, (m, tok, _) in models.items():
            text = generate_text(m, tok, prompt, c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                                 seed=c.seed, add_bos=False)  # fmt: skip
            rows.append((name, prompt + text))
        lines += [f"## Continue: {prompt!r}\n", markdown_table(["model", "continuation"], rows)]
    for q in questions + list(c.instructions):
        rows = []
        for name, (m, tok, enc) in models.items():
            if enc is None:
                text = plain_answers(m, tok, [e.plain_prompt.format(question=q)], c.max_new_tokens, 1)[0]
            else:
                text = generate_replies(m, enc, [[{"role": "user", "content": q}]], c.max_new_tokens)[0]["text"]
            rows.append((name, text))
        lines += [f"## Ask: {q!r}\n", markdown_table(["model", "reply"], rows)]
    atomic_write(out_dir / "samples.md", "\n".join(lines))

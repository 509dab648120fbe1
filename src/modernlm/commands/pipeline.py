"""Every stage end to end from one recipe: data, tokenizer, prepare, pretrain, eval, SFT, DPO,
verifier, eval, samples, report.

    modernlm pipeline                                   # the demo recipe: offline, CPU, <= 15 minutes
    modernlm pipeline -c configs/pipeline/demo.yaml pretrain.train.max_seconds=60
    modernlm pipeline -c configs/pipeline/seed.yaml     # the seed's full run on one 80 GB GPU
    modernlm pipeline -c configs/pipeline/demo.yaml --from sft      # re-run sft and everything after it
    modernlm pipeline -c configs/pipeline/demo.yaml --only samples  # re-run one stage

Each stage has its own directory under out_dir and is the library's own command run in process,
configured by the recipe's section of the same name (`sft:` is `modernlm sft`'s config, and so
on). The pipeline fills in what connects the stages: every run.out_dir / run.name, each stage's
init_from (pretrain -> sft -> dpo; sft -> verifier), the tokenizer and token paths, and, with
data.kind=synthetic, every data path left empty. Running again skips the stages already done with
the same config (and the same inputs), resumes an unfinished one, and re-runs what changed
(modernlm.pipeline.runner). The report (report.md, report.html) is rewritten whenever a stage ran.

With data.kind=synthetic the data are the project's own generated world (modernlm.data.synthetic):
stories for pretraining, word problems with checkable answers for SFT and the verifier, and pairs
of a right and a wrong solution for DPO, on which a tiny model learns at every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modernlm.commands import dpo, prepare, pretrain, sft, tokenizer_train, verifier
from modernlm.data.synthetic import SyntheticConfig
from modernlm.files import atomic_write
from modernlm.pipeline.runner import EvalSettings

FLAGS = {"--from": "from_stage", "--only": "only"}
OUTPUTS = {"out_dir": "dir"}  # the stages write below it


@dataclass
class DataStage:
    kind: Literal["synthetic", "none"] = "synthetic"  # none: every stage names its own data (hub or files)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class SamplesStage:
    story_prompts: list[str] = field(default_factory=lambda: ["Once upon a time,", "Mia had 4 apples."])
    questions: int = 3  # held-out problems each model answers (from eval.problems)
    instructions: list[str] = field(default_factory=lambda: ["Write a short story about a cat."])
    max_new_tokens: int = 80
    temperature: float = 0.8  # story continuations sample; answers are greedy
    top_k: int = 50
    seed: int = 0


@dataclass
class Config:
    recipe: str = "demo"  # a name for the report
    out_dir: str = "runs/demo"  # the pipeline directory: one subdirectory per stage
    from_stage: str = ""  # --from STAGE: re-run this stage and every later one
    only: str = ""  # --only STAGE: re-run just this stage (its inputs must be done)
    data: DataStage = field(default_factory=DataStage)
    tokenizer: tokenizer_train.Config = field(default_factory=lambda: tokenizer_train.Config(vocab_size=2048))
    prepare: prepare.Config = field(default_factory=lambda: prepare.Config(val_fraction=0.02, progress=False))
    pretrain: pretrain.Config = field(default_factory=pretrain.Config)
    sft: sft.Config = field(default_factory=sft.Config)
    dpo: dpo.Config = field(default_factory=dpo.Config)
    verifier: verifier.Config = field(default_factory=verifier.Config)
    eval: EvalSettings = field(default_factory=EvalSettings)
    samples: SamplesStage = field(default_factory=SamplesStage)


STAGE_DIRS = {
    "data": "data", "tokenizer": "tokenizer", "prepare": "tokens", "pretrain": "pretrain",
    "eval_pretrain": "eval_pretrain", "sft": "sft", "dpo": "dpo", "verifier": "verifier", "eval": "eval",
    "samples": "samples",
}  # fmt: skip


def wire(cfg: Config) -> dict[str, Any]:
    """Each stage's config with the connections filled in (see the module docstring)."""
    out = Path(cfg.out_dir)
    d = {name: str(out / sub) for name, sub in STAGE_DIRS.items()}
    synthetic = cfg.data.kind == "synthetic"
    data = Path(d["data"])

    def run(section: Any, name: str) -> Any:
        return replace(section, out_dir=str(out), name=STAGE_DIRS[name])

    tok = cfg.tokenizer
    if synthetic and not tok.input and not tok.corpus.sources:
        tok = replace(tok, input=str(data / "corpus" / "train.txt"))
    tok = replace(tok, out=d["tokenizer"])
    prep = cfg.prepare
    if synthetic and not prep.input and not prep.corpus.sources:
        prep = replace(prep, input=str(data / "corpus" / "train.txt"))
    prep = replace(prep, tokenizer=d["tokenizer"], out=d["prepare"], overwrite=True)
    pre = replace(
        cfg.pretrain, data=replace(cfg.pretrain.data, path=d["prepare"]), run=run(cfg.pretrain.run, "pretrain")
    )
    s = cfg.sft
    if synthetic and not s.data.path and not s.data.hf_dataset:
        s = replace(s, data=replace(s.data, format="alpaca", path=str(data / "sft" / "train.json")),
                    eval=replace(s.eval, val_path=s.eval.val_path or str(data / "sft" / "val.json")))  # fmt: skip
    s = replace(s, init_from=d["pretrain"], run=run(s.run, "sft"))
    p = cfg.dpo
    if synthetic and not p.data.path and not p.data.hf_dataset:
        p = replace(p, data=replace(p.data, format="pairs", path=str(data / "prefs" / "train.jsonl")),
                    eval=replace(p.eval, val_path=p.eval.val_path or str(data / "prefs" / "val.jsonl")))  # fmt: skip
    p = replace(p, init_from=d["sft"], run=run(p.run, "dpo"))
    v = cfg.verifier
    if synthetic:
        v = replace(v, data=replace(v.data, train_path=str(data / "gsm" / "train.jsonl"),
                                    eval_path=str(data / "gsm" / "test.jsonl")))  # fmt: skip
    v = replace(v, init_from=d["sft"], run=run(v.run, "verifier"))
    e = cfg.eval
    if synthetic:

        def fill(src: Any, path: Path) -> Any:  # a Source or the pairs' config: keep what the recipe names
            return src if src.path or src.hf_dataset else replace(src, path=str(path))

        e = replace(e, text=fill(e.text, data / "corpus" / "val.txt"),
                    problems=fill(e.problems, data / "gsm" / "test.jsonl"),
                    pairs=fill(e.pairs, data / "prefs" / "val.jsonl"))  # fmt: skip
    return {"data": cfg.data, "tokenizer": tok, "prepare": prep, "pretrain": pre, "eval_pretrain": e, "sft": s,
            "dpo": p, "verifier": v, "eval": e, "samples": (cfg.samples, e), "dirs": d}  # fmt: skip


def build_stages(cfg: Config) -> list[Any]:
    """The stages in order, each with its resolved config, inputs and run function."""
    from modernlm.pipeline import runner as P

    w = wire(cfg)
    d = w["dirs"]
    out = Path(cfg.out_dir)

    def data_stage(c: DataStage) -> dict[str, Any] | None:
        if c.kind == "none":
            return None
        from modernlm.data.synthetic import write_demo_data

        meta = write_demo_data(d["data"], c.synthetic)
        return {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}

    def eval_pretrain(c: EvalSettings) -> dict[str, Any]:
        row = P.evaluate_model("pretrain", d["pretrain"], chat=False, cfg=c)
        P.write_rows(Path(d["eval_pretrain"]), [row])
        return {k: v for k, v in row.items() if not k.startswith("_")}

    def final_eval(c: EvalSettings) -> dict[str, Any]:
        import json

        rows = json.loads((Path(d["eval_pretrain"]) / "results.json").read_text())["rows"]
        for name in ("sft", "dpo"):
            rows.append(P.evaluate_model(name, d[name], chat=True, cfg=c))
        rows += verifier_rows(Path(d["verifier"]))
        results = P.write_rows(Path(d["eval"]), rows, notes=RESULT_NOTES)
        return {"rows": len(results["rows"])}

    def samples_stage(args: tuple[SamplesStage, EvalSettings]) -> None:
        write_samples(Path(d["samples"]), d, *args)

    def report_stage(_: Any) -> None:
        from modernlm.pipeline.report import write_report

        write_report(out, force=True)  # the pipeline's own report: rewritten when a stage ran

    S = P.Stage
    return [
        S("data", STAGE_DIRS["data"], (), w["data"], data_stage),
        S("tokenizer", STAGE_DIRS["tokenizer"], ("data",), w["tokenizer"], tokenizer_train.main),
        S("prepare", STAGE_DIRS["prepare"], ("data", "tokenizer"), w["prepare"], prepare.main),
        S("pretrain", STAGE_DIRS["pretrain"], ("prepare",), w["pretrain"], pretrain.main, resumable=True),
        S("eval_pretrain", STAGE_DIRS["eval_pretrain"], ("data", "pretrain"), w["eval_pretrain"], eval_pretrain),
        S("sft", STAGE_DIRS["sft"], ("data", "pretrain"), w["sft"], sft.main, resumable=True),
        S("dpo", STAGE_DIRS["dpo"], ("data", "sft"), w["dpo"], dpo.main, resumable=True),
        S("verifier", STAGE_DIRS["verifier"], ("data", "sft"), w["verifier"], verifier.main, resumable=True),
        S("eval", STAGE_DIRS["eval"], ("eval_pretrain", "sft", "dpo", "verifier"), w["eval"], final_eval),
        S("samples", STAGE_DIRS["samples"], ("pretrain", "sft", "dpo"), w["samples"], samples_stage),
        S(
            "report",
            ".",
            ("data", "tokenizer", "prepare", "pretrain", "eval_pretrain", "sft", "dpo", "verifier", "eval", "samples"),
            None,
            report_stage,
        ),  # fmt: skip
    ]


RESULT_NOTES = (
    "val_ppl: perplexity of the held-out stories (sliding window, stride = context / 2). answer_accuracy: "
    "greedy answers to held-out word problems, right when the last number equals the reference (chat models "
    "are asked in ChatML, the pretrained model with a plain 'Question: ... Answer:' prompt). pair_accuracy: "
    "held-out preference pairs whose right solution gets the higher log-probability. The verifier rows rerank "
    "N samples of the SFT model on the same problems."
)


def verifier_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The verifier's reranking results as rows of the results table."""
    import json

    path = run_dir / "eval.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    n = r.get("n")
    return [
        {"model": f"sft, majority vote of {n}", "answer_accuracy": r["majority_accuracy"]},
        {"model": f"sft + verifier, best of {n}", "answer_accuracy": r["best_of_n_accuracy"]},
        {"model": f"sft + verifier, weighted vote of {n}", "answer_accuracy": r["weighted_vote_accuracy"]},
        {"model": f"sft, pass@{n} (oracle)", "answer_accuracy": r["pass_at_n"]},
    ]


def write_samples(out_dir: Path, dirs: dict[str, str], c: SamplesStage, e: EvalSettings) -> None:
    """samples.md: the same prompts to every model, side by side."""
    from modernlm.align.sft import ChatEncoder, generate_replies, load_chat_model
    from modernlm.checkpoint import load_model
    from modernlm.eval.compare import md_escape as markdown_cell
    from modernlm.eval.perplexity import resolve_checkpoint
    from modernlm.generation import generate_text
    from modernlm.pipeline import runner as P
    from modernlm.tokenizer import load_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    questions = [p["question"] for p in P.read_problems(e.problems, c.questions)] if e.problems.given() else []
    models = {}
    base = resolve_checkpoint(dirs["pretrain"])
    device, _ = P.eval_device(e.device)
    models["pretrain"] = (load_model(base, device=device).eval(), load_tokenizer(base), None)
    for name in ("sft", "dpo"):
        m, tok, _ = load_chat_model(dirs[name], what=name)
        models[name] = (m.to(device).eval(), tok, ChatEncoder(tok))
    lines = [
        "# Samples\n",
        f"Story prompts: continuations sampled at temperature {c.temperature}, top-k {c.top_k}, seed {c.seed}, "
        f"{c.max_new_tokens} new tokens. Questions and instructions: greedy replies (the pretrained model gets "
        f"the plain prompt {e.plain_prompt!r}).\n",
    ]
    for prompt in c.story_prompts:
        lines += [f"## Continue: {prompt!r}\n", "| model | continuation |", "|---|---|"]
        for name, (m, tok, _) in models.items():
            text = generate_text(m, tok, prompt, c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                                 seed=c.seed, add_bos=False)  # fmt: skip
            lines.append(f"| {name} | {markdown_cell(prompt + text)} |")
        lines.append("")
    for q in questions + list(c.instructions):
        lines += [f"## Ask: {q!r}\n", "| model | reply |", "|---|---|"]
        for name, (m, tok, enc) in models.items():
            if enc is None:
                text = P._plain_generate(m, tok, [e.plain_prompt.format(question=q)], c.max_new_tokens, 1)[0]
            else:
                text = generate_replies(m, enc, [[{"role": "user", "content": q}]], c.max_new_tokens)[0]["text"]
            lines.append(f"| {name} | {markdown_cell(text)} |")
        lines.append("")
    atomic_write(out_dir / "samples.md", "\n".join(lines))


def main(cfg: Config) -> None:
    from modernlm.config import to_yaml
    from modernlm.pipeline.runner import Runner

    stages = build_stages(cfg)
    recipe_text = to_yaml(replace(cfg, from_stage="", only=""))
    Runner(cfg.out_dir, stages, cfg.recipe, recipe_text).run(cfg.from_stage, cfg.only)
    print(f"pipeline {cfg.recipe}: done -> {Path(cfg.out_dir) / 'report.md'}", flush=True)

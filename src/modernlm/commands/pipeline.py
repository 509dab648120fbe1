"""Every stage end to end from one recipe: data, tokenizer, prepare, pretrain, eval, SFT, DPO,
RL (GRPO), verifier, eval, samples, report.

    modernlm pipeline                                   # the demo recipe: offline, CPU, <= 15 minutes
    modernlm pipeline -c configs/pipeline/demo.yaml pretrain.train.max_seconds=60
    modernlm pipeline -c configs/pipeline/seed.yaml     # the seed's full run on one 80 GB GPU
    modernlm pipeline -c configs/pipeline/demo.yaml --from sft      # re-run sft and everything after it
    modernlm pipeline -c configs/pipeline/demo.yaml --only samples  # re-run one stage

Each stage has its own directory under out_dir and is the library's own command run in process,
configured by the recipe's section of the same name (`sft:` is `modernlm sft`'s config, and so
on). The pipeline fills in what connects the stages: every run.out_dir / run.name, each stage's
init_from (pretrain -> sft -> dpo -> rl, rl_start naming rl's start; sft -> verifier), the tokenizer and
token paths, and, with
data.kind=synthetic, every data path left empty. Running again skips the stages already done with
the same config (and the same inputs), resumes an unfinished one, and re-runs what changed
(modernlm.pipeline.runner). The report (report.md, report.html) is rewritten whenever a stage ran.

With data.kind=synthetic the data are the project's own generated world (modernlm.data.synthetic):
stories for pretraining, word problems with checkable answers for SFT, RL and the verifier, and
pairs of a right and a wrong solution for DPO, on which a tiny model learns at every stage. What
chooses a checkpoint is never what the report measures: SFT keeps its best on sft/val, DPO on
prefs/val, RL on gsm/val, the verifier on a share of gsm/train; the results table scores gsm/test
and prefs/test, per kind of problem as well as overall.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modernlm.commands import dpo, grpo, prepare, pretrain, sft, tokenizer_train, verifier
from modernlm.data.synthetic import SyntheticConfig
from modernlm.errors import UserError
from modernlm.files import atomic_write
from modernlm.pipeline.runner import PipelineEvalSettings

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
    rl_start: Literal["sft", "dpo"] = "dpo"  # the model the rl stage starts from
    rl: grpo.Config = field(default_factory=grpo.Config)
    verifier: verifier.Config = field(default_factory=verifier.Config)
    eval: PipelineEvalSettings = field(default_factory=PipelineEvalSettings)
    samples: SamplesStage = field(default_factory=SamplesStage)


STAGE_DIRS = {
    "data": "data", "tokenizer": "tokenizer", "prepare": "tokens", "pretrain": "pretrain",
    "eval_pretrain": "eval_pretrain", "sft": "sft", "dpo": "dpo", "rl": "rl", "verifier": "verifier",
    "eval": "eval",
    "samples": "samples",
}  # fmt: skip


def wire(cfg: Config) -> dict[str, Any]:
    """Each stage's config with the connections filled in (see the module docstring)."""
    out = Path(cfg.out_dir)
    dirs = {name: str(out / sub) for name, sub in STAGE_DIRS.items()}
    synthetic = cfg.data.kind == "synthetic"
    data = Path(dirs["data"])

    def run(section: Any, name: str) -> Any:
        return replace(section, out_dir=str(out), name=STAGE_DIRS[name])

    tokenizer_cfg = cfg.tokenizer
    if synthetic and not tokenizer_cfg.input and not tokenizer_cfg.corpus.sources:
        tokenizer_cfg = replace(tokenizer_cfg, input=str(data / "corpus" / "train.txt"))
    tokenizer_cfg = replace(tokenizer_cfg, out=dirs["tokenizer"])
    prepare_cfg = cfg.prepare
    if synthetic and not prepare_cfg.input and not prepare_cfg.corpus.sources:
        prepare_cfg = replace(prepare_cfg, input=str(data / "corpus" / "train.txt"))
    prepare_cfg = replace(prepare_cfg, tokenizer=dirs["tokenizer"], out=dirs["prepare"], overwrite=True)
    pretrain_cfg = replace(
        cfg.pretrain, data=replace(cfg.pretrain.data, path=dirs["prepare"]), run=run(cfg.pretrain.run, "pretrain")
    )

    def tuned(section: Any, name: str, init_from: str, fmt: str, train: Path, val: Path) -> Any:
        """sft / dpo: the synthetic data where the recipe names none, then init_from and the run."""
        if synthetic and not section.data.path and not section.data.hf_dataset:
            section = replace(section, data=replace(section.data, format=fmt, path=str(train)),
                              eval=replace(section.eval, val_path=section.eval.val_path or str(val)))  # fmt: skip
        return replace(section, init_from=init_from, run=run(section.run, name))

    sft_cfg = tuned(cfg.sft, "sft", dirs["pretrain"], "alpaca", data / "sft" / "train.json", data / "sft" / "val.json")
    dpo_cfg = tuned(cfg.dpo, "dpo", dirs["sft"], "pairs", data / "prefs" / "train.jsonl", data / "prefs" / "val.jsonl")
    rl_cfg = cfg.rl
    if synthetic and not rl_cfg.data.given():
        gsm = data / "gsm"
        rl_eval = rl_cfg.eval if rl_cfg.eval.given() else replace(rl_cfg.eval, path=str(gsm / "val.jsonl"))
        rl_cfg = replace(rl_cfg, data=replace(rl_cfg.data, path=str(gsm / "train.jsonl")), eval=rl_eval)
    rl_cfg = replace(rl_cfg, init_from=dirs[cfg.rl_start], run=run(rl_cfg.run, "rl"))
    verifier_cfg = cfg.verifier
    if synthetic:
        gsm = data / "gsm"
        verifier_data = replace(
            verifier_cfg.data, train_path=str(gsm / "train.jsonl"), eval_path=str(gsm / "test.jsonl")
        )
        verifier_cfg = replace(verifier_cfg, data=verifier_data)
    verifier_cfg = replace(verifier_cfg, init_from=dirs["sft"], run=run(verifier_cfg.run, "verifier"))
    eval_cfg = cfg.eval
    if synthetic:

        def fill(src: Any, path: Path) -> Any:  # a Source or the pairs' config: keep what the recipe names
            return src if src.path or src.hf_dataset else replace(src, path=str(path))

        eval_cfg = replace(eval_cfg, text=fill(eval_cfg.text, data / "corpus" / "val.txt"),
                           problems=fill(eval_cfg.problems, data / "gsm" / "test.jsonl"),
                           pairs=fill(eval_cfg.pairs, data / "prefs" / "test.jsonl"))  # fmt: skip
    return {"data": cfg.data, "tokenizer": tokenizer_cfg, "prepare": prepare_cfg, "pretrain": pretrain_cfg,
            "eval_pretrain": eval_cfg, "sft": sft_cfg, "dpo": dpo_cfg, "rl": rl_cfg, "verifier": verifier_cfg,
            "eval": eval_cfg, "samples": (cfg.samples, eval_cfg), "dirs": dirs}  # fmt: skip


def build_stages(cfg: Config) -> list[Any]:
    """The stages in order, each with its resolved config, inputs and run function."""
    from modernlm.pipeline import runner
    from modernlm.pipeline.runner import Stage

    cfgs = wire(cfg)  # each stage's config
    dirs = cfgs["dirs"]
    out = Path(cfg.out_dir)

    def data_stage(c: DataStage) -> dict[str, Any] | None:
        if c.kind == "none":
            return None
        from modernlm.data.synthetic import write_demo_data

        meta = write_demo_data(dirs["data"], c.synthetic)
        return {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}

    def eval_pretrain(c: PipelineEvalSettings) -> dict[str, Any]:
        row = runner.evaluate_model("pretrain", dirs["pretrain"], chat=False, cfg=c)
        runner.write_rows(Path(dirs["eval_pretrain"]), [row])
        return {k: v for k, v in row.items() if not k.startswith("_")}

    def final_eval(c: PipelineEvalSettings) -> dict[str, Any]:
        import json

        rows = json.loads((Path(dirs["eval_pretrain"]) / "results.json").read_text())["rows"]
        for name in ("sft", "dpo", "rl"):
            rows.append(runner.evaluate_model(name, dirs[name], chat=True, cfg=c))
        rows += verifier_rows(Path(dirs["verifier"]), runner.problem_kinds(c.problems, c.max_problems))
        results = runner.write_rows(Path(dirs["eval"]), rows, notes=RESULT_NOTES)
        return {"rows": len(results["rows"])}

    def samples_stage(args: tuple[SamplesStage, PipelineEvalSettings]) -> None:
        write_samples(Path(dirs["samples"]), dirs, *args)

    def report_stage(_: Any) -> None:
        from modernlm.pipeline.report import write_report

        write_report(out, force=True)  # the pipeline's own report: rewritten when a stage ran

    return [
        Stage("data", STAGE_DIRS["data"], (), cfgs["data"], data_stage),
        Stage("tokenizer", STAGE_DIRS["tokenizer"], ("data",), cfgs["tokenizer"], tokenizer_train.main),
        Stage("prepare", STAGE_DIRS["prepare"], ("data", "tokenizer"), cfgs["prepare"], prepare.main),
        Stage("pretrain", STAGE_DIRS["pretrain"], ("prepare",), cfgs["pretrain"], pretrain.main, resumable=True),
        Stage("eval_pretrain", STAGE_DIRS["eval_pretrain"], ("data", "pretrain"), cfgs["eval_pretrain"], eval_pretrain),
        Stage("sft", STAGE_DIRS["sft"], ("data", "pretrain"), cfgs["sft"], sft.main, resumable=True),
        Stage("dpo", STAGE_DIRS["dpo"], ("data", "sft"), cfgs["dpo"], dpo.main, resumable=True),
        Stage("rl", STAGE_DIRS["rl"], ("data", cfg.rl_start), cfgs["rl"], grpo.main, resumable=True),
        Stage("verifier", STAGE_DIRS["verifier"], ("data", "sft"), cfgs["verifier"], verifier.main, resumable=True),
        Stage("eval", STAGE_DIRS["eval"], ("eval_pretrain", "sft", "dpo", "rl", "verifier"), cfgs["eval"],
              final_eval),
        Stage("samples", STAGE_DIRS["samples"], ("pretrain", "sft", "dpo", "rl"), cfgs["samples"], samples_stage),
        Stage(
            "report",
            ".",
            ("data", "tokenizer", "prepare", "pretrain", "eval_pretrain", "sft", "dpo", "rl", "verifier", "eval",
             "samples"),
            None,
            report_stage,
        ),  # fmt: skip
    ]


RESULT_NOTES = (
    "val_ppl: perplexity of the held-out stories (sliding window, stride = context / 2). answer_accuracy: "
    "greedy answers to held-out word problems, right when the last number equals the reference (chat models "
    "are asked in ChatML, the pretrained model with a plain 'Question: ... Answer:' prompt); "
    "answer_accuracy/<kind>: the same per kind of problem (compare: the 'more / fewer than' problems the SFT "
    "demonstrations get wrong). pair_accuracy: held-out preference pairs whose right solution gets the higher "
    "log-probability; the pairs' prompts are the first gsm/test problems, so pair and answer accuracy share "
    "their questions. The verifier rows rerank N samples of the SFT model on the same problems. None of these "
    "problems or pairs chose a checkpoint, and no training text states their computations."
)


def verifier_rows(run_dir: Path, kinds: list[str | None] | None = None) -> list[dict[str, Any]]:
    """The verifier's reranking results as rows of the results table; with the problems' kinds
    (in eval order), each method's accuracy per kind too (from eval/predictions.jsonl)."""
    import json

    from modernlm.pipeline.runner import accuracy_by_kind

    path = run_dir / "eval.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    n = r.get("n")
    rows = [
        ({"model": f"sft, majority vote of {n}", "answer_accuracy": r["majority_accuracy"]}, "majority_correct"),
        ({"model": f"sft + verifier, best of {n}", "answer_accuracy": r["best_of_n_accuracy"]}, "best_correct"),
        ({"model": f"sft + verifier, weighted vote of {n}", "answer_accuracy": r["weighted_vote_accuracy"]},
         "weighted_correct"),
        ({"model": f"sft, pass@{n} (oracle)", "answer_accuracy": r["pass_at_n"]}, "pass_at_n"),
    ]  # fmt: skip
    predictions = run_dir / "eval" / "predictions.jsonl"
    if kinds and predictions.is_file():
        picks = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
        problem_kinds = [kinds[p["index"]] if p["index"] < len(kinds) else None for p in picks]
        for row, key in rows:
            row["answer_count"] = len(picks)
            row.update(accuracy_by_kind([bool(p[key]) for p in picks], problem_kinds))
    return [row for row, _ in rows]


def write_samples(out_dir: Path, dirs: dict[str, str], c: SamplesStage, e: PipelineEvalSettings) -> None:
    """samples.md: the same prompts to every model, side by side."""
    from modernlm.align.sft import chat_ready, generate_replies
    from modernlm.api import load
    from modernlm.chat import ChatEncoder
    from modernlm.eval.compare import markdown_table
    from modernlm.generation import generate_text
    from modernlm.pipeline import runner

    out_dir.mkdir(parents=True, exist_ok=True)
    questions = [p["question"] for p in runner.read_problems(e.problems, c.questions)] if e.problems.given() else []
    models = {}
    device, _ = runner.eval_device(e.device)
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
                text = runner.plain_answers(m, tok, [e.plain_prompt.format(question=q)], c.max_new_tokens, 1)[0]
            else:
                text = generate_replies(m, enc, [[{"role": "user", "content": q}]], c.max_new_tokens)[0]["text"]
            rows.append((name, text))
        lines += [f"## Ask: {q!r}\n", markdown_table(["model", "reply"], rows)]
    atomic_write(out_dir / "samples.md", "\n".join(lines))


def main(cfg: Config) -> None:
    from modernlm.config import to_yaml
    from modernlm.pipeline.runner import Runner

    if cfg.eval.harness_tasks:  # a wrong task name or a missing file fails now, not after pretraining
        try:
            from modernlm.eval.tasks.run import prepare_tasks
        except ImportError as e:
            raise UserError(f"eval.harness_tasks needs lm-evaluation-harness: pip install 'modernlm[harness]' "
                            f"({e})") from None
        prepare_tasks(cfg.eval.harness_tasks, cfg.eval.harness_data_dir)
    stages = build_stages(cfg)
    recipe_text = to_yaml(replace(cfg, from_stage="", only=""))
    Runner(cfg.out_dir, stages, cfg.recipe, recipe_text).run(cfg.from_stage, cfg.only)
    print(f"pipeline {cfg.recipe}: done -> {Path(cfg.out_dir) / 'report.md'}", flush=True)

"""Every stage end to end from one recipe: data, tokenizer, prepare, pretrain, eval, SFT, DPO,
RL (GRPO), verifier, eval, samples, report.

    modernlm pipeline                                   # the demo recipe: offline, CPU, <= 15 minutes
    modernlm pipeline -c configs/pipeline/demo.yaml pretrain.train.max_seconds=60
    modernlm pipeline -c configs/pipeline/seed.yaml     # the seed's full run on one 80 GB GPU
    modernlm pipeline -c configs/pipeline/demo.yaml --from sft      # re-run sft and everything after it
    modernlm pipeline -c configs/pipeline/demo.yaml --only samples  # re-run one stage

Each stage has its own directory under out_dir and is the library's own command run in process,
configured by the recipe's section of the same name (`sft:` is `modernlm sft`'s config); the
pipeline fills in what connects them (modernlm.pipeline.wiring). Running again skips the stages done
with the same config and inputs, resumes an unfinished one, and re-runs what changed
(modernlm.pipeline.runner). With data.kind=synthetic the data are the project's own generated world
(modernlm.data.synthetic), on which a tiny model learns at every stage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from modernlm.commands import dpo, grpo, prepare, pretrain, sft, tokenizer_train, verifier
from modernlm.errors import UserError
from modernlm.pipeline import report, table
from modernlm.pipeline.runner import Runner, Stage
from modernlm.pipeline.samples import SamplesStage, write_side_by_side_samples
from modernlm.pipeline.table import PipelineEvalSettings
from modernlm.pipeline.wiring import STAGE_DIRS, DataStage, wire, write_data

FLAGS = {"--from": "from_stage", "--only": "only"}
OUTPUTS = {"out_dir": "dir"}  # the stages write below it


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


def build_stages(cfg: Config) -> list[Stage]:
    """The stages in order, each with its resolved config, inputs and run function."""
    cfgs = wire(cfg)  # each stage's config
    dirs = cfgs["dirs"]

    def samples_stage(args: tuple[SamplesStage, PipelineEvalSettings]) -> None:
        write_side_by_side_samples(Path(dirs["samples"]), dirs, *args)

    def report_stage(_: None) -> None:
        report.write_report(cfg.out_dir, force=True)  # the pipeline's own report: rewritten when a stage ran

    return [
        Stage("data", STAGE_DIRS["data"], (), cfgs["data"], functools.partial(write_data, dirs["data"])),
        Stage("tokenizer", STAGE_DIRS["tokenizer"], ("data",), cfgs["tokenizer"], tokenizer_train.main),
        Stage("prepare", STAGE_DIRS["prepare"], ("data", "tokenizer"), cfgs["prepare"], prepare.main),
        Stage("pretrain", STAGE_DIRS["pretrain"], ("prepare",), cfgs["pretrain"], pretrain.main, resumable=True),
        Stage("eval_pretrain", STAGE_DIRS["eval_pretrain"], ("data", "pretrain"), cfgs["eval_pretrain"],
              functools.partial(table.eval_pretrain_stage, dirs)),
        Stage("sft", STAGE_DIRS["sft"], ("data", "pretrain"), cfgs["sft"], sft.main, resumable=True),
        Stage("dpo", STAGE_DIRS["dpo"], ("data", "sft"), cfgs["dpo"], dpo.main, resumable=True),
        Stage("rl", STAGE_DIRS["rl"], ("data", cfg.rl_start), cfgs["rl"], grpo.main, resumable=True),
        Stage("verifier", STAGE_DIRS["verifier"], ("data", "sft"), cfgs["verifier"], verifier.main, resumable=True),
        Stage("eval", STAGE_DIRS["eval"], ("eval_pretrain", "sft", "dpo", "rl", "verifier"), cfgs["eval"],
              functools.partial(table.eval_stage, dirs)),
        Stage("samples", STAGE_DIRS["samples"], ("pretrain", "sft", "dpo", "rl"), cfgs["samples"], samples_stage),
        Stage("report", ".", ("data", "tokenizer", "prepare", "pretrain", "eval_pretrain", "sft", "dpo", "rl",
                              "verifier", "eval", "samples"), None, report_stage),
    ]  # fmt: skip


def check_named_files(cfg: Config) -> None:
    """Every data file the recipe names for a later stage is there now: a typo is one line before the
    data and pretraining stages run, not minutes into the pipeline (paths under out_dir are the
    stages' own outputs, made on the way)."""
    named = {
        "sft.data.path": cfg.sft.data.path, "sft.eval.val_path": cfg.sft.eval.val_path,
        "dpo.data.path": cfg.dpo.data.path, "dpo.eval.val_path": cfg.dpo.eval.val_path,
        "rl.data.path": cfg.rl.data.path, "rl.eval.path": cfg.rl.eval.path,
        "verifier.data.train_path": cfg.verifier.data.train_path,
        "verifier.data.eval_path": cfg.verifier.data.eval_path,
        "eval.text.path": cfg.eval.text.path, "eval.problems.path": cfg.eval.problems.path,
        "eval.pairs.path": cfg.eval.pairs.path,
    }  # fmt: skip
    out = Path(cfg.out_dir).resolve()
    for name, value in named.items():
        path = Path(value)
        if value and not path.exists() and out not in path.resolve().parents:
            raise UserError(f"{name}: no such file: {value}")


def main(cfg: Config) -> None:
    from modernlm.config import to_yaml

    check_named_files(cfg)
    table.check_harness_tasks(cfg.eval)  # a wrong task name or a missing file fails now, not after pretraining
    stages = build_stages(cfg)
    recipe_text = to_yaml(replace(cfg, from_stage="", only=""))
    Runner(cfg.out_dir, stages, cfg.recipe, recipe_text).run(cfg.from_stage, cfg.only)
    print(f"pipeline {cfg.recipe}: done -> {Path(cfg.out_dir) / 'report.md'}", flush=True)

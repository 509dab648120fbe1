"""How the pipeline recipe's stages connect: each stage's directory and what `wire` fills in.

A stage's section of the recipe is the config of the command it runs (`sft:` is `modernlm sft`'s);
`wire` fills in what connects them: every run.out_dir / run.name, each stage's init_from (pretrain
-> sft -> dpo -> rl, rl_start naming rl's start; sft -> verifier), the tokenizer and token paths,
and, with data.kind=synthetic, every data path the recipe leaves empty. What chooses a checkpoint
is never what the results table measures: SFT keeps its best on sft/val, DPO on prefs/val, RL on
gsm/val, the verifier on a share of gsm/train; the table scores gsm/test and prefs/test.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modernlm.data.synthetic import SyntheticConfig, write_demo_data

# stage name -> its directory under the pipeline directory
STAGE_DIRS = {
    "data": "data", "tokenizer": "tokenizer", "prepare": "tokens", "pretrain": "pretrain",
    "eval_pretrain": "eval_pretrain", "sft": "sft", "dpo": "dpo", "rl": "rl", "verifier": "verifier",
    "eval": "eval",
    "samples": "samples",
}  # fmt: skip


@dataclass
class DataStage:
    kind: Literal["synthetic", "none"] = "synthetic"  # none: every stage names its own data (hub or files)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def write_data(out_dir: str, c: DataStage) -> dict[str, Any] | None:
    """The data stage: the synthetic world's files in out_dir; its scalar facts for stages/data.json."""
    if c.kind == "none":
        return None
    meta = write_demo_data(out_dir, c.synthetic)
    return {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}


def wire(cfg: Any) -> dict[str, Any]:
    """Each stage's config, by stage name, with the connections filled in (see the module docstring),
    and "dirs": each stage's directory. `cfg` is the pipeline recipe (the pipeline command's Config)."""
    out = Path(cfg.out_dir)
    dirs = {name: str(out / sub) for name, sub in STAGE_DIRS.items()}
    synthetic = cfg.data.kind == "synthetic"
    data = Path(dirs["data"])

    def run(section: Any, name: str) -> Any:
        return replace(section, out_dir=str(out), name=STAGE_DIRS[name])

    tokenizer_cfg = cfg.tokenizer
    if synthetic and not tokenizer_cfg.input and not tokenizer_cfg.corpus.sources:
        tokenizer_cfg = replace(tokenizer_cfg, input=str(data / "corpus" / "train.txt"))
    tokenizer_cfg = replace(tokenizer_cfg, out=dirs["tokenizer"], overwrite=True)
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
    vd = verifier_cfg.data
    if synthetic and not vd.train_path and not vd.hf_dataset:  # as rl: a recipe naming its problems keeps them
        gsm = data / "gsm"
        vd = replace(vd, train_path=str(gsm / "train.jsonl"), eval_path=vd.eval_path or str(gsm / "test.jsonl"))
        verifier_cfg = replace(verifier_cfg, data=vd)
    verifier_cfg = replace(verifier_cfg, init_from=dirs["sft"], run=run(verifier_cfg.run, "verifier"))
    eval_cfg = cfg.eval
    if synthetic:

        def fill(src: Any, path: Path) -> Any:  # HeldOutData or the pairs' config: keep what the recipe names
            return src if src.path or src.hf_dataset else replace(src, path=str(path))

        eval_cfg = replace(eval_cfg, text=fill(eval_cfg.text, data / "corpus" / "val.txt"),
                           problems=fill(eval_cfg.problems, data / "gsm" / "test.jsonl"),
                           pairs=fill(eval_cfg.pairs, data / "prefs" / "test.jsonl"))  # fmt: skip
    return {"data": cfg.data, "tokenizer": tokenizer_cfg, "prepare": prepare_cfg, "pretrain": pretrain_cfg,
            "eval_pretrain": eval_cfg, "sft": sft_cfg, "dpo": dpo_cfg, "rl": rl_cfg, "verifier": verifier_cfg,
            "eval": eval_cfg, "samples": (cfg.samples, eval_cfg), "dirs": dirs}  # fmt: skip

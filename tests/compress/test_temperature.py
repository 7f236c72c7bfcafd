"""Sharper attention in compressed layers (`mea_hf.compress.temperature`, `reduce_kv_heads(sharpen=F)`): every
attention logit of a compressed layer is multiplied by F, in the weights (per-head q_proj rows, or q_norm under
qk_norm); layers left as they were are untouched; bad factors are refused before anything changes; the CLI flag does
what the Python option does. `sharpen_layers` / `mea sharpen` do the same to chosen layers of any MEA folder."""

import copy

import pytest
import torch
from helpers import tiny_model
from test_compress import logits, random_blocks
from transformers import AutoModelForCausalLM

from mea_hf.cli import main as mea_main
from mea_hf.compress.reduce import reduce_kv_heads
from mea_hf.compress.temperature import sharpen_layers, sharpen_queries
from mea_hf.modeling_mea import compose_heads


def attention_logits(model, layer: int, ids) -> torch.Tensor:
    """Layer `layer`'s attention logits (batch, H, seq, seq) on the hidden states the model gives it for `ids`."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer]
        position_embeddings = model.model.rotary_emb(hidden, position_ids=torch.arange(ids.shape[1])[None])
        attn = model.model.layers[layer].self_attn
        normed = model.model.layers[layer].input_layernorm(hidden)
        queries = attn.project_queries(normed, position_embeddings)
        key_components, _ = attn.project_components(normed, position_embeddings)
        keys = compose_heads(key_components, attn.mixing()[0]).repeat_interleave(attn.num_key_value_groups, dim=1)
        return queries @ keys.transpose(-1, -2)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sharpen_multiplies_every_logit_of_the_layer(qk_norm):
    model = tiny_model(qk_norm=qk_norm, attention_bias=True)
    ids = random_blocks()
    before = attention_logits(model, 0, ids)
    sharpen_queries(model.model.layers[0].self_attn, 1.3)
    torch.testing.assert_close(attention_logits(model, 0, ids), 1.3 * before)


def test_reduce_sharpens_only_the_layers_it_compresses():
    model = tiny_model(num_key_value_heads=4)
    ids = random_blocks()
    plain = reduce_kv_heads(copy.deepcopy(model), 2, layers=[1])
    sharp = reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], sharpen=1.3)
    torch.testing.assert_close(attention_logits(sharp, 0, ids), attention_logits(plain, 0, ids))
    torch.testing.assert_close(attention_logits(sharp, 1, ids), 1.3 * attention_logits(plain, 1, ids))
    assert not torch.allclose(logits(sharp, ids), logits(plain, ids), atol=1e-4)
    again = reduce_kv_heads(copy.deepcopy(sharp), 2, layers=[1], sharpen=1.3)  # h' unchanged: nothing compressed
    torch.testing.assert_close(attention_logits(again, 1, ids), attention_logits(sharp, 1, ids))


@pytest.mark.parametrize("factor", [0, -1.0, float("inf"), True, "1.1"])
def test_bad_factors_are_refused_before_anything_changes(factor):
    model = tiny_model(num_key_value_heads=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="sharpen must be a positive number"):
        reduce_kv_heads(model, 2, sharpen=factor)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_cli_flag_matches_the_python_option(tmp_path, tokenizer):
    from mea_hf.hub import save_folder

    model = tiny_model(vocab_size=len(tokenizer), num_key_value_heads=4)
    save_folder(model, tmp_path / "mea", tokenizer)
    out = tmp_path / "sharp"
    args = ["compress", "--model", str(tmp_path / "mea"), "--kv-heads", "2", "--sharpen", "1.1", "--out", str(out)]
    assert mea_main(args) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = reduce_kv_heads(copy.deepcopy(model), 2, sharpen=1.1)
    ids = random_blocks(vocab=len(tokenizer))
    torch.testing.assert_close(logits(loaded, ids), logits(expected, ids))
    assert "attention logits were multiplied by 1.1" in (out / "README.md").read_text()
    refused = tmp_path / "refused"
    assert mea_main([*args[:-4], "--sharpen", "0", "--out", str(refused)]) != 0
    assert not refused.exists()


def test_sharpen_layers_touches_only_the_chosen_layers():
    model = tiny_model(num_key_value_heads=4)
    ids = random_blocks()
    sharp = copy.deepcopy(model)
    sharpen_layers(sharp, 1.2, layers=[1])
    torch.testing.assert_close(attention_logits(sharp, 0, ids), attention_logits(model, 0, ids))
    torch.testing.assert_close(attention_logits(sharp, 1, ids), 1.2 * attention_logits(model, 1, ids))
    every = copy.deepcopy(model)
    sharpen_layers(every, 1.2)
    for before, after in zip(model.model.layers, every.model.layers, strict=True):
        torch.testing.assert_close(after.self_attn.q_proj.weight, 1.2 * before.self_attn.q_proj.weight)


def test_sharpen_command_matches_the_python_function(tmp_path, tokenizer):
    from mea_hf.hub import save_folder

    model = reduce_kv_heads(tiny_model(vocab_size=len(tokenizer), num_key_value_heads=4), 2)
    save_folder(model, tmp_path / "mea", tokenizer)
    out = tmp_path / "sharp"
    args = ["sharpen", "--model", str(tmp_path / "mea"), "--factor", "1.1", "--layers", "1", "--out", str(out)]
    assert mea_main(args) == 0
    expected = copy.deepcopy(model)
    sharpen_layers(expected, 1.1, layers=[1])
    ids = random_blocks(vocab=len(tokenizer))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(expected, ids))
    assert "attention logits of layers 1 multiplied by 1.1" in (out / "README.md").read_text()


@pytest.mark.parametrize(("flag", "value", "message"), [("--factor", "0", "sharpen must be a positive number"),
                                                        ("--layers", "7", "layer")])  # fmt: skip
def test_sharpen_command_refuses_bad_input_without_output(tmp_path, tokenizer, capsys, flag, value, message):
    from mea_hf.hub import save_folder

    save_folder(tiny_model(vocab_size=len(tokenizer)), tmp_path / "mea", tokenizer)
    out = tmp_path / "refused"
    args = {"--model": str(tmp_path / "mea"), "--factor": "1.1", "--out": str(out), flag: value}
    assert mea_main(["sharpen", *(item for pair in args.items() for item in pair)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

"""calib's attention-entropy matching (`mea_hf.compress.temperature`): it finds and undoes a known softening of the
queries exactly (per head; per layer under qk_norm), gives a calib-compressed layer the original's entropy back, and
the CLI flag does what the Python option does."""

import copy

import pytest
import torch
from helpers import tiny_model
from test_compress import random_blocks
from transformers import AutoModelForCausalLM

from mea_hf.cli import main as mea_main
from mea_hf.compress.reduce import reduce_kv_heads
from mea_hf.compress.temperature import attention_entropy, match_attention_entropy


def first_layer_inputs(model, ids):
    """(normed, extras) of layer 0 on `ids`: its input is the embeddings, whatever the later layers are."""
    hidden = model.model.embed_tokens(ids)
    position_embeddings = model.model.rotary_emb(hidden, position_ids=torch.arange(ids.shape[1])[None])
    normed = model.model.layers[0].input_layernorm(hidden)
    return [(normed, {"position_embeddings": position_embeddings, "attention_mask": None})]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_matching_undoes_a_known_softening(qk_norm):
    model = tiny_model(qk_norm=qk_norm)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        inputs = first_layer_inputs(model, random_blocks())
        target = attention_entropy(attn, inputs)
        original = {name: tensor.clone() for name, tensor in attn.state_dict().items()}
        if qk_norm:  # one factor per layer: q_norm's weight is shared by the heads
            softening = torch.full((attn.config.num_attention_heads,), 0.6)
            attn.q_norm.weight.mul_(0.6)
        else:
            softening = torch.tensor([0.5, 0.8, 1.0, 1.6])
            attn.q_proj.weight.mul_(softening.repeat_interleave(attn.head_dim)[:, None])
        assert not torch.allclose(attention_entropy(attn, inputs), target, atol=1e-3)
        scales = match_attention_entropy(attn, inputs, target)
        torch.testing.assert_close(scales, 1 / softening, rtol=1e-4, atol=0)
        torch.testing.assert_close(attention_entropy(attn, inputs), target, rtol=0, atol=1e-5)
        for name, tensor in attn.state_dict().items():
            torch.testing.assert_close(tensor, original[name], rtol=1e-4, atol=1e-6, msg=name)


def test_calib_gives_the_compressed_layer_the_original_entropy():
    model = tiny_model(num_key_value_heads=4)
    blocks = random_blocks()
    with torch.no_grad():
        original = attention_entropy(model.model.layers[0].self_attn, first_layer_inputs(model, blocks))

    def compressed_entropy(**options):
        compressed = reduce_kv_heads(copy.deepcopy(model), 2, method="calib", composition="banded",
                                     calib_blocks=blocks, **options)  # fmt: skip
        assert compressed.config.num_component_heads == 2
        with torch.no_grad():
            return attention_entropy(compressed.model.layers[0].self_attn, first_layer_inputs(compressed, blocks))

    assert not torch.allclose(compressed_entropy(), original, atol=1e-3)  # the output fit moved it
    torch.testing.assert_close(compressed_entropy(calib_match_entropy=True), original, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="calib_match_entropy must be True or False"):
        reduce_kv_heads(copy.deepcopy(model), 2, method="calib", calib_blocks=blocks, calib_match_entropy="yes")


def test_cli_flag_matches_the_python_option(tmp_path, tokenizer):
    from mea_hf.data.loading import token_blocks
    from mea_hf.hub import save_folder

    model = tiny_model(vocab_size=len(tokenizer), num_key_value_heads=4)
    save_folder(model, tmp_path / "mea", tokenizer)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(4000)))
    out = tmp_path / "matched"
    args = ["compress", "--model", str(tmp_path / "mea"), "--kv-heads", "2", "--composition", "banded", "--method",
            "calib", "--calib-data", str(text), "--calib-block-size", "16", "--calib-blocks", "4", "--calib-steps",
            "5", "--calib-match-entropy", "--out", str(out)]  # fmt: skip
    assert mea_main(args) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    blocks = token_blocks(tokenizer, str(text), "train", 4, 16, "calibration")
    by_hand = reduce_kv_heads(copy.deepcopy(model), 2, method="calib", composition="banded", calib_blocks=blocks,
                              calib_steps=5, calib_match_entropy=True).state_dict()  # fmt: skip
    for name, tensor in by_hand.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)

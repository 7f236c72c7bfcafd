"""Compression into `composition="banded"` (complex key weights per RoPE pair, d x d value maps): exactness at h' = h,
the SVD error bound in each family, banded vs scalar on the same model, refusals, and the CLI round trip.

References: `torch.linalg.svdvals` of the matrices the docstring of `mea_hf.compress.factors` defines, computed here
from the weights by hand; the scalar-HLC compression of the same model; the uncompressed model's logits."""

import copy

import pytest
import torch
from helpers import tiny_model
from test_compress import MHA, logits, output_objective, random_blocks
from transformers import AutoModelForCausalLM

from mea_hf.cli import main as mea_main
from mea_hf.compress.factors import virtual_rows
from mea_hf.compress.reduce import reduce_kv_heads


def make_model(**overrides):
    return tiny_model(**{**MHA, "attention_bias": True, **overrides})


def rows_of(attn, which):
    """[W | b] of every virtual head, (h, d, D+1), from the model's weights."""
    return virtual_rows(attn, which)


def hand_singular_values(rows: torch.Tensor, which: str) -> torch.Tensor:
    """Keys: per RoPE pair j, the complex (h, D+1) matrix of channel j + i * channel j + d/2; values: the real
    (h*d, D+1) matrix of all channels. All singular values, each pair's sorted."""
    heads, head_dim, inputs = rows.shape
    if which == "v":
        return torch.linalg.svdvals(rows.reshape(heads * head_dim, inputs))[None]
    half = head_dim // 2
    return torch.stack([torch.linalg.svdvals(rows[:, j] + 1j * rows[:, j + half]) for j in range(half)])


@pytest.mark.parametrize("heads", [4, 2, 1])
def test_banded_svd_error_is_the_discarded_singular_values_of_each_family(heads):
    model = make_model()
    before = {which: rows_of(model.model.layers[1].self_attn, which) for which in ("k", "v")}
    compressed = reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="svd", composition="banded")
    attn = compressed.model.layers[1].self_attn
    assert compressed.config.composition == "banded"
    assert attn.hlc_k.shape == (heads, 4, 2, attn.head_dim // 2) and attn.hlc_v.shape == (heads, 4, 16, 16)
    for which, rank in (("k", heads), ("v", heads * attn.head_dim)):
        error = (rows_of(attn, which) - before[which]).pow(2).sum().sqrt()
        discarded = hand_singular_values(before[which], which)[:, rank:].pow(2).sum().sqrt()
        assert error.item() == pytest.approx(discarded.item(), rel=1e-5, abs=1e-5)  # float32 weights
    # The untouched layer was rewritten in banded form exactly.
    torch.testing.assert_close(rows_of(compressed.model.layers[0].self_attn, "k"), rows_of(model.model.layers[0].self_attn, "k"))


def test_banded_full_rank_is_lossless_and_generates_like_uncached():
    model = make_model()
    ids = random_blocks()
    for method in ("svd", "calib"):
        full = reduce_kv_heads(copy.deepcopy(model), 4, method=method, composition="banded", calib_blocks=ids)
        assert (logits(full, ids) - logits(model, ids)).abs().max().item() < 1e-5
    half = reduce_kv_heads(copy.deepcopy(model), 2, method="svd", composition="banded")
    prompt = ids[:1, :6]
    cached = half.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(cached, half.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False))


@pytest.mark.parametrize("heads", [2, 1])
def test_banded_is_closer_than_scalar_on_the_weights_and_the_calibration_objective(heads):
    model = make_model()
    blocks = random_blocks()
    scalar = reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="svd")
    banded = reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="svd", composition="banded")
    reference = model.model.layers[1].self_attn
    for which in ("k", "v"):
        def error(compressed, which=which):
            return (rows_of(compressed.model.layers[1].self_attn, which) - rows_of(reference, which)).pow(2).sum()
        assert error(banded) < error(scalar)
    calib = {
        composition: reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="calib", calib_blocks=blocks,
                                     composition=composition)
        for composition in ("scalar", "banded")
    }  # fmt: skip
    assert 0 < output_objective(model, calib["banded"], 1, blocks) < output_objective(model, calib["scalar"], 1, blocks)


def test_composition_refusals_change_nothing():
    banded = reduce_kv_heads(make_model(), 2, method="svd", composition="banded")
    state = copy.deepcopy(banded.state_dict())
    with pytest.raises(ValueError, match="can only go from 'scalar' to 'banded'"):
        reduce_kv_heads(banded, 1, method="svd", composition="scalar")
    assert all(torch.equal(state[key], value) for key, value in banded.state_dict().items())
    qk_norm = make_model(qk_norm=True)
    with pytest.raises(ValueError, match="not supported for qk_norm"):
        reduce_kv_heads(qk_norm, 2, method="calib", calib_blocks=random_blocks(), composition="banded")
    assert qk_norm.config.composition == "scalar" and qk_norm.model.layers[0].self_attn.hlc_k.dim() == 2


def test_cli_compress_banded_round_trips(tmp_path, tokenizer):
    from mea_hf.hub import save_folder

    model = make_model(vocab_size=len(tokenizer))
    save_folder(model, tmp_path / "mea", tokenizer)
    out = tmp_path / "banded"
    args = ["compress", "--model", str(tmp_path / "mea"), "--kv-heads", "2", "--composition", "banded", "--out", str(out)]
    assert mea_main(args) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.composition == "banded" and loaded.config.num_component_heads == 2
    expected = reduce_kv_heads(copy.deepcopy(model), 2, method="svd", composition="banded")
    ids = random_blocks(vocab=len(tokenizer))
    torch.testing.assert_close(logits(loaded, ids), logits(expected, ids))
    assert "banded composition" in (out / "README.md").read_text()


def test_cli_calib_blocks_default_follows_the_composition(tmp_path, tokenizer):
    """Without --calib-blocks, `mea compress --method calib` takes `CALIB_BLOCKS` of the composition it compresses
    into: the banded result equals `reduce_kv_heads` on that many blocks of the same data, and differs from the
    scalar default's count."""
    from mea_hf.compress.reduce import CALIB_BLOCKS
    from mea_hf.data.loading import token_blocks
    from mea_hf.hub import save_folder

    assert CALIB_BLOCKS["banded"] != CALIB_BLOCKS["scalar"]
    model = make_model(vocab_size=len(tokenizer))
    save_folder(model, tmp_path / "mea", tokenizer)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(4000)))
    out = tmp_path / "banded"
    args = ["compress", "--model", str(tmp_path / "mea"), "--kv-heads", "2", "--composition", "banded", "--method",
            "calib", "--calib-data", str(text), "--calib-block-size", "16", "--calib-steps", "0", "--out", str(out)]
    assert mea_main(args) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()

    def by_hand(count):
        blocks = token_blocks(tokenizer, str(text), "train", count, 16, "calibration")
        return reduce_kv_heads(copy.deepcopy(model), 2, method="calib", composition="banded", calib_blocks=blocks,
                               calib_steps=0).state_dict()  # fmt: skip

    for name, tensor in by_hand(CALIB_BLOCKS["banded"]).items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)
    other = by_hand(CALIB_BLOCKS["scalar"])
    assert not all(torch.equal(other[name], loaded[name]) for name in other)

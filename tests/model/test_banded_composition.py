"""`composition="banded"`: complex key weights per RoPE frequency pair and d x d value maps (docs/design.md §4).

References: transformers' `apply_rotary_pos_emb` (the band mixing must commute with it), the scalar HLC model with
the same weights (banded is a strict generalisation), and an explicit per-head loop for `compose_heads`.
Generation over every cache with banded models is covered with the other shapes in test_generate.py,
test_int8_cache.py and test_transformers_versions.py.
"""

import pytest
import torch
from helpers import tiny_mea_config, tiny_model
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from mea_hf.modeling_mea import absorbed_attention, band_maps, banded_from_scalar, compose_heads

HEAD_DIM = 16


def rope(x: torch.Tensor, config) -> torch.Tensor:
    """RoPE of (batch, heads, seq, d) at positions 0..seq-1 for `config`."""
    positions = torch.arange(x.shape[2])[None]
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


def test_band_mixing_commutes_with_rope():
    config = tiny_mea_config()
    generator = torch.Generator().manual_seed(0)
    components = torch.randn(2, 3, 7, HEAD_DIM, generator=generator)
    maps = band_maps(torch.randn(3, 4, 2, HEAD_DIM // 2, generator=generator))
    torch.testing.assert_close(compose_heads(rope(components, config), maps), rope(compose_heads(components, maps), config))
    # A general d x d map does not commute: the check above is not vacuous.
    general = torch.randn(3, 4, HEAD_DIM, HEAD_DIM, generator=generator)
    assert not torch.allclose(compose_heads(rope(components, config), general), rope(compose_heads(components, general), config), atol=1e-3)


def test_compose_heads_with_maps_is_the_per_head_sum():
    generator = torch.Generator().manual_seed(1)
    components = torch.randn(2, 3, 5, HEAD_DIM, generator=generator)
    maps = torch.randn(3, 4, HEAD_DIM, HEAD_DIM, generator=generator)
    expected = torch.stack([sum(components[:, c] @ maps[c, i] for c in range(3)) for i in range(4)], dim=1)
    torch.testing.assert_close(compose_heads(components, maps), expected)


@pytest.mark.parametrize("which", ["k", "v"])
def test_banded_from_scalar_gives_the_scalar_composition(which):
    generator = torch.Generator().manual_seed(2)
    components = torch.randn(2, 3, 5, HEAD_DIM, generator=generator)
    scalar = torch.randn(3, 4, generator=generator)
    banded = banded_from_scalar(scalar, which, HEAD_DIM)
    maps = band_maps(banded) if which == "k" else banded
    torch.testing.assert_close(compose_heads(components, maps), compose_heads(components, scalar))


@pytest.mark.parametrize("heads", [4, 2, [4, 1]], ids=["h'=h", "h/2", "per-layer"])
def test_banded_model_with_scalar_weights_equals_the_scalar_model(heads):
    """Same weights, HLC written in banded form: same logits (so banded strictly generalises scalar HLC)."""
    scalar = tiny_model(num_key_value_heads=4, num_component_heads=heads)
    banded = tiny_model(num_key_value_heads=4, num_component_heads=heads, composition="banded")
    state = scalar.state_dict()
    for layer in scalar.model.layers:
        attention = layer.self_attn
        prefix = f"model.layers.{attention.layer_idx}.self_attn."
        state[prefix + "hlc_k"] = banded_from_scalar(attention.hlc_k.detach(), "k", attention.head_dim)
        state[prefix + "hlc_v"] = banded_from_scalar(attention.hlc_v.detach(), "v", attention.head_dim)
    banded.load_state_dict(state)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(banded(ids).logits, scalar(ids).logits, atol=1e-5, rtol=0)


def test_fresh_banded_model_at_h_equals_h_is_the_fresh_scalar_model():
    """Initialisation: identity HLC in both forms (MEA pretraining with h' = h starts from standard attention)."""
    torch.manual_seed(0)
    scalar = tiny_model(scale=0.0)
    torch.manual_seed(0)
    banded = tiny_model(scale=0.0, composition="banded")
    attention = banded.model.layers[0].self_attn
    assert attention.hlc_k.shape == (2, 2, 2, HEAD_DIM // 2) and attention.hlc_v.shape == (2, 2, HEAD_DIM, HEAD_DIM)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(banded(ids).logits, scalar(ids).logits, atol=1e-6, rtol=0)


def test_config_checks_composition():
    assert tiny_mea_config().composition == "scalar"
    with pytest.raises(ValueError, match=r"`composition` must be one of \('scalar', 'banded'\)"):
        tiny_mea_config(composition="complex")
    with pytest.raises(ValueError, match="even `head_dim`"):
        tiny_mea_config(composition="banded", head_dim=15)
    with pytest.raises(ValueError, match="needs `hlc_keys=True` and `hlc_values=True`"):
        tiny_mea_config(composition="banded", hlc_values=False)


@pytest.mark.parametrize("kv_groups", [1, 3])
def test_absorbed_attention_folds_key_bands_like_their_maps(kv_groups):
    """Key bands folded element-wise onto the queries give the attention that their (d x d) maps give."""
    generator = torch.Generator().manual_seed(3)
    components, kv_heads = 3, 2
    query = torch.randn(2, kv_heads * kv_groups, 4, HEAD_DIM, generator=generator)
    keys, values = (torch.randn(2, components, 9, HEAD_DIM, generator=generator) for _ in range(2))
    bands = torch.randn(components, kv_heads, 2, HEAD_DIM // 2, generator=generator)
    value_maps = torch.randn(components, kv_heads, HEAD_DIM, HEAD_DIM, generator=generator)
    args = (None, HEAD_DIM**-0.5, kv_groups)
    got, _ = absorbed_attention(query, keys, values, bands, value_maps, *args)
    want, _ = absorbed_attention(query, keys, values, band_maps(bands), value_maps, *args)
    torch.testing.assert_close(got, want)
    # and both equal attention over the composed virtual heads
    composed_keys, composed_values = compose_heads(keys, bands), compose_heads(values, value_maps)
    heads = torch.repeat_interleave(torch.arange(kv_heads), kv_groups)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, composed_keys[:, heads], composed_values[:, heads], is_causal=True  # what no mask means
    )
    torch.testing.assert_close(got, reference.transpose(1, 2))

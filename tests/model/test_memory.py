"""KV memory: an MEA cache holds exactly h'/h of the bytes of a Llama cache of the same dims after the same tokens."""

from fractions import Fraction

import pytest
import torch
from helpers import TINY_DIMS, perturb_, tiny_mea_config
from transformers import LlamaConfig, LlamaForCausalLM

from mea_hf.cache_mea import CACHE_ARG, MEAStaticCache, output_cache
from mea_hf.memory import cache_nbytes, cached_heads_per_layer, kv_bytes_per_token, kv_fraction
from mea_hf.modeling_mea import MEAForCausalLM


@pytest.mark.parametrize(
    "kv_heads, components, expected",
    [(4, 2, Fraction(1, 2)), (2, 1, Fraction(1, 2)), (2, [2, 1], Fraction(3, 4)), (2, 2, Fraction(1))],
    ids=["mha_half", "gqa_half", "second_layer_only", "uncompressed"],
)
def test_kv_bytes_ratio_against_llama_cache(kv_heads, components, expected):
    dims = {**TINY_DIMS, "num_key_value_heads": kv_heads}
    mea = perturb_(MEAForCausalLM(tiny_mea_config(**dims, num_component_heads=components))).eval()
    llama = LlamaForCausalLM(LlamaConfig(**dims)).eval()
    prompt = torch.randint(3, 128, (2, 6))
    mea_out = mea.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    llama_out = llama.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    mea_cache, llama_cache = output_cache(mea_out), output_cache(llama_out)
    assert mea_cache.get_seq_length() == llama_cache.get_seq_length() == 9

    assert Fraction(cache_nbytes(mea_cache), cache_nbytes(llama_cache)) == expected
    assert Fraction(kv_fraction(mea.config)).limit_denominator(100) == expected
    assert kv_fraction(llama.config) == 1.0
    for model, cache in ((mea, mea_cache), (llama, llama_cache)):
        assert cache_nbytes(cache) == kv_bytes_per_token(model.config, torch.float32) * 2 * 9


def test_static_cache_bytes_are_the_allocation():
    config = tiny_mea_config(num_component_heads=[2, 1])
    model = MEAForCausalLM(config).eval()
    cache = MEAStaticCache(config, max_cache_len=32)
    assert cache_nbytes(cache) == 0  # nothing allocated before the first update
    model(torch.randint(3, 128, (3, 5)), **{CACHE_ARG: cache})
    assert cache_nbytes(cache) == kv_bytes_per_token(config, torch.float32) * 3 * 32


def test_bytes_per_token_by_hand():
    """The benchmark shape (12 layers, hidden 768, 12 heads of 64): K and V, fp16, 12 heads vs 6 per layer."""
    dims = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
    llama, mea = LlamaConfig(**dims), tiny_mea_config(**dims, num_key_value_heads=12, num_component_heads=6)
    assert cached_heads_per_layer(llama) == [12] * 12 and cached_heads_per_layer(mea) == [6] * 12
    assert kv_bytes_per_token(llama) == 2 * 64 * 12 * 12 * 2 == 36864
    assert kv_bytes_per_token(mea) == 18432
    assert kv_bytes_per_token(mea, torch.float32) == 36864
    assert kv_fraction(mea) == 0.5

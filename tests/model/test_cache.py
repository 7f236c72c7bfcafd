"""MEACache / MEAStaticCache behave like transformers' caches, and wrong use fails loudly.

The reference for every cache operation is transformers' own DynamicCache (or StaticCache) driven with exactly the
same tensors: the MEA classes only add head-count validation, so everything else must match bit for bit.
"""

import pytest
import torch
from helpers import TINY_DIMS, perturb_, tiny_mea_config
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from mea_hf.cache_mea import CACHE_ARG, MEACache, MEADynamicLayer, MEAStaticCache, MEAStaticLayer
from mea_hf.modeling_mea import MEAForCausalLM

HEAD_DIM = TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"]
COMPONENTS = [2, 1]  # a GQA model (h = 2) whose second layer is compressed to one component head


def states(batch: int, heads: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, HEAD_DIM, generator=generator) for _ in range(2))


def fill(caches, batch: int, lengths, seed: int = 0):
    """Feed every cache the same keys/values, layer by layer, for several steps of the given lengths."""
    for step, length in enumerate(lengths):
        for layer, heads in enumerate(COMPONENTS):
            keys, values = states(batch, heads, length, seed=seed + 10 * step + layer)
            outputs = [cache.update(keys, values, layer) for cache in caches]
            for got in outputs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(got, outputs[0]))


def assert_same_contents(cache, reference):
    assert cache.get_seq_length() == reference.get_seq_length()
    assert len(cache.layers) == len(reference.layers)
    for layer, ref_layer in zip(cache.layers, reference.layers):
        assert layer.is_initialized == ref_layer.is_initialized
        if ref_layer.is_initialized:
            assert torch.equal(layer.keys, ref_layer.keys) and torch.equal(layer.values, ref_layer.values)


def test_dynamic_cache_operations_match_transformers():
    config = tiny_mea_config(num_component_heads=COMPONENTS)
    cache, reference = MEACache(config), DynamicCache()
    fill([cache, reference], batch=3, lengths=[5, 1, 1])
    assert_same_contents(cache, reference)
    assert cache.get_seq_length() == 7

    for step, (operation, argument, batch) in enumerate([
        ("crop", -2, 3),  # later tokens overwrite the cropped ones in MEACache's storage
        ("reorder_cache", torch.tensor([2, 0, 0]), 3),
        ("batch_repeat_interleave", 2, 6),
        ("batch_select_indices", torch.tensor([0, 3, 5]), 3),
    ]):  # fmt: skip
        getattr(cache, operation)(argument)
        getattr(reference, operation)(argument)
        assert_same_contents(cache, reference)
        fill([cache, reference], batch=batch, lengths=[1, 2], seed=100 + 10 * step)  # appends after each operation
        assert_same_contents(cache, reference)
    assert cache.get_seq_length() == 5 + 2 - 2 + 4 * 3

    cache.reset()
    reference.reset()
    assert cache.get_seq_length() == reference.get_seq_length() == 0
    fill([cache, reference], batch=1, lengths=[4], seed=200)
    assert_same_contents(cache, reference)


def test_decode_steps_append_in_place():
    """After the prompt, MEACache writes new tokens into storage with room to spare instead of concatenating: the
    storage (and so the data pointer of `keys`) stays put until the room runs out, and the contents equal a
    DynamicCache's."""
    config = tiny_mea_config(num_component_heads=COMPONENTS)
    cache, reference = MEACache(config), DynamicCache()
    fill([cache, reference], batch=2, lengths=[40, 1])  # the prompt, then the first step moves it into storage
    layer = cache.layers[0]
    capacity = layer._key_storage.shape[-2]
    assert capacity == 41 + 41 // 32 + MEADynamicLayer.SPARE_TOKENS
    pointers = {layer.keys.data_ptr()}
    for step in range(capacity - 41):  # fill the spare room exactly
        fill([cache, reference], batch=2, lengths=[1], seed=1000 + 10 * step)
        pointers.add(cache.layers[0].keys.data_ptr())
    assert len(pointers) == 1 and cache.get_seq_length() == capacity
    assert_same_contents(cache, reference)
    fill([cache, reference], batch=2, lengths=[1], seed=2000)  # past the room: new storage, same contents
    assert cache.layers[0].keys.data_ptr() not in pointers
    assert_same_contents(cache, reference)


def test_static_cache_operations_match_transformers():
    config = tiny_mea_config(num_component_heads=COMPONENTS)
    cache, reference = MEAStaticCache(config, max_cache_len=10), StaticCache(config=config, max_cache_len=10)
    fill([cache, reference], batch=2, lengths=[4, 1])
    assert_same_contents(cache, reference)
    assert int(cache.get_seq_length()) == 5
    cache.reorder_cache(torch.tensor([1, 1]))
    reference.reorder_cache(torch.tensor([1, 1]))
    assert_same_contents(cache, reference)
    cache.reset()
    reference.reset()
    assert_same_contents(cache, reference)
    assert int(cache.get_seq_length()) == 0


@pytest.mark.parametrize("layer", [MEADynamicLayer(2, HEAD_DIM), MEAStaticLayer(2, HEAD_DIM, max_cache_len=8)])
def test_layer_refuses_wrong_head_count_or_dim(layer):
    for heads, head_dim in [(1, HEAD_DIM), (3, HEAD_DIM), (2, HEAD_DIM * 2)]:
        keys = torch.zeros(1, heads, 2, head_dim)
        with pytest.raises(ValueError, match="holds 2 component heads of dim 16"):
            layer.update(keys, keys.clone())
    assert layer.get_seq_length() == 0  # nothing was stored


def mea_and_llama(num_component_heads):
    """An MEA model and a Llama model of the same dims (Llama caches all `num_key_value_heads`)."""
    mea = perturb_(MEAForCausalLM(tiny_mea_config(num_component_heads=num_component_heads))).eval()
    llama = LlamaForCausalLM(LlamaConfig(**TINY_DIMS)).eval()
    return mea, llama


@pytest.mark.parametrize("num_component_heads", [2, 1], ids=["same_head_count", "fewer_heads"])
def test_cache_filled_by_llama_is_refused(num_component_heads):
    mea, llama = mea_and_llama(num_component_heads)
    ids = torch.randint(3, 128, (1, 5))
    llama_cache = llama(ids, use_cache=True).past_key_values
    assert type(llama_cache) is DynamicCache and llama_cache.get_seq_length() == 5
    with pytest.raises(ValueError, match="written by a model that is not this MEA model"):
        mea(ids[:, -1:], **{CACHE_ARG: llama_cache})
    with pytest.raises(ValueError, match="written by a model that is not this MEA model"):
        mea.generate(ids, **{CACHE_ARG: llama_cache}, max_new_tokens=2)


def test_cache_from_another_config_is_refused():
    mea, _ = mea_and_llama(2)
    ids = torch.randint(3, 128, (1, 5))
    for other in (
        tiny_mea_config(num_component_heads=1),
        tiny_mea_config(num_component_heads=2, num_hidden_layers=3),
        tiny_mea_config(num_component_heads=2, head_dim=8),
    ):
        for cache in (MEACache(other), MEAStaticCache(other, max_cache_len=16)):
            with pytest.raises(ValueError, match="built for an MEA config"):
                mea(ids, **{CACHE_ARG: cache})
            with pytest.raises(ValueError, match="built for an MEA config"):
                mea.generate(ids, **{CACHE_ARG: cache}, max_new_tokens=2)


def test_mea_cache_needs_an_mea_config():
    with pytest.raises(ValueError, match="needs an MEA config with `num_component_heads`, got LlamaConfig"):
        MEACache(LlamaConfig(**TINY_DIMS))


def test_reset_plain_cache_can_be_reused_by_mea():
    """An emptied plain cache is no longer another model's: MEA may claim it (and then fills component heads)."""
    mea, llama = mea_and_llama(1)
    ids = torch.randint(3, 128, (1, 5))
    cache = llama(ids, use_cache=True).past_key_values
    cache.reset()
    logits = mea(ids, **{CACHE_ARG: cache}).logits
    torch.testing.assert_close(logits, mea(ids, use_cache=False).logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[1] for layer in cache.layers] == [1, 1]


@pytest.mark.parametrize("model_kind", ["mea", "llama"])
def test_speed_prefill_in_chunks_fills_the_default_cache_like_one_pass(model_kind):
    """`mea_hf.evaluation.speed` (used by the decode benchmark) measures the model's own default cache, filled correctly."""
    from mea_hf.evaluation.speed import prefill, time_decode

    mea, llama = mea_and_llama(1)
    model = mea if model_kind == "mea" else llama
    chunked, next_chunked = prefill(model, context_len=11, batch_size=2, chunk_size=4)
    whole, next_whole = prefill(model, context_len=11, batch_size=2, chunk_size=11)
    assert type(chunked) is (MEACache if model_kind == "mea" else DynamicCache)
    assert chunked.get_seq_length() == 11 and torch.equal(next_chunked, next_whole)
    for layer, ref_layer in zip(chunked.layers, whole.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=0)
    time_decode(model, chunked, next_chunked, new_tokens=3)
    assert chunked.get_seq_length() == 14
    with pytest.raises(ValueError, match="context_len, batch_size and chunk_size must be >= 1"):
        prefill(model, context_len=0)

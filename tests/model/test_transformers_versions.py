"""MEA under the installed transformers (5.23 or 5.24; CI runs this file on both).

The cache reaches MEA under the name that version's generate() uses, a cache under any other keyword is refused
loudly, continuous batching decodes what per-prompt generate() decodes, and MEA's own code raises no deprecation.
"""

import inspect
import warnings

import pytest
import torch
import transformers
from helpers import tiny_model
from packaging.version import Version
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from mea_hf import paged_attention
from mea_hf.cache_mea import CACHE_ARG, MEACache, output_cache
from mea_hf.modeling_mea import MEAAttention, MEADecoderLayer, MEAForCausalLM, MEAModel

IDS = torch.tensor([[5, 17, 99, 3, 42, 8]])


def make_model(**overrides) -> MEAForCausalLM:
    """A perturbed tiny model without an EOS token, so that generate() and generate_batch() run the same steps."""
    return tiny_model(eos_token_id=None, **overrides)


def test_cache_arg_is_the_name_generate_passes():
    """Feature detection agrees with what the installed generate() really passes to the forward."""
    model = make_model(num_component_heads=1)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    model.generate(IDS, max_new_tokens=2, do_sample=False)
    assert all(CACHE_ARG in kwargs for kwargs in seen) and len(seen) == 2
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert CACHE_ARG == expected


@pytest.mark.parametrize("model_class", ["causal_lm", "base"])
def test_a_cache_under_an_unknown_keyword_is_refused(model_class):
    model = make_model(num_component_heads=1)
    module = model if model_class == "causal_lm" else model.model
    with torch.no_grad(), pytest.raises(ValueError, match=rf"`kv_cache=`.*transformers {transformers.__version__}"):
        module(IDS, kv_cache=MEACache(model.config))


def test_both_cache_names_are_read_and_two_different_caches_refused():
    model = make_model(num_component_heads=1)
    with torch.no_grad():
        by_new_name = output_cache(model(IDS, cache=MEACache(model.config)))
        by_old_name = output_cache(model(IDS, past_key_values=MEACache(model.config)))
        for cache in (by_new_name, by_old_name):
            assert cache.get_seq_length() == IDS.shape[1]
        with pytest.raises(ValueError, match="two different caches"):
            model(IDS, cache=MEACache(model.config), past_key_values=MEACache(model.config))


def test_no_deprecation_warning_from_mea_code():
    model = make_model(num_component_heads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(IDS, max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            model(IDS, cache=MEACache(model.config), use_cache=True)
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not [str(w.message) for w in deprecations if "mea" in w.filename or "deprecated" in str(w.message)]


def test_forwards_annotate_kwargs_like_llama():
    for module in (MEAAttention, MEADecoderLayer, MEAModel, MEAForCausalLM):
        assert inspect.signature(module.forward).parameters["kwargs"].annotation == Unpack[TransformersKwargs]


# Requests of mixed lengths; with more prompts than the batch holds, later ones are admitted while others decode.
# The engine sizes its paged cache from free memory unless told otherwise (gigabytes on CPU): keep it small.
SMALL_PAGES = ContinuousBatchingConfig(num_blocks=32, page_size=16, max_batch_tokens=16)
PROMPTS = [[5, 17, 99, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41], [60, 61, 62, 63, 64, 65], [90]]


@pytest.mark.parametrize(
    "shape",
    [
        {"num_key_value_heads": 4, "num_component_heads": 4},
        {"num_key_value_heads": 2, "num_component_heads": 2},
        {"num_key_value_heads": 4, "num_component_heads": 2},
        {"num_key_value_heads": 4, "num_component_heads": 2, "kv_decode": "reconstruct"},
        {"num_key_value_heads": 4, "num_component_heads": 2, "kv_decode": "absorb"},
        {"num_key_value_heads": 2, "num_component_heads": 1},
        {"num_key_value_heads": 2, "num_component_heads": [2, 1]},
        {"num_key_value_heads": 4, "num_component_heads": 2, "composition": "banded"},
        {"num_key_value_heads": 2, "num_component_heads": [2, 1], "composition": "banded", "kv_decode": "absorb"},
    ],
    ids=[
        "mha_uncompressed",
        "gqa_uncompressed",
        "mha_half",
        "mha_half_reconstruct",
        "mha_half_absorb",
        "gqa_one_component",
        "gqa_second_layer_only",
        "mha_half_banded",
        "gqa_second_layer_only_banded_absorb",
    ],
)
@pytest.mark.slow
def test_generate_batch_equals_per_prompt_generate(shape):
    assert_generate_batch_matches_generate(make_model(**shape))


@pytest.mark.parametrize(
    "shape",
    [
        {"num_key_value_heads": 4, "num_component_heads": 4},
        {"num_key_value_heads": 4, "num_component_heads": 2},
        {"num_key_value_heads": 4, "num_component_heads": 2, "kv_decode": "reconstruct"},
        {"num_key_value_heads": 2, "num_component_heads": [2, 1]},
        {"num_key_value_heads": 4, "num_component_heads": 2, "composition": "banded"},
    ],
    ids=["mha_uncompressed", "mha_half", "mha_half_reconstruct", "gqa_second_layer_only", "mha_half_banded"],
)
@pytest.mark.slow
def test_generate_batch_attending_per_sequence_equals_generate(shape, monkeypatch):
    """The same with every paged batch attended per sequence (`mea_hf.paged_attention`; by default small decode-only
    batches, which this stream of 5 requests ends with, keep the packed call)."""
    monkeypatch.setattr(paged_attention, "PACKED_MAX_SEQUENCES", 0)
    assert_generate_batch_matches_generate(make_model(**shape))


def assert_generate_batch_matches_generate(model):
    """Greedy tokens of `generate_batch` over PROMPTS (mixed lengths, small pages: requests are admitted while others
    decode) equal per-prompt `generate(use_cache=False)`."""
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)  # -1: none
    results = model.generate_batch(inputs=PROMPTS, generation_config=config, continuous_batching_config=SMALL_PAGES)
    got = {int(result.request_id.split("_")[-1]): result.generated_tokens for result in results.values()}
    for index, tokens in enumerate(PROMPTS):
        ids = torch.tensor([tokens])
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert got[index] == reference[0, len(tokens) :].tolist(), f"request {index}"


def paged_bytes_per_token(model) -> float:
    """Bytes of keys and values (all layers) one token takes in the paged cache the engine builds for `model`."""
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False), continuous_batching_config=SMALL_PAGES)
    try:
        cache = manager._create_batch_processor().cache
        return sum(
            ca.bytes_per_page * len(ca.layer_indices) / ca.tokens_per_page for ca in cache.cache_allocators.values()
        )
    finally:
        manager.destroy()


@pytest.mark.parametrize(
    "components, fraction_524",
    [(4, 1.0), (2, 0.5), (1, 0.25), ([2, 1], 0.5), ([4, 1], 1.0)],
    ids=["uncompressed", "half", "quarter", "per_layer_2_1", "per_layer_4_1"],
)
def test_paged_pages_hold_component_heads(components, fraction_524):
    """From 5.24 on a page holds the largest h' heads of the model (h'/h of Llama's page for a uniform h'); up to
    5.23 the paged kernels write the pages and they hold the h virtual heads."""
    from mea_hf.cache_mea import MODEL_WRITES_PAGES
    from mea_hf.memory import kv_bytes_per_token

    model = make_model(num_key_value_heads=4, num_component_heads=components)
    llama = tiny_model(transformers.LlamaForCausalLM, num_key_value_heads=4)
    mea_bytes, llama_bytes = paged_bytes_per_token(model), paged_bytes_per_token(llama)
    assert llama_bytes == kv_bytes_per_token(llama.config, dtype=llama.dtype)
    assert mea_bytes / llama_bytes == (fraction_524 if MODEL_WRITES_PAGES else 1.0)
    if MODEL_WRITES_PAGES and components in (2, 1):  # uniform h': exactly MEACache's cost per token
        assert mea_bytes == kv_bytes_per_token(model.config, dtype=model.dtype)

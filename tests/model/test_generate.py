"""Every generate() mode over the compressed cache gives what the same model gives without any cache.

The reference is `generate(..., use_cache=False)`, which recomputes the whole prefix at every step, so it never
touches a cache. Each mode runs for h' = h and h' < h, for MHA and GQA shapes, for a model where only some layers
are compressed, and for both decode paths ("reconstruct" and "absorb").
"""

import io
from contextlib import redirect_stdout

import pytest
import torch
from helpers import TINY_DIMS, tiny_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache, TextStreamer, pipeline

from mea_hf import modeling_mea
from mea_hf.cache_mea import CACHE_ARG, MEACache, MEAStaticCache, output_cache
from mea_hf.modeling_mea import MEAForCausalLM

# Tiny configs have 4 query heads; "kv" is the number of virtual KV heads h, "components" h' (per layer if a list).
SHAPES = {
    "mha_uncompressed": {"num_key_value_heads": 4, "num_component_heads": 4},
    "mha_half": {"num_key_value_heads": 4, "num_component_heads": 2},
    "gqa_uncompressed": {"num_key_value_heads": 2, "num_component_heads": 2},
    "gqa_one_component": {"num_key_value_heads": 2, "num_component_heads": 1},
    "gqa_second_layer_only": {"num_key_value_heads": 2, "num_component_heads": [2, 1]},
    # Banded HLC (complex key weights per RoPE pair, d x d value maps), compressed and partly compressed.
    "mha_half_banded": {"num_key_value_heads": 4, "num_component_heads": 2, "composition": "banded"},
    "gqa_second_layer_only_banded": {"num_key_value_heads": 2, "num_component_heads": [2, 1], "composition": "banded"},
}
PATHS = ("reconstruct", "absorb")
ALL_CASES = [pytest.param(shape, path, id=f"{shape}-{path}") for shape in SHAPES for path in PATHS]
# For the modes other than greedy, a covering subset: every shape, both paths for MHA and GQA, h' = h and h' < h.
CASES = [
    case
    for case in ALL_CASES
    if case.id
    in {
        "mha_uncompressed-reconstruct",
        "mha_half-absorb",
        "gqa_uncompressed-absorb",
        "gqa_one_component-reconstruct",
        "gqa_second_layer_only-absorb",
        "mha_half_banded-absorb",
        "gqa_second_layer_only_banded-reconstruct",
    }
]
NEW_TOKENS = 8
ATOL = 1e-4


def make_model(shape: str, path: str, seed: int = 0, **overrides) -> MEAForCausalLM:
    return tiny_model(seed=seed, **{**SHAPES[shape], "kv_decode": path, **overrides})


def prompt(batch: int = 1, length: int = 6, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, input_ids, seed: int = 0, **kwargs):
    """generate() with logits returned and a fixed length (EOS cannot end a sequence early)."""
    torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    return model.generate(input_ids, return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_same_generation(cached, uncached):
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.logits) == len(uncached.logits)
    for step, (got, want) in enumerate(zip(cached.logits, uncached.logits)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"logits differ at step {step}")


def assert_component_storage(cache, config):
    for layer, heads in zip(cache.layers, config.component_heads_per_layer):
        assert layer.keys.shape[1] == layer.values.shape[1] == heads


@pytest.mark.parametrize("shape, path", ALL_CASES)
def test_greedy(shape, path):
    model = make_model(shape, path)
    ids = prompt()
    cached = run(model, ids, do_sample=False)
    assert_same_generation(cached, run(model, ids, do_sample=False, use_cache=False))
    assert isinstance(output_cache(cached), MEACache)
    assert_component_storage(output_cache(cached), model.config)
    # A user-built plain cache and an explicit MEACache end up the same way.
    for cache in (DynamicCache(config=model.config), MEACache(model.config)):
        explicit = run(model, ids, do_sample=False, **{CACHE_ARG: cache})
        assert_same_generation(explicit, cached)
        assert_component_storage(cache, model.config)


@pytest.mark.parametrize("shape, path", CASES)
def test_sampling_with_fixed_seed(shape, path):
    model = make_model(shape, path)
    ids = prompt(batch=2)
    sample = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "seed": 7}
    cached = run(model, ids, **sample)
    assert_same_generation(cached, run(model, ids, use_cache=False, **sample))
    # The seed matters (sampling is really random), so equal outputs above are not a coincidence of argmax.
    assert not torch.equal(cached.sequences, run(model, ids, **{**sample, "seed": 8}).sequences)


@pytest.mark.parametrize("shape, path", CASES)
def test_beam_search(shape, path):
    model = make_model(shape, path)
    ids = prompt(batch=2)
    beams = {"do_sample": False, "num_beams": 3, "num_return_sequences": 2, "output_scores": True}
    cached = run(model, ids, **beams)
    uncached = run(model, ids, use_cache=False, **beams)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=ATOL, rtol=0)
    assert torch.equal(cached.beam_indices, uncached.beam_indices)
    steps = cached.beam_indices[:, : NEW_TOKENS - 1]
    assert (steps[:, 1:] != steps[:, :-1]).any(), "beams were never reordered"


@pytest.mark.parametrize("shape, path", CASES)
def test_assisted_decoding_with_draft_model(shape, path, monkeypatch):
    model = make_model(shape, path)
    if path == "absorb":  # a smaller MEA draft (with its own compressed cache)
        draft = make_model(shape, path, seed=5, num_hidden_layers=1, num_component_heads=1)
    else:  # any model with the same vocabulary: a one-layer Llama
        draft = LlamaForCausalLM(LlamaConfig(**{**TINY_DIMS, "num_hidden_layers": 1})).eval()
    crops = []
    original_crop = MEACache.crop
    monkeypatch.setattr(MEACache, "crop", lambda cache, n: crops.append(n) or original_crop(cache, n))
    ids = prompt()
    assisted = run(model, ids, do_sample=False, assistant_model=draft, max_new_tokens=12)
    assert_same_generation(assisted, run(model, ids, do_sample=False, use_cache=False, max_new_tokens=12))
    assert any(n < 0 for n in crops), "the draft was never rejected, so the cache was never cropped"


@pytest.mark.parametrize("shape, path", CASES)
def test_batched_generation_with_left_padding(shape, path):
    model = make_model(shape, path)
    long, short = prompt(length=7, seed=2)[0], prompt(length=3, seed=3)[0]
    pad = model.config.pad_token_id
    ids = torch.stack([long, torch.cat([torch.full((4,), pad), short])])
    mask = torch.stack([torch.ones(7, dtype=torch.long), torch.tensor([0, 0, 0, 0, 1, 1, 1])])
    cached = run(model, ids, attention_mask=mask, do_sample=False)
    assert_same_generation(cached, run(model, ids, attention_mask=mask, do_sample=False, use_cache=False))
    # The padded row continues exactly as the short prompt alone would.
    alone = run(model, short[None], do_sample=False)
    assert torch.equal(cached.sequences[1, 7:], alone.sequences[0, 3:])


@pytest.mark.parametrize("shape, path", CASES)
def test_continue_from_returned_cache(shape, path):
    model = make_model(shape, path)
    ids = prompt()
    first = run(model, ids, do_sample=False, max_new_tokens=4)
    cache = output_cache(first)
    assert cache.get_seq_length() == ids.shape[1] + 3  # the last sampled token is not yet in the cache
    second = run(model, first.sequences, do_sample=False, max_new_tokens=4, **{CACHE_ARG: cache})
    uncached = run(model, ids, do_sample=False, max_new_tokens=8, use_cache=False)
    assert torch.equal(second.sequences, uncached.sequences)
    for got, want in zip(first.logits + second.logits, uncached.logits):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape, path", CASES)
def test_static_cache(shape, path):
    model = make_model(shape, path)
    ids = prompt(batch=2)
    cached = run(model, ids, do_sample=False, cache_implementation="static")
    assert_same_generation(cached, run(model, ids, do_sample=False, use_cache=False))
    assert isinstance(output_cache(cached), MEAStaticCache)
    assert_component_storage(output_cache(cached), model.config)
    plain = StaticCache(config=model.config, max_cache_len=ids.shape[1] + NEW_TOKENS)  # a user-built plain one
    assert_same_generation(run(model, ids, do_sample=False, **{CACHE_ARG: plain}), cached)
    assert_component_storage(plain, model.config)


@pytest.mark.parametrize("shape, path", CASES)
def test_pipeline_and_streamer(shape, path, tokenizer):
    model = make_model(shape, path, vocab_size=len(tokenizer))
    text = "The river"
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = {
        "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "return_full_text": False
    }  # fmt: skip
    cached_text = generate(text, **options)[0]["generated_text"]
    assert cached_text == generate(text, use_cache=False, **options)[0]["generated_text"]

    ids = tokenizer(text, return_tensors="pt").input_ids
    reference = run(model, ids, do_sample=False, use_cache=False).sequences[0, ids.shape[1] :]
    assert cached_text == tokenizer.decode(reference, skip_special_tokens=True)
    printed = io.StringIO()
    with redirect_stdout(printed):
        run(model, ids, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert printed.getvalue() == tokenizer.decode(reference) + "\n"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", ["mha_half", "gqa_one_component", "gqa_second_layer_only", "mha_half_banded"])
def test_absorb_matches_reconstruct(shape, attn_implementation, monkeypatch):
    """The absorbed attention equals reconstruct-then-attend on the same cache, for a left-padded batch: prefill
    (T > 1, no cache), a 3-token chunk over a cache (T > 1) and single-token steps (T = 1)."""
    model = make_model(shape, "reconstruct")
    model.set_attn_implementation(attn_implementation)
    mask_dtypes = []
    original = modeling_mea.absorbed_attention

    def spy(query, keys, values, hlc_k, hlc_v, mask, *args):
        mask_dtypes.append(None if mask is None else mask.dtype)
        return original(query, keys, values, hlc_k, hlc_v, mask, *args)

    monkeypatch.setattr(modeling_mea, "absorbed_attention", spy)
    ids = prompt(batch=2, length=10, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    chunks = [(0, 5), (5, 8), (8, 9), (9, 10)]
    logits = {}
    for path in PATHS:
        model.config.kv_decode = path
        cache = MEACache(model.config)
        outputs = [
            model(ids[:, start:end], attention_mask=mask[:, :end], **{CACHE_ARG: cache}).logits
            for start, end in chunks
        ]
        logits[path] = torch.cat(outputs, dim=1)
    real = mask.bool()  # logits at padding positions are not used by anyone
    torch.testing.assert_close(logits["absorb"][real], logits["reconstruct"][real], atol=ATOL, rtol=0)
    assert len(mask_dtypes) == len(chunks) * model.config.num_hidden_layers, "absorbed path not taken"
    if attn_implementation == "eager":
        assert all(dtype is not None and dtype.is_floating_point for dtype in mask_dtypes)
    else:
        assert all(dtype in (None, torch.bool) for dtype in mask_dtypes)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_compiled_decode_step_over_static_cache(path):
    """A `torch.compile(fullgraph=True)`d decode step over MEAStaticCache gives the eager logits."""
    model = make_model("gqa_second_layer_only", path)
    ids = prompt(length=5)
    caches = [MEAStaticCache(model.config, max_cache_len=16) for _ in range(2)]
    for cache in caches:
        model(ids, **{CACHE_ARG: cache})
    step = {"input_ids": prompt(length=1, seed=9), "position_ids": torch.tensor([[5]])}
    eager = model(**step, **{CACHE_ARG: caches[0]}).logits
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled = compiled_model(**step, **{CACHE_ARG: caches[1]}).logits
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)
    torch.testing.assert_close(caches[1].layers[1].keys, caches[0].layers[1].keys, atol=ATOL, rtol=0)

"""kv_decode="auto" (composed-head cache where h' = h, absorb where h' < h) and the int8 MEA caches.

References: generate(use_cache=False) for the exact auto path; transformers' DynamicCache fed the same states, and
`quantize_int8` applied token by token, for the int8 cache operations; the float MEACache for int8 logits.
"""

import pytest
import torch
from helpers import TINY_DIMS, tiny_mea_config, tiny_model
from transformers import DynamicCache

from mea_hf import cache_mea, modeling_mea
from mea_hf.cache_mea import (
    CACHE_ARG,
    MEACache,
    MEAQuantizedCache,
    MEAStaticQuantizedCache,
    QuantizedStates,
    cache_nbytes,
    dequantize_int8,
    output_cache,
    quantize_int8,
)
from mea_hf.configuration_mea import MEAConfig
from mea_hf.memory import kv_bytes_per_token
from mea_hf.modeling_mea import absorbed_attention, band_maps, compose_heads

HEAD_DIM = TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"]
# h' per layer of a GQA model with h = 2, and the HLC form (composition)
SHAPES = {
    "uncompressed": (2, "scalar"),
    "one_component": (1, "scalar"),
    "mixed": ([2, 1], "scalar"),
    "mixed_banded": ([2, 1], "banded"),
}
INT8_ATOL = 0.05  # max |logit difference| int8 vs float cache on the tiny perturbed models (logits are O(1))


def make_model(heads, kv_decode="auto", **overrides):
    return tiny_model(num_component_heads=heads, kv_decode=kv_decode, **overrides)


def prompt(batch=2, length=6, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    return model.generate(ids, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)


def test_kv_decode_defaults_to_auto_and_lists_allowed_values():
    assert MEAConfig().kv_decode == "auto"
    with pytest.raises(ValueError, match=r"`kv_decode` must be one of \('auto', 'reconstruct', 'absorb'\)"):
        tiny_mea_config(kv_decode="fast")


@pytest.mark.parametrize("shape", SHAPES)
def test_auto_is_exact_and_stores_composed_heads_only_where_nothing_is_saved(shape, monkeypatch):
    heads, composition = SHAPES[shape]
    model = make_model(heads, composition=composition)
    ids = prompt()
    cached = generate(model, ids)
    uncached = generate(model, ids, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for got, want in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    # What each layer stores: composed heads where h' = h (== HLC of the components cached by "reconstruct").
    auto_cache, components = MEACache(model.config), None
    model(ids, **{CACHE_ARG: auto_cache})
    model.config.kv_decode = "reconstruct"
    components = MEACache(model.config)
    model(ids, **{CACHE_ARG: components})
    model.config.kv_decode = "auto"
    for layer, (stored, comp) in enumerate(zip(auto_cache.layers, components.layers)):
        attention = model.model.layers[layer].self_attn
        expected = comp.keys
        if attention.num_component_heads == attention.num_kv_heads:
            expected = compose_heads(comp.keys, attention.mixing()[0])
            assert not torch.allclose(expected, comp.keys)  # the HLC is not identity: the check means something
        torch.testing.assert_close(stored.keys, expected, atol=1e-5, rtol=0)

    # A decode step applies HLC to the new token only (never the cache); compressed layers take the absorbed path.
    composed_lengths, absorbed = [], []
    original_compose, original_absorb = modeling_mea.compose_heads, modeling_mea.absorbed_attention
    def spy_compose(x, w):
        if w is not None:  # None is the identity: no HLC work
            composed_lengths.append(x.shape[2])
        return original_compose(x, w)

    monkeypatch.setattr(modeling_mea, "compose_heads", spy_compose)
    monkeypatch.setattr(modeling_mea, "absorbed_attention", lambda *a: absorbed.append(1) or original_absorb(*a))
    model(prompt(length=1, seed=3), **{CACHE_ARG: auto_cache})
    assert set(composed_lengths) == ({1} if model.config.kv_decode == "auto" and shape != "one_component" else set())
    compressed = sum(h < model.config.num_key_value_heads for h in model.config.component_heads_per_layer)
    assert len(absorbed) == compressed


def test_cache_filled_under_another_kv_decode_is_refused():
    model = make_model(2)  # h' = h: "auto" stores composed heads, "reconstruct"/"absorb" components
    ids = prompt()
    cache = MEACache(model.config)
    model(ids, **{CACHE_ARG: cache})
    for other in ("reconstruct", "absorb"):
        model.config.kv_decode = other
        with pytest.raises(ValueError, match="filled under another `kv_decode`"):
            model(ids[:, :1], **{CACHE_ARG: cache})
    model.config.kv_decode = "reconstruct"
    empty = MEACache(make_model(2).config)  # built under "auto" but still empty: taken over
    torch.testing.assert_close(model(ids, **{CACHE_ARG: empty}).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_quantize_int8_error_bound():
    states = torch.randn(2, 3, 50, HEAD_DIM) * torch.logspace(-3, 2, 50)[:, None]
    q, scale = quantize_int8(states)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (2, 3, 50, 1)
    error = (dequantize_int8(q, scale, torch.float32) - states).abs()
    assert (error <= scale.float() / 2 + 1e-7).all()
    normal = states.abs().amax(-1) / 127 > torch.finfo(torch.float16).tiny  # scales above float16's smallest normal
    assert q.abs().amax(-1)[normal].min() >= 126  # absmax maps to +-127 (up to the float16 rounding of the scale)
    assert not normal.all()  # tiny tokens (clamped scale) were covered by the error bound too


@pytest.mark.parametrize("composition", ["scalar", "banded"])
def test_absorbed_attention_reads_int8_as_stored(composition, monkeypatch):
    """Absorbed attention over `QuantizedStates` (int8 read in chunks, scales folded into the products) equals
    absorbed attention over the same tokens dequantised, to float rounding: several chunks, a full-precision
    residual window, a padding mask, a 3-token query, and gradients with respect to the queries."""
    batch, heads, components, query_len, kv_len, residual = 2, 4, 3, 3, 23, 4
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, query_len, HEAD_DIM, generator=generator, requires_grad=True)
    keys, values = (torch.randn(batch, components, kv_len, HEAD_DIM, generator=generator) for _ in range(2))
    mixing = [torch.randn(components, 2, generator=generator) for _ in range(2)]  # h = 2 virtual heads, 2 groups
    if composition == "banded":
        mixing = [band_maps(torch.randn(components, 2, 2, HEAD_DIM // 2, generator=generator)),
                  torch.randn(components, 2, HEAD_DIM, HEAD_DIM, generator=generator)]  # fmt: skip
    mask = torch.ones(batch, 1, query_len, kv_len, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding
    mask[..., -query_len:] = torch.ones(query_len, query_len, dtype=torch.bool).tril()

    quantized = [quantize_int8(states[:, :, : kv_len - residual]) for states in (keys, values)]
    stored = [QuantizedStates(q, scale, states[:, :, kv_len - residual :])
              for (q, scale), states in zip(quantized, (keys, values))]  # fmt: skip
    dequantized = [torch.cat([dequantize_int8(q, scale, torch.float32), states[:, :, kv_len - residual :]], 2)
                   for (q, scale), states in zip(quantized, (keys, values))]  # fmt: skip
    monkeypatch.setattr(cache_mea, "INT8_READ_CHUNK", batch * components * HEAD_DIM * 5)  # 5 tokens a chunk
    args = (*mixing, mask, HEAD_DIM**-0.5, 2)
    want, want_probs = absorbed_attention(query, *dequantized, *args)
    (want_grad,) = torch.autograd.grad(want.square().sum(), query)
    got, got_probs = absorbed_attention(query, *stored, *args)
    (got_grad,) = torch.autograd.grad(got.square().sum(), query)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_probs, want_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # the no-grad read (one reused conversion buffer) gives the same
        torch.testing.assert_close(absorbed_attention(query, *stored, *args)[0], want, atol=1e-5, rtol=1e-5)
    assert stored[0].shape == keys.shape


def fill(caches, steps, heads=(2, 1), batch=3, seed=0):
    """Feed every cache the same random states; return the states of each layer, concatenated."""
    generator = torch.Generator().manual_seed(seed)
    for length in steps:
        for layer, h in enumerate(heads):
            keys, values = (torch.randn(batch, h, length, HEAD_DIM, generator=generator) for _ in range(2))
            for cache in caches:
                cache.update(keys, values, layer)


def assert_matches_reference(cache, reference):
    """The int8 cache holds the reference's tokens: its first `quantized_length` tokens quantised, the rest exact."""
    assert cache.get_seq_length() == reference.get_seq_length()
    for layer, ref in zip(cache.layers, reference.layers):
        keys, values = layer._read(fresh=True)
        n = layer.quantized_length
        for got, want in ((keys, ref.keys), (values, ref.values)):
            torch.testing.assert_close(got[:, :, :n], dequantize_int8(*quantize_int8(want[:, :, :n]), torch.float32))
            assert torch.equal(got[:, :, n:], want[:, :, n:])


@pytest.mark.parametrize("residual_length", [0, 3])
def test_int8_cache_operations_match_dynamic_cache(residual_length):
    config = tiny_mea_config(num_component_heads=[2, 1])
    cache, reference = MEAQuantizedCache(config, residual_length=residual_length), DynamicCache()
    fill([cache, reference], [5, 1, 1])
    assert_matches_reference(cache, reference)
    assert cache.layers[0].quantized_length == 7 - residual_length
    for operation, argument in [
        ("crop", -2),
        ("reorder_cache", torch.tensor([2, 0, 0])),
        ("batch_repeat_interleave", 2),
        ("batch_select_indices", torch.tensor([0, 3, 5])),
        ("crop", -4),  # into the int8 part, whatever the residual
    ]:
        getattr(cache, operation)(argument)
        getattr(reference, operation)(argument)
        assert_matches_reference(cache, reference)
    fill([cache, reference], [2, 300], seed=1)  # still usable, and grows past one storage block
    assert_matches_reference(cache, reference)
    cache.reset()
    assert cache.get_seq_length() == 0


def test_int8_bytes_are_payload_plus_scales():
    config = tiny_mea_config(num_component_heads=[2, 1])
    cache = MEAQuantizedCache(config, residual_length=4)
    fill([cache], [300], batch=2)  # 296 int8 tokens (storage: 2 blocks of 256), 4 float32 residual tokens
    capacity, heads = 512, 2 + 1
    int8_bytes = 2 * 2 * heads * capacity * (HEAD_DIM + 2)  # K and V, batch 2: payload + float16 scale
    assert cache_nbytes(cache) == int8_bytes + 2 * 2 * heads * 4 * HEAD_DIM * 4
    static = MEAStaticQuantizedCache(config, max_cache_len=40)
    fill([static], [5], batch=2)
    assert cache_nbytes(static) == 2 * 2 * heads * 40 * (HEAD_DIM + 2)
    # Per token, against a Llama float16 cache of the same shape (12 layers, h = 12, head_dim 64).
    dims = {"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768}
    llama_fp16 = kv_bytes_per_token(MEAConfig(**dims))
    assert kv_bytes_per_token(MEAConfig(**dims, num_component_heads=6), int8=True) == 12 * 2 * 6 * 66
    assert kv_bytes_per_token(MEAConfig(**dims, num_component_heads=6), int8=True) / llama_fp16 <= 0.27
    assert kv_bytes_per_token(MEAConfig(**dims, num_component_heads=3), int8=True) / llama_fp16 <= 0.14


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_logits_close_to_float_cache(shape, monkeypatch):
    heads, composition = SHAPES[shape]
    model = make_model(heads, composition=composition)
    read = []  # what the absorbed attention reads: int8 as stored under the int8 cache, float tensors otherwise
    original_absorb = modeling_mea.absorbed_attention
    monkeypatch.setattr(modeling_mea, "absorbed_attention", lambda *a: read.append(type(a[1])) or original_absorb(*a))
    ids = prompt(length=12)
    float_cache, int8_cache = MEACache(model.config), MEAQuantizedCache(model.config)
    for start, end in [(0, 8), (8, 9), (9, 10), (10, 12)]:  # prefill, decode steps, a short verification chunk
        want = model(ids[:, start:end], **{CACHE_ARG: float_cache}).logits
        got = model(ids[:, start:end], **{CACHE_ARG: int8_cache}).logits
        torch.testing.assert_close(got, want, atol=INT8_ATOL, rtol=0)
        assert not torch.equal(got, want)  # the int8 path really ran
    compressed = sum(h < model.config.num_key_value_heads for h in model.config.component_heads_per_layer)
    steps = 4  # every chunk here is short enough to be absorbed, the prefill too
    assert read == ([torch.Tensor] * compressed + [QuantizedStates] * compressed) * steps  # float, then int8 cache
    assert int8_cache.layers[0].quantized["qkeys"].dtype == torch.int8


def test_generate_selects_int8_caches_by_transformers_conventions():
    model = make_model([2, 1])
    ids = prompt()
    dynamic = generate(model, ids, cache_implementation="quantized", cache_config={"backend": "mea-int8", "nbits": 8})
    assert type(output_cache(dynamic)) is MEAQuantizedCache
    assert type(output_cache(generate(model, ids, cache_implementation="quantized"))) is MEAQuantizedCache
    static = generate(model, ids, cache_implementation="static", cache_config={"backend": "mea-int8"})
    assert type(output_cache(static)) is MEAStaticQuantizedCache
    # Per-token quantisation does not depend on how tokens arrive: static and dynamic int8 decode alike.
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    window = generate(model, ids, cache_implementation="quantized", cache_config={"residual_length": 4})
    assert output_cache(window).layers[0].keys.shape[2] == 4  # the recent tokens stay in full precision


def test_int8_beam_search_and_assisted_decoding():
    model = make_model([2, 1])
    ids = prompt()
    int8 = {"cache_implementation": "quantized"}
    greedy = generate(model, ids[:1], max_new_tokens=10, **int8)
    draft = make_model(1, num_hidden_layers=1)
    assisted = generate(model, ids[:1], max_new_tokens=10, assistant_model=draft, **int8)
    assert torch.equal(assisted.sequences, greedy.sequences)  # crop of rejected drafts is exact
    beams = generate(model, ids, num_beams=3, num_return_sequences=2, output_scores=True, **int8)
    reference = generate(model, ids, num_beams=3, num_return_sequences=2, output_scores=True)  # float cache
    assert torch.equal(beams.sequences, reference.sequences)
    torch.testing.assert_close(beams.sequences_scores, reference.sequences_scores, atol=INT8_ATOL, rtol=0)


def test_int8_cache_refuses_other_configs_and_options():
    model = make_model(2)
    ids = prompt()
    with pytest.raises(ValueError, match="built for an MEA config"):
        model(ids, **{CACHE_ARG: MEAQuantizedCache(tiny_mea_config(num_component_heads=1))})
    with pytest.raises(ValueError, match=r"`nbits`=4. Allowed values: \(8,\)"):
        MEAQuantizedCache(model.config, nbits=4)
    with pytest.raises(ValueError, match=r"`nbits`=4. Allowed values: \(8,\)"):
        model.generate(ids, max_new_tokens=2, cache_implementation="quantized", cache_config={"nbits": 4})
    with pytest.raises(ValueError, match=r"keys \['q_group_size'\] are not read.*allowed: \('backend', 'nbits'"):
        model.generate(ids, max_new_tokens=2, cache_implementation="quantized", cache_config={"q_group_size": 64})
    with pytest.raises(ValueError, match="residual_length must be 0"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static",
                       cache_config={"backend": "mea-int8", "residual_length": 2})  # fmt: skip
    cache = MEAQuantizedCache(model.config)
    model(ids, **{CACHE_ARG: cache})
    model.config.kv_decode = "absorb"
    with pytest.raises(ValueError, match="filled under another `kv_decode`"):
        model(ids[:, :1], **{CACHE_ARG: cache})


def test_compiled_decode_step_over_static_int8_cache():
    model = make_model([2, 1])
    ids = prompt(batch=1, length=5)
    caches = [MEAStaticQuantizedCache(model.config, max_cache_len=16) for _ in range(2)]
    for cache in caches:
        model(ids, **{CACHE_ARG: cache})
    step = {"input_ids": prompt(batch=1, length=1, seed=9), "position_ids": torch.tensor([[5]])}
    eager = model(**step, **{CACHE_ARG: caches[0]}).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**step, **{CACHE_ARG: caches[1]}).logits
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert torch.equal(caches[1].layers[1].quantized["qkeys"], caches[0].layers[1].quantized["qkeys"])

"""The compressed KV cache of MEA: it stores the h' component heads (after RoPE), never the h virtual heads.

MEA attention hands the cache its component keys and values, so any transformers cache would store them. The
classes here add what a plain cache cannot know: how many component heads each layer has. Feeding a layer the
wrong head count raises a clear error instead of attending wrongly, and `claim_cache` (called by `MEAModel` on every
forward) refuses a cache built for another config or already filled by another model (e.g. Llama, whose cache has
the same shape whenever h' = h).

Why the model picks its cache itself (`MEAForCausalLM._prepare_cache_for_generation`) rather than registering a
custom `layer_types` entry: a custom layer type is rejected by config validation on save in transformers 5.x, and
the layer-type route would tie the saved config to this package. The override keeps the config plain.

This file is copied next to saved models for `trust_remote_code`, so it imports only torch and transformers.
"""

import inspect

import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.masking_utils import create_causal_mask

# The name under which the installed transformers passes a cache between generate(), forwards and mask builders, and
# returns it in model outputs: `past_key_values` up to 5.23, `cache` from 5.24 on. Detected from the mask builder's
# signature, not from a version string, so that a backport or a dev build is read by what it does.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def is_cache(value) -> bool:
    """A transformers KV cache of any kind, paged caches of continuous batching included."""
    return isinstance(value, (Cache, PagedAttentionCache))


def resolve_cache(cache, past_key_values, kwargs: dict):
    """The cache a forward was given, under 5.24's `cache` or the older `past_key_values` (both are read on every
    transformers version, silently). A cache under any other keyword raises: a future rename must fail loudly rather
    than let the model rebuild an empty cache every step and decode wrong tokens."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Got two different caches, as `cache` and as `past_key_values`; pass one.")
    for name, value in kwargs.items():
        if is_cache(value):
            raise ValueError(
                f"MEA received a {type(value).__name__} as `{name}=`, an argument it does not read as its cache (it "
                f"reads `cache` and `past_key_values`). The installed transformers {transformers.__version__} may "
                "pass the cache under a new name that this version of mea-hf does not know; decoding would ignore "
                "the cache and be silently wrong. Upgrade mea-hf, or use a transformers version it supports."
            )
    return cache if cache is not None else past_key_values


def output_cache(outputs):
    """The cache a model output carries (`outputs.cache` from 5.24 on, `outputs.past_key_values` before)."""
    return getattr(outputs, CACHE_ARG)


class _ComponentHeadsLayer:
    """Mixin for a cache layer that accepts exactly `num_component_heads` heads of `head_dim` channels."""

    def __init__(self, num_component_heads: int, head_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_component_heads = num_component_heads
        self.head_dim = head_dim

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        expected = (self.num_component_heads, self.head_dim)
        for name, states in (("keys", key_states), ("values", value_states)):
            got = (states.shape[1], states.shape[-1])
            if got != expected:
                raise ValueError(
                    f"{type(self).__name__} holds {expected[0]} component heads of dim {expected[1]}, but was given "
                    f"{name} with {got[0]} heads of dim {got[1]}. The cache was built for another config: build it "
                    "with `MEACache(config=model.config)` for this model."
                )
        return super().update(key_states, value_states, *args, **kwargs)


class MEADynamicLayer(_ComponentHeadsLayer, DynamicLayer):
    """A growing cache layer of component heads, shape `[batch, num_component_heads, seq_len, head_dim]`."""


class MEAStaticLayer(_ComponentHeadsLayer, StaticLayer):
    """A pre-allocated cache layer of component heads, shape `[batch, num_component_heads, max_cache_len, head_dim]`."""


def _component_heads(config) -> list[int]:
    heads = getattr(config, "component_heads_per_layer", None)
    if heads is None:
        raise ValueError(f"An MEA cache needs an MEA config with `num_component_heads`, got {type(config).__name__}.")
    return list(heads)


def cache_signature(config) -> tuple[int, tuple[int, ...]]:
    """What a cache's contents depend on: the head dim and every layer's number of component heads."""
    return config.head_dim, tuple(_component_heads(config))


def claim_cache(cache: Cache, config) -> None:
    """Check that `cache` may serve a model with `config`, or raise a `ValueError` that says why not.

    MEA caches carry the signature of the config they were built for. A plain transformers cache (e.g.
    `DynamicCache(config=model.config)`) is accepted while empty and tagged with this config's signature, so that it
    stores component heads from then on; a plain cache that already holds states was filled by another model (a
    Llama cache has the same shape whenever h' = h), so attending over it would be silently wrong.
    """
    if isinstance(cache, PagedAttentionCache):
        return  # continuous batching: the engine sized the pages from this model's config
    expected = cache_signature(config)
    signature = getattr(cache, "mea_signature", None)
    if signature == expected:
        return
    if signature is not None:
        raise ValueError(
            f"This cache was built for an MEA config with head_dim and component heads per layer {signature}, but the "
            f"model has {expected}. Build the cache with `MEACache(config=model.config)` for this model."
        )
    if any(getattr(layer, "is_initialized", False) for layer in cache.layers):
        raise ValueError(
            f"This {type(cache).__name__} already holds keys/values written by a model that is not this MEA model "
            "(e.g. a Llama model), which are not component heads. Pass an empty cache or "
            "`MEACache(config=model.config)`."
        )
    cache.mea_signature = expected


class MEACache(DynamicCache):
    """Dynamic cache of an MEA model: per layer, only its h' component heads. The default cache of `generate()`."""

    def __init__(self, config, offloading: bool = False):
        layers = [MEADynamicLayer(heads, config.head_dim) for heads in _component_heads(config)]
        Cache.__init__(self, layers=layers, offloading=offloading)
        self.mea_signature = cache_signature(config)


class MEAStaticCache(StaticCache):
    """Pre-allocated cache of component heads, for `cache_implementation="static"` and `torch.compile`d decoding."""

    def __init__(self, config, max_cache_len: int, offloading: bool = False, **kwargs):
        heads_per_layer = _component_heads(config)
        layers = [MEAStaticLayer(heads, config.head_dim, max_cache_len=max_cache_len) for heads in heads_per_layer]
        Cache.__init__(self, layers=layers, offloading=offloading)
        self.mea_signature = cache_signature(config)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of any transformers cache (allocated size for static caches)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total

"""KV-cache memory accounting, for MEA and for plain Llama-family configs alike."""

import torch

from .cache_mea import INT8_SCALE_DTYPE, cache_nbytes


def cached_heads_per_layer(config) -> list[int]:
    """Heads each layer actually caches: h' for MEA, `num_key_value_heads` for Llama-family models."""
    components = getattr(config, "component_heads_per_layer", None)
    return list(components) if components is not None else [config.num_key_value_heads] * config.num_hidden_layers


def kv_bytes_per_token(config, dtype: torch.dtype = torch.float16, int8: bool = False) -> int:
    """Bytes of keys plus values that one token adds to the cache, summed over layers. `int8`: the MEA int8 cache,
    one byte per channel plus one float16 scale per head (`MEAQuantizedCache`, outside its full-precision window)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_head = head_dim + INT8_SCALE_DTYPE.itemsize if int8 else head_dim * dtype.itemsize
    return 2 * per_head * sum(cached_heads_per_layer(config))


def kv_fraction(config) -> float:
    """KV memory of `config` relative to the same model caching all `num_key_value_heads` in every layer."""
    return sum(cached_heads_per_layer(config)) / (config.num_key_value_heads * config.num_hidden_layers)


__all__ = ["cache_nbytes", "cached_heads_per_layer", "kv_bytes_per_token", "kv_fraction"]

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
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, StaticCache, StaticLayer
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
        self._check_heads(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)

    def _check_heads(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (self.num_component_heads, self.head_dim)
        for name, states in (("keys", key_states), ("values", value_states)):
            got = (states.shape[1], states.shape[-1])
            if got != expected:
                raise ValueError(
                    f"{type(self).__name__} holds {expected[0]} component heads of dim {expected[1]}, but was given "
                    f"{name} with {got[0]} heads of dim {got[1]}. The cache was built for another config: build it "
                    "with `MEACache(config=model.config)` for this model."
                )


class MEADynamicLayer(_ComponentHeadsLayer, DynamicLayer):
    """A growing cache layer of component heads, shape `[batch, num_component_heads, seq_len, head_dim]`.

    `keys`/`values` are views of storage with room to spare: an update writes its tokens in place, and only when the
    room runs out is the storage reallocated, `SPARE_FRACTION` larger than needed. transformers' `DynamicLayer`
    concatenates instead, copying the whole layer on every decode step, which at long context moves more bytes than
    attention reads. Anything that replaces `keys` by another tensor (beam reordering, batch selection, offloading)
    is noticed by `_appends_in_place` and the storage rebuilt; `crop` keeps the view and later tokens overwrite the
    cropped ones. `cache_nbytes` counts the tokens stored; the spare room (at most 1/32 of them plus 16 tokens per
    layer) is allocator slack, as in a Python list, and is never read."""

    SPARE_FRACTION = 1 / 32  # extra room per reallocation: at most 1/32 over the stored tokens, plus SPARE_TOKENS
    SPARE_TOKENS = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._key_storage = self._value_storage = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # the first update (the prompt) is stored as it comes
            return super().update(key_states, value_states, *args, **kwargs)
        self._check_heads(key_states, value_states)
        length, added = self.keys.shape[-2], key_states.shape[-2]
        if not self._appends_in_place(length + added):
            capacity = length + added + int((length + added) * self.SPARE_FRACTION) + self.SPARE_TOKENS
            self._key_storage, self._value_storage = (
                _storage_with(states, capacity) for states in (self.keys, self.values)
            )  # fmt: skip
        for storage, new in ((self._key_storage, key_states), (self._value_storage, value_states)):
            storage[..., length : length + added, :] = new
        self.keys = self._key_storage[..., : length + added, :]
        self.values = self._value_storage[..., : length + added, :]
        return self.keys, self.values

    def _appends_in_place(self, length: int) -> bool:
        """Are `keys`/`values` still the leading rows of this layer's storage, with room for `length` rows?"""
        storages = (self._key_storage, self._value_storage)
        return all(
            storage is not None
            and storage.shape[-2] >= length
            and states.data_ptr() == storage.data_ptr()
            and states.stride() == storage.stride()
            and states.shape[:-2] == storage.shape[:-2]
            and states.shape[-1] == storage.shape[-1]
            and states.dtype == storage.dtype
            for states, storage in zip((self.keys, self.values), storages)
        )

    def reset(self) -> None:
        self._key_storage = self._value_storage = None
        super().reset()

    def offload(self) -> None:
        """Offloading moves `keys`/`values` off the device; drop the storage so that its memory goes with them."""
        self._key_storage = self._value_storage = None
        super().offload()


def _storage_with(states: torch.Tensor, capacity: int) -> torch.Tensor:
    """New storage of `capacity` rows (dim -2) holding `states` in its leading rows."""
    storage = states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
    storage[..., : states.shape[-2], :] = states
    return storage


class MEAStaticLayer(_ComponentHeadsLayer, StaticLayer):
    """A pre-allocated cache layer of component heads, shape `[batch, num_component_heads, max_cache_len, head_dim]`."""


def _component_heads(config) -> list[int]:
    heads = getattr(config, "component_heads_per_layer", None)
    if heads is None:
        raise ValueError(f"An MEA cache needs an MEA config with `num_component_heads`, got {type(config).__name__}.")
    return list(heads)


def stores_composed(config, heads: int) -> bool:
    """Does a layer with `heads` component heads cache composed (virtual) heads rather than components? True where
    `kv_decode` is "auto" and h' = h: HLC is applied once as tokens enter the cache (exact, as RoPE commutes with
    head mixing), and decoding is plain attention over the stored heads. Same shape as components, so the signature
    records it. O(1): the attention layers ask on every forward, reading `kv_decode` as it is now."""
    return getattr(config, "kv_decode", None) == "auto" and heads == config.num_key_value_heads


def stores_composed_heads(config) -> list[bool]:
    """`stores_composed` for every layer."""
    return [stores_composed(config, heads) for heads in _component_heads(config)]


def cache_signature(config) -> tuple[int, tuple[int, ...], tuple[str, ...]]:
    """What a cache's contents depend on: the head dim, every layer's number of cached heads, and whether each layer
    stores component or composed heads (see `stores_composed_heads`)."""
    kinds = tuple("composed" if composed else "components" for composed in stores_composed_heads(config))
    return config.head_dim, tuple(_component_heads(config)), kinds


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
    holds_states = any(getattr(layer, "is_initialized", False) for layer in cache.layers)
    if signature is not None and signature[:2] == expected[:2]:
        if not holds_states:  # an empty cache built before `kv_decode` changed: nothing stored yet, re-tag it
            cache.mea_signature = expected
            return
        raise ValueError(
            f"This cache holds per-layer {list(signature[2])} heads, but the model (kv_decode={config.kv_decode!r}) "
            f"reads {list(expected[2])}: it was filled under another `kv_decode` (allowed values keep their storage: "
            "'auto' stores composed heads where h' = h, 'reconstruct'/'absorb' store components). Keep kv_decode "
            "fixed while a cache is in use, or start from an empty cache."
        )
    if signature is not None:
        raise ValueError(
            f"This cache was built for an MEA config with head_dim and component heads per layer {signature[:2]}, "
            f"but the model has {expected[:2]}. Build the cache with `MEACache(config=model.config)` for this model."
        )
    if holds_states:
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



# ---- int8 cache --------------------------------------------------------------------------------------------------
INT8_BACKEND = "mea-int8"
INT8_NBITS = (8,)  # bit widths the MEA quantized cache supports
INT8_CACHE_OPTIONS = ("backend", "nbits", "residual_length")  # the `cache_config` keys it reads
INT8_SCALE_DTYPE = torch.float16  # one scale per token and head: 2 bytes next to head_dim int8 payload bytes
_SCALE_RANGE = (torch.finfo(INT8_SCALE_DTYPE).tiny, torch.finfo(INT8_SCALE_DTYPE).max)
_QUANTIZED = ("qkeys", "kscale", "qvalues", "vscale")  # int8 payload and float16 scales, keys then values
_GROWTH = 256  # dynamic int8 storage grows by this many tokens at a time (amortised appends, no copy per step)


def quantize_int8(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per token and head: (..., d) -> int8 (..., d) and float16 scales (..., 1), such that
    `states ~= q * scale` with |error| <= scale / 2 (the scale is rounded to float16 before dividing)."""
    x = states.detach().float()  # the cache stores data, never a graph
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(*_SCALE_RANGE).to(INT8_SCALE_DTYPE)
    return torch.round(x / scale.float()).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out=None) -> torch.Tensor:
    """`q * scale` in `dtype` (into `out` if given). Converted first, then scaled in place: both passes are vectorised,
    where a mixed int8 x float multiply is not (4x slower on CPU); the result is the same to the bit."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device) if out is None else out
    return out.copy_(q).mul_(scale.to(dtype))


# Int8 payload converted at a time by `QuantizedStates`, in elements (batch x heads x tokens x head_dim): a float32
# buffer of 2 MiB, read back while it is still in cache. Chosen by measurement on CPU (one thread, h' = 3 and 6,
# head_dim 64, 2048 and 8192 tokens): 2**18 to 2**20 are within noise of each other; much smaller chunks pay per-op
# overhead, the whole layer at once falls out of cache.
INT8_READ_CHUNK = 2**19


class QuantizedStates:
    """One layer's cached keys or values as the int8 cache stores them, for attention to read without a full-precision
    copy: `payload` int8 (batch, h', n, d) and `scale` float16 (batch, h', n, 1) (`quantize_int8`), then `residual`,
    the most recent tokens in full precision (batch, h', R, d). `shape` is that of the float tensor it stands for.

    Both products the absorbed attention needs are sums over components of per-component matmuls, and a per-token
    scale commutes out of them: `q . (k * s) = (q . k) * s` and `p @ (v * s) = (p * s) @ v`. So the payload is only
    converted to float, `INT8_READ_CHUNK` elements at a time (a buffer that stays in cache, no scale multiply per
    element), and the scales multiply the (queries x tokens) products instead of the (tokens x head_dim) payload."""

    def __init__(self, payload: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor):
        self.payload, self.scale, self.residual = payload, scale, residual
        self.shape = torch.Size((*payload.shape[:2], payload.shape[2] + residual.shape[2], payload.shape[3]))

    def _chunks(self, dtype: torch.dtype, fresh: bool):
        """(start, end, states, scales) over all tokens: payload chunks converted to `dtype` (into one reused buffer
        unless `fresh`, i.e. autograd may keep them) with scales (batch, h', 1, tokens), then the residual (no scale)."""
        batch, heads, length, head_dim = self.payload.shape
        step = max(1, INT8_READ_CHUNK // (batch * heads * head_dim))
        buffer = None if fresh else self.payload.new_empty((batch, heads, min(step, length), head_dim), dtype=dtype)
        scales = self.scale.to(dtype).transpose(-1, -2)  # (batch, h', 1, n): small
        for start in range(0, length, step):
            end = min(start + step, length)
            chunk = self.payload[:, :, start:end]
            chunk = chunk.to(dtype) if fresh else buffer[:, :, : end - start].copy_(chunk)
            yield start, end, chunk, scales[..., start:end]
        if self.residual.shape[2]:
            yield length, self.shape[2], self.residual.to(dtype), None

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """sum_c queries[:, c] @ states[:, c]^T: queries (batch, h', M, d) -> (batch, M, tokens)."""
        parts = []
        for _, _, chunk, scales in self._chunks(queries.dtype, queries.requires_grad and torch.is_grad_enabled()):
            products = queries @ chunk.transpose(-1, -2)  # (batch, h', M, tokens)
            parts.append((products if scales is None else products.mul_(scales)).sum(1))
        return torch.cat(parts, -1)

    def weighted_sum(self, probs: torch.Tensor) -> torch.Tensor:
        """probs @ states[:, c] for every component c: probs (batch, M, tokens) -> (batch, h', M, d)."""
        total = 0
        for start, end, chunk, scales in self._chunks(probs.dtype, probs.requires_grad and torch.is_grad_enabled()):
            weights = probs[:, None, :, start:end]  # (batch, 1, M, tokens): broadcast over components
            total = total + (weights if scales is None else weights * scales) @ chunk
        return total


def int8_cache_options(generation_config) -> dict | None:
    """The MEA int8 cache a generation config asks for, as `MEAQuantizedCache` keyword arguments, or None.

    Asked for by `cache_implementation="quantized"` (transformers' convention) with `cache_config` backend
    "mea-int8" or no backend, or by `cache_implementation="static"` with `cache_config={"backend": "mea-int8"}` (the
    pre-allocated variant). Other backends ("quanto", "hqq", "fp8") are left to transformers."""
    implementation = getattr(generation_config, "cache_implementation", None)
    options = dict(getattr(generation_config, "cache_config", None) or {})
    options.pop("config", None)
    backend = options.get("backend", INT8_BACKEND if implementation == "quantized" else None)
    if backend != INT8_BACKEND or implementation not in ("quantized", "static"):
        return None
    unknown = sorted(set(options) - set(INT8_CACHE_OPTIONS))
    if unknown:
        raise ValueError(f"`cache_config` keys {unknown} are not read by the {INT8_BACKEND} cache; allowed: "
                         f"{INT8_CACHE_OPTIONS}.")  # fmt: skip
    options.pop("backend", None)
    if implementation == "static" and options.get("residual_length", 0):
        raise ValueError("`cache_config` residual_length must be 0 (or absent) with cache_implementation='static': "
                         "the static int8 cache has no full-precision window.")  # fmt: skip
    return options


def _check_int8_options(nbits: int, residual_length: int) -> None:
    if nbits not in INT8_NBITS:
        raise ValueError(f"The {INT8_BACKEND} cache stores nbits={INT8_NBITS[0]}; got `nbits`={nbits!r}. "
                         f"Allowed values: {INT8_NBITS}.")  # fmt: skip
    if not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"`residual_length` must be an int >= 0 (recent tokens kept in full precision), got "
                         f"{residual_length!r}.")  # fmt: skip


class _Scratch:
    """Reusable full-precision buffers for one layer's dequantised keys and values. Layers run one after another, so
    all layers of a cache share them: the int8 cache never holds more than one layer in full precision, and no step
    allocates (fresh multi-MiB tensors cost page faults on CPU)."""

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buffer = self.buffers.get(name)
        if (buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device
                or buffer.is_inference() != torch.is_inference_mode_enabled()):  # fmt: skip
            buffer = torch.empty(numel + numel // 4 + 1, dtype=dtype, device=device)  # headroom for later steps
            self.buffers[name] = buffer
        return buffer[:numel].view(shape)


class _Int8Storage:
    """Int8 keys and values with one float16 scale per token and head (`quantize_int8`): buffers `qkeys`, `qvalues`
    (batch, heads, capacity, head_dim) and `kscale`, `vscale` (batch, heads, capacity, 1) in `self.quantized`."""

    def nbytes(self) -> int:
        """Bytes held: int8 payload and scales (allocated capacity) plus any full-precision residual tokens."""
        tensors = [*self.quantized.values()] + [t for t in (self.keys, self.values) if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _allocate(self, key_states: torch.Tensor, capacity: int, fill=torch.empty) -> None:
        batch, heads, _, head_dim = key_states.shape
        device = key_states.device
        self.quantized = {
            name: fill((batch, heads, capacity, 1 if name.endswith("scale") else head_dim), device=device,
                       dtype=INT8_SCALE_DTYPE if name.endswith("scale") else torch.int8)
            for name in _QUANTIZED
        }  # fmt: skip


class MEAInt8Layer(_Int8Storage, _ComponentHeadsLayer, CacheLayerMixin):
    """A growing int8 cache layer (component or composed heads, whatever the model stores): all but the most recent
    `residual_length` tokens are int8 with per-token, per-head scales; those recent tokens stay in full precision
    (`keys`, `values`), as in transformers' quantised caches. `update` returns the layer dequantised into buffers
    shared by all layers (`_Scratch`), so no full-precision copy of the whole cache ever exists."""

    is_croppable = True
    is_sliding = False

    def __init__(self, num_component_heads: int, head_dim: int, residual_length: int = 0, scratch=None):
        super().__init__(num_component_heads=num_component_heads, head_dim=head_dim)
        self.residual_length = residual_length
        self.scratch = scratch if scratch is not None else _Scratch()
        self.quantized, self.quantized_length = {}, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys, self.values = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        self._allocate(key_states, 0)
        self.quantized_length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.store(key_states, value_states)
        return self._read(key_states.requires_grad and torch.is_grad_enabled())

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append new tokens: into the full-precision window, and whatever leaves it quantised into the int8 part."""
        self._check_heads(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)
        overflow = keys.shape[2] - self.residual_length
        if overflow > 0:  # tokens leaving the full-precision window: quantise and append
            self._append(keys[:, :, :overflow], values[:, :, :overflow])
            keys, values = keys[:, :, overflow:], values[:, :, overflow:]
        self.keys, self.values = keys, values

    def quantized_states(self) -> tuple["QuantizedStates", "QuantizedStates"]:
        """Every cached token as stored (int8 part, then the full-precision window), for attention to read directly."""
        n, q = self.quantized_length, self.quantized
        return (QuantizedStates(q["qkeys"][:, :, :n], q["kscale"][:, :, :n], self.keys),
                QuantizedStates(q["qvalues"][:, :, :n], q["vscale"][:, :, :n], self.values))  # fmt: skip

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        start, end = self.quantized_length, self.quantized_length + keys.shape[2]
        new = (*quantize_int8(keys), *quantize_int8(values))
        for name, states in zip(_QUANTIZED, new):
            buffer = self.quantized[name]
            if buffer.shape[2] < end:  # grow by whole blocks: one copy per _GROWTH tokens, not per step
                grown = buffer.new_empty((*buffer.shape[:2], -(-end // _GROWTH) * _GROWTH, buffer.shape[3]))
                grown[:, :, :start] = buffer[:, :, :start]
                buffer = self.quantized[name] = grown
            buffer[:, :, start:end] = states
        self.quantized_length = end

    def _read(self, fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token in full precision: dequantised int8 part, then the residual. `fresh` (autograd needs
        the result) allocates instead of writing the shared scratch buffers."""
        n, (batch, heads, residual, head_dim) = self.quantized_length, self.keys.shape
        shape, dtype = (batch, heads, n + residual, head_dim), self.keys.dtype
        outputs = []
        for name, q, scale, recent in (("keys", "qkeys", "kscale", self.keys), ("values", "qvalues", "vscale", self.values)):
            out = torch.empty(shape, dtype=dtype, device=self.device) if fresh else self.scratch.get(name, shape, dtype, self.device)
            dequantize_int8(self.quantized[q][:, :, :n], self.quantized[scale][:, :, :n], dtype, out=out[:, :, :n])
            out[:, :, n:] = recent
            outputs.append(out)
        return tuple(outputs)

    def _map(self, function) -> None:
        """Apply `function` to every stored tensor (valid tokens only), e.g. a batch reordering."""
        if not self.is_initialized:
            return
        n = self.quantized_length
        self.quantized = {name: function(buffer[:, :, :n]) for name, buffer in self.quantized.items()}
        self.keys, self.values = function(self.keys), function(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))  # exact: scales are per token and row

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        remove = -tokens_to_remove
        from_residual = min(remove, self.keys.shape[2])
        keep = self.keys.shape[2] - from_residual
        self.keys, self.values = self.keys[:, :, :keep], self.values[:, :, :keep]
        self.quantized_length = max(0, self.quantized_length - (remove - from_residual))

    def get_seq_length(self) -> int:
        return self.quantized_length + self.keys.shape[2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.quantized, self.quantized_length = {}, 0
        self.is_initialized = False


class MEAStaticInt8Layer(_Int8Storage, _ComponentHeadsLayer, CacheLayerMixin):
    """A pre-allocated int8 cache layer of `max_cache_len` tokens (no full-precision window), for
    `cache_implementation="static"` and `torch.compile`: writes in place, returns the dequantised buffers."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, num_component_heads: int, head_dim: int, max_cache_len: int):
        super().__init__(num_component_heads=num_component_heads, head_dim=head_dim)
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long)
        self.quantized = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.compute_dtype = key_states.device, key_states.dtype
        self.batch_size = key_states.shape[0]
        self._allocate(key_states, self.max_cache_len, fill=torch.zeros)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for tensor in (*self.quantized.values(), self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.store(key_states, value_states)
        q = self.quantized
        return (dequantize_int8(q["qkeys"], q["kscale"], key_states.dtype),
                dequantize_int8(q["qvalues"], q["vscale"], value_states.dtype))  # fmt: skip

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantise the new tokens into their slots (in place)."""
        self._check_heads(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[2])
        for name, states in zip(_QUANTIZED, (*quantize_int8(key_states), *quantize_int8(value_states))):
            self.quantized[name].index_copy_(2, positions, states)

    def quantized_states(self) -> tuple["QuantizedStates", "QuantizedStates"]:
        """All `max_cache_len` slots as stored (unused ones are zero and masked), for attention to read directly."""
        q = self.quantized
        empty = q["qkeys"].new_empty((*q["qkeys"].shape[:2], 0, self.head_dim), dtype=self.compute_dtype)
        return (QuantizedStates(q["qkeys"], q["kscale"], empty), QuantizedStates(q["qvalues"], q["vscale"], empty))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for buffer in self.quantized.values():  # in place: static addresses stay valid for compiled graphs
            buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        self.cumulative_length.sub_(-tokens_to_remove)

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        for buffer in self.quantized.values():
            buffer.zero_()
        self.cumulative_length.zero_()


class _Int8Cache(Cache):
    """What both int8 caches add to `Cache`: `update_quantized`, the update for attention that reads int8 directly."""

    def update_quantized(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Store the new tokens of layer `layer_idx` and return its keys and values as `QuantizedStates` (not
        dequantised: the absorbed attention reads them, docs/decode.md)."""
        layer = self.layers[layer_idx]
        layer.store(key_states, value_states)
        return layer.quantized_states()


class MEAQuantizedCache(_Int8Cache):
    """Int8 cache of an MEA model (`cache_implementation="quantized"`, `cache_config={"backend": "mea-int8",
    "nbits": 8, "residual_length": R}`): per layer, the heads it stores (components, or composed heads where
    `kv_decode="auto"` and h' = h) as int8 with a float16 scale per token and head, the last R tokens in full
    precision (default 0). About (head_dim + 2) / (2 * head_dim) of a float16 cache of the same heads."""

    def __init__(self, config, nbits: int = 8, residual_length: int = 0):
        _check_int8_options(nbits, residual_length)
        scratch = _Scratch()
        layers = [MEAInt8Layer(heads, config.head_dim, residual_length, scratch) for heads in _component_heads(config)]
        Cache.__init__(self, layers=layers)
        self.mea_signature = cache_signature(config)
        self.nbits, self.residual_length = nbits, residual_length


class MEAStaticQuantizedCache(_Int8Cache):
    """Pre-allocated int8 cache (`cache_implementation="static"` with `cache_config={"backend": "mea-int8"}`):
    `MEAQuantizedCache` storage without a full-precision window, written in place (torch.compile-friendly)."""

    def __init__(self, config, max_cache_len: int, nbits: int = 8, residual_length: int = 0):
        _check_int8_options(nbits, residual_length)
        if residual_length:
            raise ValueError("`residual_length` must be 0 for the static int8 cache (it has no full-precision window).")
        layers = [MEAStaticInt8Layer(heads, config.head_dim, max_cache_len) for heads in _component_heads(config)]
        Cache.__init__(self, layers=layers)
        self.mea_signature = cache_signature(config)
        self.nbits, self.residual_length = nbits, residual_length

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len


def cache_nbytes(cache: Cache) -> int:
    """Bytes of the key and value tensors of any transformers cache (allocated size for static caches; for
    `MEADynamicLayer` the tokens stored, not its spare room); int8 layers count their payload, scales and
    full-precision residual (`MEAInt8Layer.nbytes`)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, _Int8Storage):
            total += layer.nbytes()
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ---- Continuous batching: pages of component heads (docs/design.md §3) ----

# From 5.24 on the model writes the pages itself (`PagedAttentionCache.update`), so it may write fewer heads than
# `num_key_value_heads`; up to 5.23 the paged kernels write them and expect the h virtual heads.
MODEL_WRITES_PAGES = CACHE_ARG == "cache"


def paged_heads(config) -> int:
    """Heads per layer and token that MEA's continuous-batching pages hold: the largest h' over layers (every layer of
    one paged cache has pages of the same size; layers with fewer components leave the rest of their page unused)."""
    return max(_component_heads(config))


class PagedConfigView:
    """`config` as continuous batching's cache sizing reads it: `num_key_value_heads` is the heads a page holds
    (`paged_heads`), everything else is the model's config. Used only to size and lay out the paged cache."""

    def __init__(self, config):
        self._config = config
        self.num_key_value_heads = paged_heads(config)

    def __getattr__(self, name):
        return getattr(self._config, name)

    def get_text_config(self, *args, **kwargs):
        return self


class PagedEngineModel:
    """The model as the continuous-batching manager sees it while it builds its paged cache: the same model, whose
    `config` is a `PagedConfigView`."""

    def __init__(self, model):
        self._model = model
        self.config = PagedConfigView(model.config)

    def __getattr__(self, name):
        return getattr(self._model, name)

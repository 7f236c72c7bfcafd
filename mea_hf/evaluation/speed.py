"""Decode speed: prefill a random context, then time greedy single-token steps over the model's own default cache.

"Default cache" is what the model builds when called with `use_cache=True` and no cache: `MEACache` (component
heads) for MEA, `DynamicCache` for Llama-family models, i.e. what `generate()` uses. The loop is a plain greedy
decode (no generate() bookkeeping), so the time is the model's and the cache's, the same for every model compared.
"""

import time

import torch
from transformers.cache_utils import Cache

from ..cache_mea import CACHE_ARG, output_cache


@torch.inference_mode()
def prefill(
    model, context_len: int, batch_size: int = 1, chunk_size: int = 1024, seed: int = 0, cache: Cache | None = None
) -> tuple[Cache, torch.Tensor]:
    """Run `context_len` random tokens through `model` in chunks of `chunk_size` (as long-context serving does, so
    activations stay small next to the cache); return the filled cache and the greedy next tokens, (batch, 1).
    `cache`: an empty cache to fill (e.g. `MEAQuantizedCache`); default: the model's own default cache."""
    if context_len < 1 or batch_size < 1 or chunk_size < 1:
        raise ValueError(
            f"context_len, batch_size and chunk_size must be >= 1, got {context_len}, {batch_size}, {chunk_size}."
        )
    generator = torch.Generator().manual_seed(seed)
    context = torch.randint(0, model.config.vocab_size, (batch_size, context_len), generator=generator)
    context = context.to(model.device)
    for start in range(0, context_len, chunk_size):
        outputs = model(input_ids=context[:, start : start + chunk_size], use_cache=True, logits_to_keep=1,
                        **{CACHE_ARG: cache})  # fmt: skip
        cache = output_cache(outputs)
    return cache, outputs.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def time_decode(model, cache: Cache, next_tokens: torch.Tensor, new_tokens: int) -> float:
    """Seconds for `new_tokens` greedy decode steps that extend `cache` (it grows by `new_tokens`)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}.")
    tokens = next_tokens
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=tokens, use_cache=True, **{CACHE_ARG: cache}).logits
        tokens = logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def decode_tokens_per_second(model, context_len: int, new_tokens: int, batch_size: int = 1) -> float:
    """Generated tokens per second (all sequences of the batch together) while decoding after `context_len` tokens.
    Puts `model` in eval mode; one untimed warm-up step precedes the `new_tokens` timed ones."""
    model.eval()
    cache, next_tokens = prefill(model, context_len, batch_size)
    time_decode(model, cache, next_tokens, 1)  # warm-up step, not timed
    return batch_size * new_tokens / time_decode(model, cache, next_tokens, new_tokens)


__all__ = ["decode_tokens_per_second", "prefill", "time_decode"]

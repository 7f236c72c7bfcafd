"""Per-sequence attention for continuous batching (`mea_hf.paged_attention`) against transformers' packed SDPA path.

The reference is what the engine runs by default on CPU: transformers' `sdpa_attention_forward` over the whole packed
batch with the block-diagonal mask the engine builds (`build_attention_mask`). Batches mix decoding sequences (one
query row), prefill chunks over a cached past, a fresh prompt and a sequence with no query rows this step.
"""

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_model
from transformers.generation.continuous_batching.utils import build_attention_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mea_hf import paged_attention
from mea_hf.modeling_mea import compose_heads
from mea_hf.paged_attention import per_sequence_sdpa

# (query rows, key rows) per sequence: 3 decodes, a prefill chunk over a cached past, a fresh prompt, an idle one
MIXED = [(1, 7), (5, 12), (1, 20), (0, 4), (9, 9), (1, 3)]
DECODES = [(1, 7), (1, 20), (1, 3)]  # by default small decode-only batches stay packed


def packed_batch(num_heads, num_kv_heads, width, sliding_window=1, seed=0, sequences=MIXED):
    """Random packed queries/keys/values, the engine's additive mask and the cumulative lengths as tensors."""
    generator = torch.Generator().manual_seed(seed)
    cu_q, cu_k = [0], [0]
    for query_rows, key_rows in sequences:
        cu_q.append(cu_q[-1] + query_rows)
        cu_k.append(cu_k[-1] + key_rows)
    mask = torch.full((1, 1, cu_q[-1], cu_k[-1]), torch.finfo(torch.float32).min)
    build_attention_mask(mask, cu_q, cu_k, sliding_window=sliding_window)
    query = torch.randn(1, num_heads, cu_q[-1], width, generator=generator)
    # token-major storage, as the paged cache returns it: (S, h_kv, w) seen as (1, h_kv, S, w)
    key, value = (torch.randn(cu_k[-1], num_kv_heads, width, generator=generator).transpose(0, 1)[None] for _ in "kv")
    return query, key, value, mask, torch.tensor(cu_q), torch.tensor(cu_k)


@pytest.fixture(params=[0, paged_attention.PACKED_MAX_SEQUENCES], ids=["always_per_sequence", "default"])
def packed_max_sequences(request, monkeypatch):
    """Run with every batch attended per sequence, and with the default threshold."""
    monkeypatch.setattr(paged_attention, "PACKED_MAX_SEQUENCES", request.param)
    return request.param


class Grouped(torch.nn.Module):
    """What transformers' SDPA function reads from the attention module; with `sliding_window`, also a config that
    says which attention the layer has (`sees_whole_sequence`)."""

    def __init__(self, groups, sliding_window="unknown"):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True
        if sliding_window != "unknown":
            self.config = SimpleNamespace(sliding_window=sliding_window)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("sliding_window", [1, 4], ids=["causal", "sliding_window_4"])
@pytest.mark.parametrize("sequences", [MIXED, DECODES], ids=["mixed", "decodes"])
def test_per_sequence_sdpa_equals_the_packed_call(num_kv_heads, sliding_window, sequences, packed_max_sequences):
    """Modules without a config keep every mask block; a config without a sliding window lets decoding rows skip
    theirs (the causal cases), one with a window keeps them."""
    query, key, value, mask, cu_q, cu_k = packed_batch(4, num_kv_heads, 8, sliding_window, sequences=sequences)
    expected, _ = sdpa_attention_forward(Grouped(4 // num_kv_heads), query, key, value, mask, scaling=0.3)
    for module in Grouped(4 // num_kv_heads), Grouped(4 // num_kv_heads, None if sliding_window == 1 else sliding_window):
        got, weights = per_sequence_sdpa(
            module, query, key, value, mask, scaling=0.3, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k
        )
        assert weights is None and got.shape == expected.shape == (1, query.shape[2], 4, 8)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_full_attention_decoding_rows_do_not_read_the_mask(monkeypatch):
    """The skipped mask is really skipped: a module that claims full attention over a sliding-window mask gets the
    full-attention answer on its decoding rows (wrong for that mask, which is why only the config may claim it)."""
    monkeypatch.setattr(paged_attention, "PACKED_MAX_SEQUENCES", 0)
    query, key, value, window_mask, cu_q, cu_k = packed_batch(4, 2, 8, sliding_window=4)
    causal_mask = packed_batch(4, 2, 8)[3]
    lengths = {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k}
    claims_full = per_sequence_sdpa(Grouped(2, None), query, key, value, window_mask, scaling=0.3, **lengths)[0]
    windowed = per_sequence_sdpa(Grouped(2, 4), query, key, value, window_mask, scaling=0.3, **lengths)[0]
    full = per_sequence_sdpa(Grouped(2), query, key, value, causal_mask, scaling=0.3, **lengths)[0]
    decode_rows = [0, 6, 16]  # the decoding rows of MIXED: (1, 7) and (1, 20) see more than the window; (1, 3) not
    torch.testing.assert_close(claims_full[:, decode_rows], full[:, decode_rows])
    assert not torch.allclose(claims_full[:, decode_rows[:2]], windowed[:, decode_rows[:2]], atol=1e-4)


def test_which_batches_attend_per_sequence():
    lengths = [torch.tensor(cumulative) for cumulative in ([0, 1, 2, 3], [0, 1, 6, 7], [0, 9], list(range(10)))]
    assert [paged_attention.attends_per_sequence(cu) for cu in lengths] == [False, True, False, True]
    assert not paged_attention.attends_per_sequence(None)


def test_per_sequence_sdpa_refuses_what_is_not_a_packed_batch():
    query, key, value, mask, cu_q, cu_k = packed_batch(4, 4, 8)
    with pytest.raises(ValueError, match="packed continuous batch"):
        per_sequence_sdpa(None, query, key, value, mask)
    with pytest.raises(ValueError, match="packed continuous batch"):
        doubled = (torch.cat([t, t]) for t in (query, key, value))
        per_sequence_sdpa(None, *doubled, mask, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)
    with pytest.raises(ValueError, match="dropout must be 0"):
        per_sequence_sdpa(None, query, key, value, mask, dropout=0.1, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)


@pytest.mark.parametrize("composition", ["scalar", "banded"])
@pytest.mark.parametrize(
    "num_kv_heads, num_components", [(4, 2), (2, 1), (4, 4)], ids=["mha_half", "gqa_one", "mha_full"]
)
def test_component_attention_equals_packed_attention_over_composed_heads(composition, num_kv_heads, num_components):
    """MEA's paged path over component pages (decodes as one h'·d-wide KV head, prefill chunks composed) against
    composing every cached row and running the packed SDPA call, with perturbed (non-identity) mixing."""
    model = tiny_model(num_key_value_heads=num_kv_heads, num_component_heads=num_components, composition=composition)
    attention = model.model.layers[0].self_attn
    head_dim = attention.head_dim
    query, key, value, mask, cu_q, cu_k = packed_batch(attention.num_heads, num_components, head_dim, seed=1)
    hlc_k, hlc_v = attention.mixing()
    with torch.no_grad():
        got = attention._per_sequence_component_attention(
            query, key, value, (hlc_k, hlc_v), mask, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k
        )
        module = Grouped(attention.num_key_value_groups)
        expected, _ = sdpa_attention_forward(
            module, query, compose_heads(key, hlc_k), compose_heads(value, hlc_v), mask, scaling=attention.scaling
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

"""Per-sequence attention for continuous batching on CPU (docs/serving.md).

transformers' engine packs every sequence of a forward into one block: T query rows (one per decoding sequence plus
the chunks of prefilling ones) against the S cached rows of all of them, with a block-diagonal mask. Its SDPA path
attends over the whole T x S block, so a forward with n sequences of length L costs about n²·L. The functions here
attend each sequence's query rows to its own key rows only (n·L), with that sequence's block of the engine's mask, so
they are exact wherever the packed call is.

- `per_sequence_sdpa` has the signature of transformers' attention functions, so a transformers model can use it too
  (`AttentionInterface.register("sdpa", per_sequence_sdpa)`; the serving benchmark does this for its Llama baseline).
- `per_sequence_component_attention` attends over MEA's component pages: a decoding sequence (one query row) reads
  its components as multi-query attention with one KV head of width h'·d (queries folded with W_k, outputs mixed
  with W_v: no virtual heads are built), a prefilling chunk composes its own sequence's heads and attends to them.
"""

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Decode-only batches of at most this many sequences take the packed call: there the per-sequence loop's fixed cost (a
# few small ops per sequence and layer) exceeds the packed call's wasted work (benchmarks/bench_paged_attention.py).
PACKED_MAX_SEQUENCES = 8


def attends_per_sequence(cu_seq_lens_q: torch.Tensor | None) -> bool:
    """Does a packed batch with these cumulative query lengths attend per sequence? Yes if it holds more than
    `PACKED_MAX_SEQUENCES` sequences, or several sequences one of which prefills (a prefill chunk's rows against every
    other sequence's keys are the packed call's largest waste)."""
    if cu_seq_lens_q is None:
        return False
    num_sequences, num_rows = len(cu_seq_lens_q) - 1, int(cu_seq_lens_q[-1])
    return num_sequences > PACKED_MAX_SEQUENCES or 1 < num_sequences < num_rows


def sequence_blocks(cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor) -> tuple[list, list]:
    """The sequences of a packed batch that have query rows, as (first query row, end, first key row, end): those
    decoding one token, and the prefill chunks."""
    query_starts, key_starts = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    decodes, prefills = [], []
    for q0, q1, k0, k1 in zip(query_starts, query_starts[1:], key_starts, key_starts[1:]):
        if q1 > q0:
            (decodes if q1 - q0 == 1 else prefills).append((q0, q1, k0, k1))
    return decodes, prefills


def _check_packed(query: torch.Tensor, cu_seq_lens_q, cu_seq_lens_k) -> None:
    if query.shape[0] != 1 or cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError("Per-sequence attention reads a packed continuous batch: batch 1 and cu_seq_lens_q/k.")


def _attend_chunk(query, key, value, mask, scaling) -> torch.Tensor:
    """One sequence's query rows (1, H, t, w) over its keys (1, h_kv, L, w), with its block (.., t, L) of the engine's
    mask: (1, t, H, w)."""
    block = scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return block.transpose(1, 2)


def _mask_block(attention_mask: torch.Tensor | None, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask[..., q0:q1, k0:k1]


def sees_whole_sequence(module: torch.nn.Module | None) -> bool:
    """Does every decoding row attend to all of its sequence, so that its mask block (all zeros) need not be read?
    Only when the module's config says so: no `sliding_window` and no "sliding_attention" layer. Unknown modules keep
    the mask."""
    config = getattr(module, "config", None)
    if config is None:
        return False
    return getattr(config, "sliding_window", None) is None and "sliding_attention" not in (
        getattr(config, "layer_types", None) or ()
    )


def _attend_decode_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """One decoding row (1, H, 1, d) over its whole sequence (1, h_kv, L, d), no mask: two batched matmuls over the
    KV heads (the query heads of a group are rows of one product), as MEA's component decode does. (1, 1, H, d)."""
    kv_heads, head_dim = key.shape[1], query.shape[-1]
    rows = query[0, :, 0].view(kv_heads, -1, head_dim)  # (h_kv, groups, d)
    scores = torch.bmm(rows, key[0].transpose(1, 2)).mul_(scaling)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.bmm(probs, value[0]).view(1, 1, -1, value.shape[-1])


def per_sequence_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed batch, one SDPA call per sequence: query (1, H, T, d), key/value (1, h_kv, S, d), the
    engine's (1, 1, T, S) additive mask and cumulative lengths. Returns (1, T, H, d) like transformers' kernels.
    Batches that `attends_per_sequence` leaves packed go to transformers' packed SDPA function instead. Decoding rows of
    a full-attention module (`sees_whole_sequence`) skip their mask block and SDPA's call (`_attend_decode_row`)."""
    _check_packed(query, cu_seq_lens_q, cu_seq_lens_k)
    if dropout:
        raise ValueError("per_sequence_sdpa is an inference kernel (continuous batching): dropout must be 0.")
    if not attends_per_sequence(cu_seq_lens_q):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    output = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    decodes, prefills = sequence_blocks(cu_seq_lens_q, cu_seq_lens_k)
    if sees_whole_sequence(module):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        for q0, _, k0, k1 in decodes:
            row = _attend_decode_row(query[:, :, q0 : q0 + 1], key[:, :, k0:k1], value[:, :, k0:k1], scale)
            output[:, q0] = row[:, 0]
        decodes = []
    for q0, q1, k0, k1 in decodes + prefills:
        output[:, q0:q1] = _attend_chunk(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], _mask_block(attention_mask, q0, q1, k0, k1), scaling
        )  # fmt: skip
    return output, None


def per_sequence_component_attention(
    query: torch.Tensor,
    key_components: torch.Tensor,
    value_components: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    fold_queries,
    mix_outputs,
    compose,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor,
) -> torch.Tensor:
    """MEA attention of a packed batch over component pages, per sequence: query (1, H, T, d), components
    (1, h', S, d); returns (1, T, H, d). `fold_queries` maps query rows (1, H, n, d) to (1, H, n, h'·d) (each row
    times W_k of every component for its head), `mix_outputs` maps outputs (1, n, H, h'·d) back to (1, n, H, d) with
    W_v, `compose` builds one sequence's virtual keys and values from its components (`compose_heads`)."""
    _check_packed(query, cu_seq_lens_q, cu_seq_lens_k)
    decodes, prefills = sequence_blocks(cu_seq_lens_q, cu_seq_lens_k)
    output = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    if decodes:  # multi-query attention over the concatenated components: one KV head of width h'·d
        width = key_components.shape[1] * key_components.shape[3]
        wide_keys, wide_values = (  # (S, h'·d): a view when the pages hold exactly h' heads
            states[0].transpose(0, 1).reshape(-1, width) for states in (key_components, value_components)
        )
        rows = torch.tensor([q0 for q0, _, _, _ in decodes], device=query.device)
        folded = fold_queries(query.index_select(2, rows))[0]  # (H, n, h'·d)
        wide_output = folded.new_empty(1, len(decodes), query.shape[1], width)
        # A decoding row sees all of its sequence (MEA has no sliding window), so its mask row is all zeros and is
        # not read; two matmuls per sequence cost less than an SDPA call at these sizes.
        for row, (_, _, k0, k1) in enumerate(decodes):
            scores = torch.mm(folded[:, row], wide_keys[k0:k1].t()).mul_(scaling)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(wide_values.dtype)
            torch.mm(probs, wide_values[k0:k1], out=wide_output[0, row])
        output[:, rows] = mix_outputs(wide_output)
    for q0, q1, k0, k1 in prefills:  # a prefill chunk composes its own sequence's heads and attends to them
        keys, values = compose(key_components[:, :, k0:k1], value_components[:, :, k0:k1])
        output[:, q0:q1] = _attend_chunk(
            query[:, :, q0:q1], keys, values, _mask_block(attention_mask, q0, q1, k0, k1), scaling
        )
    return output

"""MEA (Multi-head Explicit Attention, arXiv 2601.19611) for transformers: attention, decoder layer and models.

The MEA math lives in `MEAAttention.forward` and the two helpers above it:

    Q = X Wq (H heads),  Kc = X Wk, Vc = X Wv (h' component heads), RoPE on Q and Kc
    K = compose_heads(Kc, W_k), V = compose_heads(Vc, W_v)      # Head-level Linear Composition, (h', h) each
    heads = attention(Q, K, V);  out = o_proj(head_norm(heads))  # per-head RMSNorm before o_proj

With h' = h, identity HLC and no head norm this is exactly Llama attention. Everything that is not MEA-specific
(MLP, RMSNorm, RoPE, eager attention) is transformers' own Llama code, imported rather than copied.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_mea import (
    CACHE_ARG,
    MODEL_WRITES_PAGES,
    MEACache,
    MEAQuantizedCache,
    MEAStaticCache,
    MEAStaticQuantizedCache,
    PagedAttentionCache,
    PagedEngineModel,
    QuantizedStates,
    claim_cache,
    int8_cache_options,
    output_cache,
    paged_heads,
    resolve_cache,
    stores_composed,
)
from .configuration_mea import MEAConfig
from .paged_attention import attends_per_sequence, per_sequence_component_attention, per_sequence_sdpa

# Cached steps with at most this many query tokens (decode, speculative verification) may use the absorbed path;
# long prefills and every uncached (training) forward reconstruct.
ABSORB_MAX_QUERY_LEN = 64


def default_hlc(num_component_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Initial HLC matrix (h', h): identity when h' = h; otherwise virtual head j copies component j*h'//h,
    so a freshly initialised compressed layer starts as grouped-query attention over its components."""
    hlc = torch.zeros(num_component_heads, num_kv_heads)
    hlc[torch.arange(num_kv_heads) * num_component_heads // num_kv_heads, torch.arange(num_kv_heads)] = 1.0
    return hlc


def banded_from_scalar(hlc: torch.Tensor, which: str, head_dim: int) -> torch.Tensor:
    """The `composition="banded"` parameter equal to a scalar HLC (h', h): keys (h', h, 2, d/2) with the weight as
    the real part of every band, values (h', h, d, d) = weight * identity."""
    if which == "k":
        real = hlc[..., None].expand(*hlc.shape, head_dim // 2)
        return torch.stack([real, torch.zeros_like(real)], dim=2)
    return hlc[..., None, None] * torch.eye(head_dim, dtype=hlc.dtype, device=hlc.device)


def band_maps(bands: torch.Tensor) -> torch.Tensor:
    """Banded key mixing (h', h, 2, d/2) as the equivalent (h', h, d, d) maps acting on rows (k_virtual = k_c @ map).

    RoPE rotates channel pairs (j, j + d/2) as complex numbers; multiplying pair j by the complex weight a + ib is
    (x_j, x_j+d/2) -> (a x_j - b x_j+d/2, b x_j + a x_j+d/2), which commutes with any rotation of that pair."""
    real, imag = (torch.diag_embed(part) for part in bands.unbind(2))
    return torch.cat([torch.cat([real, imag], -1), torch.cat([-imag, real], -1)], -2)


def as_maps(mixing: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A 4-dim HLC as (h', h, d, d) maps: key bands (h', h, 2, d/2) through `band_maps`, maps as they are."""
    return band_maps(mixing) if mixing.shape[-1] != head_dim else mixing


def compose_heads(components: torch.Tensor, mixing: torch.Tensor | None) -> torch.Tensor:
    """Head-level Linear Composition: (batch, h', seq, d) -> (batch, h, seq, d). `mixing` is a scalar HLC (h', h),
    (h', h, d, d) maps (virtual head i = sum_c component_c @ mixing[c, i]), key bands (h', h, 2, d/2) (`band_maps`),
    or `None` for identity."""
    if mixing is None:
        return components
    batch, num_components, seq_len, head_dim = components.shape
    num_heads = mixing.shape[1]
    if mixing.dim() == 4:  # one (seq, h'd) @ (h'd, hd) product against the block matrix of all maps
        maps = as_maps(mixing, head_dim).to(components.dtype)
        blocks = maps.permute(0, 2, 1, 3).reshape(num_components * head_dim, -1)
        mixed = components.transpose(1, 2).reshape(batch, seq_len, -1) @ blocks
        return mixed.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)
    # One (h x h') @ (h' x seq*d) product per sequence, written straight into the output layout (no copies).
    weights = mixing.t().to(components.dtype).expand(batch, -1, -1)
    mixed = torch.bmm(weights, components.reshape(batch, num_components, seq_len * head_dim))
    return mixed.view(batch, num_heads, seq_len, head_dim)


def _fold_queries(rows: torch.Tensor, mixing_k: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """Key mixing moved onto the queries, for every component: rows (B, H, T, d) -> (B, h', H, T, d) with
    q . (k_c W[c, i]) = (q W[c, i]^T) . k_c; query head i reads KV head i // kv_groups (the query heads are viewed as
    (h, kv_groups), so no weight is copied per query head). `mixing_k`: (h', h) scalars, (h', h, d, d) maps acting on
    rows, or key bands (h', h, 2, d/2): the transpose of a complex weight a + ib on pair (q_j, q_j+d/2) is its
    conjugate, (a q_j + b q_j+d/2, a q_j+d/2 - b q_j), applied element-wise (no d x d map is built)."""
    batch, num_heads, length, head_dim = rows.shape
    grouped = rows.view(batch, -1, kv_groups, length, head_dim)
    if mixing_k.dim() == 2:
        folded = torch.einsum("bkgtd,ck->bckgtd", grouped, mixing_k)
    elif mixing_k.shape[-1] == head_dim:
        folded = torch.einsum("bkgtd,cked->bckgte", grouped, mixing_k)
    else:
        real, imag = (part[:, :, None, None, :] for part in mixing_k.unbind(2))  # (h', h, 1, 1, d/2)
        first, second = grouped[:, None].chunk(2, dim=-1)
        folded = torch.cat([real * first + imag * second, real * second - imag * first], dim=-1)
    return folded.reshape(batch, mixing_k.shape[0], num_heads, length, head_dim)


def _sum_over_components(rows: torch.Tensor, mixing: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """sum_c rows[:, c] times component c's weight for each row's head: (B, h', H, T, d) -> (B, H, T, d)."""
    batch, num_components, num_heads, length, head_dim = rows.shape
    grouped = rows.view(batch, num_components, -1, kv_groups, length, head_dim)
    equation = "bckgtd,ck->bkgtd" if mixing.dim() == 2 else "bckgtd,ckde->bkgte"
    return torch.einsum(equation, grouped, mixing).reshape(batch, num_heads, length, head_dim)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of (batch, heads, seq, d) states, as Llama's `apply_rotary_pos_emb` does for queries and keys."""
    return states * cos.unsqueeze(1) + rotate_half(states) * sin.unsqueeze(1)


def _additive_mask(mask, query_len: int, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Any transformers attention mask (None, bool, additive float, 2-D padding) as an additive (.., q, kv) mask."""
    if mask is None:
        if query_len == 1:
            return None
        # transformers passes no mask exactly when SDPA's `is_causal` is right, i.e. a causal mask aligned top-left
        # (kv == query, or a prefill into an empty static cache whose trailing slots are still unused).
        causal = torch.ones(query_len, kv_len, dtype=torch.bool, device=device).tril()
        mask = causal[None, None]
    elif mask.dim() == 2:  # flash-attention style padding mask (batch, kv)
        mask = mask[:, None, None, :].bool()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask[..., :kv_len].to(dtype)


def _component_scores(queries: torch.Tensor, key_components) -> torch.Tensor:
    """sum_c queries[:, c] @ key_components[:, c]^T: queries (B, h', M, d) -> scores (B, M, S). Float components
    are read once, one matmul per component accumulated in place; int8 ones (`QuantizedStates`) in chunks."""
    if isinstance(key_components, QuantizedStates):
        return key_components.scores(queries)
    batch, num_components, rows = queries.shape[:3]
    scores = queries.new_zeros(batch, rows, key_components.shape[2])
    for c in range(num_components):
        scores.baddbmm_(queries[:, c], key_components[:, c].transpose(1, 2))
    return scores


def _component_outputs(probs: torch.Tensor, value_components) -> torch.Tensor:
    """probs @ value_components[:, c] for every component: probs (B, M, S) -> (B, h', M, d)."""
    if isinstance(value_components, QuantizedStates):
        return value_components.weighted_sum(probs)
    return torch.stack([torch.bmm(probs, value_components[:, c]) for c in range(value_components.shape[1])], 1)


def absorbed_attention(query, key_components, value_components, mixing_k, mixing_v, mask, scaling, kv_groups):
    """Attention over the compressed cache without materialising virtual heads (docs/design.md §2, "absorb").

    For query head i of KV group g:  logit_i = sum_c (q_i W_k[c, g]^T) . k_c,  out_i = sum_c (p_i @ v_c) W_v[c, g],
    with W[c, g] a scalar HLC weight, a (d, d) map or a key band (`compose_heads`, `_fold_queries`). Each component is
    read once, by one matmul with all H*T folded queries as rows, so nothing bigger than the (H*T, S) scores is
    written. Components are float tensors (B, h', S, d), or the int8 cache's `QuantizedStates`, read as stored
    (docs/decode.md).
    Shapes: query (B, H, T, d); returns (B, T, H, d) and the (B, H, T, S) probabilities.
    """
    batch, num_heads, query_len, head_dim = query.shape
    num_components, kv_len = key_components.shape[1:3]
    mixing_k, mixing_v = mixing_k.to(query.dtype), mixing_v.to(query.dtype)
    folded = _fold_queries(query * scaling, mixing_k, kv_groups)
    folded = folded.reshape(batch, num_components, -1, head_dim)  # (B, h', H*T, d)
    scores = _component_scores(folded, key_components).view(batch, num_heads, query_len, kv_len).float()
    additive = _additive_mask(mask, query_len, kv_len, scores.dtype, query.device)
    if additive is not None:
        scores = scores + additive
    probs = torch.softmax(scores, dim=-1).to(query.dtype)

    outputs = _component_outputs(probs.view(batch, num_heads * query_len, kv_len), value_components)
    outputs = outputs.view(batch, num_components, num_heads, query_len, head_dim)
    output = _sum_over_components(outputs, mixing_v, kv_groups)
    return output.transpose(1, 2), probs


class MEAHeadRMSNorm(LlamaRMSNorm):
    """Per-head RMSNorm of attention outputs (the paper's "GroupNorm", Eq. 12) with a learned scale per channel:
    each head is normalised over its own `head_dim` channels; the scale has shape (num_heads, head_dim)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__((num_heads, head_dim), eps=eps)


class MEAAttention(nn.Module):
    """Multi-head Explicit Attention: component K/V heads, Head-level Linear Composition, per-head norm."""

    def __init__(self, config: MEAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_component_heads = config.component_heads_per_layer[layer_idx]
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        hidden, qkv_bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_component_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_component_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_proj_bias)
        self.hlc_k = nn.Parameter(self.initial_hlc("k")) if config.hlc_keys else None
        self.hlc_v = nn.Parameter(self.initial_hlc("v")) if config.hlc_values else None
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.head_norm = (
            MEAHeadRMSNorm(self.num_heads, self.head_dim, eps=config.rms_norm_eps)
            if config.head_norm == "rms"
            else None
        )

    def initial_hlc(self, which: str) -> torch.Tensor:
        """A fresh HLC parameter for keys ("k") or values ("v"): `default_hlc`, in the config's `composition`."""
        hlc = default_hlc(self.num_component_heads, self.num_kv_heads)
        return hlc if self.config.composition == "scalar" else banded_from_scalar(hlc, which, self.head_dim)

    def mixing(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(keys, values) HLC as `compose_heads` and `absorbed_attention` take it: the (h', h) matrices, or for
        `composition="banded"` the key bands (h', h, 2, d/2) and the (h', h, d, d) value maps."""
        return self.hlc_k, self.hlc_v

    def _stores_composed(self) -> bool:
        """Does this layer cache composed heads (`kv_decode="auto"`, h' = h)? Read from the config on every call, by
        the same rule as `claim_cache` (`stores_composed`), so that the two agree on what a cache holds."""
        return stores_composed(self.config, self.num_component_heads)

    def _use_absorb(self, query_len: int, cached: bool) -> bool:
        """Absorb only attends over a cache: uncached (training) forwards keep the attention kernel's own masking.
        "auto" absorbs wherever components are cached (h' < h): it reads the compressed cache once, no transient."""
        return (
            cached
            and self.config.kv_decode in ("absorb", "auto")
            and self.hlc_k is not None
            and self.hlc_v is not None
            and query_len <= ABSORB_MAX_QUERY_LEN
        )

    def _paged_absorb(self, query_len: int) -> bool:
        """Absorb a paged batch with `absorbed_attention` only when `kv_decode="absorb"` asks for it. That call attends
        over the packed batch (T query rows against the S cached tokens of all sequences, a block-diagonal mask), so
        its h'*H*T*S*d multiply-adds grow with the square of the sequences held; "auto" attends per sequence instead
        (`_per_sequence_component_attention`). Measurements: docs/serving.md."""
        return self.config.kv_decode == "absorb" and self._use_absorb(query_len, cached=True)

    def _paged_per_sequence(self, cu_seq_lens_q) -> bool:
        """Attend each sequence of a paged batch on its own (`mea_hf.paged_attention`) instead of transformers'
        packed SDPA call: under the SDPA implementation (the one continuous batching uses on CPU), for the batches
        `attends_per_sequence` picks (many sequences, or a prefill chunk beside others)."""
        return self.config._attn_implementation == "sdpa" and attends_per_sequence(cu_seq_lens_q)

    def _per_sequence_component_attention(self, query, key_components, value_components, mixing, attention_mask,
                                          **kwargs):  # fmt: skip
        """`per_sequence_component_attention` with this layer's `mixing` (`self.mixing()`): (1, H, T, d) queries ->
        (1, T, H, d). Decoding sequences read the components as one h'·d-wide KV head (no virtual heads built),
        prefill chunks compose."""
        hlc_k, hlc_v = (weights.to(query.dtype) for weights in mixing)
        num_components = key_components.shape[1]

        def fold_queries(rows):  # (1, H, n, d) -> (1, H, n, h'd)
            return _fold_queries(rows, hlc_k, self.num_key_value_groups).permute(0, 2, 3, 1, 4).flatten(-2)

        def mix_outputs(wide):  # (1, n, H, h'd) -> (1, n, H, d)
            rows = wide.unflatten(-1, (num_components, self.head_dim)).permute(0, 3, 2, 1, 4)  # (1, h', H, n, d)
            return _sum_over_components(rows, hlc_v, self.num_key_value_groups).transpose(1, 2)

        return per_sequence_component_attention(
            query, key_components, value_components, attention_mask, self.scaling, fold_queries, mix_outputs,
            lambda keys, values: (compose_heads(keys, hlc_k), compose_heads(values, hlc_v)),
            kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"],
        )  # fmt: skip

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self.project_queries(hidden_states, position_embeddings)
        key_components, value_components = self.project_components(hidden_states, position_embeddings)
        return self.attend(query, key_components, value_components, attention_mask, cache, **kwargs)

    def project_queries(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Queries (batch, H, seq, d) after q_norm (if any) and RoPE."""
        query = self.q_proj(hidden_states).view(*hidden_states.shape[:-1], -1, self.head_dim)
        if self.config.qk_norm:
            query = self.q_norm(query)
        return rotate(query.transpose(1, 2), *position_embeddings)

    def project_components(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Component keys (after k_norm, if any, and RoPE) and values, (batch, h', seq, d) each."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_components = self.k_proj(hidden_states).view(shape)
        if self.config.qk_norm:
            key_components = self.k_norm(key_components)
        value_components = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        return rotate(key_components.transpose(1, 2), *position_embeddings), value_components

    def attend(self, query, key_components, value_components, attention_mask, cache, **kwargs):
        """Attention of projected queries over the components (through `cache` if given), then head norm and o_proj."""
        if isinstance(cache, PagedAttentionCache):
            return self._paged_forward(query, key_components, value_components, attention_mask, cache, **kwargs)
        hlc_k, hlc_v = mixing = self.mixing()
        if self._stores_composed():  # compose once, as tokens enter the cache; attention then reads plain heads
            key_components, value_components = compose_heads(key_components, hlc_k), compose_heads(value_components, hlc_v)
            hlc_k = hlc_v = None
        absorb = hlc_k is not None and self._use_absorb(query.shape[2], cached=cache is not None)
        if cache is not None:  # the absorbed path reads an int8 cache as stored (`QuantizedStates`), not dequantised
            update = cache.update_quantized if absorb and hasattr(cache, "update_quantized") else cache.update
            key_components, value_components = update(key_components, value_components, self.layer_idx)

        if absorb:
            attn_output, attn_weights = absorbed_attention(
                query, key_components, value_components, *mixing,
                attention_mask, self.scaling, self.num_key_value_groups,
            )  # fmt: skip
        else:
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query,
                compose_heads(key_components, hlc_k),
                compose_heads(value_components, hlc_v),
                attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                **kwargs,
            )
        return self._output(attn_output), attn_weights

    def _output(self, attn_output: torch.Tensor) -> torch.Tensor:
        """Head norm, then o_proj: (batch, seq, H, d) -> (batch, seq, hidden)."""
        if self.head_norm is not None:
            attn_output = self.head_norm(attn_output)
        return self.o_proj(attn_output.reshape(*attn_output.shape[:2], -1).contiguous())

    def _paged_forward(self, query, key_components, value_components, attention_mask, cache, **kwargs):
        """Continuous batching (docs/design.md §3). From transformers 5.24 on the model writes the pages: pages sized by
        MEA's manager hold fewer heads than h, and then get this layer's components (zero-padded to the page's head
        count), which are read back and attended over exactly: per sequence under SDPA (`kv_decode="auto"`:
        `_per_sequence_component_attention`; "reconstruct": composed heads, `per_sequence_sdpa`), or the packed
        `absorbed_attention` for "absorb" (`_paged_absorb`). Pages of h heads (a [2, 1] model, or a cache the stock
        engine sized) get the composed virtual heads. Up to 5.23 the paged kernels write the pages themselves from
        their keyword arguments, so they always get the virtual heads and the stock kernel."""
        hlc_k, hlc_v = self.mixing()
        page_heads = cache.layer_to_allocator[self.layer_idx].num_key_value_heads if MODEL_WRITES_PAGES else None
        if page_heads is None or page_heads >= self.num_kv_heads:
            key_components, value_components = compose_heads(key_components, hlc_k), compose_heads(value_components, hlc_v)
            hlc_k = hlc_v = None
        elif kwargs.get("block_table") is not None:
            raise ValueError(
                "MEA's component pages cannot be read by the block-table decode kernel (it would attend over "
                "components as if they were heads); keep `max_blocks_per_request=0` in the ContinuousBatchingConfig."
            )
        per_sequence = page_heads is not None and self._paged_per_sequence(kwargs.get("cu_seq_lens_q"))
        if page_heads is None:
            kwargs["cache"] = cache
            key, value = key_components, value_components
        else:
            stored = key_components.shape[1]
            padding = (0, 0, 0, 0, 0, page_heads - stored)  # zero heads up to the page's head count
            key, value = cache.update(
                nn.functional.pad(key_components, padding), nn.functional.pad(value_components, padding),
                self.layer_idx, kwargs=kwargs,
            )  # fmt: skip
            key, value = key[:, :stored], value[:, :stored]
            if hlc_k is not None and self._paged_absorb(query.shape[2]):
                attn_output, attn_weights = absorbed_attention(
                    query, key, value, hlc_k, hlc_v, attention_mask, self.scaling, self.num_key_value_groups
                )
                return self._output(attn_output), attn_weights
            if hlc_k is not None and hlc_v is not None and per_sequence and self.config.kv_decode == "auto":
                attn_output = self._per_sequence_component_attention(
                    query, key, value, (hlc_k, hlc_v), attention_mask, **kwargs
                )
                return self._output(attn_output), None
            key, value = compose_heads(key, hlc_k), compose_heads(value, hlc_v)
        attention_interface: Callable = (
            per_sequence_sdpa
            if per_sequence
            else ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self._output(attn_output), attn_weights


class MEADecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block: MEA attention then a SwiGLU MLP, each with a residual connection."""

    def __init__(self, config: MEAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MEAAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return self.after_attention(hidden_states, attention_output)

    def after_attention(self, hidden_states: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The block's output from its input and its attention sub-layer's output: residual add, then the MLP with
        its residual."""
        hidden_states = hidden_states + attention_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MEAPreTrainedModel(PreTrainedModel):
    """Weight initialisation and capability flags shared by the MEA models."""

    config: MEAConfig
    config_class = MEAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MEADecoderLayer"]
    _skip_keys_device_placement = [CACHE_ARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False  # the absorbed decode path takes dense masks only
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": MEADecoderLayer, "attentions": MEAAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MEAAttention):
            for which, hlc in (("k", module.hlc_k), ("v", module.hlc_v)):
                if hlc is not None:
                    init.copy_(hlc, module.initial_hlc(which))


class MEAModel(MEAPreTrainedModel):
    """The bare MEA decoder: embeddings, `num_hidden_layers` MEA blocks, final RMSNorm."""

    def __init__(self, config: MEAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MEADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""`cache` holds the component heads (see `MEACache`); `past_key_values` is read as the same argument, the
        name transformers used up to 5.23. A cache under any other keyword is refused (`resolve_cache`)."""
        cache = resolve_cache(cache, past_key_values, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            cache = None  # checkpointed layers run twice and would write the cache twice
        if use_cache and cache is None:
            cache = MEACache(config=self.config)
        if cache is not None:
            claim_cache(cache, self.config)  # never attend over another model's keys/values
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_ARG: cache})


class MEAContinuousBatchingManager(ContinuousBatchingManager):
    """transformers' continuous-batching manager, whose paged cache holds MEA's component heads (`paged_heads`): the
    engine sizes pages, blocks, memory fraction and batch tokens from a config view with h' KV heads, so a fixed KV
    budget admits h/h' times the tokens. The block-table decode kernel (flash only) is turned off: it would read
    components as heads."""

    def _create_batch_processor(self):
        config = self.model.config
        if paged_heads(config) < config.num_key_value_heads:
            self.continuous_batching_config.max_blocks_per_request = 0
        model, self.model = self.model, PagedEngineModel(self.model)
        try:
            return super()._create_batch_processor()
        finally:
            self.model = model


class MEAForCausalLM(MEAPreTrainedModel, GenerationMixin):
    """MEA decoder with a language-modelling head. `generate()` caches only the component heads."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MEAConfig):
        super().__init__(config)
        self.model = MEAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""Language-model logits (and the shifted LM loss given `labels`); `cache` as in `MEAModel.forward`."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_ARG: output_cache(outputs)},
        )

    def init_continuous_batching(self, *args, **kwargs) -> ContinuousBatchingManager:
        """transformers' entry point of continuous batching (`generate_batch`, `transformers serve`); from 5.24 on the
        manager is `MEAContinuousBatchingManager`, whose pages hold component heads. Up to 5.23 the paged kernels
        write the pages and need the h virtual heads, so the stock manager is kept."""
        manager = super().init_continuous_batching(*args, **kwargs)
        if MODEL_WRITES_PAGES and type(manager) is ContinuousBatchingManager:
            manager.__class__ = MEAContinuousBatchingManager
        return manager

    def _get_static_cache_init_shape(self):
        """Static caches are pre-allocated with each layer's component heads, not `num_key_value_heads`."""
        return self.config.component_heads_per_layer, self.config.head_dim

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Let generate() build its usual cache, then swap it for the MEA cache of the same kind.

        `cache_implementation="quantized"` (with `cache_config` backend "mea-int8" or none) gives `MEAQuantizedCache`;
        `"static"` with `cache_config={"backend": "mea-int8"}` gives `MEAStaticQuantizedCache` (`int8_cache_options`).
        A user-supplied cache is kept as it is (`claim_cache` refuses a wrong one)."""
        int8 = int8_cache_options(generation_config)
        if int8 is not None and model_kwargs.get(CACHE_ARG) is not None and generation_config.is_assistant:
            return  # a draft model's own cache, handed back on its next call (5.23 keeps cache_implementation set)
        if (
            int8 is not None
            and generation_config.cache_implementation == "quantized"
            and model_kwargs.get(CACHE_ARG) is None
            and generation_config.use_cache is not False
        ):
            model_kwargs[CACHE_ARG] = MEAQuantizedCache(self.config, **int8)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_ARG)
        if cache is None or getattr(cache, "_is_user_defined", False):
            return
        if type(cache) is DynamicCache:
            model_kwargs[CACHE_ARG] = MEACache(self.config, offloading=cache.offloading)
        elif type(cache) is StaticCache and int8 is not None:
            model_kwargs[CACHE_ARG] = MEAStaticQuantizedCache(self.config, cache.layers[0].max_cache_len, **int8)
        elif type(cache) is StaticCache:
            mea_cache = MEAStaticCache(self.config, cache.layers[0].max_cache_len, offloading=cache.offloading)
            if cache.is_initialized:  # eager init (chunked prefill): keep it eager
                first = cache.layers[0]
                mea_cache.early_initialization(
                    first.batch_size, self.config.component_heads_per_layer, self.config.head_dim,
                    first.keys.dtype, first.device,
                )  # fmt: skip
            model_kwargs[CACHE_ARG] = mea_cache


class MEAForSequenceClassification(GenericForSequenceClassification, MEAPreTrainedModel):
    """MEA decoder with a classification head on the last non-padding token."""


__all__ = ["MEAForCausalLM", "MEAForSequenceClassification", "MEAModel", "MEAPreTrainedModel"]

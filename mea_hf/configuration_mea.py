"""MEA model configuration: a Llama-style decoder plus the Multi-head Explicit Attention fields."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

HEAD_NORMS = ("rms", None)
KV_DECODE_PATHS = ("auto", "reconstruct", "absorb")
COMPOSITIONS = ("scalar", "banded")
# Remote-code entry points written into every saved config. `save_pretrained` alone records only the class being
# saved, so without this a folder saved from MEAForCausalLM would not load through AutoModel (or the classifier
# class) with trust_remote_code. Entries already present (e.g. "repo--modeling_mea.MEAModel" from the Hub) win.
AUTO_MAP = {
    "AutoConfig": "configuration_mea.MEAConfig",
    "AutoModel": "modeling_mea.MEAModel",
    "AutoModelForCausalLM": "modeling_mea.MEAForCausalLM",
    "AutoModelForSequenceClassification": "modeling_mea.MEAForSequenceClassification",
}


@strict
class MEAConfig(PreTrainedConfig):
    r"""
    Configuration of an MEA decoder (arXiv 2601.19611). All Llama fields keep their Llama meaning; MEA adds:

    num_component_heads (`int` or `list[int]`, *optional*):
        KV heads actually projected and cached (h'), one value for all layers or one per layer. Defaults to
        `num_key_value_heads` (no compression). Head-level Linear Composition rebuilds the `num_key_value_heads`
        virtual heads from them.
    hlc_keys / hlc_values (`bool`, defaults to `True`):
        Mix keys / values across heads with a learned (h' x h) matrix per layer. Required when h' < h. A fresh
        model starts from the identity when h' = h (exactly standard attention); when h' < h, virtual head j starts
        as a copy of component j * h' // h (grouped-query attention over the components).
    composition (`"scalar"` or `"banded"`, defaults to `"scalar"`):
        The form of HLC. `"scalar"` (the paper): one weight per (component, virtual head), `hlc_k`/`hlc_v` of shape
        (h', h). `"banded"`: keys are mixed by one complex weight per (component, virtual head, RoPE frequency pair),
        `hlc_k` of shape (h', h, 2, head_dim // 2) holding (real, imaginary) parts, which still commutes with RoPE;
        values by a full (head_dim x head_dim) map per (component, virtual head), `hlc_v` of shape
        (h', h, head_dim, head_dim). Same cache size; a strict generalisation of `"scalar"` (docs/design.md §4).
    head_norm (`"rms"` or `None`, defaults to `"rms"`):
        Per-head RMSNorm of each attention output before `o_proj`, with a learned per-channel scale.
    qk_norm (`bool`, defaults to `False`):
        Per-head RMSNorm on queries and component keys before RoPE (as in Qwen3).
    kv_decode (`"auto"`, `"reconstruct"` or `"absorb"`, defaults to `"auto"`):
        How cached steps attend (all exact; see docs/decode.md). `"auto"` picks per layer: a layer with h' = h caches
        its composed heads (HLC applied once, when tokens enter the cache) and decodes as plain attention; a layer
        with h' < h caches components and decodes with `"absorb"` (continuous batching attends per sequence: decode
        rows read the components as one h'·d-wide KV head, prefill chunks reconstruct).
        `"reconstruct"` / `"absorb"` cache components in every layer. A cache filled under one setting is refused
        under another.
    o_proj_bias (`bool`, *optional*):
        Bias on `o_proj`; defaults to `attention_bias` (Qwen2 has q/k/v biases but none on `o_proj`).
    """

    model_type = "mea"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the output field before / from 5.24
    # Tensor parallelism shards the MLP only. Attention stays replicated: HLC mixes K/V across all heads, so a rank
    # holding a slice of the query heads would still need every virtual head, which transformers' plans can't express
    # (a colwise q_proj/rowwise o_proj plan fails with head norm and silently gives wrong logits without it).
    base_model_tp_plan = {
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    o_proj_bias: bool | None = None
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    # MEA
    num_component_heads: int | list[int] | None = None
    hlc_keys: bool = True
    hlc_values: bool = True
    head_norm: str | None = "rms"
    qk_norm: bool = False
    kv_decode: str = "auto"
    composition: str = "scalar"

    def __post_init__(self, **kwargs):
        self._check_positive_sizes()
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                    f"({self.num_attention_heads}) when `head_dim` is not given."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_component_heads is None:
            self.num_component_heads = self.num_key_value_heads
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        super().__post_init__(**kwargs)
        self.validate_mea_fields()

    @property
    def component_heads_per_layer(self) -> list[int]:
        """h' for every layer, as a list (expands an int `num_component_heads`)."""
        if isinstance(self.num_component_heads, int):
            return [self.num_component_heads] * self.num_hidden_layers
        return list(self.num_component_heads)

    def validate_architecture(self):
        """Part of `@strict` validation (also run on save, after fields were changed)."""
        super().validate_architecture()
        self.validate_mea_fields()

    def _check_positive_sizes(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")

    def validate_mea_fields(self):
        """Raise a `ValueError` naming the field for every impossible combination of head counts and options."""
        self._check_positive_sizes()
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads % kv_heads:
            raise ValueError(
                f"`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads` ({kv_heads})."
            )
        if isinstance(self.num_component_heads, list) and len(self.num_component_heads) != self.num_hidden_layers:
            raise ValueError(
                f"`num_component_heads` has {len(self.num_component_heads)} entries but the model has "
                f"`num_hidden_layers`={self.num_hidden_layers}; give one value per layer or a single int."
            )
        for layer, components in enumerate(self.component_heads_per_layer):
            if not 1 <= components <= kv_heads:
                raise ValueError(
                    f"`num_component_heads` must be between 1 and `num_key_value_heads` ({kv_heads}), "
                    f"got {components} for layer {layer}."
                )
            if components < kv_heads and not (self.hlc_keys and self.hlc_values):
                raise ValueError(
                    f"Layer {layer} has {components} component heads < {kv_heads} KV heads, which needs "
                    "`hlc_keys=True` and `hlc_values=True` to rebuild the virtual heads."
                )
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"`head_norm` must be one of {HEAD_NORMS}, got {self.head_norm!r}.")
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"`composition` must be one of {COMPOSITIONS}, got {self.composition!r}.")
        if self.composition == "banded" and self.head_dim % 2:
            raise ValueError(f"`composition='banded'` pairs RoPE channels and needs an even `head_dim`, got {self.head_dim}.")
        if self.composition == "banded" and not (self.hlc_keys and self.hlc_values):
            raise ValueError("`composition='banded'` needs `hlc_keys=True` and `hlc_values=True`.")
        if self.kv_decode not in KV_DECODE_PATHS:
            raise ValueError(f"`kv_decode` must be one of {KV_DECODE_PATHS}, got {self.kv_decode!r}.")


__all__ = ["MEAConfig"]

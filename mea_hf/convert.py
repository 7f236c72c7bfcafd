"""Exact conversion of Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3) to MEA, from a model, a folder or a
GGUF file.

The converted model has h' = h, identity HLC and no head norm, so its logits equal the original's; it is the
starting point for KV compression (`mea_hf.compress`) or continued pretraining with MEA.
"""

import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .configuration_mea import MEAConfig
from .gguf import gguf_base_model, is_gguf_path, load_gguf_causal_lm, load_gguf_tokenizer
from .modeling_mea import MEAForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_COPIED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
    "attention_dropout",
)  # fmt: skip


def _check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Cannot convert model_type {model_type!r} to MEA; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            f"Cannot convert a {model_type} model with sliding_window={config.sliding_window}: "
            "MEA uses full attention in every layer."
        )
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"Cannot convert a checkpoint with pretraining_tp={config.pretraining_tp}; expected 1.")


def mea_config_from(config, **overrides) -> MEAConfig:
    """The MEA config equivalent to a Llama-family config (identity HLC, no head norm), plus `overrides`."""
    _check_supported(config)
    fields = {name: getattr(config, name) for name in _COPIED_FIELDS if getattr(config, name, None) is not None}
    model_type = config.model_type
    fields.update(
        attention_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        o_proj_bias=model_type != "qwen2" and bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        head_norm=None,
        hlc_keys=True,
        hlc_values=True,
    )
    fields.update(overrides)
    return MEAConfig(**fields)


def public_name(name_or_path: str | os.PathLike | None) -> str | None:
    """A name fit for a config or model card: a Hub repo id stays, a local path becomes its folder or file name
    (or the repo id of a Hub cache snapshot)."""
    name = os.fspath(name_or_path or "")
    if not name or not (os.path.isabs(name) or os.path.exists(name)):
        return name or None
    snapshot = re.search(r"models--([^/]+)--([^/]+)/snapshots/", Path(name).resolve().as_posix())
    return f"{snapshot[1]}/{snapshot[2]}" if snapshot else Path(name).resolve().name


def from_llama(model_or_path: PreTrainedModel | str | os.PathLike, dtype: torch.dtype | None = None) -> MEAForCausalLM:
    """Convert a Llama/Mistral/Qwen2/Qwen3 causal LM (a model, a local folder or a `.gguf` file, which transformers
    dequantises) into an equivalent MEAForCausalLM. `config.base_model_name_or_path` names the source, never by a
    local path."""
    if isinstance(model_or_path, PreTrainedModel):
        source = model_or_path
        _check_supported(source.config)
        base_model = public_name(getattr(source.config, "_name_or_path", None))
    elif is_gguf_path(model_or_path):
        source, metadata = load_gguf_causal_lm(model_or_path, dtype)
        _check_supported(source.config)
        base_model = gguf_base_model(metadata, model_or_path)
    else:
        _check_supported(AutoConfig.from_pretrained(model_or_path))  # refuse before loading any weights
        source, loading = AutoModelForCausalLM.from_pretrained(
            model_or_path, dtype=dtype or "auto", output_loading_info=True
        )
        if loading["missing_keys"]:  # e.g. a base-model or classifier checkpoint: its lm_head would be random
            raise ValueError(
                f"{model_or_path} is not a complete causal-LM checkpoint: missing {sorted(loading['missing_keys'])[:5]}."
            )
        base_model = public_name(model_or_path)
    config = mea_config_from(source.config)
    config.architectures = ["MEAForCausalLM"]
    model = MEAForCausalLM(config).to(dtype or source.dtype)
    result = model.load_state_dict(source.state_dict(), strict=False)
    missing = [key for key in result.missing_keys if not key.endswith((".hlc_k", ".hlc_v"))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Checkpoint does not map onto MEA: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
        )
    if source.generation_config is not None:
        model.generation_config = source.generation_config
    model.config.base_model_name_or_path = base_model
    return model.eval()


def load_tokenizer(model_path: str | os.PathLike):
    """The tokenizer of a checkpoint folder (None if it has none) or of a `.gguf` file (errors if unreadable)."""
    from transformers import AutoTokenizer

    if is_gguf_path(model_path):
        return load_gguf_tokenizer(model_path)
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None

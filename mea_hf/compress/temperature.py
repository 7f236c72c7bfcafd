"""Sharper attention in compressed layers: one factor on every query head's logits, folded into the weights
(docs/design.md §4, "Attention temperature").

calib's squared-error fit leaves a compressed layer attending more softly than the original, and its greedy text
loops more often. Scaling the logits of the layers that were compressed by a factor above 1 (`reduce_kv_heads(...,
sharpen=F)`, `mea compress --sharpen F`) counters that. Distillation undoes that gain, so a distilled model is
sharpened afterwards (`sharpen_layers`, `mea sharpen`). The factor goes into the rows of q_proj (under `qk_norm`,
whose per-head norm would undo that, into q_norm's weight), so the config, the cache and every decode path stay as
they are.
"""

import math

import torch


def check_sharpen(factor) -> None:
    """Refuse a sharpening factor that is not a positive finite number."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise ValueError(f"sharpen must be a positive number, got {factor!r}.")


def sharpen_queries(attn, factor: float) -> None:
    """Multiply every attention logit of the MEA attention layer `attn` by `factor`, in its weights (in place)."""
    check_sharpen(factor)
    with torch.no_grad():
        if attn.config.qk_norm:
            attn.q_norm.weight.mul_(factor)
        else:
            attn.q_proj.weight.mul_(factor)
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.mul_(factor)


def sharpen_layers(model, factor: float, layers: list[int] | None = None) -> None:
    """Multiply every attention logit of `layers` (default: all) of the MEA model `model` by `factor` (in place)."""
    check_sharpen(factor)
    for index in range(model.config.num_hidden_layers) if layers is None else layers:
        sharpen_queries(model.model.layers[index].self_attn, factor)


def describe_sharpening(source_name: str, factor: float, layers: list[int] | None) -> str:
    """Model-card provenance line of a model sharpened by `mea sharpen`."""
    where = "every layer" if layers is None else f"layers {', '.join(map(str, layers))}"
    return (
        f"Sharpened from `{source_name}` with `mea sharpen`: the attention logits of {where} multiplied by {factor:g}. "
        "Calibration leaves a compressed model's attention softer than the original's, and its greedy text loops "
        "more; sharper attention loops less, after distillation too."
    )

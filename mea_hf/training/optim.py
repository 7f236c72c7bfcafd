"""The optimiser of a training run: AdamW with weight decay on weight matrices only, and its LR schedule."""

import torch

from .schedules import lr_multiplier
from .settings import TrainSettings

# Parameters that get no weight decay: every vector (biases), every norm scale (the per-head norm's is a matrix), the
# token embeddings (tied to the LM head in all configs here) and the HLC matrices, which start at the identity: decay
# would pull them towards zero, i.e. towards silencing heads, not towards standard attention.
NO_DECAY_NAMES = ("norm", "embed_tokens", "hlc_k", "hlc_v")


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices; none on vectors, embeddings and HLC matrices."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_and_scheduler(model, s: TrainSettings, device: torch.device):
    """AdamW over `parameter_groups` and the LR schedule as a LambdaLR (one step per optimizer step)."""
    optimizer = torch.optim.AdamW(
        parameter_groups(model, s.weight_decay),
        lr=s.lr,
        betas=(s.adam_beta1, s.adam_beta2),
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters; much faster on CPU
    )
    multiplier = lr_multiplier(s.schedule, s.warmup_steps, s.max_steps, s.min_lr_ratio, s.decay_fraction)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

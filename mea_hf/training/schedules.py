"""Learning-rate schedules as multipliers of the peak LR, one value per optimizer step.

- cosine: linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps` (the paper's recipe: to 10%).
- wsd (warmup-stable-decay): linear warmup, constant 1, then a linear decay to `min_lr_ratio` over the last
  `decay_fraction` of the steps.
"""

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "wsd")


def lr_multiplier(
    schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2
) -> Callable[[int], float]:
    """A function step -> LR multiplier for `torch.optim.lr_scheduler.LambdaLR` (step 0 is the first update)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
    if max_steps < 1 or warmup_steps < 0 or warmup_steps >= max_steps:
        raise ValueError(f"need 0 <= warmup_steps < max_steps, got warmup_steps={warmup_steps}, max_steps={max_steps}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"`decay_fraction` must be in (0, 1], got {decay_fraction}.")
    decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))

    def warmup(step: int) -> float:
        return (step + 1) / warmup_steps

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return cosine if schedule == "cosine" else wsd

"""Validation loss: mean next-token cross-entropy over packed blocks."""

import math

import torch


@torch.no_grad()
def mean_token_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` over `blocks` (n_blocks, block_size) of token ids."""
    if blocks.numel() == 0:
        raise ValueError("mean_token_loss needs at least one block of tokens.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    loss = total / count
    if not math.isfinite(loss):
        raise FloatingPointError(f"validation loss is {loss}")
    return loss

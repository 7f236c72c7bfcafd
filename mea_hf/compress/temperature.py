"""Attention temperature after calib's output fit: give each compressed layer's query heads back the original's
attention entropy (docs/design.md §5).

Fitting a layer's attention output by squared error hedges: where the compressed keys cannot tell which earlier
token the original attended to, the output that minimises the error is the average over the candidates, so the fit
leaves attention softer than the original's (on SmolLM2-135M, 3 -> 2, every layer, 89% of the query heads, +0.08 nats
on average). Softer attention spreads probability over the context's tokens, and greedy text then loops.

`match_attention_entropy` scales each query head's logits by one factor s_h, found by bisection so that the head's
mean attention entropy over some calibration blocks equals the original layer's on the same inputs. The factor is
folded into the weights (the rows of q_proj; under `qk_norm`, whose per-head norm would undo that, one factor per
layer on q_norm's weight), so the model, its config and every decode path stay as they are.
"""

import torch

from ..modeling_mea import compose_heads

ENTROPY_BLOCKS = 8  # calibration blocks the entropies are measured on: one layer's logits on them take ~20 MB
SCALE_RANGE = (0.25, 4.0)  # the factors searched; the entropy of a softmax falls monotonically as its logits grow
BISECTION_STEPS = 30  # halves the log-range 30 times: the factor to ~1e-8 relative


def _causal_logits(attn, normed: torch.Tensor, extras: dict) -> torch.Tensor:
    """Attention logits (batch, H, seq, seq) of `attn` on one calibration batch, masked positions -inf."""
    queries = attn.project_queries(normed, extras["position_embeddings"])
    key_components, _ = attn.project_components(normed, extras["position_embeddings"])
    keys = compose_heads(key_components, attn.mixing()[0]).repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (queries @ keys.transpose(-1, -2)).float() * attn.scaling
    length = logits.shape[-1]
    mask = extras["attention_mask"]
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=logits.device).tril()
    return logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask


def _mean_entropy(logits: list[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) per query head of softmax(scale_h x logits), over every batch, row and position."""
    total, count = 0.0, 0
    for batch in logits:
        log_probs = (batch * scales[:, None, None]).log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)  # (batch, H, seq)
        total = total + entropy.sum((0, 2))
        count += entropy.shape[0] * entropy.shape[2]
    return total / count


def calibration_logits(attn, inputs) -> list[torch.Tensor]:
    """`attn`'s attention logits on the first `ENTROPY_BLOCKS` blocks of `inputs` [(normed, extras)]."""
    logits, blocks = [], 0
    with torch.no_grad():
        for normed, extras in inputs:
            if blocks >= ENTROPY_BLOCKS:
                break
            logits.append(_causal_logits(attn, normed[: ENTROPY_BLOCKS - blocks], extras))
            blocks += logits[-1].shape[0]
    return logits


def attention_entropy(attn, inputs) -> torch.Tensor:
    """Mean attention entropy per query head (H,) of `attn` on the first `ENTROPY_BLOCKS` blocks of `inputs`."""
    logits = calibration_logits(attn, inputs)
    return _mean_entropy(logits, torch.ones(logits[0].shape[1], device=logits[0].device))


def match_attention_entropy(attn, inputs, target: torch.Tensor) -> torch.Tensor:
    """Scale `attn`'s query heads (in place, in its weights) so that their mean attention entropy on `inputs` equals
    `target` (H,), per head, or for the layer as a whole under `qk_norm`. Returns the factors (H,)."""
    logits = calibration_logits(attn, inputs)
    heads = logits[0].shape[1]
    per_head = not attn.config.qk_norm
    low = torch.full((heads if per_head else 1,), SCALE_RANGE[0]).log().to(target.device)
    high = torch.full_like(low, torch.tensor(SCALE_RANGE[1]).log().item())
    goal = target if per_head else target.mean()[None]
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        entropy = _mean_entropy(logits, middle.exp().expand(heads))
        entropy = entropy if per_head else entropy.mean()[None]
        too_soft = entropy > goal  # then the factor must grow
        low, high = torch.where(too_soft, middle, low), torch.where(too_soft, high, middle)
    scales = ((low + high) / 2).exp().expand(heads)
    with torch.no_grad():
        if per_head:
            head_dim = attn.head_dim
            attn.q_proj.weight.mul_(scales.repeat_interleave(head_dim)[:, None].to(attn.q_proj.weight.dtype))
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.mul_(scales.repeat_interleave(head_dim).to(attn.q_proj.bias.dtype))
        else:
            attn.q_norm.weight.mul_(scales[0].to(attn.q_norm.weight.dtype))
    return scales

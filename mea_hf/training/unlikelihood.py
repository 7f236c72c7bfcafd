"""Unlikelihood of the student's own repeats: a loss against greedy loops, on on-policy micro-batches.

A compressed model's greedy text falls into loops more often than the original's, and matching the teacher's
next-token distribution (forward or reverse KL, teacher-forced or on-policy) has not changed that: the KL has signal
only at the few tokens where a loop starts (docs/coherence.md). Sequence-level unlikelihood training (Welleck et al.
2020, "Neural Text Generation with Unlikelihood Training") charges those tokens directly. In a block the student
continued itself, every token of an n-gram that already occurred earlier in the continuation is a negative
candidate, and the loss is -log(1 - p_student(token)) there, summed and divided by the number of tokens the student
wrote (so the term shrinks as the loops go).
"""

import torch

from ..evaluation.repetition import repeated_ngram_starts

# 1 - p is clamped at this, so a token the student is certain of costs a bounded -log(1e-5) = 11.5 nats.
_MIN_COMPLEMENT = 1e-5


def repeated_ngram_mask(tokens: torch.Tensor, ngram: int, start: int) -> torch.Tensor:
    """(batch, length) bool: True at every token of an n-gram within `tokens[:, start:]` that equals an earlier
    n-gram there (the later occurrence only, overlapping occurrences included)."""
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, sequence in enumerate(tokens[:, start:].tolist()):
        for first, repeated in enumerate(repeated_ngram_starts(sequence, ngram)):
            if repeated:
                mask[row, start + first : start + first + ngram] = True
    return mask.to(tokens.device)


def unlikelihood_loss(logits: torch.Tensor, tokens: torch.Tensor, ngram: int, start: int) -> torch.Tensor:
    """Sum over the repeated n-gram tokens of `tokens` (at positions `start` on, `repeated_ngram_mask`) of
    -log(1 - p(token)) under `logits` (position t-1 predicts token t), divided by the number of tokens from `start`
    on. Zero, with a gradient, when nothing repeats."""
    mask = repeated_ngram_mask(tokens, ngram, start)[:, 1:]
    written = tokens.shape[0] * (tokens.shape[1] - start)
    rows = logits[:, :-1][mask].float()
    if rows.shape[0] == 0:
        return logits.sum() * 0.0
    log_p = rows.log_softmax(-1).gather(-1, tokens[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
    return -(1 - log_p.exp()).clamp(min=_MIN_COMPLEMENT).log().sum() / written

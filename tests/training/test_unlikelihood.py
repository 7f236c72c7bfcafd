"""Unlikelihood of the student's own repeats (`mea_hf.training.unlikelihood`); in training: test_distill.py."""

import pytest
import torch

from mea_hf.training.unlikelihood import repeated_ngram_mask, unlikelihood_loss


def test_mask_marks_every_token_of_a_later_occurrence_from_start_on():
    tokens = torch.tensor([[7, 8, 1, 2, 3, 1, 2, 3, 1, 9], [1, 2, 1, 2, 5, 6, 7, 8, 9, 4]])
    mask = repeated_ngram_mask(tokens, ngram=2, start=2)
    # row 0: from position 2 on, "1 2", "2 3" and "3 1" recur at 5-6, 6-7 and 7-8; "1 9" is new
    assert mask[0].tolist() == [False] * 5 + [True, True, True, True, False]
    # row 1: "1 2" at 0-1 lies before start, so its recurrence at 2-3 is the first occurrence there
    assert not mask[1].any()
    assert repeated_ngram_mask(tokens, ngram=2, start=0)[1].tolist() == [False, False, True, True] + [False] * 6


def test_loss_is_minus_log_one_minus_p_over_the_repeats_per_written_token():
    torch.manual_seed(0)
    tokens = torch.tensor([[4, 1, 2, 1, 2, 3]])
    logits = torch.randn(1, 6, 5, requires_grad=True)
    loss = unlikelihood_loss(logits, tokens, ngram=2, start=1)
    p = logits.softmax(-1)
    # repeated 2-gram "1 2" at positions 3-4: predicted by positions 2 and 3; 5 tokens from start 1 on
    expected = -(torch.log(1 - p[0, 2, 1]) + torch.log(1 - p[0, 3, 2])) / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (gradient,) = torch.autograd.grad(loss, logits)
    (expected_gradient,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(gradient, expected_gradient)
    no_repeats = unlikelihood_loss(logits, torch.tensor([[4, 1, 2, 3, 0, 4]]), ngram=2, start=1)
    assert no_repeats.item() == 0.0 and no_repeats.requires_grad
    certain = torch.full((1, 6, 5), -50.0)
    certain[0, 2, 1] = certain[0, 3, 2] = 50.0  # p = 1 where the repeats are: bounded, not inf
    assert unlikelihood_loss(certain, tokens, 2, 1).item() == pytest.approx(-2 * torch.log(torch.tensor(1e-5)) / 5)

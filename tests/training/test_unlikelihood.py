"""Unlikelihood of the student's own repeats (`mea_hf.training.unlikelihood`), alone and inside on-policy training."""

import pytest
import torch
from helpers import perturb_, tiny_model
from transformers import AutoModelForCausalLM

from mea_hf.hub import save_folder
from mea_hf.training.checkpoints import read_metrics
from mea_hf.training.distill import distillation_loss
from mea_hf.training.loop import train
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


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """A tiny MEA teacher and a perturbed copy of it (the student), both with the session tokenizer."""
    root = tmp_path_factory.mktemp("unlikelihood")
    save_folder(tiny_model(vocab_size=len(tokenizer), scale=0.05), root / "teacher", tokenizer)
    save_folder(perturb_(tiny_model(vocab_size=len(tokenizer), scale=0.05), scale=0.05, seed=1), root / "student",
                tokenizer)  # fmt: skip
    return root


def _settings(folders, tmp_path, **overrides):
    return {
        "model": None, "init_from": str(folders / "student"), "teacher": str(folders / "teacher"),
        "data": "builtin", "block_size": 32, "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "lr": 3e-3,
        "eval_every": 2, "eval_blocks": 2, "save_every": 0, "seed": 0, "out": str(tmp_path / "run"),
        "progress": False, "on_policy_fraction": 1.0, "on_policy_prompt_tokens": 8, "on_policy_temperature": 0.0,
        **overrides,
    }  # fmt: skip


def test_on_policy_loss_adds_the_weighted_unlikelihood_of_the_students_repeats(folders, tmp_path):
    seen = []
    summary = train(_settings(folders, tmp_path, unlikelihood_weight=0.5, unlikelihood_ngram=2),
                    on_event=lambda event, **info: seen.append(info) if event == "batch" else None)  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(folders / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(folders / "teacher").eval()
    first = seen[0]["input_ids"]
    with torch.no_grad():
        logits = student(first).logits
        kl = distillation_loss(logits[:, 7:], teacher(first).logits[:, 7:]).item()
        repeats = unlikelihood_loss(logits, first, 2, 8).item()
    assert repeated_ngram_mask(first, 2, 8).any() and repeats > 0  # the tiny student's greedy text repeats
    records = [record for record in read_metrics(summary["out_dir"]) if "loss" in record]
    assert records[0]["loss"] == pytest.approx(kl + 0.5 * repeats, rel=1e-5)
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "+ 0.5 x the unlikelihood of their repeated 2-grams" in card


def test_unlikelihood_training_makes_the_students_repeats_less_likely(folders, tmp_path):
    """Weighted heavily, a few steps lower the unlikelihood term of the student's first greedy micro-batch: the
    repeated tokens it wrote got less likely (a KL-only run of the same steps is the control)."""
    seen = []
    on_batch = lambda event, **info: seen.append(info["input_ids"]) if event == "batch" else None
    terms = {}
    for weight in (0.0, 20.0):
        seen.clear()
        out = tmp_path / f"w{weight:g}"
        train(_settings(folders, tmp_path, unlikelihood_weight=weight, unlikelihood_ngram=2, max_steps=4,
                        out=str(out)), on_event=on_batch)  # fmt: skip
        trained = AutoModelForCausalLM.from_pretrained(out / "final").eval()
        with torch.no_grad():
            terms[weight] = unlikelihood_loss(trained(seen[0]).logits, seen[0], 2, 8).item()
    assert terms[20.0] < 0.5 * terms[0.0]

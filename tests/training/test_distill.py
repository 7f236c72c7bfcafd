"""Recovery by distillation (`mea train --teacher`): KL to a teacher's logits, train-only-attention, settings."""

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import perturb_, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mea_hf.cli import main as cli_main
from mea_hf.data.loading import cached_blocks
from mea_hf.hub import save_folder
from mea_hf.training.checkpoints import checkpoint_dirs, loss_curves, read_metrics
from mea_hf.training.distill import attention_kl, distillation_loss, mean_attention_kl, mean_kl
from mea_hf.training.loop import _ended_no_lower, train
from mea_hf.training.settings import TrainSettings
from mea_hf.training.unlikelihood import repeated_ngram_mask, unlikelihood_loss


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """A tiny MEA teacher and a perturbed copy of it (the student), both with the session tokenizer."""
    root = tmp_path_factory.mktemp("distill")
    teacher = tiny_model(vocab_size=len(tokenizer), scale=0.05)
    student = perturb_(tiny_model(vocab_size=len(tokenizer), scale=0.05), scale=0.05, seed=1)
    save_folder(teacher, root / "teacher", tokenizer)
    save_folder(student, root / "student", tokenizer)
    return root


def _settings(folders, tmp_path, **overrides):
    return {
        "model": None, "init_from": str(folders / "student"), "teacher": str(folders / "teacher"),
        "data": "builtin", "block_size": 32, "batch_size": 4, "max_steps": 6, "warmup_steps": 1, "lr": 3e-3,
        "eval_every": 6, "eval_blocks": 4, "save_every": 0, "seed": 0, "out": str(tmp_path / "run"),
        "progress": False, **overrides,
    }  # fmt: skip


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_and_its_gradient_match_the_textbook_kl(temperature, divergence):
    student, teacher = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11)
    assert distillation_loss(teacher, teacher, temperature, divergence).item() == pytest.approx(0.0, abs=1e-6)
    loss = distillation_loss(student, teacher, temperature, divergence)
    (gradient,) = torch.autograd.grad(loss, student)
    log_student = (student / temperature).log_softmax(-1).reshape(-1, 11)
    log_teacher = (teacher / temperature).log_softmax(-1).reshape(-1, 11)
    log_p, log_q = (log_teacher, log_student) if divergence == "forward" else (log_student, log_teacher)
    reference = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    (reference_gradient,) = torch.autograd.grad(reference, student)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(gradient, reference_gradient, rtol=1e-5, atol=1e-7)
    other = "reverse" if divergence == "forward" else "forward"
    assert abs(distillation_loss(student, teacher, temperature, other).item() - loss.item()) > 1e-3


def test_reverse_kl_charges_the_student_for_mass_where_the_teacher_has_little():
    """The failure that starts a greedy loop: the student gives 0.31 to a token the teacher gives 0.02."""
    teacher = torch.tensor([[0.90, 0.02, 0.08]]).log()
    student = torch.tensor([[0.61, 0.31, 0.08]]).log()
    forward, reverse = (distillation_loss(student, teacher, divergence=d).item() for d in ("forward", "reverse"))
    assert reverse == pytest.approx(0.61 * math.log(0.61 / 0.90) + 0.31 * math.log(0.31 / 0.02), rel=1e-5)
    assert reverse > 1.5 * forward
    with pytest.raises(ValueError, match="divergence must be one of"):
        distillation_loss(student, teacher, divergence="js")


def test_distillation_loss_sums_a_large_vocabulary_accurately():
    # 16.8 million terms: a plain float32 dot product of the two buffers is off by about 5e-5 here (1.6e-3 at SmolLM2's
    # 2,048 x 49,152), a pairwise sum by 1e-6.
    generator = torch.Generator().manual_seed(0)
    student, teacher = (3 * torch.randn(512, 32768, generator=generator) for _ in range(2))
    p = teacher.double().softmax(-1)
    reference = (p * (p.log() - student.double().log_softmax(-1))).sum(-1).mean()
    assert distillation_loss(student, teacher).item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_teacher_equal_to_student_gives_zero_kl_loss(folders, tmp_path, bf16):
    # max_tokens 200 with 4 x 32 tokens per step: 2 steps (the token budget rounds up to whole steps). Under bf16 the
    # teacher runs in the student's autocast, so the logits are the same: a float32 teacher against the bf16 student
    # would leave bf16 rounding in the loss (8e-6 here).
    summary = train(_settings(folders, tmp_path, teacher=str(folders / "student"), max_tokens=200, lr=1e-12, bf16=bf16))
    assert summary["steps"] == 2 and summary["tokens_seen"] == 256
    losses = [record["loss"] for record in read_metrics(summary["out_dir"]) if "loss" in record]
    assert len(losses) == 2 and max(abs(loss) for loss in losses) < (1e-7 if bf16 else 1e-5)
    assert not checkpoint_dirs(tmp_path / "run")  # save_every 0: no checkpoints, only final/


def test_distilling_a_perturbed_student_lowers_held_out_kl(folders, tmp_path, tokenizer):
    summary = train(_settings(folders, tmp_path))
    held_out = cached_blocks(tokenizer, "builtin", "validation", 32)[4:12]  # not the 4 blocks training evaluated
    teacher = AutoModelForCausalLM.from_pretrained(folders / "teacher")
    before = mean_kl(AutoModelForCausalLM.from_pretrained(folders / "student"), teacher, held_out)
    after = mean_kl(AutoModelForCausalLM.from_pretrained(summary["final_dir"]), teacher, held_out)
    assert after < 0.8 * before
    kls = [record["val_kl"] for record in read_metrics(summary["out_dir"]) if "val_kl" in record]
    assert len(kls) == 2 and kls[-1] < kls[0]
    assert (summary["initial_val_kl"], summary["final_val_kl"]) == (kls[0], kls[-1]) and not summary["diverged"]
    curves = loss_curves(read_metrics(summary["out_dir"]))  # loss_curve.png plots the KL beside the losses
    assert curves["validation KL to teacher"] == ([0, 6], kls) and len(curves["train"][0]) == 6


@pytest.mark.parametrize(
    ("alpha", "start", "end", "diverged", "unlikelihood"),
    [
        (1.0, (2.0, 0.5), (2.5, 0.4), False, 0.0),  # pure KL: the LM loss may rise while the KL falls
        (1.0, (2.0, 0.5), (1.5, 0.6), True, 0.0),
        (0.5, (2.0, 0.5), (2.5, 0.4), True, 0.0),  # half and half: 1.25 -> 1.45
        (0.5, (2.0, 0.5), (1.5, 0.6), False, 0.0),  # 1.25 -> 1.05
        (1.0, (2.0, None), (2.5, 0.4), True, 0.0),  # a checkpoint from before val_kl was kept: the LM loss decides
        (1.0, (2.0, 0.5), (float("nan"), 0.4), True, 0.0),  # a broken model diverged, whatever its KL
        (0.5, (2.0, 0.5), (float("inf"), 0.4), True, 0.0),
        (1.0, (2.0, 0.103), (1.9, 0.121), False, 0.3),  # unlikelihood may buy fewer repeats with a little KL
        (1.0, (2.0, 0.5), (float("nan"), 0.4), True, 0.3),  # but a broken model still diverged
        (1.0, (2.0, 0.5), (1.9, float("inf")), True, 0.3),
    ],
)
def test_divergence_is_judged_on_what_training_lowers(alpha, start, end, diverged, unlikelihood):
    settings = SimpleNamespace(distill_alpha=alpha, unlikelihood_weight=unlikelihood, attention_kl_weight=0.0)
    state = {"initial_val_loss": start[0], "initial_val_kl": start[1], "val_kl": end[1]}
    assert _ended_no_lower(settings, state, end[0]) is diverged


@pytest.mark.parametrize(("weight", "diverged"), [(0.0, True), (1.0, False)])
def test_divergence_counts_the_attention_maps_kl_at_its_weight(weight, diverged):
    """The logits' KL rose 0.50 -> 0.55 while the maps' fell 0.20 -> 0.10: at weight 1 the loss fell 0.70 -> 0.65."""
    settings = SimpleNamespace(distill_alpha=1.0, unlikelihood_weight=0.0, attention_kl_weight=weight)
    state = {"initial_val_loss": 2.0, "initial_val_kl": 0.5, "val_kl": 0.55, "initial_val_attention_kl": 0.2,
             "val_attention_kl": 0.1}  # fmt: skip
    assert _ended_no_lower(settings, state, 2.0) is diverged


def test_attention_kl_matches_the_textbook_sum_over_causal_maps():
    """Two stacks of causal attention maps (masked keys have probability 0): the mean over layers, batch, heads and
    query rows of sum_k p log(p / q), computed element by element; zero against itself; finite gradients although the
    student has zeros; rows before `first` left out."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.full((6, 6), float("-inf")).triu(1)

    def maps():
        return [(torch.randn(2, 3, 6, 6, generator=generator) + mask).softmax(-1) for _ in range(2)]

    teacher, student = maps(), [m.requires_grad_() for m in maps()]
    for first in (0, 2):
        reference = sum(float(t[b, h, i, k] * (t[b, h, i, k] / s[b, h, i, k].detach()).log())
                        for t, s in zip(teacher, student) for b in range(2) for h in range(3) for i in range(first, 6)
                        for k in range(i + 1)) / (2 * 2 * 3 * (6 - first))  # fmt: skip
        assert attention_kl(student, teacher, first).item() == pytest.approx(reference, rel=1e-5)
    assert attention_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    attention_kl(student, teacher).backward()
    assert all(torch.isfinite(m.grad).all() and m.grad.abs().sum() > 0 for m in student)
    with pytest.raises(ValueError, match="the student has 2 layers, the teacher 1"):
        attention_kl(student, teacher[:1])


def test_attention_kl_distillation_matches_the_maps_more_closely(folders, tmp_path, tokenizer):
    """`attention_kl_weight` 1: the first step's loss is the logits' KL plus the maps' KL of eager forwards, computed
    by hand; the held-out maps' KL falls further than logit-only distillation takes it; validation logs it; the saved
    model keeps the default attention kernel."""
    seen = []
    summary = train(_settings(folders, tmp_path, attention_kl_weight=1.0),
                    on_event=lambda event, **info: seen.append(info["input_ids"]) if event == "batch" else None)  # fmt: skip
    student, teacher = (AutoModelForCausalLM.from_pretrained(folders / name, attn_implementation="eager").eval()
                        for name in ("student", "teacher"))  # fmt: skip
    with torch.no_grad():
        s, t = (model(seen[0], output_attentions=True) for model in (student, teacher))
        expected = distillation_loss(s.logits, t.logits).item() + attention_kl(s.attentions, t.attentions).item()
    records = read_metrics(summary["out_dir"])
    assert next(r["loss"] for r in records if "loss" in r) == pytest.approx(expected, rel=1e-5)
    val_blocks = cached_blocks(tokenizer, "builtin", "validation", 32)[:4]
    initial = mean_attention_kl(student, teacher, val_blocks)
    maps_kls = [r["val_attention_kl"] for r in records if "val_attention_kl" in r]
    assert maps_kls[0] == pytest.approx(initial, rel=1e-5) == summary["initial_val_attention_kl"]
    assert summary["final_val_attention_kl"] == maps_kls[-1] and not summary["diverged"]
    assert "validation attention KL" in loss_curves(records)

    logits_only = train(_settings(folders, tmp_path, out=str(tmp_path / "logits-only")))
    held_out = cached_blocks(tokenizer, "builtin", "validation", 32)[4:12]
    final_maps_kl = {}
    for name, run in (("maps", summary), ("logits only", logits_only)):
        final = AutoModelForCausalLM.from_pretrained(run["final_dir"])
        assert final.config._attn_implementation == "sdpa"
        final.set_attn_implementation("eager")
        final_maps_kl[name] = mean_attention_kl(final, teacher, held_out)
    assert final_maps_kl["maps"] < 0.8 * min(final_maps_kl["logits only"], mean_attention_kl(student, teacher, held_out))
    assert "+ 1 x KL of the attention maps" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_mixed_loss_and_temperature_train(folders, tmp_path):
    summary = train(_settings(folders, tmp_path, distill_alpha=0.5, distill_temperature=2.0, max_steps=3))
    assert summary["steps"] == 3 and not summary["diverged"]
    assert "Distilled from" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_train_only_attention_leaves_other_weights_bit_identical(folders, tmp_path):
    summary = train(_settings(folders, tmp_path, train_only="attention", max_steps=3, lr=1e-2))
    before = load_file(folders / "student" / "model.safetensors")
    after = load_file(f"{summary['final_dir']}/model.safetensors")
    assert before.keys() == after.keys()
    attention = [name for name in before if ".self_attn." in name]
    others = [name for name in before if ".self_attn." not in name]
    assert attention and any("mlp" in name for name in others) and any("embed_tokens" in name for name in others)
    assert all(torch.equal(before[name], after[name]) for name in others)
    assert any(not torch.equal(before[name], after[name]) for name in attention)


def test_bad_distillation_settings_are_named(folders, tmp_path, tokenizer):
    base = _settings(folders, tmp_path)
    cases = [
        ({"distill_alpha": 1.5}, "distill_alpha"),
        ({"distill_temperature": 0}, "distill_temperature"),
        ({"distill_divergence": "js"}, "distill_divergence"),
        ({"teacher": None, "distill_divergence": "reverse"}, "need a `teacher`"),
        ({"train_only": "mlp"}, "train_only"),
        ({"save_every": -1}, "save_every"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"save_every": 0, "resume": True}, "resume"),
        ({"teacher": None, "distill_alpha": 0.5}, "need a `teacher`"),
        ({"teacher": None, "on_policy_fraction": 0.5, "on_policy_prompt_tokens": 8}, "need a `teacher`"),
        ({"on_policy_fraction": 1.5}, "on_policy_fraction"),
        ({"on_policy_fraction": 0.5, "on_policy_prompt_tokens": 32}, "on_policy_prompt_tokens"),
        ({"on_policy_fraction": 0.5, "on_policy_prompt_tokens": 0}, "on_policy_prompt_tokens"),
        ({"on_policy_temperature": -1.0}, "on_policy_temperature"),
        ({"unlikelihood_weight": 1.0}, "needs `on_policy_fraction`"),
        ({"on_policy_fraction": 0.5, "on_policy_prompt_tokens": 8, "unlikelihood_weight": -1.0}, "unlikelihood_weight"),
        ({"unlikelihood_ngram": 0}, "unlikelihood_ngram"),
        ({"attention_kl_weight": -1.0}, "attention_kl_weight"),
        ({"teacher": None, "attention_kl_weight": 1.0}, "need a `teacher`"),
        ({"init_from": None, "model": "tiny-mea"}, "needs `init_from`"),
        ({"tokenizer": str(folders / "student")}, "`tokenizer`"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainSettings.from_dict({**base, **overrides})

    with pytest.raises(ValueError, match="setting `max_tokens` 100 gives 1 steps"):
        train({**base, "max_tokens": 100})
    with pytest.raises(FileNotFoundError, match="setting `teacher`"):
        train({**base, "teacher": str(tmp_path / "missing")})
    other_vocab = tmp_path / "other-vocab"
    save_folder(tiny_model(vocab_size=len(tokenizer) + 8), other_vocab, tokenizer)
    with pytest.raises(ValueError, match="setting `teacher`.*vocab_size"):
        train({**base, "teacher": str(other_vocab), "out": str(tmp_path / "run2")})
    deeper = tmp_path / "deeper"
    save_folder(tiny_model(vocab_size=len(tokenizer), num_hidden_layers=3), deeper, tokenizer)
    with pytest.raises(ValueError, match="student has 2 layers of 4 query heads, the teacher 3 of 4"):
        train({**base, "teacher": str(deeper), "attention_kl_weight": 1.0, "out": str(tmp_path / "run3")})


def test_cli_distills_with_flags(folders, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "--init-from", str(folders / "student"), "--teacher", str(folders / "teacher"),
            "--train-only", "attention", "--distill-alpha", "0.9", "--save-every", "0", "--data", "builtin",
            "--block-size", "32", "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--eval-blocks", "2",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    assert (out / "final" / "model.safetensors").is_file() and not checkpoint_dirs(out)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_on_policy_micro_batch_is_the_students_greedy_continuation_scored_by_kl(
    folders, tmp_path, tokenizer, divergence
):
    """fraction 1, temperature 0: every block keeps its first 8 tokens and the rest is what `generate()` (greedy)
    writes; the first step's loss is the KL at the positions that predict the student's tokens, computed by hand,
    and the validation KL is the chosen divergence on the first 4 held-out blocks."""
    seen = []
    summary = train(_settings(folders, tmp_path, on_policy_fraction=1.0, on_policy_prompt_tokens=8,
                              on_policy_temperature=0.0, max_steps=2, distill_divergence=divergence),
                    on_event=lambda event, **info: seen.append(info) if event == "batch" else None)  # fmt: skip
    assert len(seen) == 2 and all(info["on_policy"] for info in seen)
    student = AutoModelForCausalLM.from_pretrained(folders / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(folders / "teacher").eval()
    first = seen[0]["input_ids"]
    data_blocks = cached_blocks(tokenizer, "builtin", "train", 32)
    assert any(torch.equal(first[0, :8], block[:8].long()) for block in data_blocks)  # the prompt is a data block's
    with torch.no_grad():
        greedy = student.generate(input_ids=first[:, :8], attention_mask=torch.ones_like(first[:, :8]),
                                  max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)  # fmt: skip
        assert torch.equal(first, greedy)
        expected = distillation_loss(student(first).logits[:, 7:], teacher(first).logits[:, 7:], 1, divergence).item()
        everywhere = distillation_loss(student(first).logits, teacher(first).logits, 1, divergence).item()
    val_blocks = cached_blocks(tokenizer, "builtin", "validation", 32)[:4]
    val_kl = mean_kl(student, teacher, val_blocks, divergence=divergence)
    records_all = read_metrics(summary["out_dir"])
    records = [record for record in records_all if "loss" in record]
    assert records[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert records[0]["on_policy_loss"] == records[0]["loss"] and abs(everywhere - expected) > 1e-4 * expected
    assert next(record["val_kl"] for record in records_all if "val_kl" in record) == pytest.approx(val_kl, rel=1e-5)
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "On-policy: 1 of the micro-batches" in card and f"{divergence} KL" in card


def test_on_policy_share_and_samples_are_seeded_and_resume_exactly(folders, tmp_path):
    """fraction 0.5 at temperature 1 over 6 micro-batches (grad_accum 2): both kinds occur, the on-policy ones are
    sampled (not greedy), the same seed draws the same batches, and a run resumed from a checkpoint logs what the
    uninterrupted run logged."""

    def run(out, **overrides):
        seen = []
        settings = _settings(folders, tmp_path, on_policy_fraction=0.5, on_policy_prompt_tokens=4, grad_accum=2,
                             max_steps=3, save_every=1, out=str(out), **overrides)  # fmt: skip
        summary = train(settings, on_event=lambda event, **info: seen.append(info) if event == "batch" else None)
        return summary, seen

    reference, batches = run(tmp_path / "reference")
    kinds = [info["on_policy"] for info in batches]
    assert len(kinds) == 6 and 0 < sum(kinds) < 6
    _, batches_again = run(tmp_path / "again")
    assert [info["on_policy"] for info in batches_again] == kinds
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, batches_again))
    student = AutoModelForCausalLM.from_pretrained(folders / "student").eval()
    sampled = next(info["input_ids"] for info in batches if info["on_policy"] and info["step"] == 0)
    with torch.no_grad():
        greedy = student.generate(input_ids=sampled[:, :4], attention_mask=torch.ones_like(sampled[:, :4]),
                                  max_new_tokens=28, min_new_tokens=28, do_sample=False, pad_token_id=0)  # fmt: skip
    assert not torch.equal(sampled, greedy)
    records = read_metrics(reference["out_dir"])
    assert any("on_policy_loss" in record for record in records)

    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "reference", interrupted)
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(checkpoint_dirs(interrupted)[-1])  # resume from step 2
    resumed, resumed_batches = run(interrupted, resume=True)
    assert [info["step"] for info in resumed_batches] == [2, 2]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed_batches, batches[4:], strict=True))
    assert read_metrics(resumed["out_dir"]) == records


_GREEDY_ON_POLICY = {"max_steps": 2, "eval_every": 2, "eval_blocks": 2, "on_policy_fraction": 1.0,
                     "on_policy_prompt_tokens": 8, "on_policy_temperature": 0.0}  # fmt: skip


def test_on_policy_loss_adds_the_weighted_unlikelihood_of_the_students_repeats(folders, tmp_path):
    seen = []
    summary = train(_settings(folders, tmp_path, **_GREEDY_ON_POLICY, unlikelihood_weight=0.5, unlikelihood_ngram=2),
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
        settings = {**_GREEDY_ON_POLICY, "max_steps": 4, "out": str(out)}
        train(_settings(folders, tmp_path, **settings, unlikelihood_weight=weight, unlikelihood_ngram=2),
              on_event=on_batch)  # fmt: skip
        trained = AutoModelForCausalLM.from_pretrained(out / "final").eval()
        with torch.no_grad():
            terms[weight] = unlikelihood_loss(trained(seen[0]).logits, seen[0], 2, 8).item()
    assert terms[20.0] < 0.5 * terms[0.0]

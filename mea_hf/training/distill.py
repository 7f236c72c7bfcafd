"""Recovery by distillation: match a teacher's next-token distribution (KL divergence), optionally mixed with the
LM loss, and train only the attention parameters if asked.

The teacher (usually the uncompressed model the student was compressed from) runs in eval mode without gradients.
The loss per token is `T^2 * KL` between the temperature-softened distributions, averaged over every position of
every block (the T^2 keeps gradient sizes comparable across temperatures, as in Hinton et al. 2015). The divergence
is "forward", KL(teacher || student), which spreads the student's mass over everything the teacher finds likely, or
"reverse", KL(student || teacher), which charges the student most for mass on tokens the teacher finds unlikely
(mode-seeking; Gu et al. 2024, "MiniLLM", and Agarwal et al. 2024 pair it with on-policy samples).

`attention_kl` adds the attention maps themselves (Wang et al. 2020, "MiniLM"): KL(teacher || student) between the
attention probabilities of every layer and query head. A compressed layer's keys cannot always tell which earlier
token the original attended to, and matching only the output lets the student attend more softly instead.
"""

from pathlib import Path

import torch

from .settings import DIVERGENCES, TRAIN_ONLY


class _KLFromLogits(torch.autograd.Function):
    """Mean over rows of KL(softmax(teacher) || softmax(student)), or KL(softmax(student) || softmax(teacher)) when
    `reverse`, in a few full-vocabulary buffers: the forward keeps only the gradient (times the rows). Forward KL's is
    p_student - p_teacher; reverse KL's is p_student * (log p_student - log p_teacher - the row's KL). With SmolLM2's
    49,152-token vocabulary a batch of 2,048 tokens has 400 MB logits, and the textbook composition (log-softmaxes,
    kl_div and their backward) allocates and page-faults many such buffers a step."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, reverse: bool) -> torch.Tensor:
        rows = student.shape[0]
        log_student = student.log_softmax(-1)
        log_teacher = teacher.log_softmax(-1)
        if reverse:
            p_student = log_student.exp()
            log_ratio = log_student.sub_(log_teacher)
            row_kl = (p_student * log_ratio).sum(-1, keepdim=True)
            kl = row_kl.sum() / rows
            ctx.save_for_backward(log_ratio.sub_(row_kl).mul_(p_student))
            return kl
        p_teacher = log_teacher.exp()
        kl = log_teacher.sub_(log_student).mul_(p_teacher).sum() / rows  # sum(): pairwise, exact enough at 1e8 terms
        ctx.save_for_backward(log_student.exp_().sub_(p_teacher))
        return kl

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return gradient * (grad_output / gradient.shape[0]), None, None


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, divergence: str = "forward"
):
    """Mean over tokens of T^2 * KL(teacher || student) ("forward") or KL(student || teacher) ("reverse") on
    temperature-softened distributions."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
    vocab = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    teacher = teacher_logits.detach().float().reshape(-1, vocab)
    if temperature != 1:
        student, teacher = student / temperature, teacher / temperature
    return _KLFromLogits.apply(student, teacher, divergence == "reverse") * temperature**2


def attention_kl(student_attentions, teacher_attentions, first: int = 0) -> torch.Tensor:
    """Mean over layers, batch, heads and the query positions from `first` on of KL(teacher || student) between the
    attention probabilities (`output_attentions=True` of an eager forward: one (batch, heads, queries, keys) tensor
    per layer). Masked keys have probability 0 in both and add nothing."""
    if len(student_attentions) != len(teacher_attentions):
        raise ValueError(f"attention KL: the student has {len(student_attentions)} layers, the teacher "
                         f"{len(teacher_attentions)}.")  # fmt: skip
    total = 0.0
    for student, teacher in zip(student_attentions, teacher_attentions):
        student, teacher = student[:, :, first:].float(), teacher[:, :, first:].detach().float()
        tiny = torch.finfo(student.dtype).tiny
        total = total + (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(tiny).log()).sum(-1).mean()
    return total / len(student_attentions)


@torch.no_grad()
def mean_kls(
    student, teacher, blocks: torch.Tensor, batch_size: int = 8, temperature: float = 1.0, divergence: str = "forward",
    attention: bool = False,
) -> dict[str, float]:
    """Means over the tokens of `blocks`, from one forward pass of each model (eval mode, no gradients): the
    distillation loss of `student` against `teacher` ("kl") and, with `attention`, the `attention_kl` of their maps
    ("attention_kl"; both models eager)."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    totals, tokens = dict.fromkeys(["kl", "attention_kl"] if attention else ["kl"], 0.0), 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].long().to(device)
        ours, theirs = (model(input_ids=batch, use_cache=False, output_attentions=attention)
                        for model in (student, teacher))  # fmt: skip
        totals["kl"] += distillation_loss(ours.logits, theirs.logits, temperature, divergence).item() * batch.numel()
        if attention:
            totals["attention_kl"] += attention_kl(ours.attentions, theirs.attentions).item() * batch.numel()
        tokens += batch.numel()
    student.train(was_training)
    return {name: total / tokens for name, total in totals.items()}


def mean_kl(
    student, teacher, blocks: torch.Tensor, temperature: float = 1.0, batch_size: int = 8, divergence: str = "forward"
) -> float:
    """Mean per-token distillation loss of `student` against `teacher` on token `blocks`."""
    return mean_kls(student, teacher, blocks, batch_size, temperature, divergence)["kl"]


def mean_attention_kl(student, teacher, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """`attention_kl` of `student` against `teacher` on token `blocks`, averaged over them (both eager)."""
    return mean_kls(student, teacher, blocks, batch_size, attention=True)["attention_kl"]


def load_teacher(folder: str, student, tokenizer, device):
    """The saved model in `folder`, in float32, eval mode and frozen on `device`, checked against the student's
    vocabulary (same vocab_size, and the same token->id map when the folder has a tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mea_hf  # noqa: F401  (registers "mea")

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"setting `teacher`: {folder} is not a saved model folder (no config.json).")
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(
            f"setting `teacher`: {folder} has vocab_size {teacher.config.vocab_size}, the student "
            f"{student.config.vocab_size}; distillation needs the same vocabulary."
        )
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if has_tokenizer and AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"setting `teacher`: the tokenizer of {folder} differs from the student's.")
    teacher.config.use_cache = False
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def apply_train_only(model, train_only: str) -> None:
    """Freeze every parameter outside the attention blocks (`train_only="attention"`); "all" changes nothing."""
    if train_only not in TRAIN_ONLY:
        raise ValueError(f"setting `train_only` must be one of {TRAIN_ONLY}, got {train_only!r}.")
    if train_only == "all":
        return
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".self_attn." in name)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError("setting `train_only='attention'`: the model has no `self_attn` parameters to train.")

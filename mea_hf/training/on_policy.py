"""On-policy distillation: the student writes the text it is scored on.

Teacher-forced distillation (`distill.py`) scores the student only on the data's text, never on its own
continuations, and that is where a compressed model's greedy loops start (docs/coherence.md). On an
on-policy micro-batch (a seeded share `on_policy_fraction` of them) the first `on_policy_prompt_tokens` tokens of
every block stay, the student continues them to the block's length (eval mode, no gradients, its own cache), sampled
at `on_policy_temperature` (0: greedy), and the loss is the KL to the teacher at the positions that predict the
student's tokens. This is the on-policy half of generalised knowledge distillation (Agarwal et al. 2024, "On-Policy
Distillation of Language Models"), with the forward KL that the teacher-forced loss uses.

Both choices are seeded by (seed, micro-batch number), so a resumed run draws the same batches and samples.
"""

import torch

# Distinct streams for "is this micro-batch on-policy?" and for the student's samples.
_CHOICE_STREAM, _SAMPLE_STREAM = 1, 2


def _seed(seed: int, micro_batch: int, stream: int, process: int = 0) -> int:
    return (((seed * 1_000_003 + micro_batch) * 7 + stream) * 65_537 + process) % 2**63


def is_on_policy(seed: int, micro_batch: int, fraction: float) -> bool:
    """Does micro-batch number `micro_batch` (counted from the run's start) get the student's own text? A seeded draw
    with probability `fraction`, the same on every process."""
    if fraction in (0.0, 1.0):
        return fraction == 1.0
    generator = torch.Generator().manual_seed(_seed(seed, micro_batch, _CHOICE_STREAM))
    return torch.rand((), generator=generator).item() < fraction


@torch.no_grad()
def student_continuations(model, input_ids: torch.Tensor, prompt_tokens: int, temperature: float,
                          seed: int) -> torch.Tensor:  # fmt: skip
    """`input_ids` (batch, block) with everything after the first `prompt_tokens` tokens written by `model`: sampled
    at `temperature` with no top-k/top-p truncation, or greedy at 0, seeded by `seed`. The student never stops early
    (its end-of-sequence token is suppressed), so every block keeps its length."""
    prompts = input_ids[:, :prompt_tokens]
    new_tokens = input_ids.shape[1] - prompt_tokens
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False}  # fmt: skip
    pad = next((token for token in (model.generation_config.pad_token_id, model.generation_config.eos_token_id)
                if token is not None), 0)  # fmt: skip
    pad = pad[0] if isinstance(pad, list) else pad
    was_training = model.training
    model.eval()
    devices = [prompts.device] if prompts.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, use_cache=True, pad_token_id=pad, **sampling,
            )  # fmt: skip
    finally:
        model.train(was_training)
    return output


def sample_seed(seed: int, micro_batch: int, process: int) -> int:
    """The seed of the student's samples for one micro-batch on one process."""
    return _seed(seed, micro_batch, _SAMPLE_STREAM, process)

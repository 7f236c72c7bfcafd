"""The model can learn: a few hundred AdamW steps on packed blocks of the built-in corpus bring the training loss far
below its initial value and below the unigram entropy of the data (so it uses context, not only token frequencies),
and lower the loss on held-out documents too."""

import math
from collections import Counter

import pytest
import torch
from helpers import tiny_mea_config

from mea_hf import MEAForCausalLM
from mea_hf.data.corpus import builtin_corpus
from mea_hf.data.loading import pack_blocks
from mea_hf.evaluation.loss import mean_token_loss

pytestmark = pytest.mark.slow  # subprocesses / real training runs

STEPS, BATCH, BLOCK, LR = 300, 8, 32, 1e-2


def unigram_entropy(blocks: torch.Tensor) -> float:
    """Entropy (nats/token) of the token frequencies of `blocks`: the best loss without using any context."""
    counts = Counter(blocks.flatten().tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_a_few_hundred_steps_reduce_the_loss_clearly(tokenizer):
    corpus = builtin_corpus()
    train_blocks = pack_blocks(tokenizer, corpus["train"][:40], BLOCK, max_blocks=256).long()
    val_blocks = pack_blocks(tokenizer, corpus["validation"][:10], BLOCK, max_blocks=32)
    config = tiny_mea_config(vocab_size=len(tokenizer), num_component_heads=1)  # compressed: 1 of 2 KV heads
    model = MEAForCausalLM(config)
    initial_train, initial_val = mean_token_loss(model, train_blocks), mean_token_loss(model, val_blocks)

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        batch = train_blocks[torch.randint(len(train_blocks), (BATCH,), generator=generator)]
        model(batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    final_train, final_val = mean_token_loss(model, train_blocks), mean_token_loss(model, val_blocks)
    baseline = unigram_entropy(train_blocks)
    print(
        f"\ntrain loss {initial_train:.3f} -> {final_train:.3f}, held-out {initial_val:.3f} -> {final_val:.3f} "
        f"after {STEPS} steps; unigram entropy of the training tokens {baseline:.3f}"
    )
    assert math.isclose(initial_train, math.log(len(tokenizer)), rel_tol=0.05)  # starts near uniform
    assert final_train < 0.6 * initial_train
    assert final_train < baseline
    assert final_val < 0.9 * initial_val

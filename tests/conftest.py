"""Shared fixtures: offline environment, seeds, tiny configs and a tokenizer trained on the built-in corpus."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MEA_HF_CACHE" not in os.environ:  # a throw-away cache for the session: leave ~/.cache alone
    os.environ["MEA_HF_CACHE"] = tempfile.mkdtemp(prefix="mea-hf-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEA_HF_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

import mea_hf  # noqa: E402,F401

# Tiny models run faster on one thread, and the suite stays quick on a busy 2-core machine.
torch.set_num_threads(1)

TINY_DIMS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_mea_config(**overrides):
    """A 2-layer MEA config small enough for any test; keyword arguments override fields."""
    return mea_hf.MEAConfig(**{**TINY_DIMS, **overrides})


def perturb_(model, scale: float = 0.1, seed: int = 0):
    """Add seeded noise to every parameter (HLC and norm scales included) so nothing is identity or one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    """A 512-token byte-level BPE tokenizer trained on a slice of the built-in corpus."""
    from mea_hf.corpus import builtin_corpus
    from mea_hf.tokenizer import train_tokenizer

    return train_tokenizer(builtin_corpus()["train"][:40], vocab_size=512)

"""Shared fixtures: offline environment, seeds and a tokenizer trained on the built-in corpus (the tiny model
factory and the no-mea_hf harness are in helpers.py)."""

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

import pytest
import torch

import mea_hf  # noqa: F401

# Tiny models run faster on one thread, and the suite stays quick on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    """A 512-token byte-level BPE tokenizer trained on a slice of the built-in corpus."""
    from mea_hf.data.corpus import builtin_corpus
    from mea_hf.data.tokenizer import train_tokenizer

    return train_tokenizer(builtin_corpus()["train"][:40], vocab_size=512)

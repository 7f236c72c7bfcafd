"""What many tests share: the tiny model factory and the "run this in a Python without mea_hf" harness."""

import json
import os
import subprocess
import sys

import torch
from transformers import LlamaConfig

import mea_hf

TINY_DIMS = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_mea_config(**overrides) -> mea_hf.MEAConfig:
    """A 2-layer MEA config small enough for any test; keyword arguments override fields."""
    return mea_hf.MEAConfig(**{**TINY_DIMS, **overrides})


def perturb_(model, scale: float = 0.1, seed: int = 0):
    """Add seeded noise to every parameter (HLC and norm scales included) so nothing is identity or one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def tiny_model(model_class=None, seed: int = 0, scale: float = 0.1, attn_implementation: str | None = None,
               **overrides):  # fmt: skip
    """A seeded, perturbed tiny model in eval mode. MEA (`MEAForCausalLM`, config from `tiny_mea_config`) unless
    `model_class` is a transformers Llama-family class, which gets a `LlamaConfig` of the same dims."""
    model_class = model_class or mea_hf.MEAForCausalLM
    is_mea = model_class.config_class is mea_hf.MEAConfig
    config = tiny_mea_config(**overrides) if is_mea else LlamaConfig(**{**TINY_DIMS, **overrides})
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=attn_implementation)
    return perturb_(model, scale=scale, seed=seed).eval()


# Prepended to subprocess scripts: any `import mea_hf` fails, as on a machine that only has transformers.
BLOCK_MEA_HF = """
import sys
class _BlockMeaHf:
    def find_spec(self, name, path=None, target=None):
        if name == "mea_hf" or name.startswith("mea_hf."):
            raise ImportError(f"{name} is blocked in this process")
        return None
sys.meta_path.insert(0, _BlockMeaHf())
"""


def run_without_mea_hf(script: str, cwd=None, env: dict | None = None) -> dict:
    """Run `script` in a fresh Python where mea_hf cannot be imported (what loading a folder from the Hub with
    `trust_remote_code=True` does); it prints one JSON line, returned parsed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": "", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_MEA_HF + script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Do you wish to run the custom code" not in done.stdout
    return json.loads(done.stdout.strip().splitlines()[-1])

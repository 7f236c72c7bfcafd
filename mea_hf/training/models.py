"""What a training run starts from: the model-size configs that ship with mea-hf, a fresh or saved model, and the
tokenizer."""

import json
from pathlib import Path

import torch

from ..resources import resource_dir
from .settings import TrainSettings

MODEL_CONFIG_DIR = resource_dir("models")


def model_config_path(model: str) -> Path:
    """`mea_hf/resources/models/<model>.json`, or `model` itself when it is a path to a JSON file."""
    path = Path(model)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist.")
        return path
    path = MODEL_CONFIG_DIR / f"{model}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise ValueError(f"unknown model {model!r}; choose one of {known} or give a config JSON path.")
    return path


def model_config(model: str, **overrides):
    """The transformers config of `mea_hf/resources/models/<model>.json` (or a config JSON path), fields overridden."""
    from transformers import AutoConfig

    import mea_hf  # noqa: F401  (registers "mea")

    path = model_config_path(model)
    fields = json.loads(path.read_text(encoding="utf-8"))
    model_type = fields.pop("model_type", None)
    if model_type not in ("mea", "llama"):
        raise ValueError(f"model config {path}: `model_type` must be 'mea' or 'llama', got {model_type!r}.")
    return AutoConfig.for_model(model_type, **{**fields, **overrides})


def build_model(model: str, tokenizer, block_size: int):
    """A freshly initialised causal LM from a config JSON ("model_type" mea or llama), sized to `tokenizer`."""
    from transformers import AutoModelForCausalLM

    config = model_config(
        model,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"block_size {block_size} exceeds max_position_embeddings {config.max_position_embeddings} of {model}."
        )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_tokenizer(settings: TrainSettings):
    """The tokenizer folder given, the one saved with `init_from`, or one trained (and cached) on the data."""
    from transformers import AutoTokenizer

    from ..data.loading import cached_tokenizer

    folder = settings.tokenizer or settings.init_from
    if folder:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist.")
        return AutoTokenizer.from_pretrained(folder)
    return cached_tokenizer(settings.data, settings.vocab_size, settings.cache_dir)


def load_initial_model(settings: TrainSettings, tokenizer):
    """A fresh `settings.model`, or the saved `settings.init_from` folder, in float32 and without a KV cache."""
    if not settings.init_from:
        return build_model(settings.model, tokenizer, settings.block_size)
    from transformers import AutoModelForCausalLM

    import mea_hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(settings.init_from, dtype=torch.float32)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but {settings.init_from} has vocab_size {model.config.vocab_size}."
        )
    model.config.use_cache = False
    return model

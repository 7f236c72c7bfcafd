"""Reading saved model folders: one check for "is this a model folder (of an MEA model)?", one loader."""

import os
from pathlib import Path

import torch

from ..convert import SUPPORTED_MODEL_TYPES, load_tokenizer


def check_model_folder(folder: str | os.PathLike, mea_only: bool = False, what: str = "model folder"):
    """The folder's transformers config, or a clear error: no such folder, no config.json, or (with `mea_only`)
    another model type, with a hint to convert Llama-family folders first. `what` names the folder in messages
    (e.g. "--model")."""
    from transformers import AutoConfig

    import mea_hf  # noqa: F401  (registers model_type "mea")

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path}: no such folder (it does not exist)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path} has no config.json: not a saved model folder")
    config = AutoConfig.from_pretrained(path)
    if mea_only and config.model_type != "mea":
        hint = " Run `mea convert --model FOLDER --out MEA_FOLDER` first." if config.model_type in SUPPORTED_MODEL_TYPES else ""
        raise ValueError(f"{what} {path} is a {config.model_type!r} model, not an MEA model.{hint}")
    return config


def load_folder(path, dtype: str = "auto"):
    """(model, tokenizer) of a saved causal-LM folder in eval mode; the tokenizer is None when the folder has none."""
    from transformers import AutoModelForCausalLM

    import mea_hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    return model.eval(), load_tokenizer(path)

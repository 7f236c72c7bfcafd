"""Hub-ready model folders: safetensors weights, remote code, tokenizer and model card, written atomically."""

import os
import tempfile
from pathlib import Path

from ..utils.atomic import atomic_dir, atomic_write_text
from .model_card import render_model_card


def save_folder(model, path, tokenizer=None, card: dict | None = None, overwrite: bool = False) -> Path:
    """Save `model` (and `tokenizer`) to `path` as a folder that `from_pretrained` and the Hub accept.

    MEA models get their model code (`configuration_mea.py`, `modeling_mea.py`, `cache_mea.py`, `paged_attention.py`)
    copied beside the weights, so the folder loads with `trust_remote_code=True` without mea_hf. `card` holds extra
    model-card facts (how it was made, base model, measured results). `push_folder` uploads exactly this folder.
    """
    import mea_hf  # noqa: F401  (registers the Auto classes and the remote-code files)

    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_text(Path(tmp) / "README.md", render_model_card(model.config, **(card or {})))
    return Path(os.fspath(path))


def push_folder(
    model, repo_id: str, tokenizer=None, card: dict | None = None, private: bool | None = None, token=None
) -> str:
    """Upload to the Hub repo `repo_id` exactly the folder `save_folder` writes (weights, remote code, tokenizer,
    model card), creating the repo if needed. Returns the commit URL. Needs network access and a Hub token."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mea-push-") as staging:
        folder = save_folder(model, Path(staging) / "model", tokenizer, card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload MEA model").commit_url

"""Loaders for the offline mea-hf lm-eval tasks (referenced as `custom_dataset: !function offline_data.NAME`).

The JSONL files live in `data/` next to this file, so the tasks work from any current directory; lm-eval itself
would resolve `dataset_kwargs.data_files` against the current directory. Rebuild them with
`python scripts/make_lm_eval_data.py`.
"""

from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def _load(name: str) -> datasets.DatasetDict:
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python scripts/make_lm_eval_data.py`.")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def heldout_chunks(**_metadata) -> datasets.DatasetDict:
    return _load("heldout_chunks")


def next_line(**_metadata) -> datasets.DatasetDict:
    return _load("next_line")


def complete_line(**_metadata) -> datasets.DatasetDict:
    return _load("complete_line")

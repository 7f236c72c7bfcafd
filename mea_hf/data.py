"""Training data: documents in, fixed-length token blocks out, cached on disk.

Sources (`source` / the `data` training setting):
- "builtin" (or None): the text that ships with Python (`mea_hf.corpus`), split by a stable hash of each file name.
- a local `.txt`/`.md` file (one document), a `.jsonl` file (one document per line, in its "text" field), or a folder
  holding such files (searched recursively). Documents go to validation by the same stable name hash as the built-in
  corpus; when that leaves a split empty (a handful of documents), every document is instead cut at the line nearest
  95% of its length: the head trains, the tail validates.
- anything else is a `datasets` name (`datasets.load_dataset(name)`, "text" column; needs Hub access or a local
  datasets cache). A dataset without a "validation" split gets a seeded 5% `train_test_split`.

Blocks are cached under `cache_dir` keyed by the data (paths, sizes, mtimes), the tokenizer and the block size, so a
second run or another process reads them instead of tokenising again.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from .atomic import atomic_dir, atomic_file
from .corpus import VALIDATION_PERCENT, builtin_corpus, is_validation

SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$MEA_HF_CACHE`, else `~/.cache/mea_hf`."""
    return Path(os.environ.get("MEA_HF_CACHE", Path.home() / ".cache" / "mea_hf"))


def _is_builtin(source) -> bool:
    return source in (None, "builtin")


def _is_local(source: str) -> bool:
    """An existing path, or something that can only be meant as one (a missing file gets a FileNotFoundError)."""
    path_like = source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
    return path_like or Path(source).expanduser().exists()


def _data_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data {source!r} does not exist (expected 'builtin', a .txt/.jsonl file or folder, or a dataset name)."
        )
    if path.is_file():
        if not path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
            raise ValueError(
                f"data file {path} has an unsupported extension; use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}."
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
    if not files:
        raise ValueError(f"data folder {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files.")
    return files


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"data file {path} is not valid UTF-8: byte {raw[error.start]:#04x} at offset {error.start} ({error.reason})."
        ) from None
    if not text.strip():
        raise ValueError(f"data file {path} is empty.")
    return text


def _file_documents(path: Path) -> list[tuple[str, str]]:
    text = _read_utf8(path)
    if not path.name.endswith(JSONL_SUFFIXES):
        return [(str(path), text)]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"data file {path} line {number} is not valid JSON: {error.msg}.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'data file {path} line {number} has no string "text" field.')
        if record["text"].strip():
            documents.append((f"{path}:{number}", record["text"]))
    if not documents:
        raise ValueError(f'data file {path} has no non-empty "text" records.')
    return documents


def _split_tail(text: str) -> tuple[str, str]:
    """Cut `text` at the line boundary nearest 95% of its length: (head, tail)."""
    target = len(text) * (100 - VALIDATION_PERCENT) // 100
    cut = text.rfind("\n", 0, target) + 1 or target
    return text[:cut], text[cut:]


def _local_splits(source: str) -> dict[str, list[str]]:
    named = [doc for path in _data_files(source) for doc in _file_documents(path)]
    splits = {"train": [], "validation": []}
    for name, text in named:
        splits["validation" if is_validation(name) else "train"].append(text)
    if splits["train"] and splits["validation"]:
        return splits
    heads, tails = zip(*(_split_tail(text) for _, text in named))
    return {"train": [t for t in heads if t.strip()], "validation": [t for t in tails if t.strip()]}


def _dataset_split(name: str, split: str) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown name, no access: one clear message
        raise ValueError(
            f"data {name!r} is neither 'builtin' nor a local file or folder, and datasets.load_dataset({name!r}) "
            f"failed: {type(error).__name__}: {error}"
        ) from None
    if "validation" not in dataset:
        dataset = dataset["train"].train_test_split(test_size=VALIDATION_PERCENT / 100, seed=0)
        dataset = {"train": dataset["train"], "validation": dataset["test"]}
    column = dataset[split]
    if "text" not in column.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {column.column_names}).")
    return [text for text in column["text"] if text and text.strip()]


def load_documents(source: str | None = None, split: str = "train") -> list[str]:
    """Documents of `split` ("train" or "validation") from `source` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if _is_builtin(source):
        return builtin_corpus()[split]
    source = os.fspath(source)
    if _is_local(source):
        documents = _local_splits(source)[split]
    else:
        documents = _dataset_split(source, split)
    if not documents:
        raise ValueError(f"the {split} split of data {source!r} is empty.")
    return documents


def pack_blocks(tokenizer, documents: list[str], block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise `documents`, join them with the EOS token and cut the stream into (n, block_size) blocks."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    stream: list[int] = []
    chunk = 64
    for start in range(0, len(documents), chunk):
        for ids in tokenizer(documents[start : start + chunk], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
        if max_blocks is not None and len(stream) >= max_blocks * block_size:
            break
    n_blocks = len(stream) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the data has {len(stream)} tokens, fewer than one block of block_size={block_size}.")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def data_fingerprint(source: str | None) -> str:
    """A string that changes when the data changes: file paths, sizes and mtimes; the Python version for builtin."""
    if _is_builtin(source):
        return f"builtin:python{sys.version_info.major}.{sys.version_info.minor}:{VALIDATION_PERCENT}"
    source = os.fspath(source)
    if not _is_local(source):
        return f"dataset:{source}"
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _data_files(source)]
    return "files:" + json.dumps(stats)


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([_CACHE_FORMAT, *parts]).encode()).hexdigest()[:20]


def cached_blocks(tokenizer, source, split: str, block_size: int, cache_dir=None) -> torch.Tensor:
    """`pack_blocks(tokenizer, load_documents(source, split), block_size)`, read from / written to the cache."""
    key = _cache_key(data_fingerprint(source), tokenizer_fingerprint(tokenizer), split, block_size)
    path = Path(cache_dir or default_cache_dir()) / "blocks" / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    try:
        blocks = pack_blocks(tokenizer, load_documents(source, split), block_size)
    except ValueError as error:
        if "fewer than one block" not in str(error):
            raise
        raise ValueError(
            f"the {split} split of data {source or 'builtin'!r}: {error} Use a smaller block_size or more data."
        ) from None
    with atomic_file(path) as tmp:
        torch.save(blocks, tmp)
    return blocks


def cached_tokenizer(source, vocab_size: int, cache_dir=None):
    """A BPE tokenizer trained on the train split of `source` (`mea_hf.tokenizer.train_tokenizer`), cached."""
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import train_tokenizer

    folder = Path(cache_dir or default_cache_dir()) / "tokenizers" / _cache_key(data_fingerprint(source), vocab_size)
    if not folder.exists():
        tokenizer = train_tokenizer(load_documents(source, "train"), vocab_size=vocab_size)
        try:
            with atomic_dir(folder) as tmp:
                tokenizer.save_pretrained(tmp)
        except FileExistsError:  # another process finished first
            pass
    return PreTrainedTokenizerFast.from_pretrained(folder)

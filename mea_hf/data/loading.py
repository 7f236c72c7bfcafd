"""Training data through `datasets`: documents in, fixed-length token blocks out, cached on disk.

Sources (`source` / the `data` training setting), each loaded as a `datasets.Dataset` with a "text" column:
- "builtin" (or None): the text that ships with Python (`mea_hf.data.corpus`).
- a local `.txt`/`.md` file (one document), a `.jsonl` file (one document per line, in its "text" field), or a folder
  holding such files (searched recursively): read by a checking generator into `Dataset.from_generator`, an Arrow
  file under `cache_dir/datasets` keyed by the files' paths, sizes and mtimes. A bad file fails with its name and the
  problem (line number, byte offset) before anything is cached.
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: `datasets.load_from_disk`.
- anything else: `datasets.load_dataset(name)`, or `load_dataset(name, config)` for "name:config". That covers Hub
  datasets (Hub access or the local datasets cache) and local dataset folders of parquet/csv/arrow files.

Splits: a source's own "validation" split when it has one (Hub datasets). Otherwise a document goes to validation by
a stable hash of its name (`corpus.is_validation`): the file name for the built-in corpus; for local files the path
relative to the source folder (the file's own name for a single-file source), with `:line` for JSONL, so the split
does not change when the data moves; the row number for datasets. When that leaves a split empty (a handful of
documents), every document is instead cut at the line nearest 95% of its length: the head trains, the tail validates.

Blocks are int32 tensors (n_blocks, block_size). `cached_blocks` keeps them as `.npy` files under `cache_dir`, keyed
by the data, the tokenizer and the block size, and memory-maps them, so processes and later runs share one copy.
"""

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..utils.atomic import atomic_dir, atomic_file
from .corpus import VALIDATION_PERCENT, builtin_documents, is_validation

SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes
_READ_BATCH = 256  # documents read (and tokenised) at a time
_CACHE_FORMAT = 2  # 2: local documents named relative to the source (the split changed)


def default_cache_dir() -> Path:
    """`$MEA_HF_CACHE`, else `~/.cache/mea_hf`."""
    return Path(os.environ.get("MEA_HF_CACHE", Path.home() / ".cache" / "mea_hf"))


def _is_builtin(source) -> bool:
    return source in (None, "builtin")


def _is_local(source: str) -> bool:
    """An existing path, or something that can only be meant as one (a missing file gets a FileNotFoundError)."""
    path_like = source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
    return path_like or Path(source).expanduser().exists()


def _is_text_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS)


def _text_files(source: str) -> list[Path]:
    """The .txt/.md/.jsonl files of a local source; [] for a folder without any (a dataset folder)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data {source!r} does not exist (expected 'builtin', a .txt/.jsonl file or folder, or a dataset name)."
        )
    if path.is_file():
        if not _is_text_file(path):
            raise ValueError(
                f"data file {path} has an unsupported extension; use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} "
                "(or a folder of parquet/csv/arrow files, which datasets reads)."
            )
        return [path]
    return sorted(p for p in path.rglob("*") if _is_text_file(p))


def _decode(raw: bytes, path: Path, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        at = offset + error.start
        raise ValueError(
            f"data file {path} is not valid UTF-8: byte {raw[error.start]:#04x} at offset {at} ({error.reason})."
        ) from None


def _file_documents(path: Path, name: str) -> Iterator[tuple[str, str]]:
    """(name, text) of each document in `path` (named `name`, or `name:line` in a JSONL file), checked; a JSONL file
    is streamed line by line."""
    if not path.name.endswith(JSONL_SUFFIXES):
        text = _decode(path.read_bytes(), path)
        if not text.strip():
            raise ValueError(f"data file {path} is empty.")
        yield name, text
        return
    found, offset = False, 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            line, offset = _decode(raw, path, offset), offset + len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"data file {path} line {number} is not valid JSON: {error.msg}.") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'data file {path} line {number} has no string "text" field.')
            if record["text"].strip():
                found = True
                yield f"{name}:{number}", record["text"]
    if not found:
        raise ValueError(f'data file {path} is empty (no non-empty "text" records).')


def _generate_file_documents(source: str, fingerprint: str) -> Iterator[dict]:
    """`Dataset.from_generator` body; `fingerprint` is unused here but keys datasets' cache to the files' state."""
    root = Path(source).expanduser()
    for path in _text_files(source):
        file_name = path.name if path == root else path.relative_to(root).as_posix()
        for name, text in _file_documents(path, file_name):
            yield {"name": name, "text": text}


def _files_dataset(source: str, cache_dir: Path):
    import datasets

    try:
        return datasets.Dataset.from_generator(
            _generate_file_documents,
            gen_kwargs={"source": source, "fingerprint": data_fingerprint(source)},
            cache_dir=str(cache_dir / "datasets"),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, (ValueError, OSError)):
            raise error.__cause__ from None  # the file's own problem, named by _file_documents
        raise


def _in_split(name: str, split: str) -> bool:
    return is_validation(name) == (split == "validation")


def _split_tail(text: str) -> tuple[str, str]:
    """Cut `text` at the line boundary nearest 95% of its length: (head, tail)."""
    target = len(text) * (100 - VALIDATION_PERCENT) // 100
    cut = text.rfind("\n", 0, target) + 1 or target
    return text[:cut], text[cut:]


def _split_named(dataset, split: str):
    """The `split` part of a dataset of named documents: by name hash, or head/tail cuts when a split is empty."""
    part = dataset.filter(_in_split, input_columns="name", fn_kwargs={"split": split})
    if 0 < len(part) < len(dataset):
        return part.select_columns("text")
    side = SPLITS.index(split)
    cut = dataset.map(lambda text: {"text": _split_tail(text)[side]}, input_columns="text")
    return cut.filter(str.strip, input_columns="text").select_columns("text")


def _named_dataset_split(source: str, split: str):
    """The `split` of a `datasets` source: its own "validation" split, else a row-number hash of "train"."""
    import datasets

    try:
        if _is_saved_dataset(Path(source).expanduser()):
            dataset = datasets.load_from_disk(str(Path(source).expanduser()))
        else:
            name, _, config = source.partition(":")
            dataset = datasets.load_dataset(name, config or None)
    # offline, unknown name, no access, not a dataset folder: one clear message
    except Exception as error:  # noqa: BLE001
        raise ValueError(
            f"data {source!r} is neither 'builtin' nor .txt/.md/.jsonl files, and datasets could not load it: "
            f"{type(error).__name__}: {error}"
        ) from None
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict(train=dataset)
    if "validation" in dataset:
        part = dataset[split]
    elif "train" in dataset:
        part = dataset["train"].filter(lambda _, row: _in_split(f"row-{row}", split), with_indices=True)
    else:
        raise ValueError(f"dataset {source!r} has no 'train' split (splits: {list(dataset)}).")
    if "text" not in part.column_names:
        raise ValueError(f"dataset {source!r} has no 'text' column (columns: {part.column_names}).")
    return part.select_columns("text").filter(lambda text: bool(text and text.strip()), input_columns="text")


def load_text(source: str | None = None, split: str = "train", cache_dir=None):
    """The `split` ("train" or "validation") documents of `source` (see the module docstring) as a
    `datasets.Dataset` with one "text" column of non-empty documents."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if _is_builtin(source):
        names, texts = zip(*builtin_documents())
        part = _split_named(datasets.Dataset.from_dict({"name": names, "text": texts}), split)
    else:
        source = os.fspath(source)
        if _is_local(source) and _text_files(source):
            part = _split_named(_files_dataset(source, Path(cache_dir or default_cache_dir())), split)
        else:
            part = _named_dataset_split(source, split)
    if len(part) == 0:
        raise ValueError(f"the {split} split of data {source!r} is empty.")
    return part


def _text_batches(documents, size: int) -> Iterator[list[str]]:
    if hasattr(documents, "iter"):  # a datasets.Dataset: read in Arrow batches
        for batch in documents.iter(batch_size=size):
            yield batch["text"]
        return
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def pack_blocks(tokenizer, documents, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise `documents` (a `load_text` dataset or strings), join them with the EOS token and cut the stream into
    an int32 tensor (n_blocks, block_size); with `max_blocks`, stop reading once that many are filled."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    pieces, total = [], 0
    for texts in _text_batches(documents, _READ_BATCH):
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [tokenizer.eos_token_id], dtype=np.int32))
            total += len(ids) + 1
        if max_blocks is not None and total >= max_blocks * block_size:
            break
    n_blocks = total // block_size if max_blocks is None else min(total // block_size, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the data has {total} tokens, fewer than one block of block_size={block_size}.")
    stream = np.concatenate(pieces)[: n_blocks * block_size]
    return torch.from_numpy(stream.reshape(n_blocks, block_size))


def _dataset_folder_files(path: Path) -> list[Path]:
    """The files of a local dataset folder, without the `cache-*.arrow` files that datasets' map/filter add."""
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(("cache-", ".")))


def data_fingerprint(source: str | None) -> str:
    """A string that changes when the data changes: local file paths, sizes and mtimes; the Python version for
    builtin; the name for a Hub dataset."""
    if _is_builtin(source):
        return f"builtin:python{sys.version_info.major}.{sys.version_info.minor}:{VALIDATION_PERCENT}"
    source = os.fspath(source)
    if not _is_local(source):
        return f"dataset:{source}"
    files = _text_files(source) or _dataset_folder_files(Path(source).expanduser())
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return "files:" + json.dumps(stats)


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([_CACHE_FORMAT, *parts]).encode()).hexdigest()[:20]


def cached_blocks(tokenizer, source, split: str, block_size: int, cache_dir=None) -> torch.Tensor:
    """`pack_blocks(tokenizer, load_text(source, split), block_size)`, memory-mapped from / written to the cache."""
    cache_dir = Path(cache_dir or default_cache_dir())
    key = _cache_key(data_fingerprint(source), tokenizer_fingerprint(tokenizer), split, block_size)
    path = cache_dir / "blocks" / f"{key}.npy"
    if not path.exists():
        try:
            blocks = pack_blocks(tokenizer, load_text(source, split, cache_dir), block_size)
        except ValueError as error:
            if "fewer than one block" not in str(error):
                raise
            raise ValueError(
                f"the {split} split of data {source or 'builtin'!r}: {error} Use a smaller block_size or more data."
            ) from None
        with atomic_file(path) as tmp, tmp.open("wb") as file:
            np.save(file, blocks.numpy())
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: pages shared, never written back


def cached_tokenizer(source, vocab_size: int, cache_dir=None):
    """A BPE tokenizer trained on the train split of `source` (`mea_hf.tokenizer.train_tokenizer`), cached."""
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import train_tokenizer

    cache_dir = Path(cache_dir or default_cache_dir())
    folder = cache_dir / "tokenizers" / _cache_key(data_fingerprint(source), vocab_size)
    if not folder.exists():
        tokenizer = train_tokenizer(iter_texts(load_text(source, "train", cache_dir)), vocab_size=vocab_size)
        try:
            with atomic_dir(folder) as tmp:
                tokenizer.save_pretrained(tmp)
        except FileExistsError:  # another process finished first
            pass
    return PreTrainedTokenizerFast.from_pretrained(folder)


def iter_texts(documents: Iterable) -> Iterator[str]:
    """Every document text of a `load_text` dataset (or of an iterable of strings), in order."""
    for batch in _text_batches(documents, _READ_BATCH):
        yield from batch


def token_blocks(tokenizer, source: str, split: str, num_blocks: int, block_size: int, what: str) -> torch.Tensor:
    """Up to `num_blocks` packed blocks of `split` of `source` (via mea_hf.data), for calibration or validation."""
    if tokenizer is None:
        raise ValueError(f"the model folder has no tokenizer, which {what} needs.")
    if num_blocks < 1 or block_size < 2:
        raise ValueError(f"{what} needs at least 1 block of at least 2 tokens, got {num_blocks} x {block_size}.")
    return pack_blocks(tokenizer, load_text(source, split), block_size, max_blocks=num_blocks)

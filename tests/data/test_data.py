"""Data loading, splitting, packing, caching and the errors for bad data."""

import json

import datasets
import numpy as np
import pytest
import torch

from mea_hf.data.loading import cached_blocks, cached_tokenizer, iter_texts, load_text, pack_blocks
from mea_hf.training.settings import TrainSettings


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _documents(source, split, cache_dir):
    return list(iter_texts(load_text(str(source), split, cache_dir)))


def test_folder_of_txt_and_jsonl_splits_deterministically(tmp_path):
    docs = [f"document {i}: " + "word " * (50 + i) for i in range(100)]
    for i, text in enumerate(docs[:50]):
        _write(tmp_path / "data" / f"doc{i:02d}.txt", text)
    _write(tmp_path / "data" / "more" / "rest.jsonl", "\n".join(json.dumps({"text": t}) for t in docs[50:]) + "\n\n")
    train, validation = (_documents(tmp_path / "data", split, tmp_path / "cache") for split in ("train", "validation"))
    assert sorted(train + validation) == sorted(docs)  # every document once, none lost
    assert train and validation and not set(train) & set(validation)
    assert isinstance(load_text(str(tmp_path / "data"), "train", tmp_path / "cache"), datasets.Dataset)
    assert list((tmp_path / "cache" / "datasets").iterdir())  # read through datasets, cached as Arrow
    assert _documents(tmp_path / "data", "validation", tmp_path / "cache2") == validation  # deterministic


def test_split_does_not_depend_on_where_the_data_lies(tmp_path):
    lines = "".join(json.dumps({"text": f"record {i} " + "word " * 20}) + "\n" for i in range(60))
    for place in ("here", "there/deeper"):
        _write(tmp_path / place / "data.jsonl", lines)
        _write(tmp_path / place / "notes" / "a.txt", "a note " * 30)
    for source in ("", "data.jsonl"):  # a folder, a single file
        here = [_documents(tmp_path / "here" / source, split, tmp_path / "cache-a") for split in ("train", "validation")]
        there = [_documents(tmp_path / "there/deeper" / source, split, tmp_path / "cache-b")
                 for split in ("train", "validation")]  # fmt: skip
        assert here == there and all(here)


def test_single_file_falls_back_to_head_tail_split(tmp_path):
    text = "".join(f"line {i}\n" for i in range(200))
    path = _write(tmp_path / "one.txt", text)
    train, validation = (_documents(path, split, tmp_path / "cache") for split in ("train", "validation"))
    assert train[0] + validation[0] == text
    assert validation[0].startswith("line 19") and len(validation[0]) < len(text) // 10


def test_dataset_folders_go_through_datasets(tmp_path):
    """The `datasets` route that Hub names take, offline: parquet folders (load_dataset) and save_to_disk folders."""
    docs = [f"row {i} " + "text " * (i % 7 + 1) for i in range(120)]
    with_validation = tmp_path / "with_validation"
    datasets.Dataset.from_dict({"text": docs[:100], "id": list(range(100))}).to_parquet(
        str(with_validation / "train.parquet")
    )
    datasets.Dataset.from_dict({"text": docs[100:] + ["  "], "id": list(range(21))}).to_parquet(
        str(with_validation / "validation.parquet")
    )
    assert _documents(with_validation, "validation", tmp_path / "cache") == docs[100:]  # its own split, blanks out
    assert _documents(with_validation, "train", tmp_path / "cache") == docs[:100]

    train_only = tmp_path / "train_only"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": docs})).save_to_disk(str(train_only))
    train, validation = (_documents(train_only, split, tmp_path / "cache") for split in ("train", "validation"))
    assert sorted(train + validation) == sorted(docs) and validation and not set(train) & set(validation)

    no_text = tmp_path / "no_text"
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(no_text))
    with pytest.raises(ValueError, match=r"has no 'text' column \(columns: \['content'\]\)"):
        load_text(str(no_text), "train", tmp_path / "cache")


def test_pack_blocks_joins_documents_with_eos(tokenizer, tmp_path):
    documents = ["def f(x):\n    return x\n", "import os\n"]
    blocks = pack_blocks(tokenizer, documents, block_size=4)
    stream = []
    for text in documents:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.shape == (len(stream) // 4, 4) and blocks.dtype == torch.int32
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert pack_blocks(tokenizer, documents, block_size=4, max_blocks=2).shape == (2, 4)
    as_dataset = datasets.Dataset.from_dict({"text": documents})
    assert torch.equal(pack_blocks(tokenizer, as_dataset, block_size=4), blocks)


def test_blocks_and_tokenizer_are_cached(tmp_path):
    path = _write(tmp_path / "c.txt", "".join(f"value_{i} = {i} * 2\n" for i in range(400)))
    tokenizer = cached_tokenizer(str(path), 320, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
    again = cached_tokenizer(str(path), 320, tmp_path / "cache")
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    blocks = cached_blocks(tokenizer, str(path), "train", 32, tmp_path / "cache")
    cache_files = list((tmp_path / "cache" / "blocks").glob("*.npy"))
    assert len(cache_files) == 1
    assert isinstance(np.load(cache_files[0], mmap_mode="r"), np.memmap)  # read back memory-mapped
    reference = pack_blocks(tokenizer, load_text(str(path), "train", tmp_path / "cache"), 32)
    assert torch.equal(blocks, reference)
    assert torch.equal(cached_blocks(tokenizer, str(path), "train", 32, tmp_path / "cache"), reference)
    cached_blocks(tokenizer, str(path), "train", 16, tmp_path / "cache")  # another block size: another entry
    assert len(list((tmp_path / "cache" / "blocks").glob("*.npy"))) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"  \n\n", "is empty"),
        ("blank.jsonl", b'\n{"text": "  "}\n', "is empty"),
        ("latin1.txt", "caf\u00e9 ol\u00e9\n".encode("latin-1"), "is not valid UTF-8: byte 0xe9 at offset 3"),
        ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "is not valid UTF-8: byte 0xe9 at offset 28"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": 1}\n', 'line 2 has no string "text" field'),
        ("broken.jsonl", b'{"text": "ok"}\n{oops\n', "line 2 is not valid JSON"),
        ("data.csv", b"a,b\n", "unsupported extension"),
    ],
)
def test_bad_files_name_the_file_and_problem(tmp_path, name, content, message):
    folder = tmp_path / "data"
    _write(folder / "good.txt", "fine text\n" * 50)
    path = folder / name
    path.write_bytes(content)
    source = path if name.endswith(".csv") else folder  # a bad file inside a folder of good ones is found too
    with pytest.raises(ValueError, match=message) as error:
        load_text(str(source), "train", tmp_path / "cache")
    assert str(path) in str(error.value)
    assert not list((tmp_path / "cache").rglob("*.arrow"))  # nothing half-written


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_text(str(tmp_path / "nowhere.txt"), "train", tmp_path / "cache")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="is neither 'builtin' nor .txt/.md/.jsonl files"):
        load_text(str(tmp_path / "empty_dir"), "train", tmp_path / "cache")


def test_block_larger_than_the_data_is_refused(tmp_path, tokenizer):
    path = _write(tmp_path / "short.txt", "".join(f"x{i}\n" for i in range(40)))
    with pytest.raises(
        ValueError, match=r"validation split of data .*short.txt.*fewer than one block of block_size=512"
    ):
        cached_blocks(tokenizer, str(path), "validation", 512, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half-written


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lr": "fast"}, "`lr` must be a number"),
        ({"max_steps": 0}, "`max_steps` must be positive"),
        ({"warmup_steps": 10, "max_steps": 10}, "`warmup_steps` must be in"),
        ({"schedule": "linear"}, "`schedule` must be one of"),
        ({"learning_rate": 1e-3}, r"unknown training setting\(s\) \['learning_rate'\]"),
        ({"bf16": "yes"}, "`bf16` must be true or false"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings.from_dict(settings)


def test_unknown_dataset_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"data 'no-such-corpus' is neither 'builtin' nor .txt/.md/.jsonl files"):
        load_text("no-such-corpus", "train")

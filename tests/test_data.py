"""Data loading, splitting, packing, caching and the errors for bad data."""

import json

import pytest
import torch

from mea_hf.data import cached_blocks, cached_tokenizer, load_documents, pack_blocks
from mea_hf.train_settings import resolve_settings


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_folder_of_txt_and_jsonl_splits_deterministically(tmp_path):
    docs = [f"document {i}: " + "word " * (50 + i) for i in range(100)]
    for i, text in enumerate(docs[:50]):
        _write(tmp_path / "data" / f"doc{i:02d}.txt", text)
    _write(tmp_path / "data" / "more" / "rest.jsonl", "\n".join(json.dumps({"text": t}) for t in docs[50:]) + "\n\n")
    train, validation = (load_documents(str(tmp_path / "data"), split) for split in ("train", "validation"))
    assert sorted(train + validation) == sorted(docs)  # every document once, none lost
    assert train and validation and not set(train) & set(validation)
    assert load_documents(str(tmp_path / "data"), "validation") == validation  # deterministic


def test_single_file_falls_back_to_head_tail_split(tmp_path):
    text = "".join(f"line {i}\n" for i in range(200))
    path = _write(tmp_path / "one.txt", text)
    train, validation = load_documents(str(path), "train"), load_documents(str(path), "validation")
    assert train[0] + validation[0] == text
    assert validation[0].startswith("line 19") and len(validation[0]) < len(text) // 10


def test_pack_blocks_joins_documents_with_eos(tokenizer):
    documents = ["def f(x):\n    return x\n", "import os\n"]
    blocks = pack_blocks(tokenizer, documents, block_size=4)
    stream = []
    for text in documents:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert pack_blocks(tokenizer, documents, block_size=4, max_blocks=2).shape == (2, 4)


def test_blocks_and_tokenizer_are_cached(tmp_path):
    path = _write(tmp_path / "c.txt", "".join(f"value_{i} = {i} * 2\n" for i in range(400)))
    tokenizer = cached_tokenizer(str(path), 320, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
    again = cached_tokenizer(str(path), 320, tmp_path / "cache")
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    blocks = cached_blocks(tokenizer, str(path), "train", 32, tmp_path / "cache")
    cache_files = list((tmp_path / "cache" / "blocks").glob("*.pt"))
    assert len(cache_files) == 1
    reference = pack_blocks(tokenizer, load_documents(str(path), "train"), 32)
    assert torch.equal(blocks, reference)
    assert torch.equal(cached_blocks(tokenizer, str(path), "train", 32, tmp_path / "cache"), reference)
    cached_blocks(tokenizer, str(path), "train", 16, tmp_path / "cache")  # another block size: another entry
    assert len(list((tmp_path / "cache" / "blocks").glob("*.pt"))) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"  \n\n", "is empty"),
        ("latin1.txt", "caf\u00e9 ol\u00e9\n".encode("latin-1"), "is not valid UTF-8: byte 0xe9 at offset 3"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": 1}\n', 'line 2 has no string "text" field'),
        ("broken.jsonl", b'{"text": "ok"}\n{oops\n', "line 2 is not valid JSON"),
        ("data.csv", b"a,b\n", "unsupported extension"),
    ],
)
def test_bad_files_name_the_file_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_documents(str(path), "train")
    assert str(path) in str(error.value)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_documents(str(tmp_path / "nowhere.txt"), "train")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_documents(str(tmp_path / "empty_dir"), "train")


def test_block_larger_than_the_data_is_refused(tmp_path, tokenizer):
    path = _write(tmp_path / "short.txt", "".join(f"x{i}\n" for i in range(40)))
    with pytest.raises(
        ValueError, match=r"validation split of data .*short.txt.*fewer than one block of block_size=512"
    ):
        cached_blocks(tokenizer, str(path), "validation", 512, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.pt"))  # nothing half-written


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
        resolve_settings(settings)


def test_unknown_dataset_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"data 'no-such-corpus' is neither 'builtin' nor a local file or folder"):
        load_documents("no-such-corpus", "train")

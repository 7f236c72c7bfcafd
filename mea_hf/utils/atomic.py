"""Atomic writes: outputs appear complete or not at all."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_output_dir(path: str | os.PathLike, overwrite: bool, what: str = "Output folder") -> None:
    """Refuse an existing non-empty output folder (or a file in its place) unless `overwrite` is set. Commands call
    it before any slow work; `atomic_dir` calls it again when it saves."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{what} {out} exists and is not empty (pass overwrite / --overwrite to replace it).")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it is renamed to `path`, on error it is removed.

    Refuses to replace an existing non-empty folder unless `overwrite` is set.
    """
    final = Path(path)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path` to write to; on success it is renamed to `path`, on error removed.
    `suffix` keeps an extension for writers that infer the format from it (e.g. ".png")."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); the result is an ordinary file
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")

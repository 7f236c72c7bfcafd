"""The built-in corpus: text that ships with Python itself, so nothing is downloaded.

Documents are the standard library's `.py` sources (tests and vendored packages excluded) and the `pydoc_data`
help topics. The train/validation split is by a stable hash of each document's name, so it is the same on every
machine with the same Python version.
"""

import ast
import hashlib
import sysconfig
from collections.abc import Iterable
from pathlib import Path

VALIDATION_PERCENT = 5
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip"}


def _stdlib_documents() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            documents.append((f"stdlib/{relative.as_posix()}", text))
    return documents


def _pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc/{name}", text) for name, text in sorted(topics.items()) if text.strip()]


def is_validation(name: str) -> bool:
    """Whether document `name` belongs to the validation split (stable across machines and runs)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def builtin_documents() -> list[tuple[str, str]]:
    """(name, text) of every document of the built-in corpus, in a fixed order."""
    return _stdlib_documents() + _pydoc_documents()


def split_by_name(documents: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """{"train": [...], "validation": [...]} texts of (name, text) `documents`, by `is_validation(name)`, in order."""
    splits = {"train": [], "validation": []}
    for name, text in documents:
        splits["validation" if is_validation(name) else "train"].append(text)
    return splits


def _docstrings(source: str, min_chars: int) -> list[str]:
    """The module, class and function docstrings of at least `min_chars` characters in Python `source`."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    docstrings = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DOCUMENTED_NODES))
    return [text for text in docstrings if text and len(text) >= min_chars]


def stdlib_docstrings(min_chars: int = 200) -> dict[str, list[str]]:
    """English prose from the standard library: its docstrings of at least `min_chars` characters, split like the
    source files they come from ({"train": [...], "validation": [...]})."""
    return split_by_name(
        (name, text) for name, source in _stdlib_documents() for text in _docstrings(source, min_chars)
    )


def builtin_corpus() -> dict[str, list[str]]:
    """{"train": [...], "validation": [...]} document texts of the built-in corpus, in a fixed order."""
    return split_by_name(builtin_documents())

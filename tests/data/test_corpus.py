"""The built-in corpus: Python's own texts, split by document name."""

import inspect
import json

from mea_hf.data.corpus import builtin_documents, is_validation, stdlib_docstrings


def test_docstrings_are_long_prose_split_like_their_source_files():
    docstrings = stdlib_docstrings(min_chars=400)
    split = "validation" if is_validation("stdlib/json/__init__.py") else "train"
    module_docstring = inspect.cleandoc(json.__doc__)
    assert module_docstring in docstrings[split]  # the json package's own docstring, in its source file's split
    assert module_docstring not in docstrings["train" if split == "validation" else "validation"]
    assert min(len(text) for texts in docstrings.values() for text in texts) >= 400


def test_validation_split_holds_a_few_percent_of_the_documents():
    names = [name for name, _ in builtin_documents()]
    share = sum(map(is_validation, names)) / len(names)
    assert 0.02 < share < 0.09

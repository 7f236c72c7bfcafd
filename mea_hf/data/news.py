"""English news prose from PyPI: the Lee corpus (Lee, Pincombe and Welsh, 2005; Australian news articles, one per
line), which gensim ships as test data. Broader English than the Python documentation of the built-in corpus, for
calibrating and evaluating real checkpoints (`benchmarks/bench_real.py`). Fetched once into the mea-hf cache from the
wheel `gensim==4.4.0` (about 28 MB, never installed); never used by CI."""

import os

from ..hub.pypi_wheels import files_from_pypi

GENSIM = ("gensim", "4.4.0")
# The 300 background articles train, the 50 articles of the similarity study (none of them among the 300) validate.
LEE_FILES = {"train": "gensim/test/test_data/lee_background.cor", "validation": "gensim/test/test_data/lee.cor"}


def parse_lee(raw: bytes) -> list[str]:
    """The articles of a Lee corpus file: one per non-empty line (the files are Latin-1: "£" is byte 0xa3)."""
    return [line.strip() for line in raw.decode("latin-1").splitlines() if line.strip()]


def lee_news(cache_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{"train": 300 articles, "validation": 50 other articles}, downloaded and cached on first use."""
    paths = files_from_pypi(*GENSIM, list(LEE_FILES.values()), cache_dir)  # one download for both files
    return {split: parse_lee(path.read_bytes()) for split, path in zip(LEE_FILES, paths, strict=True)}


def mid_article_opening(article: str, words: int) -> str:
    """`words` whitespace-split words of `article` from the sentence start nearest its middle (a prompt that is not
    the article's opening); from the middle word itself when no sentence starts early enough to leave `words` words."""
    tokens = article.split()
    starts = [i for i in range(1, len(tokens) - words + 1) if tokens[i - 1][-1] in ".?!"]
    start = min(starts, key=lambda i: abs(i - len(tokens) / 2)) if starts else max(0, (len(tokens) - words) // 2)
    return " ".join(tokens[start : start + words])

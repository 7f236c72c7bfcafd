"""The Lee news corpus: parsed from gensim's files, read from the mea-hf cache (no download in tests)."""

import subprocess

import pytest

from mea_hf.data.news import GENSIM, lee_news, mid_article_opening, parse_lee


def test_articles_are_the_non_empty_lines_of_a_latin_1_file():
    raw = b"Wind pushed a bushfire towards Hill Top. \n\n  A shirt cost \xa33,000.\r\n"
    assert parse_lee(raw) == ["Wind pushed a bushfire towards Hill Top.", "A shirt cost \u00a33,000."]


def test_splits_come_from_their_own_cached_files(tmp_path, monkeypatch):
    folder = tmp_path / "pypi" / "-".join(GENSIM)
    folder.mkdir(parents=True)
    (folder / "lee_background.cor").write_bytes(b"first train article\nsecond train article\n")
    (folder / "lee.cor").write_bytes(b"a validation article\n")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("downloaded although cached"))
    assert lee_news(tmp_path) == {"train": ["first train article", "second train article"],
                                  "validation": ["a validation article"]}  # fmt: skip


def test_mid_article_opening_starts_at_the_sentence_nearest_the_middle():
    article = "One two three. Four five six seven. Eight nine ten eleven twelve. Thirteen fourteen."
    assert mid_article_opening(article, 3) == "Eight nine ten"  # sentences start at words 3, 7, 12; 14 words
    assert mid_article_opening(article, 8) == "Four five six seven. Eight nine ten eleven"  # 7 leaves only 7
    assert mid_article_opening("no sentence ends here at all", 2) == "ends here"  # no start: the middle words

import pytest

from mea_hf.evaluation.repetition import ends_in_loop, repeated_ngram_fraction


def test_a_text_without_repeated_ngrams_scores_zero():
    assert repeated_ngram_fraction(list(range(20)), n=4) == 0.0


def test_a_loop_scores_its_repeated_share():
    # 1 2 3 1 2 3 1 2 3: 3-grams 123 231 312 123 231 312 123 -> the last four were seen before
    assert repeated_ngram_fraction([1, 2, 3] * 3, n=3) == pytest.approx(4 / 7)
    assert repeated_ngram_fraction([5] * 10, n=2) == pytest.approx(8 / 9)


def test_a_text_ends_in_a_loop_when_its_last_ngram_occurred_before():
    assert ends_in_loop(list(range(10)) + [7, 8, 9] * 3, n=6)  # 7 8 9 7 8 9 ends it and first occurs at 7-12
    assert not ends_in_loop(list(range(30)), n=8)
    assert not ends_in_loop([1, 2, 3] * 3 + list(range(10, 20)), n=4)  # looped once, then moved on
    assert ends_in_loop([1, 2, 1, 2], n=2) and not ends_in_loop([1, 2], n=2)  # needs an earlier occurrence


def test_short_texts_and_bad_n():
    assert repeated_ngram_fraction([1, 2], n=4) == 0.0
    assert not ends_in_loop([1, 2], n=8)
    for measure in (repeated_ngram_fraction, ends_in_loop):
        with pytest.raises(ValueError, match="n must be at least 1"):
            measure([1, 2, 3], n=0)

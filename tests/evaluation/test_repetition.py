import pytest

from mea_hf.evaluation.repetition import repeated_ngram_fraction


def test_a_text_without_repeated_ngrams_scores_zero():
    assert repeated_ngram_fraction(list(range(20)), n=4) == 0.0


def test_a_loop_scores_its_repeated_share():
    # 1 2 3 1 2 3 1 2 3: 3-grams 123 231 312 123 231 312 123 -> the last four were seen before
    assert repeated_ngram_fraction([1, 2, 3] * 3, n=3) == pytest.approx(4 / 7)
    assert repeated_ngram_fraction([5] * 10, n=2) == pytest.approx(8 / 9)


def test_short_texts_and_bad_n():
    assert repeated_ngram_fraction([1, 2], n=4) == 0.0
    with pytest.raises(ValueError, match="n must be at least 1"):
        repeated_ngram_fraction([1, 2, 3], n=0)

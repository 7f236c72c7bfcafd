import pytest
from scipy.stats import binomtest  # scipy comes with lm-eval (scikit-learn), a test dependency

from mea_hf.evaluation.paired import discordant_pairs, mcnemar_exact_p


def test_mcnemar_matches_the_binomial_tail():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 3) == 1.0  # balanced: no evidence either way
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)


def test_mcnemar_equals_scipys_two_sided_binomial_test():
    for b in range(13):
        for c in range(13):
            if b + c:
                assert mcnemar_exact_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue), (b, c)


def test_discordant_pairs_counts_each_side():
    assert discordant_pairs([True, True, False, False], [True, False, True, False]) == (1, 1)
    assert discordant_pairs([True, True, False], [False, False, False]) == (2, 0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact_p(-1, 2)
    with pytest.raises(ValueError, match="same prompts"):
        discordant_pairs([True], [True, False])

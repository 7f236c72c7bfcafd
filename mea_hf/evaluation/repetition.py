"""How much a generated text repeats itself: the share of its token n-grams seen earlier in the same text.

Greedy decoding of a damaged model typically falls into a loop ("the number of the number of ..."); this counts it.
0 means no n-gram occurs twice, values near 1 a loop from the first tokens on. `ends_in_loop` asks the sharper
question whether a continuation is still looping when it stops. Both measure repetition only, not sense: read the
samples too."""

from collections.abc import Sequence


def repeated_ngram_fraction(tokens: Sequence[int], n: int = 4) -> float:
    """The fraction of the `n`-grams of `tokens` that already occurred earlier in `tokens` (0.0 when there are none)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    seen, repeated = set(), 0
    grams = [tuple(tokens[start : start + n]) for start in range(len(tokens) - n + 1)]
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


def ends_in_loop(tokens: Sequence[int], n: int = 8) -> bool:
    """Whether the last `n` tokens of `tokens` already occurred, in that order, earlier in `tokens`: a greedy
    continuation cut off inside a loop does, prose almost never repeats 8 tokens verbatim."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    tail = tuple(tokens[-n:])
    return len(tokens) > n and any(tuple(tokens[start : start + n]) == tail for start in range(len(tokens) - n))

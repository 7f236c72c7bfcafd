"""How much a generated text repeats itself: the share of its token n-grams seen earlier in the same text.

Greedy decoding of a damaged model typically falls into a loop ("the number of the number of ..."); this counts it.
0 means no n-gram occurs twice, values near 1 a loop from the first tokens on. `ends_in_loop` asks the sharper
question whether a continuation is still looping when it stops. Both measure repetition only, not sense: read the
samples too."""

from collections.abc import Sequence


def repeated_ngram_starts(tokens: Sequence[int], n: int = 4) -> list[bool]:
    """For each start position of an `n`-gram of `tokens`, in order: did that n-gram already occur earlier?"""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    seen, repeated = set(), []
    for start in range(len(tokens) - n + 1):
        gram = tuple(tokens[start : start + n])
        repeated.append(gram in seen)
        seen.add(gram)
    return repeated


def repeated_ngram_fraction(tokens: Sequence[int], n: int = 4) -> float:
    """The fraction of the `n`-grams of `tokens` that already occurred earlier in `tokens` (0.0 when there are none)."""
    repeated = repeated_ngram_starts(tokens, n)
    return sum(repeated) / len(repeated) if repeated else 0.0


def ends_in_loop(tokens: Sequence[int], n: int = 8) -> bool:
    """Whether the last `n` tokens of `tokens` already occurred, in that order, earlier in `tokens`: a greedy
    continuation cut off inside a loop does, prose almost never repeats 8 tokens verbatim."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    tail = tuple(tokens[-n:])
    return len(tokens) > n and any(tuple(tokens[start : start + n]) == tail for start in range(len(tokens) - n))

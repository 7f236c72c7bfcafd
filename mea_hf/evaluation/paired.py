"""Paired yes/no outcomes of two models on the same prompts (e.g. "does the greedy text end in a loop?"): the exact
McNemar test. Only the discordant prompts count: `b` where only the first model says yes, `c` where only the second
does; under "the two are alike" each discordant prompt is a fair coin, so the two-sided p-value is that of a
binomial(b + c, 1/2) count at least as far from the middle as the one seen."""

from math import comb


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` and `c` discordant pairs (1.0 when there are none)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}.")
    n = b + c
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def discordant_pairs(first: list[bool], second: list[bool]) -> tuple[int, int]:
    """(prompts where only `first` is true, prompts where only `second` is), outcome lists in the same prompt order."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need the same prompts, got {len(first)} and {len(second)}.")
    return sum(a and not b for a, b in zip(first, second)), sum(b and not a for a, b in zip(first, second))

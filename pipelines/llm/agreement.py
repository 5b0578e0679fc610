"""Greedy agreement: how far two models' greedy continuations of the same prompts agree.

The measure of the evaluate stage (a version beside its parent) and of the certification's
parity check (a version beside its full-precision ancestor), kept in one place so the two
numbers mean the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["greedy_agreement"]


def greedy_agreement(
    ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]], n: int
) -> tuple[float, float]:
    """(share of the first ``n`` positions where two greedy continuations chose the same token,
    mean length of their equal prefix) over pairs of continuations; a position one of them did
    not reach (it stopped early) differs."""
    same = positions = 0
    prefixes: list[int] = []
    for a, b in zip(ours, theirs, strict=True):
        a, b = list(a)[:n], list(b)[:n]
        positions += max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b, strict=False))
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        prefixes.append(min(len(a), len(b)) if prefix is None else prefix)
    share = same / positions if positions else 1.0
    return share, (sum(prefixes) / len(prefixes) if prefixes else 0.0)

"""Which positions make each block of a pooled map: one rule for :class:`PooledAttention`,
the page's pooled map of a long call and the command line's block labels (issue 21; it lives
at the bottom so that both ``keep`` and ``views`` import it).

An axis of ``n`` positions pooled to at most ``size`` blocks has ``P = min(size, n)`` blocks (a
shorter axis keeps one block per position), and position ``p`` falls in block ``p * P // n``.
The blocks are contiguous, never empty and never overlap; each is ``n // P`` or ``n // P + 1``
positions wide, the wider ones spread along the axis. When ``P`` divides ``n`` every block is
``n / P`` wide (``avg_pool2d`` / ``max_pool2d`` with that kernel). Block ``b`` holds positions
``ceil(b * n / P)`` to ``ceil((b + 1) * n / P) - 1``.

Example:
    >>> block_count(10, 4), [block_of(p, 10, 4) for p in range(10)], block_edges(10, 4)
    (4, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3], [0, 3, 5, 8, 10])
"""

from __future__ import annotations

from typing import List

__all__ = ["block_count", "block_of", "block_edges"]


def block_count(n: int, size: int) -> int:
    """How many blocks an axis of ``n`` positions pooled to at most ``size`` blocks has."""
    return min(size, n)


def block_of(positions, n: int, size: int):
    """The block of each of ``positions`` (an int, or an integer tensor or array, element by
    element) on an axis of ``n`` positions pooled to at most ``size`` blocks."""
    return positions * block_count(n, size) // n


def block_edges(n: int, size: int) -> List[int]:
    """The first position of each block, then ``n``: block ``b`` holds positions
    ``edges[b]`` to ``edges[b + 1] - 1`` (the first ``p`` with ``block_of(p) == b``)."""
    blocks = block_count(n, size)
    if blocks <= 0:
        return [0]
    return [(b * n + blocks - 1) // blocks for b in range(blocks + 1)]

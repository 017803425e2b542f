"""Issue 21, one pooled-block rule: an axis of L positions pooled to at most `size` blocks has
min(size, L) blocks and position p falls in block p * P // L (attention_hooker._blocks), for
PooledAttention, the page's pooled map of a long call (in Python and in its script) and the
command line's block labels."""

from __future__ import annotations

import pytest
import torch

from attention_hooker._blocks import block_count, block_edges, block_of
from attention_hooker.keep.pooling import block_labels

# (L, size): shorter than size, equal, one longer, prime lengths, size dividing L, and the page's defaults.
CASES = [(1, 4), (5, 8), (8, 8), (9, 8), (10, 4), (13, 4), (97, 10), (600, 256), (700, 256), (2000, 256),
         (2003, 256), (4096, 512)]


@pytest.mark.parametrize("n, size, edges", [
    (5, 8, [0, 1, 2, 3, 4, 5]),  # L < size: one block per position
    (8, 8, [0, 1, 2, 3, 4, 5, 6, 7, 8]),  # L = size
    (9, 8, [0, 2, 3, 4, 5, 6, 7, 8, 9]),  # L = size + 1: eight blocks, the first two wide
    (10, 4, [0, 3, 5, 8, 10]),  # widths 3, 2, 3, 2
    (13, 4, [0, 4, 7, 10, 13]),  # L prime
    (12, 4, [0, 3, 6, 9, 12]),  # size divides L: equal widths
    (600, 256, None), (2000, 256, None),
])
def test_the_block_edges_of_some_lengths(n, size, edges):
    got = block_edges(n, size)
    if edges is not None:
        assert got == edges
    assert len(got) == block_count(n, size) + 1 == min(n, size) + 1
    assert got[0] == 0 and got[-1] == n


@pytest.mark.parametrize("n, size", CASES)
def test_every_position_is_in_the_block_its_edges_say(n, size):
    edges, blocks = block_edges(n, size), block_count(n, size)
    assert blocks == min(n, size)
    by_edges = [b for b in range(blocks) for _ in range(edges[b], edges[b + 1])]
    assert by_edges == [block_of(p, n, size) for p in range(n)]  # ints
    assert torch.equal(block_of(torch.arange(n), n, size), torch.tensor(by_edges))  # tensors, element by element
    widths = {b - a for a, b in zip(edges, edges[1:])}
    assert widths <= {n // blocks, -(-n // blocks)}, "blocks are never empty, and differ by one position at most"


def test_an_empty_axis_has_no_block():
    assert block_count(0, 4) == 0 and block_edges(0, 4) == [0]


@pytest.mark.parametrize("n, size", [(5, 8), (10, 4), (13, 4), (97, 10)])
def test_the_block_labels_name_the_blocks_of_the_rule(n, size):
    tokens = [f"t{i}" for i in range(n)]
    edges = block_edges(n, size)
    want = [tokens[a] if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
    assert block_labels(tokens, size) == want

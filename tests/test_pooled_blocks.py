"""Issue 21, one pooled-block rule: an axis of L positions pooled to at most `size` blocks has
min(size, L) blocks and position p falls in block p * P // L (attention_hooker._blocks), for
PooledAttention, the page's pooled map of a long call (in Python and in its script) and the
command line's block labels."""

from __future__ import annotations

import pytest
import torch

from attention_hooker import PooledAttention
from attention_hooker._blocks import block_count, block_edges, block_of
from attention_hooker.keep.pooling import block_labels
from attention_hooker.views.page import NONFINITE_CODE, RELATIVE_ERROR, encode_weights, render_html
from test_page import _long_arrays, _Page, _payload, browser  # noqa: F401 (browser: the headless Chromium fixture)

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


# ------------------------------------------------------------------ PooledAttention and the page: the same blocks
def _page_pooled(weights, size, pool_above):
    """The page's pooled map of one call (its codes, (batch, heads, query blocks, key blocks)) and its meta."""
    meta, blob = _payload(render_html({"layer": [weights]}, pool_above=pool_above, pool_size=size).html)
    call = meta["layers"][0]["calls"][0]
    return _long_arrays(call, blob)[0], call["pooled"]


def _pooled_attention(weights, size, how="max", tile=3):
    """PooledAttention's map of the same call, written a few query rows at a time (as the routes do)."""
    pooled = PooledAttention(size=size, how=how)
    partial = pooled.partial("layer", n_query=weights.shape[2])
    for start in range(0, weights.shape[2], tile):
        rows = torch.arange(start, min(start + tile, weights.shape[2]))
        partial.write(rows, weights[:, :, rows])
    partial.commit()
    return pooled.values["layer"][0]


@pytest.mark.parametrize("n_query, n_key, size", [(10, 10, 4), (13, 9, 8), (9, 17, 8), (11, 13, 5), (600, 700, 256)])
def test_pooled_attention_and_the_page_pool_the_same_blocks(n_query, n_key, size):
    """The page's block maxima are the codes of PooledAttention(how="max")'s block maxima of the same
    weights (a code is monotone in the weight, and the largest block maximum is the head's scale). Before
    issue 21's one rule, the page cut 600 x 700 at size 256 into 200 x 234 blocks of 3 (PooledAttention:
    256 x 256), and 10 tokens at size 4 into 3, 3, 3, 1 (PooledAttention: 3, 2, 3, 2)."""
    torch.manual_seed(n_query * n_key)
    weights = (torch.randn(2, 3, n_query, n_key) * 3).softmax(-1)
    page, meta = _page_pooled(weights, size, pool_above=min(n_query, n_key) - 1)
    kept = _pooled_attention(weights, size)
    assert meta["shape"] == list(kept.shape) == [2, 3, min(size, n_query), min(size, n_key)]
    assert meta["edges"] == [block_edges(n_query, size), block_edges(n_key, size)]
    assert torch.equal(page, encode_weights(kept)[0])


def test_the_page_pools_uneven_blocks_by_hand_and_marks_a_non_finite_weight():
    torch.manual_seed(1)
    weights = torch.rand(1, 2, 13, 10)
    weights[0, 1, 6, 4] = float("nan")  # query block 1 (rows 4-6), key block 1 (keys 3-4) of head 1
    page, meta = _page_pooled(weights, 4, pool_above=8)
    codes, _ = encode_weights(weights)
    qe, ke = meta["edges"]
    assert (qe, ke) == ([0, 4, 7, 10, 13], [0, 3, 5, 8, 10])
    expected = torch.tensor([[[[codes[0, h, qe[i]:qe[i + 1], ke[j]:ke[j + 1]].max() for j in range(4)]
                               for i in range(4)] for h in range(2)]], dtype=torch.uint8)
    assert torch.equal(page, expected)
    assert page[0, 1, 1, 1] == NONFINITE_CODE and (page[0, 1] == NONFINITE_CODE).sum() == 1


# ------------------------------------------------------------------ the page's script reads the same edges
def _centre(box, i, j, rows, cols):
    """The whole pixel nearest the centre of cell (i, j) of the matrix (a pointer's position is whole pixels:
    a cell of 256 blocks drawn 520 px wide is 2 px)."""
    return round(box["x"] + (j + 0.5) * box["width"] / cols), round(box["y"] + (i + 0.5) * box["height"] / rows)


def _hover(p, box, i, j, rows, cols):
    p.mouse.move(*_centre(box, i, j, rows, cols))
    return p.inner_text("#ah-readout")


@pytest.mark.parametrize("n_query, n_key, size, pool_above, blocks", [
    (13, 10, 4, 8, "all"),  # every block of a 4 x 4 map: widths 4, 3, 3, 3 and 3, 2, 3, 2
    (600, 700, 256, 512, [(0, 0), (1, 2), (100, 37), (199, 233), (200, 234), (255, 255)]),  # the page's defaults
])
def test_the_pages_readout_click_and_labels_use_the_shared_block_edges(browser, tmp_path, n_query, n_key, size,
                                                                      pool_above, blocks):
    torch.manual_seed(2)
    weights = (torch.randn(1, 1, n_query, n_key) * 3).softmax(-1)
    weights[0, 0, :, 3:5] = 0  # keys 3-4: a whole key block of the 4 x 4 map (under the old width 3, half a block)
    queries, keys = [f"q{i}" for i in range(n_query)], [f"k{i}" for i in range(n_key)]
    page = render_html({"layer": [weights]}, tokens=[queries, keys], pool_above=pool_above, pool_size=size)
    qe, ke = block_edges(n_query, size), block_edges(n_key, size)
    rows, cols = len(qe) - 1, len(ke) - 1
    kept = _pooled_attention(weights, size)[0, 0]
    scale = weights.max().item()
    view = _Page(browser, page.save(tmp_path / "blocks.html"))
    p = view.page
    try:
        box = p.locator("#ah-matrix").bounding_box()
        cells = [(i, j) for i in range(rows) for j in range(cols)] if blocks == "all" else blocks
        for i, j in cells:
            readout = _hover(p, box, i, j, rows, cols)
            assert readout.startswith(f'queries {qe[i]}-{qe[i + 1] - 1} "q{qe[i]}"... -> keys {ke[j]}-{ke[j + 1] - 1}'
                                      f' "k{ke[j]}"...: largest '), (i, j, readout)
            value = readout.split("largest ")[1]  # PooledAttention's maximum of the same block, to the code's error
            read = 0.0 if value.startswith("below") else float(value.lstrip("~"))
            assert read == pytest.approx(kept[i, j].item(), rel=RELATIVE_ERROR + 0.005, abs=scale * 1e-6), \
                (i, j, readout, kept[i, j])
        widths = lambda e: {b - a for a, b in zip(e, e[1:])}
        caption = p.inner_text("#ah-matrix-caption")
        shown = lambda e: str(min(widths(e))) if len(widths(e)) == 1 else f"{min(widths(e))}-{max(widths(e))}"
        assert f"a block of {shown(qe)} x {shown(ke)} tokens" in caption
        if rows * 14 <= 520:  # every block's label is drawn: its first token
            labels = p.eval_on_selector_all("#ah-matrix-cols span", "els => els.map(e => e.textContent)")
            assert labels == [f"k{ke[j]}" for j in range(cols)]
            labels = p.eval_on_selector_all("#ah-matrix-rows span", "els => els.map(e => e.textContent)")
            assert labels == [f"q{qe[i]}" for i in range(rows)]
            # the masked keys 3-4 are key block 1, drawn grey (the old width of 3 put them with key 5: no grey block)
            grey = p.eval_on_selector("#ah-matrix", "c => Array.from({length: c.width}, (_, x) =>"
                                      " Array.from(c.getContext('2d').getImageData(x, 0, 1, 1).data.slice(0, 3)))")
            assert [x for x, rgb in enumerate(grey) if rgb == [215, 215, 215]] == [1]
        # a click opens the tokens around the block, and the head view follows its first query
        i, j = cells[len(cells) // 2]
        p.mouse.click(*_centre(box, i, j, rows, cols))
        centre = lambda e, b, n: max(0, min(n - min(64, n), e[b] + (e[b + 1] - e[b]) // 2 - 32))
        q0, k0 = centre(qe, i, n_query), centre(ke, j, n_key)
        caption = p.inner_text("#ah-matrix-caption")
        assert caption.startswith(f"layer, head 0: queries {q0}-{q0 + min(64, n_query) - 1}"
                                  f" x keys {k0}-{k0 + min(64, n_key) - 1}"), caption
        assert p.eval_on_selector("#ah-queries .ah-active", "e => e.dataset.index") == str(qe[i])
        assert view.errors == []
    finally:
        view.close()

"""Issue 26, the page's dynamic range: a long causal page was black. Its weights travelled as 8-bit
codes on a linear scale under each head's largest weight (1.0 in a causal head: the first token on
itself), so that every weight under 0.002 read 0: on a 2,000-token page 93% of them. They now travel
as log codes over six decades, and the page opens in the log colour scale where the linear one would
draw most weights as 0; checked by the pixels Chromium draws of a hand-written causal head whose
every row is known."""

from __future__ import annotations

import pytest
import torch

from attention_hooker import render_html
from attention_hooker._blocks import block_edges
from attention_hooker.views.page import RELATIVE_ERROR, decode_weights, encode_weights
from test_page import _Page, _payload, browser  # noqa: F401 (browser: the headless Chromium fixture)

BACKGROUND = (68, 1, 84)  # the colour of a weight of 0 (viridis' darkest)
BAND = 32  # each query's band of tiny weights: itself and the 32 keys before it


def _known_causal_head(n: int) -> torch.Tensor:
    """``(1, 1, n, n)``: query ``q`` gives 1e-4 to itself, falling to 1e-5 at key ``q - 32`` (never
    to key 0), and the rest of its attention to key 0, the sink; every other weight is exactly 0."""
    w = torch.zeros(1, 1, n, n)
    for d in range(BAND + 1):
        torch.diagonal(w[0, 0], offset=-d)[1:] = 1e-4 * 10 ** (-d / BAND)  # (q, q - d) for q - d >= 1
    w[0, 0, :, 0] = 1 - w[0, 0].sum(-1)
    return w


def _expected_cells(weights: torch.Tensor, rows: list, cols: list) -> torch.Tensor:
    """Which cells of a picture whose cell ``(i, j)`` covers queries ``rows[i]:rows[i + 1]`` and keys
    ``cols[j]:cols[j + 1]`` hold a weight that is not 0."""
    nonzero = (weights[0, 0] > 0).float()
    return torch.tensor([[bool(nonzero[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].any()) for j in range(len(cols) - 1)]
                         for i in range(len(rows) - 1)])


def _painted(q: int, out: int) -> list:
    """The rows (or keys) each of ``out`` pixels covers when the page paints ``q`` of them (view.js's paint)."""
    starts = [(y * q) // out for y in range(out)]
    return starts + [q]


def _drawn(view, selector: str) -> torch.Tensor:
    """``(height, width)``: which pixels of a canvas are visibly not the colour of a weight of 0."""
    width, height, data = view.page.eval_on_selector(selector, "c => [c.width, c.height, Array.from("
                                                               "c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]")
    pixels = torch.tensor(data, dtype=torch.int32).view(height, width, 4)[..., :3]
    return (pixels - torch.tensor(BACKGROUND)).abs().amax(-1) >= 20


def test_codes_keep_six_decades_so_that_1e5_and_1_are_both_shown_within_the_stated_error():
    """1e-5 next to a head's 1.0 was code 0 (read 0); every weight from 1e-6 of the head's largest up
    now decodes within RELATIVE_ERROR (2.8%), which the docstring states."""
    weights = torch.logspace(-6, 0, 1000).view(1, 1, 10, 100)
    codes, scales = encode_weights(weights)
    decoded = decode_weights(codes, scales)
    torch.testing.assert_close(decoded, weights, rtol=RELATIVE_ERROR * 1.0001, atol=0)
    assert RELATIVE_ERROR == pytest.approx(0.0277, abs=1e-4) and "2.8%" in encode_weights.__doc__
    one, tiny = encode_weights(torch.tensor([[[[1.0, 1e-5, 0.0]]]]))[0].flatten().tolist()[:2]
    assert 0 < tiny < one, "1e-5 and 1.0 both have a code, and they differ"
    codes, _ = encode_weights(torch.tensor([[[[1.0, 1e-9, 0.0, float("nan")]]]]))
    assert codes.flatten().tolist() == [254, 1, 0, 255], "under the floor: code 1 (read 'below'); 0 stays 0"


@pytest.mark.parametrize("n", [2000, 4000])
def test_a_long_causal_page_shows_its_known_pattern_in_every_row(browser, tmp_path, n):  # noqa: F811
    """The done-when of issue 26: every row of a 4,000-token causal map (and a 2,000-token one), and of
    its overview thumbnail, shows the sink and the band of 1e-4..1e-5 weights where they are, and the
    colour of 0 where the weights are 0: in the page's default mode and with each query's largest
    brightest. Before, only the first rows showed (their weights are large) and the thumbnail was black."""
    weights = _known_causal_head(n)
    page = render_html({"layer": [weights]}, tokens=[f"t{i}" for i in range(n)])
    meta, _ = _payload(page.html)
    call = meta["layers"][0]["calls"][0]
    assert call["pooled"]["shape"] == [1, 1, 256, 256] and meta["colour"] == "log"
    edges = block_edges(n, 256)
    blocks = _expected_cells(weights, edges, edges)  # (256, 256): a 256 x 256 matrix canvas, one pixel a block
    thumb = _painted(256, 48)  # the overview paints the 256 x 256 blocks on 48 x 48 pixels
    thumb_cells = torch.tensor([[bool(blocks[thumb[y]:thumb[y + 1], thumb[x]:thumb[x + 1]].any()) for x in range(48)]
                                for y in range(48)])
    view = _Page(browser, page.save(tmp_path / f"causal-{n}.html"))
    try:
        assert view.page.input_value("#ah-scale") == "log" and view.page.input_value("#ah-norm") == "head"
        shown = {"default": (_drawn(view, "#ah-matrix"), _drawn(view, "#ah-overview canvas"))}
        legend = view.page.inner_text("#ah-legend-note")
        view.page.select_option("#ah-norm", "row")  # each query's largest = brightest
        shown["row"] = (_drawn(view, "#ah-matrix"), _drawn(view, "#ah-overview canvas"))
        assert view.errors == []
    finally:
        view.close()
    for mode, (matrix, overview) in shown.items():
        assert matrix.shape == (256, 256) and overview.shape == (48, 48)
        assert matrix.all(-1).logical_not().all() and matrix.any(-1).all(), mode
        assert torch.equal(matrix, blocks), (mode, "the sink and the band in every row, 0 elsewhere",
                                             (matrix != blocks).nonzero()[:5])
        assert torch.equal(overview, thumb_cells), (mode, "the thumbnail too", (overview != thumb_cells).nonzero()[:5])
        assert matrix[1:].sum(-1).min() >= 2, "every row past the first block: the sink and the band apart"
    assert "within 2.8% of the captured weight" in legend, "the page states the codes' error bound"


def test_the_row_mode_colours_each_querys_largest_brightest(browser, tmp_path):  # noqa: F811
    """A late row of a causal head whose largest is 0.1 next to row 0's 1.0: the head's scale draws it
    dimmer than row 0; 'each query's largest' draws both rows' largest in the brightest colour."""
    weights = torch.zeros(1, 1, 4, 4)
    weights[0, 0, 0, 0] = 1.0
    weights[0, 0, 1:, 0] = torch.tensor([0.5, 0.2, 0.1])
    for q in range(1, 4):
        weights[0, 0, q, 1: q + 1] = (1 - weights[0, 0, q, 0]) / q
    view = _Page(browser, render_html({"layer": [weights]}, color_scale="linear").save(tmp_path / "rows.html"))
    read = "c => Array.from({length: 4}, (_, q) => Array.from(c.getContext('2d').getImageData(0, q * c.height / 4, 1, 1).data.slice(0, 3)))"
    try:
        head = view.page.eval_on_selector("#ah-matrix", read)
        view.page.select_option("#ah-norm", "row")
        row = view.page.eval_on_selector("#ah-matrix", read)
        legend = view.page.inner_text("#ah-matrix-legend")
        assert view.errors == []
    finally:
        view.close()
    yellow = [253, 231, 37]
    assert head[0] == yellow and all(colour != yellow for colour in head[1:]), "the head's largest only"
    assert row[0] == yellow and row[1] == yellow, "row 1's largest (0.5, key 0) is its brightest"
    assert row[3] != yellow and "each query's largest" in legend  # row 3's largest is 0.3 (keys 1-3), not key 0


TEXT = ("Attention lets every token of a sentence look at every other token, and each head of each layer learns "
        "its own way of looking: some follow the previous word, some the separator, some the subject of the verb. ")


@pytest.mark.parametrize("text, asked, opens", [
    (None, None, "linear"),  # the demo's sentence: its weights show in linear
    (TEXT * 10, None, "log"),  # about 400 tokens: most of MiniLM's weights are under 1/510 of their head's largest
    (TEXT * 10, "linear", "linear"),  # as asked
])
def test_the_page_opens_in_log_where_linear_would_draw_most_weights_as_0(tmp_path, text, asked, opens):
    """run and demo passed their --color-scale default, linear, to the page: a long page opened black."""
    from attention_hooker.cli import main

    args = ["demo", "--out", str(tmp_path), "--no-grids"] + (["--text", text] if text else [])
    assert main(args + (["--color-scale", asked] if asked else [])) == 0
    assert _payload((tmp_path / "attention.html").read_text(encoding="utf-8"))[0]["colour"] == opens

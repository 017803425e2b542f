"""Issue 26, part 3: the head-roles page misled. "Colour by: induction" on an encoder (MiniLM) ran from 0
to the best score, 0.0109, so several heads glowed yellow; the summary named "induction: layer 3 head 5
(0.01)" the strongest; the page opened on the plain maps; "importance" was all grey with no word why.
Pages checked by the pixels Chromium draws."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

from attention_hooker import AttentionHookerError, render_html
from attention_hooker.cli import main
from attention_hooker.cli.head_roles import ROLE_FLOOR
from test_page import _Page, _payload, browser  # noqa: F401 (browser: the headless Chromium fixture)

YELLOW = [253, 231, 37]  # the brightest colour


def _tile(page, layer: int, head: int):
    """The colour of one head's tile of the overview, and its title."""
    selector = f"#ah-overview canvas[data-layer='{layer}'][data-head='{head}']"
    colour = page.eval_on_selector(selector, "c => Array.from(c.getContext('2d').getImageData(0, 0, 1, 1).data.slice(0, 3))")
    return colour, page.get_attribute(selector, "title")


@pytest.fixture(scope="module")
def minilm_heads(tmp_path_factory, minilm_path):
    """``attention-hooker heads`` on the real MiniLM: (its printed summary, the out folder)."""
    out = tmp_path_factory.mktemp("heads")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["heads", "--model", str(minilm_path), "--out", str(out)]) == 0
    return printed.getvalue(), out


def test_the_summary_names_no_strongest_head_for_a_role_below_the_floor(minilm_heads):
    """It printed "induction: encoder.layer.3... head 5 (0.01)": no MiniLM head is an induction head."""
    out, folder = minilm_heads
    lines = {line.split(":")[0]: line for line in out.splitlines() if ":" in line}
    induction = [float(row.split(",")[4]) for row in (folder / "head_roles.csv").read_text().splitlines()[1:]]
    assert max(induction) < ROLE_FLOOR == 0.1, "MiniLM, an encoder, has no induction head"
    assert lines["induction"] == f"induction:{' ' * 14}no head reaches 0.1 (largest {max(induction):.3f})"
    assert "head" not in lines["induction"].split("no head")[1], "no head named"
    assert "previous_token:         encoder.layer.0.attention.self head 2 (1.00)" in out, "a strong role still is"


def test_the_roles_page_opens_on_a_role_colours_shares_on_0_to_1_and_says_why_a_score_is_missing(
        browser, minilm_heads):  # noqa: F811
    _, folder = minilm_heads
    path = folder / "head_roles.html"
    meta, _ = _payload(path.read_text(encoding="utf-8"))
    induction = {(li, h): v for li, layer in enumerate(meta["layers"]) for h, v in enumerate(layer["scores"]["induction"])}
    best = max(induction, key=induction.get)
    assert 0 < induction[best] < 0.02, induction[best]
    view = _Page(browser, path)
    p = view.page
    try:
        opened = (p.input_value("#ah-overview-colour"), p.inner_text("#ah-overview-legend"), _tile(p, 0, 2))
        p.select_option("#ah-overview-colour", "induction")
        induction_tile, induction_legend = _tile(p, *best), p.inner_text("#ah-overview-legend")
        p.select_option("#ah-overview-colour", "importance")
        importance_tile, importance_legend = _tile(p, 0, 0), p.inner_text("#ah-overview-legend")
        assert view.errors == []
    finally:
        view.close()
    colour_by, legend, (colour, title) = opened
    assert colour_by == "previous token", "the page opens on a role, not on the plain maps"
    assert legend.startswith("colour: previous token, 0.00 (dark) to 1.00 (bright), its whole range")
    assert colour == YELLOW and title.endswith("previous token 1.00"), "layer 0 head 2: a previous-token head"
    colour, title = induction_tile
    assert induction_legend.startswith("colour: induction, 0.00 (dark) to 1.00 (bright), its whole range")
    assert colour != YELLOW and colour[1] < 20, ("the best induction head, 0.01 of 1, is dark", colour)
    colour, title = importance_tile
    why = "needs a language-model loss (an encoder without its head has none)"
    assert colour == [215, 215, 215] and title.endswith(f"importance does not apply: {why}")
    assert importance_legend == f"colour: importance: does not apply to any head shown: {why}"


def test_the_pages_own_shares_are_coloured_on_0_to_1_and_entropy_on_0_to_ln_keys(browser, tmp_path):  # noqa: F811
    """Two diffuse heads (confidence 0.30 and 0.35): the more confident was the brightest colour, as a
    head that always looks at one token would be."""
    weights = torch.full((1, 2, 10, 10), 0.7 / 9)
    weights[0, 0, :, 0] = 0.30
    weights[0, 0, :, 1:] = 0.70 / 9
    weights[0, 1, :, 0] = 0.35
    weights[0, 1, :, 1:] = 0.65 / 9
    view = _Page(browser, render_html({"layer": [weights]}).save(tmp_path / "shares.html"))
    p = view.page
    try:
        p.select_option("#ah-overview-colour", "confidence")
        confidence = [_tile(p, 0, h)[0] for h in range(2)], p.inner_text("#ah-overview-legend")
        p.select_option("#ah-overview-colour", "entropy (nats)")
        entropy = p.inner_text("#ah-overview-legend")
        assert view.errors == []
    finally:
        view.close()
    (low, high), legend = confidence
    assert YELLOW not in (low, high) and low != high, confidence
    assert legend.startswith("colour: confidence, 0.00 (dark) to 1.00 (bright), its whole range")
    assert entropy.startswith(f"colour: entropy (nats), 0.00 (dark) to {math.log(10):.2f} (bright), its whole range")


def test_a_score_without_a_range_says_its_colours_are_the_heads_own(browser, tmp_path):  # noqa: F811
    weights = {"layer": [torch.rand(1, 3, 4, 4).softmax(-1)]}
    page = render_html(weights, head_scores={"importance": {"layer": [0.0, 2.0, float("nan")]}},
                       not_applicable={"importance": "no loss here"}, color_by="importance")
    view = _Page(browser, page.save(tmp_path / "own.html"))
    try:
        legend = view.page.inner_text("#ah-overview-legend")
        tiles = [_tile(view.page, 0, h) for h in range(3)]
    finally:
        view.close()
    assert legend == ("colour: importance, 0.00 (dark) to 2.00 (bright): the heads' own range (no fixed bound); "
                      "grey: does not apply (no loss here)")
    assert tiles[1][0] == YELLOW and tiles[2] == ([215, 215, 215], "layer head 2: importance does not apply: no loss here")


def test_score_ranges_reasons_and_the_opening_score_are_checked():
    weights = {"layer": [torch.rand(1, 2, 3, 3).softmax(-1)]}
    with pytest.raises(AttentionHookerError, match=r"color_by names 'inductoin', a score the page does not carry; "
                                                   r"its scores: 'first-token share', 'confidence'"):
        render_html(weights, color_by="inductoin")
    with pytest.raises(AttentionHookerError, match=r"score_ranges\['confidence'\] = \(1, 0\) must be \(low, high\)"):
        render_html(weights, score_ranges={"confidence": (1, 0)})
    with pytest.raises(AttentionHookerError, match=r"score_ranges\['confidence'\] = 'ab' must be"):
        render_html(weights, score_ranges={"confidence": "ab"})
    with pytest.raises(AttentionHookerError, match="not_applicable names 'x'"):
        render_html(weights, not_applicable={"x": "why"})
    with pytest.raises(AttentionHookerError, match=r"not_applicable\['confidence'\] must be a sentence"):
        render_html(weights, not_applicable={"confidence": 3})

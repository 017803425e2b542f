"""Issue 21: the page receives its per-head scores; the public render_html computes the built-in
ones (page_scores.py, above the views), so the page shows the same scores as before."""

from __future__ import annotations

import json
import re

import pytest
import torch

import attention_hooker
from attention_hooker import AttentionHookerError, head_confidence, head_entropy, previous_token_score, sink_share
from attention_hooker.page_scores import page_scores
from attention_hooker.views import page as views_page


def _calls(page):
    meta = json.loads(re.search(r'id="ah-meta">(.*?)</script>', page.html, re.S).group(1))
    return [call for layer in meta["layers"] for call in layer["calls"]]


def test_the_public_page_carries_the_four_scores_of_every_call_and_batch_item():
    square, cross = torch.rand(2, 3, 4, 4).softmax(-1), torch.rand(2, 3, 2, 4).softmax(-1)
    page = attention_hooker.render_html({"self": [square, square.flip(-1)], "cross": [cross]})
    expected = {"first-token share": lambda w: sink_share(w, [0]), "confidence": head_confidence,
                "entropy (nats)": head_entropy, "previous token": previous_token_score}
    for call, weights in zip(_calls(page), (square, square.flip(-1), cross)):
        names = list(expected) if weights.shape[-1] == weights.shape[-2] else list(expected)[:3]
        assert list(call["scores"]) == names, "the names and their order, as before"
        for name in names:
            want = expected[name](weights.double())
            torch.testing.assert_close(torch.tensor(call["scores"][name], dtype=torch.float64), want, atol=2e-6, rtol=0,
                                       msg=name)
    assert attention_hooker.render_html is attention_hooker.page_scores.render_html


def test_the_page_draws_the_scores_it_is_given_and_computes_none():
    weights = torch.rand(1, 2, 3, 3).softmax(-1)
    assert _calls(views_page.render_html({"layer": [weights]}))[0]["scores"] == {}
    given = views_page.render_html({"layer": [weights]}, scores={"layer": [{"mine": torch.tensor([[0.25, 0.5]])}]})
    assert _calls(given)[0]["scores"] == {"mine": [[0.25, 0.5]]}
    scored = page_scores({"layer": [weights]})
    public = attention_hooker.render_html({"layer": [weights]})
    assert _calls(views_page.render_html({"layer": [weights]}, scores=scored))[0]["scores"] == _calls(public)[0]["scores"]
    with pytest.raises(AttentionHookerError, match=r"scores\['layer'\]\[0\]\['mine'\] must hold \(batch, heads\) = \(1, 2\)"):
        views_page.render_html({"layer": [weights]}, scores={"layer": [{"mine": [[1.0, 2.0, 3.0]]}]})


def test_calls_the_page_refuses_get_no_scores_and_the_page_says_why():
    assert page_scores({"l": [torch.rand(5, 5)], "m": [torch.rand(1, 1, 0, 0)]}) == {"l": [{}], "m": [{}]}
    assert page_scores(42) == {}
    with pytest.raises(AttentionHookerError, match="Wrong shape for layer 'l' call 0"):
        attention_hooker.render_html({"l": [torch.rand(5, 5)]})
    assert page_scores({"l": [torch.rand(1, 1, 3, 3)]}) == {"l": [{}]}, "not probabilities: no scores, as before"

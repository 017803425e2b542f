"""The public :func:`render_html`: the page of a capture with the per-head scores its overview
can be coloured by.

The page (``views/page``) draws what it is given and computes no score: views do not import the
analyses (pyproject.toml, the import-linter contracts). The scores are computed here, one layer
above the views, and handed to it; ``attention_hooker.render_html`` is this function.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ._map_kinds import kind_of
from ._tensor import as_batched, values_of
from .analysis.compare import AttentionComparison
from .analysis.roles import head_confidence, previous_token_score
from .analysis.stats import head_entropy, sink_share
from .errors import AttentionHookerError
from .views.page import AttentionPage, PageScores
from .views.page import render_html as render_page
from .views.page.score_meta import score_mapping

__all__ = ["render_html", "page_scores", "call_scores", "SHARE_SCORES"]

SHARE_SCORES = ("first-token share", "confidence", "previous token")
"""The page's own scores that are shares of a row's attention: bounded in [0, 1], coloured on [0, 1]."""


def call_scores(weights: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The page's own scores of one call ``(batch, heads, query, key)``: ``{name: (batch, heads)}``
    float64: first-token share, confidence, entropy (nats) and, for square calls of more than
    one token, previous-token score; ``{}`` for weights that are not attention probabilities.

    Each head is scored on its own (a long call's float64 copy stays one head), its non-finite
    weights read as 0.

    Example:
        >>> sorted(call_scores(torch.rand(1, 2, 3, 3).softmax(-1)))
        ['confidence', 'entropy (nats)', 'first-token share', 'previous token']
        >>> call_scores(torch.rand(1, 2, 3, 3).softmax(-1))["confidence"].shape
        torch.Size([1, 2])
    """
    functions = {"first-token share": lambda w: sink_share(w, [0]), "confidence": head_confidence,
                 "entropy (nats)": head_entropy}
    if weights.shape[-1] == weights.shape[-2] and weights.shape[-1] > 1:
        functions["previous token"] = previous_token_score
    tables: Dict[str, List[torch.Tensor]] = {name: [] for name in functions}
    try:
        for head in range(weights.shape[1]):
            w = weights[:, head: head + 1].detach().to("cpu", torch.float64)
            w = torch.where(torch.isfinite(w), w, torch.zeros((), dtype=w.dtype))
            for name, function in functions.items():
                tables[name].append(function(w)[:, 0])  # (B,)
    except AttentionHookerError:  # not attention probabilities (a test's random numbers): no scores
        return {}
    return {name: torch.stack(columns, dim=1) for name, columns in tables.items()}


def page_scores(source, *, layers: Optional[Sequence[str]] = None) -> PageScores:
    """The page's own scores of every call: ``{layer name: [{score name: (batch, heads)} per call]}``.

    A call the page will refuse (not ``(batch, heads, query, key)``, or without positions) gets
    none here: the page says what is wrong with it.
    """
    try:
        values = values_of(source, layers=layers)
    except AttentionHookerError:  # the page says so, in its own words
        return {}
    return {name: [_scored(weights) for weights in calls] for name, calls in values.items()}


def _scored(weights) -> Dict[str, torch.Tensor]:
    if kind_of(weights) is not None:  # not probabilities over tokens (DiffLlama's map, a channel map): no scores
        return {}
    try:
        weights = as_batched(weights)
    except AttentionHookerError:
        return {}
    return {} if 0 in tuple(weights.shape)[-2:] else call_scores(weights)


def _own_score_meta(source, layers, scores: PageScores):
    """The ranges of the page's own scores that it carries (shares on [0, 1]; entropy on [0, ln keys]
    for the most keys of any scored call), and why previous token is missing where a call is not
    square: ``({score: (low, high)}, {score: why})``."""
    carried, keys, square, cross = set(), 1, False, False
    values = values_of(source, layers=layers) if scores else {}
    for name, calls in scores.items():
        for call, weights in zip(calls, values.get(name, ())):
            if call:
                carried.update(call)
                keys = max(keys, int(weights.shape[-1]))
                square, cross = square or "previous token" in call, cross or "previous token" not in call
    ranges = {name: (0.0, 1.0) for name in SHARE_SCORES if name in carried}
    if "entropy (nats)" in carried and keys > 1:
        ranges["entropy (nats)"] = (0.0, math.log(keys))  # 0: one key; ln(keys): uniform over the keys
    notes = {"previous token": "self-attention only (as many queries as keys)"} if square and cross else {}
    return ranges, notes


def render_html(
    source,
    tokens: Optional[Sequence] = None,
    *,
    query_tokens: Optional[Sequence[str]] = None,
    key_tokens: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    compression_level: int = 1,
    pool_above: int = 512,
    pool_size: int = 256,
    top_keys: int = 8,
    head_scores: Optional[Dict[str, Dict[str, Sequence[float]]]] = None,
    color_scale: Optional[str] = None,
    score_ranges: Optional[Mapping[str, Sequence[float]]] = None,
    not_applicable: Optional[Mapping[str, str]] = None,
    color_by: Optional[str] = None,
    prompt_length: Optional[int] = None,
    words=None,
    units: str = "tokens",
    image=None,
) -> AttentionPage:
    """One offline, self-contained interactive page of captured attention.

    Views: the layers x heads overview (a click selects a head), a head view
    (query tokens on the left, key tokens on the right, lines from the selected
    token weighted by attention, heads coloured and toggleable), and the matrix
    of the selected layer and head with the value under the pointer. Selectors
    for layer, call (for layers called several times), batch item and head.

    A call longer than ``pool_above`` tokens on either axis is carried as its
    pooled map (blocks of tokens, each block's largest weight, ``min(pool_size,
    length)`` blocks a side, those of :class:`~attention_hooker.keep.pooling.PooledAttention`) and
    each query's ``top_keys`` largest weights
    (see :mod:`attention_hooker.views.page.long_calls`): the matrix shows the pooled
    map, a click on a block shows the tokens inside it, and the head view lists
    each query's largest weights with the share of its attention they hold.
    (Measured: MiniLM's 512-token page weighs 20.7 MB whole and 2.8 MB with
    ``pool_above=256, pool_size=128``; ``benchmarks/bench_page.py``.)

    The overview can be coloured by a score per head instead of the maps:
    first-token share, confidence, entropy and (self-attention) previous-token
    score of every call and batch item (computed here, by :func:`page_scores`,
    and given to the page, which computes none); ``head_scores`` adds others
    (importance, retrieval, ... from ``attention-hooker heads``). A score is
    coloured on its range: the shares (first-token share, confidence, previous
    token) on [0, 1], entropy on [0, ln keys], a given score on ``score_ranges``
    where given, else on the heads' own range, which the legend says.

    The weights travel as 8-bit codes on a log scale, six decades below each
    head's largest weight, each within 2.8% of the captured weight
    (:func:`attention_hooker.views.page.encode_weights`): 1e-5 and 1.0 are both
    shown. The page opens in the log colour scale (six decades) where the linear
    one would draw most of the weights as 0 (long inputs, causal heads: a
    4,000-token causal head then shows its structure in every row), else in
    linear. "brightest" colours each query's largest weight brightest instead
    of the head's.

    Text the page carries (title, tokens, layer and score names) can always be
    saved: a lone surrogate becomes U+FFFD, and a text past 1,000 characters is
    cut (a label shows its first 64, the rest on hover).

    A comparison (:func:`attention_hooker.compare`) gives the page's compare mode: a "showing"
    selector draws every view of A or of B, a panel shows the selected head in A, in B and
    A - B (red where A attends more, blue where B does), and the overview opens coloured by
    each head's Jensen-Shannon distance.

    Args:
        source: a hooker, a loaded capture, or ``{layer_name: [tensor per call]}``
            with tensors ``(batch, heads, query, key)``; or an :class:`~attention_hooker.analysis.compare.AttentionComparison`.
        tokens: labels; a list of lists when axes differ in length (encoder and
            decoder tokens): each axis takes the first list of its length; or
            one list per batch item. A loaded capture's own tokens by default.
            When the capture kept some query rows or keys (``rows=``, ``keys=``),
            their tokens label the axes. An axis no list fits shows its
            positions (the rule: :class:`~attention_hooker.views.labels.AxisLabels`).
        query_tokens: labels of the query axis of cross-attention layers.
        key_tokens: labels of the key axis of cross-attention layers.
        layers: the layer names to include (default: all).
        title: the page title.
        compression_level: zlib level (1 fastest, 9 smallest).
        pool_above: the longest axis, in tokens, carried whole (default 512).
        pool_size: the most blocks a side of a long call's pooled map (default 256).
        top_keys: the keys kept of each query row of a long call (default 8).
        head_scores: more scores to colour the overview by: ``{score name: {layer
            name: one number per head}}`` (NaN where a score does not apply).
        color_scale: the colour scale the page opens in: ``"linear"``, ``"sqrt"`` or ``"log"``
            (as the plots' ``color_scale``; the page's "colour" selector changes it); by
            default log where linear would draw most of the weights that are not 0 as 0
            (under 1/510 of their head's largest), else linear.
        score_ranges: ``{score name: (low, high)}``: the range a score is coloured on
            (``(0, 1)`` for a share); a score without one is coloured on the heads' own.
        not_applicable: ``{score name: why}``: the sentence the page shows where a head
            has no value of the score (``head_scores`` NaN), e.g. ``{"importance": "needs
            a language-model loss"}``.
        color_by: the score the overview opens coloured by (default: the maps).
        prompt_length: generation (``stitch_steps``): the first ``prompt_length`` tokens are the
            prompt, the rest generated. The page draws a line where the prompt ends beside the
            matrix, sets the generated tokens' labels apart, and its caption says how many of each.
        words: the same capture between words, :func:`~attention_hooker.to_words` of it (with the
            same ``layers``): the page carries both, and its "units" selector switches between
            tokens and words (every view: overview, head view, matrix). ``render_html(words)``
            alone is a page of words.
        units: what the page opens with: ``"tokens"`` (default) or ``"words"``.
        image: a vision-language capture's image and its tokens
            (:func:`~attention_hooker.views.page.image_meta.image_page_meta`): the page shows the
            image tokens as a patch grid over the picture, beside the text; hovering a query token
            lights each patch with that token's weight.

    Returns:
        An :class:`AttentionPage`.

    Raises:
        AttentionHookerError: on empty values, a wrong shape, an unknown layer,
            tokens that fit no axis of any call or are not a list of strings, a title
            that is not a string, a compression level outside 0..9, or a
            ``pool_above``, ``pool_size`` or ``top_keys`` that is not a positive int,
            or ``head_scores`` naming an unknown layer or giving a layer the wrong
            number of heads; ``words`` that lack a layer shown, or ``units="words"`` without them;
            ``score_ranges``, ``not_applicable`` or ``color_by`` naming a score the page does not
            carry (or a range that is not ``low < high``).

    Example:
        >>> page = render_html({"layer": [torch.rand(1, 2, 3, 3).softmax(-1)]}, tokens=["a", "b", "c"])
        >>> page.html.startswith("<!DOCTYPE html>") and "http://" not in page.html
        True
    """
    if isinstance(source, AttentionComparison):
        if words is not None or units != "tokens":
            raise AttentionHookerError("a comparison's page is by tokens: words= and units= are for one capture")
        return _comparison_page(source, tokens, query_tokens=query_tokens, key_tokens=key_tokens, layers=layers,
                                title=title, compression_level=compression_level, pool_above=pool_above,
                                pool_size=pool_size, top_keys=top_keys, head_scores=head_scores,
                                color_scale=color_scale)
    scores = page_scores(source, layers=layers)
    ranges, notes = _own_score_meta(source, layers, scores)
    return render_page(source, tokens, query_tokens=query_tokens, key_tokens=key_tokens, layers=layers,
                       title=title, compression_level=compression_level, pool_above=pool_above,
                       pool_size=pool_size, top_keys=top_keys, head_scores=head_scores,
                       scores=scores, color_scale=color_scale,
                       score_ranges={**ranges, **score_mapping(score_ranges, "score_ranges")},
                       not_applicable={**notes, **score_mapping(not_applicable, "not_applicable")}, color_by=color_by,
                       prompt_length=prompt_length, words=words,
                       word_scores=None if words is None else page_scores(words, layers=layers), units=units,
                       image=image)


def _comparison_page(comparison: AttentionComparison, tokens, *, layers, title, head_scores, **options) -> AttentionPage:
    """The compare mode's page: A's compared calls as the page's own, B's and each head's
    Jensen-Shannon distance (the score the overview opens in) beside them."""
    A, B = comparison.names
    names = list(comparison) if layers is None else list(layers)
    unknown = [name for name in names if name not in comparison]
    if unknown:
        raise AttentionHookerError(f"unknown layer(s) {unknown}; the comparison's layers: {list(comparison)}")
    values_a = {name: [comparison[name].a] for name in names}
    values_b = {name: [comparison[name].b] for name in names}
    score = f"JS distance {A} vs {B}"
    head_scores = {**(head_scores or {}), score: {name: comparison[name].head_distance for name in names}}
    compare = {"names": (A, B), "values": {name: calls[0] for name, calls in values_b.items()},
               "names_b": {name: comparison[name].name_b for name in names}, "scores": page_scores(values_b),
               "distance": {name: comparison[name].distance for name in names}, "colour_by": score}
    return render_page(values_a, tokens if tokens is not None else comparison.tokens, title=title or f"{A} vs {B}",
                       head_scores=head_scores, scores=page_scores(values_a), compare=compare, **options)

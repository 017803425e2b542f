"""The offline interactive page: one self-contained HTML file.

The weights travel as one compressed binary payload (8-bit codes on a log
scale per head, zlib, base64: :func:`encode_weights` says the code and its
error bound); ``view.js`` and ``view.css`` are real files of this package,
inlined when the page is rendered. Nothing is fetched: no CDN, no fonts, no
network.
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import math
import os
import re
import zlib
from importlib import resources
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..._checks import one_of, positive_int, prepare_output_path
from ...selection import selected_rows
from ..._tensor import as_batched, require_positions, values_of
from ...errors import AttentionHookerError, AttentionHookerTypeError
from ..labels import SHOWN_CHARS, AxisLabels, positions_of, short_layer_names
from ..plot import COLOR_SCALES
from .compare import PageComparison, comparison_meta
from .long_calls import encode_long_call, is_long
from .score_meta import score_meta

__all__ = ["render_html", "AttentionPage", "PageScores", "encode_weights", "decode_weights", "LOG_DECADES",
           "RELATIVE_ERROR"]

PageScores = Mapping[str, Sequence[Mapping[str, object]]]
"""Per-head scores of each call, to colour the overview by: ``{layer name: [{score name: (batch,
heads) numbers} per call]}`` (a tensor or nested lists; a layer or call left out has none)."""

_PLACEHOLDER = re.compile(r"__TITLE__|__META__|__PAYLOAD__|/\*__CSS__\*/|/\*__JS__\*/")
NONFINITE_CODE = 255
_TOP_CODE = 254
LOG_DECADES = 6  # codes 1..254 span the decades from 1e-6 of a head's largest weight up to it
_STEPS = _TOP_CODE - 1  # 253 log steps from code 1 (the floor) to code 254 (the head's largest)
RELATIVE_ERROR = 10 ** (LOG_DECADES / (2 * _STEPS)) - 1  # half a step: 0.0277, the codes' error bound
# The codes under this one are weights below 1/510 of the head's largest: the linear colour scale draws them as 0.
_LINEAR_ZERO = _TOP_CODE + math.ceil(_STEPS * math.log10(1 / 510) / LOG_DECADES)
_TEXT_LIMIT = 1000  # the most characters of any one text the page carries (a label, a name, the title)


def _page_text(text: str) -> str:
    """``text`` as the page carries it: always encodable as UTF-8, and at most 1,000 characters.

    A lone surrogate (from ``os.fsdecode`` of undecodable bytes, or ``errors="surrogateescape"``)
    cannot be written as UTF-8: it becomes U+FFFD, the replacement character (a pair of them
    becomes the character it encodes). A longer text is cut, its end marked with "…": a 100 KB
    token travels as its first 999 characters, of which the page shows 64 (``view.js``) and
    the rest on hover.

    Example:
        >>> _page_text("bad \\ud800 name")
        'bad \ufffd name'
        >>> len(_page_text("x" * 100_000)), _page_text("x" * 100_000)[-1]
        (1000, '…')
    """
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1] + "…"


def encode_weights(weights: torch.Tensor):
    """``(batch, heads, query, key)`` -> ``(uint8 codes, per-(batch, head) scales)``.

    The code of a weight ``w`` is on a log scale below its head's largest finite weight
    (``scale``): ``code = round(254 + 253 * log10(w / scale) / 6)``, so that 254 is the head's
    largest and each step down is a factor of ``10 ** (6 / 253)`` (5.6%); 1 is ``scale * 1e-6``
    and every smaller positive weight; 0 is exactly 0 (a negative weight reads 0 too); 255
    marks a non-finite weight. ``decode_weights`` inverts it to within 2.8% of the weight
    (:data:`RELATIVE_ERROR`, half a step) for every weight from ``scale * 1e-6`` up; one below
    that decodes as ``scale * 1e-6``.

    Six decades in 8 bits: at long context a causal head's largest weight is 1.0 (its first
    token on itself) while a late row's are 1e-3 to 1e-5; a linear code read them all as 0.
    (The page was 8-bit linear before: within ``scale / 508`` absolutely, blind below it.)

    Example:
        >>> codes, scales = encode_weights(torch.tensor([[[[1.0, 1e-5, 0.0]]]]))
        >>> codes.tolist(), round(decode_weights(codes, scales)[0, 0, 0, 1].item() / 1e-5, 2)
        ([[[[254, 43, 0]]]], 0.99)
    """
    w = weights.detach().to("cpu", torch.float32)  # (B, H, Q, K)
    finite = torch.isfinite(w)
    clean = torch.where(finite, w, torch.zeros((), dtype=w.dtype)).clamp_(min=0)
    scales = clean.amax(dim=(-2, -1))  # (B, H)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[..., None, None]
    positive = clean > 0
    codes = clean.div_(safe).log10_().mul_(_STEPS / LOG_DECADES).add_(_TOP_CODE).round_().clamp_(1, _TOP_CODE)
    codes = codes.to(torch.uint8).mul_(positive)  # 0 where the weight is 0
    codes[~finite] = NONFINITE_CODE
    return codes, scales


def _masked_keys(weights: torch.Tensor) -> List[List[int]]:
    """Per batch item, the keys no query of any head gives any weight (exactly 0: padding,
    or masked keys), so that the page marks them instead of drawing them as tiny weights."""
    w = weights.detach()
    zero = (w == 0).all(dim=1).all(dim=1)  # (B, K)
    return [torch.nonzero(row).flatten().tolist() for row in zero]


def decode_weights(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The page's decoding, in torch: ``scale * 10 ** (6 * (code - 254) / 253)``; 0 for code 0,
    NaN for code 255 (``codes`` ``(batch, heads, query, key)``, ``scales`` ``(batch, heads)``)."""
    w = torch.pow(10.0, (codes.double() - _TOP_CODE) * (LOG_DECADES / _STEPS)) * scales.double()[..., None, None]
    w = torch.where(codes == 0, torch.zeros_like(w), w).float()
    return torch.where(codes == NONFINITE_CODE, torch.full_like(w, float("nan")), w)


class _Payload:
    """The page's byte arrays, one after the other, each starting at a multiple of 4 bytes
    (so that the page can read 16- and 32-bit arrays in place)."""

    def __init__(self):
        self.chunks: List[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> int:
        """Appends ``data``; returns its offset."""
        pad = -self.size % 4
        if pad:
            self.chunks.append(b"\0" * pad)
            self.size += pad
        offset = self.size
        self.chunks.append(data)
        self.size += len(data)
        return offset

    def join(self) -> bytes:
        return b"".join(self.chunks)


def _call_scores(scores: Optional[PageScores], name: str, call: int, shape) -> Dict[str, list]:
    """The scores given for call ``call`` of layer ``name`` (``shape`` ``(batch, heads, query, key)``)
    as the page carries them: ``{score name: [[score per head] per batch item]}``, 6 decimals.

    Raises:
        AttentionHookerError: when a score is not one number per batch item and head.
    """
    per_call = (scores or {}).get(name) or ()
    if call >= len(per_call) or not per_call[call]:
        return {}
    carried = {}
    for score, table in per_call[call].items():
        rows = table.tolist() if hasattr(table, "tolist") else [list(row) for row in table]
        if len(rows) != shape[0] or any(len(row) != shape[1] for row in rows):
            raise AttentionHookerError(f"scores[{name!r}][{call}][{score!r}] must hold (batch, heads) = "
                                       f"{tuple(shape[:2])} numbers, one per batch item and head")
        carried[_page_text(str(score))] = [[round(float(x), 6) for x in row] for row in rows]
    return carried


def _add_head_scores(layer_meta: list, head_scores) -> None:
    """Puts the caller's ``{score: {layer: per head}}`` on each layer (checked against its heads)."""
    if head_scores is None:
        return
    if not isinstance(head_scores, dict) or not all(isinstance(k, str) for k in head_scores):
        raise AttentionHookerError("head_scores must be {score name: {layer name: one number per head}}")
    layers = {layer["name"]: layer for layer in layer_meta}
    for score, per_layer in head_scores.items():
        if not isinstance(per_layer, dict):
            raise AttentionHookerError(f"head_scores[{score!r}] must be {{layer name: one number per head}}")
        for name, numbers in per_layer.items():
            if name not in layers:
                raise AttentionHookerError(f"head_scores[{score!r}] names layer {name!r}, which the page does not show")
            heads = layers[name]["calls"][0]["shape"][1]
            values = [float(x) for x in (numbers.tolist() if hasattr(numbers, "tolist") else numbers)]
            if len(values) != heads:
                raise AttentionHookerError(
                    f"head_scores[{score!r}][{name!r}] has {len(values)} numbers; the layer has {heads} heads")
            layers[name].setdefault("scores", {})[_page_text(score)] = [None if x != x else round(x, 9) for x in values]


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class _LabelSets:
    """The label lists the page carries (``tokenSets``), each once; a call names its axes' lists by
    index (one index per batch item where the tokens are one list per batch item)."""

    def __init__(self, labels: AxisLabels, sets: Optional[List[List[str]]] = None):
        self.labels = labels
        self.sets: List[List[str]] = [] if sets is None else sets  # shared by the tokens' and the words' calls
        self._index: Dict[int, int] = {}  # id of a list the labels gave -> its index (the labels hold it)

    def _carried(self, tokens: Optional[List[str]]) -> Optional[int]:
        if tokens is None:
            return None
        if id(tokens) not in self._index:
            self._index[id(tokens)] = len(self.sets)
            self.sets.append([_page_text(str(t)) for t in tokens])
        return self._index[id(tokens)]

    def of_call(self, shape) -> dict:
        """``{"queryTokens", "keyTokens"}`` of a call of ``shape`` ``(batch, heads, query, key)``."""
        if self.labels.per_batch(shape[0]):
            pairs = [self.labels.axes(shape, b) for b in range(shape[0])]
            entry = {"queryTokens": [self._carried(q) for q, _ in pairs],
                     "keyTokens": [self._carried(k) for _, k in pairs]}
        else:
            pairs = [self.labels.axes(shape)]
            entry = {"queryTokens": self._carried(pairs[0][0]), "keyTokens": self._carried(pairs[0][1])}
        # Kept rows or keys (a selection): where each is in the input, for labels of a thinned axis.
        for name, labels in (("queryPositions", pairs[0][0]), ("keyPositions", pairs[0][1])):
            positions = None if labels is None else positions_of(labels)
            if positions is not None:
                entry[name] = positions
        return entry


class AttentionPage:
    """A rendered page: ``save(path)`` writes it; notebooks show it through ``_repr_html_``.

    Attributes:
        html: the whole page, one self-contained HTML document.
    """

    def __init__(self, html: str, title: str):
        self.html = html
        self.title = title

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Writes the page (folders are created); returns the path.

        Raises:
            AttentionHookerError: when the path cannot be written.
        """
        path = prepare_output_path(path, what="page")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.html)
        return path

    def _repr_html_(self) -> str:
        # An iframe keeps the page's script and styles apart from the notebook's. It takes
        # the height of what it shows once drawn (and again when that changes), instead
        # of a fixed 760 px that cut large pages and left small ones half empty.
        fit = ("var f=this,d=f.contentDocument;function s(){f.style.height="
               "Math.ceil(d.documentElement.getBoundingClientRect().height+4)+'px'}"
               "s();if(window.ResizeObserver){new ResizeObserver(s).observe(d.body)}")
        return (
            f'<iframe srcdoc="{html_lib.escape(self.html, quote=True)}" onload="{html_lib.escape(fit, quote=True)}" '
            # border-box: the border inside the 100%, or the frame is 2 px wider than the cell and scrolls it
            'style="display:block;box-sizing:border-box;width:100%;max-width:100%;height:480px;border:1px solid #ddd" '
            'title="attention"></iframe>'
        )

    def __len__(self) -> int:
        return len(self.html)

    def __repr__(self) -> str:
        return f"AttentionPage({self.title!r}, {len(self.html) / 1e6:.2f} MB)"


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
    scores: Optional[PageScores] = None,
    color_scale: Optional[str] = None,
    score_ranges: Optional[Mapping[str, Sequence[float]]] = None,
    not_applicable: Optional[Mapping[str, str]] = None,
    color_by: Optional[str] = None,
    prompt_length: Optional[int] = None,
    compare: Optional[PageComparison] = None,
    words=None,
    word_scores: Optional[PageScores] = None,
    units: str = "tokens",
    image: Optional[Mapping[str, object]] = None,
) -> AttentionPage:
    """The page of captured attention, with the per-head scores it is given: it draws, and
    computes no score. :func:`attention_hooker.render_html` (the public one, documented there)
    gives it first-token share, confidence, entropy and previous-token score of every call.

    Args:
        source, tokens, query_tokens, key_tokens, layers, title, compression_level, pool_above,
            pool_size, top_keys, head_scores: as in :func:`attention_hooker.render_html`; the
            tokens go on the axes by :class:`~attention_hooker.views.labels.AxisLabels`.
        scores: per-head scores of each call to colour the overview by (:data:`PageScores`):
            ``{layer name: [{score name: (batch, heads) numbers} per call]}``; none by default.
        color_scale, score_ranges, not_applicable, color_by: as in :func:`attention_hooker.render_html`.
        prompt_length: generation: how many of the tokens are the prompt (as in
            :func:`attention_hooker.render_html`).
        compare: the page's compare mode (:data:`~attention_hooker.views.page.compare.PageComparison`):
            B's calls beside these (A's, one per layer); the page then shows A, B and A - B.
        words: the same capture between words (``to_words``), carried beside the tokens; the
            page's "units" selector shows one or the other.
        word_scores: per-head scores of the words' calls, as ``scores``.
        units: what the page opens with: ``"tokens"`` or ``"words"`` (needs ``words``).
        image: a vision-language capture's image and its tokens
            (:func:`~attention_hooker.views.page.image_meta.image_page_meta`): the page shows the image
            tokens as a patch grid over the picture, lit by the hovered query's weights.

    Returns:
        An :class:`AttentionPage`.

    Raises:
        AttentionHookerError: as :func:`attention_hooker.render_html` does, and for scores that
            are not one number per batch item and head.

    Example:
        >>> page = render_html({"layer": [torch.rand(1, 2, 3, 3).softmax(-1)]}, tokens=["a", "b", "c"],
        ...                    scores={"layer": [{"made up": torch.ones(1, 2)}]})
        >>> page.html.startswith("<!DOCTYPE html>") and '"made up":[[1.0,1.0]]' in page.html
        True
    """
    values = values_of(source, layers=layers)
    if title is not None and not isinstance(title, str):
        raise AttentionHookerError(f"title must be a str or None, got {type(title).__name__}")
    if isinstance(compression_level, bool) or not isinstance(compression_level, int) or not 0 <= compression_level <= 9:
        raise AttentionHookerError(f"compression_level={compression_level!r} must be an int in 0..9 (zlib's levels)")
    pool_above, pool_size = positive_int(pool_above, "pool_above"), positive_int(pool_size, "pool_size")
    top_keys = positive_int(top_keys, "top_keys")
    color_scale = None if color_scale is None else one_of(color_scale, "color_scale", COLOR_SCALES)
    prompt_length = positive_int(prompt_length, "prompt_length", allow_none=True)
    if prompt_length is not None and words is not None:
        raise AttentionHookerError("prompt_length marks generated tokens, and generated tokens have no words: "
                                   "give prompt_length= or words=, not both")
    units = one_of(units, "units", ("tokens", "words"))
    if units == "words" and words is None:
        raise AttentionHookerError("units='words' opens the page on words: pass words=to_words(capture, word_ids) too")
    calls = _PageCalls(_axis_labels(source, tokens, query_tokens, key_tokens), scores, pool_above, pool_size, top_keys)
    layer_meta = [{"name": name, "calls": [calls.entry(name, i, weights) for i, weights in enumerate(layer_calls)]}
                  for name, layer_calls in values.items()]
    _add_head_scores(layer_meta, head_scores)
    extra = {} if compare is None else {"compare": comparison_meta(compare, calls, values, layer_meta)}
    if extra:  # B's layer names and the two captures' names, as the page carries text
        extra["compare"]["names"] = [_page_text(n) for n in extra["compare"]["names"]]
        for layer in extra["compare"]["layers"]:
            layer["name"], layer["short"] = _page_text(layer["name"]), _page_text(layer["short"])
    word_meta = None if words is None else _word_layers(words, layer_meta, word_scores, calls)
    if prompt_length is not None:
        longest = max((call["shape"][-1] for layer in layer_meta for call in layer["calls"]), default=0)
        if prompt_length > longest:
            raise AttentionHookerError(f"prompt_length={prompt_length} is more than the {longest} keys of the "
                                       "longest call; it counts the prompt's tokens, the rest being generated")
    about = score_meta(layer_meta, score_ranges, not_applicable, color_by, _page_text)
    for layer, short in zip(layer_meta, short_layer_names([layer["name"] for layer in layer_meta])):
        layer["short"] = _page_text(short)  # row labels and the layer selector; the full name on hover
        layer["name"] = _page_text(layer["name"])
    for layer, shown in zip(word_meta or (), layer_meta):
        layer["short"], layer["name"] = shown["short"], shown["name"]
    title = _page_text(title or "Attention")
    if word_meta is not None:
        extra.update({"words": {"layers": word_meta}, "units": units})
    if prompt_length is not None:  # generation: the tokens from here on were generated
        extra["promptLength"] = prompt_length
    extra.update(about)  # scoreRanges, scoreNotes, colourBy (score_meta)
    if image is not None:
        extra["image"] = _checked_image(image, layer_meta)
        _carry_long_image_rows(values, layer_meta, extra["image"], calls)
    color_scale = color_scale or calls.opening_scale()
    return AttentionPage(_document(title, layer_meta, calls, compression_level, color_scale, extra), title)


def _checked_image(image: Mapping[str, object], layer_meta: list) -> dict:
    """The page's ``image`` entry, checked: made by ``image_page_meta``, its keys those of some call."""
    needed = ("src", "width", "height", "batch", "keys", "positions", "boxes", "cells", "panels")
    if not isinstance(image, Mapping) or any(k not in image for k in needed):
        raise AttentionHookerError("image= takes image_page_meta(picture, tokens, keys=...)'s dict (it lacks "
                                   f"{[k for k in needed if not isinstance(image, Mapping) or k not in image]})")
    if not str(image["src"]).startswith("data:image/"):
        raise AttentionHookerError("image= carries its picture inline (a data: URI); the page fetches nothing")
    keys = int(image["keys"])
    if not any(call["shape"][-1] == keys for layer in layer_meta for call in layer["calls"]):
        raise AttentionHookerError(f"image= places its tokens on {keys} keys, but no call of the page has {keys} keys")
    out = dict(image)
    out["panels"] = [dict(p, name=_page_text(str(p["name"]))) for p in image["panels"]]
    return out


def _carry_long_image_rows(values, layer_meta: list, image: dict, calls: "_PageCalls") -> None:
    """A long call over the image's keys travels pooled, without each image token's weight: for it the
    page carries the mean of the heads' weights on the image tokens, for every query row that is not an
    image token (``(text rows, image tokens)`` codes, one scale), as ``call["image"]``."""
    positions = torch.as_tensor(list(image["positions"]), dtype=torch.long)
    on_image = set(positions.tolist())
    batch, keys = int(image["batch"]), int(image["keys"])
    for layer, layer_calls in zip(layer_meta, values.values()):
        for entry, weights in zip(layer["calls"], layer_calls):
            if "pooled" not in entry or entry["shape"][-1] != keys or entry["shape"][0] <= batch:
                continue
            w = as_batched(weights, layer["name"])[batch].detach().to("cpu", torch.float32)  # (H, Q, K)
            rows = [q for q in range(w.shape[1]) if q not in on_image]
            shown = w[:, rows][:, :, positions].mean(0)  # (text rows, image tokens)
            codes, scales = encode_weights(shown[None, None])
            entry["image"] = {"rows": rows, "scale": round(float(scales.flatten()[0]), 7),
                              "offset": calls.payload.add(codes.numpy().tobytes())}


def _word_layers(words, layer_meta: list, word_scores: Optional[PageScores], calls: "_PageCalls") -> list:
    """The words' layers (``to_words`` of the capture) as the page carries them, beside the tokens'
    ``layer_meta``: the same layers in the same order, their calls in the same payload.

    Raises:
        AttentionHookerError: for words that lack a layer the page shows, or labels that fit none of their axes.
    """
    if hasattr(words, "weights") and not isinstance(words, Mapping):  # to_words of one tensor
        raise AttentionHookerTypeError("words= takes the words of a whole capture (to_words(capture, ...), one entry "
                                       "per layer); to_words of one tensor gives one map, which plot_attention_grid "
                                       "draws")
    word_values = values_of(words, require=False)
    missing = [layer["name"] for layer in layer_meta if layer["name"] not in word_values]
    if missing:
        raise AttentionHookerError(f"words lacks the layer(s) {missing} the page shows; make it with "
                                   "to_words() of the same capture (and the same layers=)")
    beside = _PageCalls(_axis_labels(words, None, None, None), word_scores, calls.pool_above, calls.pool_size,
                        calls.top_keys, beside=calls)
    word_meta = []
    for layer in layer_meta:
        entry = {"name": layer["name"], "calls": [beside.entry(layer["name"], i, weights)
                                                  for i, weights in enumerate(word_values[layer["name"]])]}
        if "scores" in layer:  # a head's scores given per layer (importance, ...) are the head's, in either units
            entry["scores"] = layer["scores"]
        word_meta.append(entry)
    return word_meta


def _axis_labels(source, tokens, query_tokens, key_tokens) -> AxisLabels:
    """The labels of the page's axes: those given, else a loaded capture's own; a capture that kept
    some query rows or keys labels them with their tokens. Every list must label some axis of
    some call of the capture (any layer, shown or not).

    Raises:
        AttentionHookerError: for labels that are not lists of strings, or fit no axis.
    """
    if tokens is None and query_tokens is None and key_tokens is None:
        tokens = getattr(source, "tokens", None)  # a loaded capture's own
    labels = AxisLabels(tokens, query_tokens=query_tokens, key_tokens=key_tokens, rows=selected_rows(source),
                        keys=selected_rows(source, "keys"))
    if labels.given:
        shapes = [(f"layer {name!r}", tuple(t.shape)) for name, calls in values_of(source, require=False).items()
                  for t in calls if len(t.shape) >= 2]  # a call of another shape is refused where it is drawn
        if shapes:
            labels.check(shapes, hint="pass tokens of each length (tokens=[source_tokens, target_tokens]) or "
                                      "query_tokens=/key_tokens=")
    return labels


class _PageCalls:
    """What the page carries of each call: its shape, scales, labels and scores in the page's
    metadata, its codes (or, for a long call, its pooled map and each query's largest weights)
    in the binary payload."""

    def __init__(self, labels: AxisLabels, scores: Optional[PageScores], pool_above: int, pool_size: int,
                 top_keys: int, *, beside: Optional["_PageCalls"] = None):
        """``beside``: the calls whose payload and label lists these share (the words beside the tokens)."""
        self.labels = _LabelSets(labels, None if beside is None else beside.labels.sets)
        self.scores = scores
        self.pool_above, self.pool_size, self.top_keys = pool_above, pool_size, top_keys
        self.payload = _Payload() if beside is None else beside.payload
        self.weights = self.unseen = 0  # weights not 0, and those the linear colour scale draws as 0

    def opening_scale(self) -> str:
        """The colour scale the page opens in when none is asked: log where the linear scale would
        draw most of the weights that are not 0 as 0 (long inputs, causal heads: a late row's
        weights are 1e-3 to 1e-5 of the head's largest), else linear."""
        return "log" if self.unseen > self.weights / 2 else "linear"

    def entry(self, name: str, call: int, weights) -> dict:
        """The metadata of call ``call`` of layer ``name``, its arrays added to the payload.

        Raises:
            AttentionHookerError: for weights that are not ``(batch, heads, query, key)`` with
                query and key positions, or scores of the wrong shape.
        """
        where = f"layer {name!r} call {call}"
        weights = as_batched(weights, where)
        require_positions(weights.shape, where)
        shape = list(weights.shape)
        codes, scales = encode_weights(weights)
        shown = codes[codes != NONFINITE_CODE]
        self.weights += int(shown.count_nonzero())
        self.unseen += int(((shown > 0) & (shown < _LINEAR_ZERO)).sum())
        entry = {
            "shape": shape,
            "scores": _call_scores(self.scores, name, call, shape),
            "scales": [round(float(s), 7) for s in scales.flatten()],
            **self.labels.of_call(shape),
            "nonfinite": bool((codes == NONFINITE_CODE).any()),
            "maskedKeys": _masked_keys(weights),
        }
        if not is_long(shape, self.pool_above):
            entry["offset"] = self.payload.add(codes.numpy().tobytes())
            return entry
        arrays, long_meta = encode_long_call(weights, codes, self.pool_size, self.top_keys)
        entry["pooled"] = {"shape": long_meta["shape"], "edges": long_meta["edges"],
                           "offset": self.payload.add(arrays["pooled"])}
        entry["top"] = {"k": long_meta["k"], "indexBytes": long_meta["indexBytes"],
                        "codes": self.payload.add(arrays["top_codes"]), "index": self.payload.add(arrays["top_index"]),
                        "values": self.payload.add(arrays["top_values"]), "cover": self.payload.add(arrays["cover"])}
        return entry


def _document(title: str, layer_meta: list, calls: _PageCalls, compression_level: int, color_scale: str,
              extra: Optional[dict] = None) -> str:
    """The page: the template with its styles, script, metadata (``extra`` added) and compressed payload put in."""
    meta = {
        **(extra or {}),
        "title": title,
        "colour": color_scale,  # the colour scale the page opens in
        "layers": layer_meta,
        "tokenSets": calls.labels.sets,
        "labelChars": SHOWN_CHARS,
        "encoding": {"top": _TOP_CODE, "nonfinite": NONFINITE_CODE, "scale": "log", "decades": LOG_DECADES,
                     "relativeError": round(RELATIVE_ERROR, 5)},  # encode_weights
        "bytes": calls.payload.size,
    }
    payload = base64.b64encode(zlib.compress(calls.payload.join(), compression_level)).decode("ascii")
    parts = {
        "__TITLE__": html_lib.escape(title),
        "/*__CSS__*/": _asset("view.css"),
        "/*__JS__*/": _asset("view.js"),
        # Inside <script>, "<" is written as a JSON escape so no text can close the tag.
        "__META__": json.dumps(meta, separators=(",", ":")).replace("<", "\\u003c"),
        "__PAYLOAD__": payload,
    }
    # One pass: text put in (tokens, layer names) is never searched for placeholders again.
    return _PLACEHOLDER.sub(lambda m: parts[m.group(0)], _asset("template.html"))

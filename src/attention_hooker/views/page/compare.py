"""The page's compare mode: what a page of two captures (:func:`attention_hooker.compare`) carries
besides A's calls: B's calls (drawn by the same views when the bar's "showing" selector picks B),
and each call's ``A - B`` (the compare panel: the selected head in A, in B and A - B).

``A - B`` travels as its own codes, 8 bits on a linear scale per head centred at code 127
(``code = 127 + round(127 * d / m)``, ``m`` the head's largest ``|d|``), so that heads that agree
draw exactly the centre colour instead of the noise of two rounded maps.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from ..._tensor import as_batched
from ...errors import AttentionHookerError
from ..labels import short_layer_names
from .long_calls import is_long

__all__ = ["PageComparison", "encode_difference", "decode_difference", "comparison_meta", "DIFFERENCE_MIDDLE"]

DIFFERENCE_MIDDLE = 127
_NONFINITE = 255

PageComparison = Mapping[str, object]
"""What :func:`render_html`'s ``compare=`` takes: ``{"names": (A, B), "values": {layer (A's name): B's call
(batch, heads, query, key)}, "names_b": {layer: its name in B}, "scores": B's page scores, "distance":
{layer: (batch, heads) Jensen-Shannon distances}, "colour_by": the head score the overview opens in}``;
A's calls are the page's own (one call per layer)."""


def encode_difference(difference: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(batch, heads, query, key)`` differences -> ``(uint8 codes, (batch, heads) scales)``.

    ``code = 127 + round(127 * d / scale)`` with ``scale`` the head's largest finite ``|d|`` (0 for a
    head that agrees everywhere: all codes 127); 255 marks a non-finite difference.
    :func:`decode_difference` inverts it to within ``scale / 254``.

    Example:
        >>> codes, scales = encode_difference(torch.tensor([[[[0.5, -0.25], [0.0, 0.0]]]]))
        >>> codes.flatten().tolist(), scales.tolist()
        ([254, 63, 127, 127], [[0.5]])
    """
    d = difference.detach().to("cpu", torch.float32)  # (B, H, Q, K)
    finite = torch.isfinite(d)
    clean = torch.where(finite, d, torch.zeros((), dtype=d.dtype))
    scales = clean.abs().amax(dim=(-2, -1))  # (B, H)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[..., None, None]
    codes = (clean / safe * DIFFERENCE_MIDDLE).round_().add_(DIFFERENCE_MIDDLE).clamp_(0, 2 * DIFFERENCE_MIDDLE)
    codes = codes.to(torch.uint8)
    codes[~finite] = _NONFINITE
    return codes, scales


def decode_difference(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The page's decoding of :func:`encode_difference`, in torch: ``scale * (code - 127) / 127``; NaN for 255."""
    d = (codes.float() - DIFFERENCE_MIDDLE) / DIFFERENCE_MIDDLE * scales[..., None, None]
    return torch.where(codes == _NONFINITE, torch.full_like(d, float("nan")), d)


def comparison_meta(compare: PageComparison, calls, values_a: Mapping[str, Sequence], layer_meta: List[dict]
                    ) -> Dict[str, object]:
    """The page metadata's ``"compare"`` entry; B's calls and every ``A - B`` go into ``calls``'
    payload (``calls``: the page's call encoder, holding A's; ``values_a``: A's ``{layer: [call]}``;
    ``layer_meta``: A's layers in the same order, their head scores already on them).

    Raises:
        AttentionHookerError: when ``compare`` does not hold B's call of each of A's layers with A's
            shape, or a call is long (compare pages carry whole maps).
    """
    names = tuple(compare.get("names") or ("A", "B"))
    values_b = compare.get("values")
    if not isinstance(values_b, Mapping):
        raise AttentionHookerError("compare= must hold B's calls under 'values': {layer: (batch, heads, query, key)}")
    names_b: Mapping[str, str] = compare.get("names_b") or {}
    _check_one_call(values_a)
    scores_a = calls.scores
    layers_b, differences, distances = [], [], []
    try:
        calls.scores = compare.get("scores")  # B's own per-head scores on B's calls
        for (name, (wa,)), layer in zip(values_a.items(), layer_meta):
            if name not in values_b:
                raise AttentionHookerError(f"compare= holds no call of B for layer {name!r}")
            where = f"layer {name!r} of {names[1]}"
            wb = as_batched(values_b[name], where)
            shape = layer["calls"][0]["shape"]
            if list(wb.shape) != shape:
                raise AttentionHookerError(f"{where} is {tuple(wb.shape)}; A's is {tuple(shape)}: a compare page "
                                           "shows two captures of the same tokens")
            if is_long(shape, calls.pool_above):
                raise AttentionHookerError(
                    f"layer {name!r} is {tuple(shape)}: a compare page carries whole maps, up to pool_above="
                    f"{calls.pool_above} tokens an axis; pass layers= or a larger pool_above")
            entry = calls.entry(name, 0, wb)
            layers_b.append({"name": names_b.get(name, name), "calls": [entry], **_scores_of(layer)})
            codes, scales = encode_difference(as_batched(wa).float() - wb.float())  # (B, H, Q, K)
            differences.append({"offset": calls.payload.add(codes.numpy().tobytes()),
                                "scales": [round(float(s), 9) for s in scales.flatten()]})
            per_head = (compare.get("distance") or {}).get(name)
            distances.append(None if per_head is None else
                             [[None if x != x else round(float(x), 6) for x in row] for row in per_head.tolist()])
    finally:
        calls.scores = scores_a
    for layer, short in zip(layers_b, short_layer_names([layer["name"] for layer in layers_b])):
        layer["short"] = short
    return {"names": [str(n) for n in names], "layers": layers_b, "difference": differences,
            "distance": distances, "colourBy": compare.get("colour_by")}


def _scores_of(layer: dict) -> dict:
    """A's layer-level head scores (the distances), for B's layer too."""
    return {"scores": layer["scores"]} if "scores" in layer else {}


def _check_one_call(values: Mapping[str, Sequence]) -> None:
    """A compare page shows one call per layer (the one compared)."""
    many = [name for name, calls in values.items() if len(calls) != 1]
    if many:
        raise AttentionHookerError(f"a compare page shows one call per layer; {many[0]!r} has {len(values[many[0]])}")

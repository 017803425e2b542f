"""What the page says about the per-head scores it colours the overview by: each score's range,
why a score does not apply, and the score the overview opens on.

A score bounded in ``[0, 1]`` (a share of attention, a fraction of positions) is coloured on
``[0, 1]``: a head scoring 0.01 stays dark, instead of being the brightest because no head
scored more. A score given no range is coloured on the heads' own range, and the page says so.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence

from ...errors import AttentionHookerError, AttentionHookerTypeError

__all__ = ["score_meta", "carried_scores"]


def carried_scores(layer_meta: list) -> list:
    """The names of the scores the page carries (of any call or layer), in the order the page lists them."""
    names: Dict[str, None] = {}
    for layer in layer_meta:
        for call in layer["calls"]:
            names.update(dict.fromkeys(call.get("scores") or {}))
    for layer in layer_meta:
        names.update(dict.fromkeys(layer.get("scores") or {}))
    return list(names)


def score_meta(layer_meta: list, score_ranges: Optional[Mapping[str, Sequence[float]]],
               not_applicable: Optional[Mapping[str, str]], color_by: Optional[str],
               text: Callable[[str], str]) -> dict:
    """The page's ``scoreRanges`` (``{score: [low, high]}``), ``scoreNotes`` (``{score: why it does
    not apply}``) and ``colourBy`` (the score the overview opens coloured by; ``""``: the maps).

    Args:
        layer_meta: the page's layers, their scores already on them.
        score_ranges: ``{score name: (low, high)}``, finite numbers, ``low < high``.
        not_applicable: ``{score name: why}``, a sentence shown where a head has no value.
        color_by: a score the page carries, or ``None``.
        text: how the page carries a text (``_page_text``).

    Raises:
        AttentionHookerError: for a name the page carries no score of, a range that is not two
            finite numbers with ``low < high``, or a reason that is not a string.
    """
    carried = carried_scores(layer_meta)

    def known(name, what: str) -> str:
        if not isinstance(name, str) or text(name) not in carried:
            raise AttentionHookerError(f"{what} names {name!r}, a score the page does not carry; its scores: "
                                       f"{', '.join(map(repr, carried)) or 'none'}")
        return text(name)

    score_mapping(score_ranges, "score_ranges")
    score_mapping(not_applicable, "not_applicable")
    ranges = {}
    for name, pair in (score_ranges or {}).items():
        name = known(name, "score_ranges")
        try:
            low, high = (float(x) for x in pair)
        except (TypeError, ValueError):
            low = high = math.nan
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise AttentionHookerError(f"score_ranges[{name!r}] = {pair!r} must be (low, high): two finite "
                                       "numbers, low < high")
        ranges[name] = [low, high]
    notes = {}
    for name, why in (not_applicable or {}).items():
        name = known(name, "not_applicable")
        if not isinstance(why, str) or not why.strip():
            raise AttentionHookerError(f"not_applicable[{name!r}] must be a sentence saying why, got {why!r}")
        notes[name] = text(why)
    return {"scoreRanges": ranges, "scoreNotes": notes,
            "colourBy": "" if color_by is None else known(color_by, "color_by")}


_EXAMPLES = {"score_ranges": "{'induction': (0, 1)}", "not_applicable": "{'importance': 'needs a loss'}"}


def score_mapping(given, what: str) -> Mapping:
    """``given`` (``score_ranges`` or ``not_applicable``) as a mapping of score names; ``{}`` for ``None``.

    Raises:
        AttentionHookerTypeError: for anything but a mapping.
    """
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise AttentionHookerTypeError(f"{what} must map score names to values, as {_EXAMPLES[what]}; "
                                       f"got {type(given).__name__}")
    return given

"""Labels of the views: layer names short enough to read in a row label and still telling layers
apart, and the token-to-axis rule (:class:`AxisLabels`, kept below ``io`` in ``_axis_labels`` so
that saving checks tokens the way the views place them)."""

from __future__ import annotations

from typing import List, Sequence

from .._axis_labels import (SHOWN_CHARS, AxisLabels, PositionedLabels, kept_labels, positions_of, shown_label,
                            thinned_positions, tick_label)

__all__ = ["short_layer_names", "AxisLabels", "SHOWN_CHARS", "shown_label", "thinned_positions", "kept_labels",
           "labelled", "PositionedLabels", "positions_of", "tick_label"]


def labelled(attn, tokens):
    """``(weights, labels)`` of attention that carries its labels (``to_words`` of one tensor: an
    object with ``weights`` and ``tokens``), the ``tokens`` given winning; else ``(attn, tokens)``."""
    if hasattr(attn, "weights") and hasattr(attn, "tokens"):
        return attn.weights, attn.tokens if tokens is None else tokens
    return attn, tokens


def short_layer_names(names: Sequence[str]) -> List[str]:
    """The names without the dotted parts every one of them shares at the start and at the
    end, keeping the part that differs (cutting the end off instead made every BERT row
    read "…ntion.self", and BART's encoder and decoder rows alike).

    A part that is only a number keeps the word before it (``layer.3``, not ``3``); one
    name keeps its last three parts.

    Example:
        >>> short_layer_names(["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"])
        ['layer.0', 'layer.1']
        >>> short_layer_names(["model.encoder.layers.0.self_attn", "model.decoder.layers.0.self_attn",
        ...                    "model.decoder.layers.0.encoder_attn"])
        ['encoder.layers.0.self_attn', 'decoder.layers.0.self_attn', 'decoder.layers.0.encoder_attn']
    """
    parts = [name.split(".") for name in names]
    if len(parts) < 2:
        return [".".join(p[-3:]) for p in parts]
    shortest = min(len(p) for p in parts)
    start = 0
    while start < shortest - 1 and len({p[start] for p in parts}) == 1:
        start += 1
    end = 0  # parts shared at the end, kept clear of the shared start
    while end < shortest - start - 1 and len({p[len(p) - 1 - end] for p in parts}) == 1:
        end += 1
    short = []
    for p in parts:
        kept = p[start: len(p) - end]
        if kept and kept[0].isdigit() and start > 0:
            kept = [p[start - 1]] + kept
        short.append(".".join(kept))
    if len(set(short)) < len(short):  # cannot happen for distinct names; kept as a guard
        return list(names)
    return short

"""Pictures of a comparison (:func:`attention_hooker.compare`): one head in A, in B and A - B, and
the layers x heads grid of Jensen-Shannon distances.

The views import no analysis: they read the comparison's attributes (``names``, ``tokens``,
``ranked_heads()``, ``table()``, and per layer ``a``, ``b``, ``difference``, ``head_distance``).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np

from .._checks import check_heads, positive_int, positive_number
from .._tensor import as_heads, require_positions
from ..errors import AttentionHookerError
from .labels import short_layer_names, shown_label, thinned_positions
from .plot import COLOR_SCALES, color_norm, colormap_named, figure_class, resolve_tokens, save_figure

__all__ = ["plot_head_comparison", "plot_distance_grid", "DIFFERENCE_CMAP"]

DIFFERENCE_CMAP = "RdBu_r"  # A - B: red where A attends more, blue where B does, white where they agree


def _checked_comparison(comparison):
    """``comparison``, when it is what :func:`attention_hooker.compare` returns."""
    if not all(hasattr(comparison, attr) for attr in ("ranked_heads", "table", "names", "pairs")):
        raise AttentionHookerError(
            f"expected the result of attention_hooker.compare(a, b), got {type(comparison).__name__}")
    return comparison


def plot_head_comparison(
    comparison,
    layer: Optional[str] = None,
    head: Optional[int] = None,
    *,
    batch_index: int = 0,
    tokens: Optional[Sequence[str]] = None,
    max_labels: int = 40,
    cmap: str = "viridis",
    color_scale: str = "linear",
    panel_size: float = 3.2,
    save_path: Union[str, os.PathLike, None] = None,
):
    """One head side by side: its ``(query, key)`` map in A, in B (one colour scale for both), and
    ``A - B`` on a diverging scale centred at 0 (``RdBu_r``, from ``-m`` to ``+m`` with ``m`` the
    largest difference: red where A attends more, blue where B does).

    Args:
        comparison: what :func:`attention_hooker.compare` returns.
        layer: the layer (its name in A); default: that of the most different head.
        head: the head; default: the layer's most different head.
        batch_index: which batch item.
        tokens: labels of the axes (default: the comparison's tokens).
        max_labels: at most this many labels per axis.
        cmap: colormap of A and B.
        color_scale: ``"linear"``, ``"sqrt"`` or ``"log"`` for A and B (the difference is linear).
        panel_size: inches per panel.
        save_path: file to write (folders are created; format from the extension).

    Returns:
        The ``matplotlib.figure.Figure``: three panels, each with its colour bar.

    Raises:
        AttentionHookerError: on an unknown layer, a head out of range, or a wrong option.

    Example:
        >>> import torch
        >>> from attention_hooker import compare
        >>> w = torch.rand(1, 2, 3, 3).softmax(-1)
        >>> fig = plot_head_comparison(compare({"l": w}, {"l": w.flip(-1)}), "l", 1)
        >>> [ax.get_title() for ax in fig.axes if ax.images]
        ['A', 'B', 'A - B']
    """
    Figure = figure_class()
    comparison = _checked_comparison(comparison)
    if layer is None:
        best = comparison.ranked_heads(1)[0]
        layer = best.layer
        head = best.head if head is None else head
    if layer not in comparison:
        raise AttentionHookerError(f"layer {layer!r} is not in the comparison; its layers: {list(comparison)}")
    pair = comparison[layer]
    n_heads = pair.a.shape[1]
    if head is None:
        head = pair.most_different_head or 0
    (head,) = check_heads([head], n_heads, f"layer {layer!r}")
    max_labels = positive_int(max_labels, "max_labels")
    panel_size = positive_number(panel_size, "panel_size")
    colormap = colormap_named(cmap)
    if color_scale not in COLOR_SCALES:
        raise AttentionHookerError(f"color_scale={color_scale!r} must be one of {', '.join(COLOR_SCALES)}")
    a = as_heads(pair.a, batch_index=batch_index, where=f"layer {layer!r} of {comparison.names[0]}")[head]
    b = as_heads(pair.b, batch_index=batch_index, where=f"layer {layer!r} of {comparison.names[1]}")[head]
    diff = as_heads(pair.difference, batch_index=batch_index)[head]  # (Q, K)
    require_positions(a.shape, f"layer {layer!r}")
    query_tokens, key_tokens = resolve_tokens(tokens if tokens is not None else _one_list(comparison.tokens),
                                              None, None, tuple(pair.a.shape), batch_index)
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    norm = color_norm(color_scale, 0.0, float(finite.max()) if finite.size else 1.0)
    span = float(np.abs(diff[np.isfinite(diff)]).max()) if np.isfinite(diff).any() else 0.0
    span = span if span > 0 else 1.0  # identical heads: all white, on a scale that still reads +-1
    fig = Figure(figsize=(panel_size * 3 + 2.4, panel_size + 1.2), layout="constrained")
    axes = fig.subplots(1, 3, squeeze=False)[0]
    A, B = comparison.names
    for i, (ax, panel, title) in enumerate(zip(axes, (a, b, diff), (A, B, f"{A} - {B}"))):
        if i < 2:
            image = ax.imshow(np.ma.masked_invalid(panel), cmap=colormap, norm=norm, aspect="auto",
                              interpolation="nearest")
            label = "attention weight" + ("" if color_scale == "linear" else f" ({color_scale} scale)")
        else:
            image = ax.imshow(np.ma.masked_invalid(panel), cmap=colormap_named(DIFFERENCE_CMAP), vmin=-span,
                              vmax=span, aspect="auto", interpolation="nearest")
            label = f"{A} - {B} (red: {A} attends more)"
        ax.set_title(title, fontsize=10)
        _tick_labels(ax, query_tokens, key_tokens, max_labels, show_query=i == 0)
        fig.colorbar(image, ax=ax, shrink=0.85, label=label)
    distance = float(pair.head_distance[head])
    fig.suptitle(f"{layer} head {head}: Jensen-Shannon distance {distance:.3f} "
                 f"({comparison.names[0]} vs {comparison.names[1]}, base 2: 0 same, 1 disjoint)", fontsize=10)
    save_figure(fig, save_path)
    return fig


def plot_distance_grid(
    comparison,
    *,
    title: Optional[str] = None,
    cmap: str = "magma",
    cell_size: float = 0.55,
    annotate: Optional[bool] = None,
    save_path: Union[str, os.PathLike, None] = None,
):
    """The Jensen-Shannon distance of every head: rows are layers (A's order, short names),
    columns heads, on a fixed scale from 0 (the same attention) to 1 (disjoint). Heads past a
    layer's last are grey.

    Args:
        comparison: what :func:`attention_hooker.compare` returns.
        title: the figure title (default: says what is compared).
        cmap: the colormap.
        cell_size: inches per cell.
        annotate: write each distance in its cell (default: when there are at most 400 cells).
        save_path: file to write (folders are created; format from the extension).

    Returns:
        The ``matplotlib.figure.Figure``.

    Example:
        >>> import torch
        >>> from attention_hooker import compare
        >>> w = torch.rand(1, 2, 3, 3).softmax(-1)
        >>> fig = plot_distance_grid(compare({"l0": w, "l1": w}, {"l0": w, "l1": w.flip(-1)}))
        >>> fig.axes[0].images[0].get_array().shape
        (2, 2)
    """
    Figure = figure_class()
    comparison = _checked_comparison(comparison)
    cell_size = positive_number(cell_size, "cell_size")
    table = comparison.table().numpy()  # (layers, heads)
    layers = list(comparison)
    if annotate is None:
        annotate = table.size <= 400
    colormap = colormap_named(cmap).with_extremes(bad="#d7d7d7")
    rows, cols = table.shape
    fig = Figure(figsize=(cell_size * cols + 3.2, cell_size * rows + 1.4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(table), cmap=colormap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(cols))
    ax.set_xticklabels([f"h{h}" for h in range(cols)], fontsize=7)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(short_layer_names(layers), fontsize=7)
    ax.set_xlabel("head")
    if annotate:
        for (row, col), value in np.ndenumerate(table):
            if math.isfinite(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, shrink=0.9, label="Jensen-Shannon distance\n(base 2: 0 same, 1 disjoint)")
    A, B = comparison.names
    fig.suptitle(title or f"{A} vs {B}: each head's distance", fontsize=9)
    save_figure(fig, save_path)
    return fig


def _tick_labels(ax, query_tokens, key_tokens, max_labels: int, show_query: bool) -> None:
    """Key labels below a panel, query labels left of it where ``show_query`` (thinned to ``max_labels``)."""
    ax.set_xlabel("key", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if key_tokens is not None:
        ticks = thinned_positions(len(key_tokens), max_labels)
        ax.set_xticks(ticks)
        ax.set_xticklabels([shown_label(key_tokens[i]) for i in ticks], rotation=90, fontsize=7)
    if show_query:
        ax.set_ylabel("query", fontsize=8)
        if query_tokens is not None:
            ticks = thinned_positions(len(query_tokens), max_labels)
            ax.set_yticks(ticks)
            ax.set_yticklabels([shown_label(query_tokens[i]) for i in ticks], fontsize=7)


def _one_list(tokens):
    """The comparison's tokens as a plot takes them: one list (the first of several), or ``None``."""
    if tokens and isinstance(tokens[0], list):
        return tokens[0]
    return tokens
